"""Which bundle files a ``--model`` / ``--format`` request means, and which execution provider.

Naming convention: ``X.onnx`` is the FP32 bundle, ``X.int8.onnx`` (``X.fp16.onnx``...) its siblings.
A bundle's manifest ``provenance.format`` wins over its file name when both exist.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidArgumentError

FORMATS = ("fp32", "fp16", "int8")
DEVICE_PROVIDERS = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider", "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "nnapi": "NnapiExecutionProvider", "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider", "acl": "ACLExecutionProvider", "armnn": "ArmNNExecutionProvider",
}


class ProviderUnavailableError(InvalidArgumentError):
    """The requested execution provider is not in this onnxruntime build (exit code 2)."""

    code = "provider_unavailable"


@dataclass(frozen=True)
class Variant:
    """One bundle file to benchmark: ``group`` ties the FP32/INT8 siblings of one model together."""

    group: str
    format: str
    path: str


def _stem(path: Path) -> tuple[Path, str | None]:
    """(path of the FP32 sibling, format named by the file name or None)."""
    name = path.name
    for fmt in FORMATS:
        suffix = f".{fmt}.onnx"
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".onnx"), fmt
    return path, None


def _sibling(base: Path, fmt: str) -> Path:
    stem = base.name[:-5] if base.name.endswith(".onnx") else base.name
    return base.with_name(f"{stem}.{fmt}.onnx")


def declared_format(path: str | os.PathLike) -> str | None:
    """``provenance.format`` of a bundle's manifest (read without onnxruntime), if any."""
    from ..bundle import read_manifest

    try:
        manifest = read_manifest(Path(path).read_bytes(), verify_checksum=False)
    except Exception:  # unreadable here; load_bundle reports it properly later
        return None
    fmt = manifest.provenance.get("format")
    return str(fmt).lower() if fmt else None


def resolve_variants(models: Sequence[str], formats: Sequence[str]) -> tuple[list[Variant], list[dict[str, Any]]]:
    """Bundle files for each model x format that exist, and a list of what was skipped and why."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise InvalidArgumentError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    variants: list[Variant] = []
    skipped: list[dict[str, Any]] = []
    for model in models:
        base, _ = _stem(Path(model))
        group = str(base)
        for fmt in formats:
            path = base if fmt == "fp32" else _sibling(base, fmt)
            if Path(model).resolve() == path.resolve() or path.is_file():
                declared = declared_format(path) if path.is_file() else None
                if declared and declared != fmt:
                    skipped.append({"model": group, "format": fmt, "path": str(path),
                                    "reason": f"file name says {fmt} but its manifest says format={declared!r}"})
                    continue
                if any(v.path == str(path) for v in variants):
                    continue
                variants.append(Variant(group=group, format=fmt, path=str(path)))
            else:
                skipped.append({"model": group, "format": fmt, "path": str(path),
                                "reason": f"no {fmt} sibling ({path.name} does not exist)"})
    return variants, skipped


def resolve_providers(device: str | None, provider: str | None) -> list[str]:
    """``--device cpu|cuda|...`` or ``--provider NAME`` -> provider list; typed error when unavailable."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider:
        wanted = provider
    else:
        key = (device or "cpu").lower()
        if key not in DEVICE_PROVIDERS:
            raise InvalidArgumentError(f"unknown device {device!r}; known devices: {', '.join(DEVICE_PROVIDERS)} "
                                       "(or pass --provider <ExecutionProviderName>)")
        wanted = DEVICE_PROVIDERS[key]
    if wanted not in available:
        raise ProviderUnavailableError(f"execution provider {wanted} is not available in this onnxruntime "
                                       f"{ort.__version__} build; available: {', '.join(available)}")
    # CPU stays as the fallback for ops another provider does not implement (onnxruntime's own default)
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
