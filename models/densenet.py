"""DenseNet-121/161 (Huang et al., CVPR 2017) with torchvision / timm parameter names, so the shared
``densenet121-nih1071`` teacher state dict loads with ``strict=True``.

``model.features`` is the torchvision ``nn.Sequential`` (conv0 ... norm5) with a parameter-free
``relu5`` appended, so ``model.features(x)`` is relu(norm5(...)) — the teacher's ``features`` output —
and ``state_dict`` keys are unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .layers import CamNet
from .registry import ModelConfig, register_model


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) -> BN-ReLU-3x3 conv producing ``growth`` new channels."""

    def __init__(self, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs."""

    def __init__(self, num_layers: int, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(in_ch + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.values():
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_ch))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(CamNet):
    def __init__(self, growth: int, blocks: tuple[int, ...], init_features: int, num_classes: int = 14,
                 in_chans: int = 1, bn_size: int = 4, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(in_chans, init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        ch = init_features
        for i, n in enumerate(blocks):
            layers[f"denseblock{i + 1}"] = _DenseBlock(n, ch, growth, bn_size)
            ch += n * growth
            if i != len(blocks) - 1:
                layers[f"transition{i + 1}"] = _Transition(ch, ch // 2)
                ch //= 2
        layers["norm5"] = nn.BatchNorm2d(ch)
        layers["relu5"] = nn.ReLU(inplace=False)  # no parameters: state-dict keys stay torchvision's
        self.features = nn.Sequential(layers)
        self.num_features = ch
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)


_REF = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017 (arXiv:1608.06993)"


@register_model(ModelConfig("densenet121", "teacher", 224, 1024,
                            "DenseNet-121 (growth 32, blocks 6-12-24-16); torchvision key names", _REF))
def densenet121(num_classes: int = 14, in_chans: int = 1, **kw) -> DenseNet:
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes, in_chans, **kw)


@register_model(ModelConfig("densenet161", "teacher", 224, 2208,
                            "DenseNet-161 (growth 48, blocks 6-12-36-24); torchvision key names", _REF))
def densenet161(num_classes: int = 14, in_chans: int = 1, **kw) -> DenseNet:
    return DenseNet(48, (6, 12, 36, 24), 96, num_classes, in_chans, **kw)


__all__ = ["DenseNet", "densenet121", "densenet161"]
