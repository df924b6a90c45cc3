"""EfficientNet-B0 (Tan & Le, ICML 2019): MBConv blocks with squeeze-excite (in_ch / 4, SiLU +
sigmoid), SiLU everywhere, 1x1 head conv to 1280 before the global pool (as in the paper, so the
CAM is exact without changes). Stochastic depth via ``drop_path_rate`` (default 0.0 here)."""
from __future__ import annotations

import torch
from torch import nn

from .layers import BlockSpec, CamNet, ConvBNAct, build_blocks, init_weights
from .registry import ModelConfig, register_model

# (expansion ratio, kernel, stride of the first block, out channels, repeats) — Table 1 of the paper.
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def _b0_specs(stem_ch: int = 32) -> list[BlockSpec]:
    specs, in_ch = [], stem_ch
    for ratio, k, stride, out, repeats in B0_STAGES:
        for i in range(repeats):
            specs.append(BlockSpec(k, in_ch * ratio, out, True, "swish", stride if i == 0 else 1))
            in_ch = out
    return specs


class EfficientNet(CamNet):
    def __init__(self, num_classes: int = 14, in_chans: int = 1, drop_rate: float = 0.2,
                 drop_path_rate: float = 0.0, head_ch: int = 1280) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        specs = _b0_specs(32)
        self.stem = ConvBNAct(in_chans, 32, 3, 2, act="swish")
        self.blocks = build_blocks(32, specs, "effnet", drop_path_rate)
        self.head_conv = ConvBNAct(specs[-1].out_ch, head_ch, 1, act="swish")
        self.num_features = head_ch
        self.classifier = nn.Linear(head_ch, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_conv(self.blocks(self.stem(x)))


@register_model(ModelConfig("efficientnet_b0", "student", 224, 1280, "EfficientNet-B0 (MBConv + SE, SiLU)",
                            "Tan & Le, EfficientNet: Rethinking Model Scaling for CNNs, ICML 2019 "
                            "(arXiv:1905.11946)"))
def efficientnet_b0(num_classes: int = 14, in_chans: int = 1, **kw) -> EfficientNet:
    return EfficientNet(num_classes, in_chans, **kw)
