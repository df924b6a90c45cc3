"""A small MobileNet-style CAM network for tests and quantization benchmarks.

Why here: the export tests and the INT8 speed/accuracy measurements need a model with the same
``features`` / ``head`` / ``classifier`` contract as ``models/`` (conv-BN-ReLU stem, depthwise
separable and inverted-residual blocks, GAP + linear head) without depending on that package.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project (linear), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(_cbr(cin, mid, 1), _cbr(mid, mid, 3, stride, groups=mid), _cbr(mid, cout, 1, act=False))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.skip else y


#: (expand ratio, output channels, repeats, stride) per stage, after a stride-2 stem of ``width`` channels.
#: TINY: total stride 8, 6 quantizable convs + head - the unit-test model (seconds to quantize).
#: MOBILE: MobileNetV2-like depth, total stride 32 (224 px -> 7 x 7) - the INT8 speed benchmark.
TINY_STAGES = ((1, 16, 1, 1), (4, 32, 1, 2), (4, 64, 1, 2))
MOBILE_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))


class TinyCamNet(nn.Module):
    """MobileNetV2-style CAM net: stem, inverted residuals, 1x1 conv to ``4 x`` width, ReLU'd features."""

    def __init__(self, num_classes: int = 14, in_chans: int = 1, width: int = 16,
                 stages: Sequence[tuple[int, int, int, int]] = TINY_STAGES, drop_rate: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cbr(in_chans, width, 3, 2)]
        cin = width
        for expand, cout, repeats, stride in stages:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.num_features = cin * 4
        layers.append(_cbr(cin, self.num_features, 1))
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(features.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def settle_batchnorm(model: nn.Module, batch: np.ndarray | torch.Tensor, seed: int = 0) -> nn.Module:
    """Give a randomly initialised model realistic BatchNorm statistics from real inputs.

    Random init leaves running mean 0 / var 1, so activations drift in scale layer after layer and
    an INT8 test would measure nothing realistic. A few train-mode passes (momentum None = exact
    cumulative average) fix the statistics; weights are untouched. Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(batch, dtype=np.float32))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    model(x)
    return model.eval()


def make_toy_model(num_classes: int = 14, in_chans: int = 1, *, stages: Sequence[tuple[int, int, int, int]] = TINY_STAGES,
                   width: int = 16, seed: int = 0, bn_batch: np.ndarray | None = None,
                   positive_head: bool = True) -> TinyCamNet:
    """A seeded toy model that behaves like a trained CAM net for INT8 purposes.

    ``bn_batch`` (real preprocessed images) settles the BatchNorm statistics. ``positive_head``
    makes the classifier weights non-negative: a trained CAM head weighs ReLU features mostly
    positively (maps of positive evidence); random-sign weights would give mostly-empty ReLU'd
    CAMs whose correlation measures noise, not quantization.
    """
    torch.manual_seed(seed)
    model = TinyCamNet(num_classes, in_chans, width, stages)
    if bn_batch is not None:
        settle_batchnorm(model, bn_batch, seed)
    if positive_head:
        with torch.no_grad():
            model.classifier.weight.abs_()
    return model.eval()


def synthetic_radiographs(n: int, size: int = 160, seed: int = 0) -> list[np.ndarray]:
    """``n`` smooth [0, 1] float32 gray images (two bright 'lung' ellipses, soft blobs, noise).

    Only for tests that must run without the shared real data (graph checks, dynamic batch);
    accuracy claims are always measured on real radiographs.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        img = 0.25 + 0.1 * rng.random() * yy
        for cx in (0.3, 0.7):
            cx += rng.normal(0, 0.03)
            img += 0.35 * np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        for _ in range(3):
            bx, by, r = rng.random(), rng.random(), 0.03 + 0.08 * rng.random()
            img += rng.normal(0, 0.15) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * r * r))
        img += rng.normal(0, 0.01, img.shape)
        out.append(np.clip(img, 0.0, 1.0).astype(np.float32))
    return out
