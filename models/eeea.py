"""EEEA-Net-C2-class student: a searched MobileNetV3-space network, the default student.

EEEA-Net (Termritthikun et al., "EEEA-Net: An Early Exit Evolutionary Neural Architecture Search",
Engineering Applications of Artificial Intelligence, 2021; used as the student in "Explainable Knowledge
Distillation for On-Device Chest X-Ray Classification") builds its ImageNet-scale models as
subnets of the Once-for-All MobileNetV3 space at width 1.2 (the authors' code loads an OFA /
NSGANetV2 ``net.config``): per block a kernel in {3, 5, 7} and expansion in {3, 4, 6}, 2-4 blocks per stage,
squeeze-excite in the 40/112/160-base stages, h-swish from the 80-base stage on.

This is a RE-IMPLEMENTATION OF THAT CLASS, not the published genotype (that net.config was
not available to us). The per-block table below is one point of that search space,
chosen for ~4.7 M parameters (14 outputs) and ~0.3 GMACs at 224 x 224, 1 input channel. Two
changes for exact class activation maps and budget: OFA's final-expand + post-pool "feature mix"
pair is replaced by one 1x1 conv (192 -> 1280, BN, h-swish) BEFORE the global pool, and nothing
follows the pool but the classifier. Downsampling: the stem and four stages stride 2 (five
stride-2 steps in all, 224 -> 7).
Only depthwise/1x1 convs, BatchNorm, ReLU/h-swish/h-sigmoid: fast on CPU, clean ONNX export.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import BlockSpec, CamNet, ConvBNAct, build_blocks, init_weights, make_divisible
from .registry import ModelConfig, register_model

STEM_CH = 24
# One stage per row group: (kernel, expansion ratio, out channels, squeeze-excite, activation, stride).
# Widths follow OFA-MobileNetV3 x1.2 (24, 32, 48, 96, 136, 192); the first block of each stage strides.
EEEA_C2_GENOTYPE: tuple[tuple[tuple[int, float, int, bool, str, int], ...], ...] = (
    # stage 0, 112 px: depthwise-separable entry block
    ((3, 1, 24, False, "relu", 1),),
    # stage 1, 56 px
    ((3, 3, 32, False, "relu", 2), (3, 3, 32, False, "relu", 1)),
    # stage 2, 28 px, SE
    ((5, 3, 48, True, "relu", 2), (3, 3, 48, True, "relu", 1), (5, 3, 48, True, "relu", 1)),
    # stage 3, 14 px, h-swish
    ((5, 4, 96, False, "hswish", 2), (3, 3, 96, False, "hswish", 1), (7, 3, 96, False, "hswish", 1)),
    # stage 4, 14 px, SE + h-swish
    ((3, 4, 136, True, "hswish", 1), (5, 3, 136, True, "hswish", 1), (7, 4, 136, True, "hswish", 1)),
    # stage 5, 7 px, SE + h-swish
    ((7, 6, 192, True, "hswish", 2), (5, 6, 192, True, "hswish", 1), (3, 6, 192, True, "hswish", 1),
     (5, 4, 192, True, "hswish", 1)),
)
HEAD_CH = 1280


def genotype_to_specs(genotype=EEEA_C2_GENOTYPE, stem_ch: int = STEM_CH) -> list[BlockSpec]:
    """Expand (kernel, ratio, out, se, act, stride) rows into absolute-width block specs."""
    specs, in_ch = [], stem_ch
    for stage in genotype:
        for k, ratio, out, se, act, stride in stage:
            specs.append(BlockSpec(k, make_divisible(in_ch * ratio), out, se, act, stride))
            in_ch = out
    return specs


class EEEANet(CamNet):
    def __init__(self, num_classes: int = 14, in_chans: int = 1, drop_rate: float = 0.2,
                 drop_path_rate: float = 0.0, genotype=EEEA_C2_GENOTYPE, head_ch: int = HEAD_CH) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        specs = genotype_to_specs(genotype)
        self.stem = ConvBNAct(in_chans, STEM_CH, 3, 2, act="hswish")
        self.blocks = build_blocks(STEM_CH, specs, "mbv3", drop_path_rate)
        last = specs[-1].out_ch
        self.head_conv = ConvBNAct(last, head_ch, 1, act="hswish")
        self.num_features = head_ch
        self.classifier = nn.Linear(head_ch, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_conv(self.blocks(self.stem(x)))


@register_model(ModelConfig(
    "eeea_c2", "student", 224, HEAD_CH,
    "EEEA-Net-C2-class searched MobileNetV3-space net (mixed 3/5/7 kernels, SE, h-swish); default student",
    "Termritthikun et al., EEEA-Net: An Early Exit Evolutionary Neural Architecture Search, "
    "Eng. Appl. of Artificial Intelligence (2021); re-implementation of the class, not the published genotype"))
def eeea_c2(num_classes: int = 14, in_chans: int = 1, **kw) -> EEEANet:
    return EEEANet(num_classes, in_chans, **kw)
