"""Shared building blocks: the CAM-contract base class, conv-BN-act, squeeze-excite, inverted
residual (MobileNetV2/V3, EfficientNet, EEEA-Net all use it), stochastic depth, default init."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ActLayer = Callable[[], nn.Module]

ACTIVATIONS: dict[str, ActLayer] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "hswish": lambda: nn.Hardswish(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
}


class CamNet(nn.Module):
    """Base of every model here. Subclasses provide ``features(x) -> N x C x h x w`` (a method or,
    for the torchvision-named DenseNet, a submodule) and ``self.classifier: nn.Linear``.

    ``head`` is exactly global-average-pool -> dropout (training only) -> classifier, so in eval mode
    ``logits == features.mean((2, 3)) @ W.T + b`` and a class activation map is ``W[c] . features``.
    """

    classifier: nn.Linear
    drop_rate: float = 0.0
    num_features: int = 0

    def head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        if self.drop_rate > 0.0:
            pooled = F.dropout(pooled, p=self.drop_rate, training=self.training)
        return self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[attr-defined]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (e.g. to fine-tune on another label set)."""
        self.classifier = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional activation, 'same' padding for odd kernels."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: str | None = "relu") -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(ACTIVATIONS[act]())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: GAP -> 1x1 reduce -> act -> 1x1 expand -> gate -> scale."""

    def __init__(self, channels: int, squeeze: int, act: str = "relu", gate: str = "hardsigmoid") -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = ACTIVATIONS[act]()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid() if gate == "hardsigmoid" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block: kernel, expanded width, output width, SE, activation, stride."""

    kernel: int
    exp_ch: int
    out_ch: int
    se: bool
    act: str
    stride: int


class InvertedResidual(nn.Module):
    """(1x1 expand) -> kxk depthwise -> (SE) -> 1x1 project (linear), residual when shapes allow.

    ``se_style`` "mbv3" squeezes to make_divisible(exp/4) with ReLU + hard-sigmoid; "effnet"
    squeezes to in_ch/4 with SiLU + sigmoid, as in the respective papers.
    """

    def __init__(self, in_ch: int, spec: BlockSpec, se_style: str = "mbv3", drop_path: float = 0.0) -> None:
        super().__init__()
        self.use_residual = spec.stride == 1 and in_ch == spec.out_ch
        self.expand = ConvBNAct(in_ch, spec.exp_ch, 1, act=spec.act) if spec.exp_ch != in_ch else nn.Identity()
        self.dw = ConvBNAct(spec.exp_ch, spec.exp_ch, spec.kernel, spec.stride, groups=spec.exp_ch, act=spec.act)
        if not spec.se:
            self.se: nn.Module = nn.Identity()
        elif se_style == "mbv3":
            self.se = SqueezeExcite(spec.exp_ch, make_divisible(spec.exp_ch / 4), "relu", "hardsigmoid")
        else:
            self.se = SqueezeExcite(spec.exp_ch, max(1, in_ch // 4), "swish", "sigmoid")
        self.project = ConvBNAct(spec.exp_ch, spec.out_ch, 1, act=None)
        self.drop_path = DropPath(drop_path) if self.use_residual and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + self.drop_path(y) if self.use_residual else y


def build_blocks(in_ch: int, specs: Sequence[BlockSpec], se_style: str = "mbv3",
                 drop_path_rate: float = 0.0) -> nn.Sequential:
    """Chain blocks; stochastic depth grows linearly with depth up to ``drop_path_rate``."""
    blocks = []
    n = len(specs)
    for i, spec in enumerate(specs):
        blocks.append(InvertedResidual(in_ch, spec, se_style, drop_path_rate * i / max(1, n - 1)))
        in_ch = spec.out_ch
    return nn.Sequential(*blocks)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, BN gamma 1 / beta 0, small-normal linears, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
