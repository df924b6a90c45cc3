"""MobileNetV3-Large / -Small (Howard et al., ICCV 2019), rearranged for exact CAMs.

The paper's head is conv1x1 (960 / 576) -> pool -> 1x1 conv (1280 / 1024, h-swish) -> linear. Here
that second 1x1 conv (with BN) runs BEFORE the global pool, so ``features`` is N x 1280 x 7 x 7
(Large) or N x 1024 x 7 x 7 (Small) and nothing but the classifier follows the pool. This costs
49x the MACs of that one layer (about +60 M MACs for Large at 224 px) and changes no parameter count
beyond the BN.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import BlockSpec, CamNet, ConvBNAct, build_blocks, init_weights
from .registry import ModelConfig, register_model

R, H = "relu", "hswish"
# (kernel, expanded channels, out channels, SE, activation, stride) — Tables 1 and 2 of the paper.
LARGE: tuple[BlockSpec, ...] = tuple(BlockSpec(*row) for row in (
    (3, 16, 16, False, R, 1), (3, 64, 24, False, R, 2), (3, 72, 24, False, R, 1),
    (5, 72, 40, True, R, 2), (5, 120, 40, True, R, 1), (5, 120, 40, True, R, 1),
    (3, 240, 80, False, H, 2), (3, 200, 80, False, H, 1), (3, 184, 80, False, H, 1), (3, 184, 80, False, H, 1),
    (3, 480, 112, True, H, 1), (3, 672, 112, True, H, 1),
    (5, 672, 160, True, H, 2), (5, 960, 160, True, H, 1), (5, 960, 160, True, H, 1),
))
SMALL: tuple[BlockSpec, ...] = tuple(BlockSpec(*row) for row in (
    (3, 16, 16, True, R, 2), (3, 72, 24, False, R, 2), (3, 88, 24, False, R, 1),
    (5, 96, 40, True, H, 2), (5, 240, 40, True, H, 1), (5, 240, 40, True, H, 1),
    (5, 120, 48, True, H, 1), (5, 144, 48, True, H, 1),
    (5, 288, 96, True, H, 2), (5, 576, 96, True, H, 1), (5, 576, 96, True, H, 1),
))


class MobileNetV3(CamNet):
    def __init__(self, specs: tuple[BlockSpec, ...], last_conv: int, head_ch: int, num_classes: int = 14,
                 in_chans: int = 1, drop_rate: float = 0.2, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.stem = ConvBNAct(in_chans, 16, 3, 2, act=H)
        self.blocks = build_blocks(16, specs, "mbv3", drop_path_rate)
        self.last_conv = ConvBNAct(specs[-1].out_ch, last_conv, 1, act=H)
        self.head_conv = ConvBNAct(last_conv, head_ch, 1, act=H)  # before the pool: exact CAM
        self.num_features = head_ch
        self.classifier = nn.Linear(head_ch, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_conv(self.last_conv(self.blocks(self.stem(x))))


_REF = "Howard et al., Searching for MobileNetV3, ICCV 2019 (arXiv:1905.02244)"


@register_model(ModelConfig("mobilenetv3_large", "student", 224, 1280,
                            "MobileNetV3-Large 1.0, 1x1 head conv (1280, h-swish) before the pool", _REF))
def mobilenetv3_large(num_classes: int = 14, in_chans: int = 1, **kw) -> MobileNetV3:
    return MobileNetV3(LARGE, 960, 1280, num_classes, in_chans, **kw)


@register_model(ModelConfig("mobilenetv3_small", "student", 224, 1024,
                            "MobileNetV3-Small 1.0, 1x1 head conv (1024, h-swish) before the pool", _REF))
def mobilenetv3_small(num_classes: int = 14, in_chans: int = 1, **kw) -> MobileNetV3:
    return MobileNetV3(SMALL, 576, 1024, num_classes, in_chans, **kw)
