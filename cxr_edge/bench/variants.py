"""Which bundle files a ``--model`` / ``--format`` request means, and which execution provider.

Rules (the bench never substitutes one file for another):

* The file named by ``--model`` is benchmarked exactly as named (``--model X.fp32.onnx`` measures
  ``X.fp32.onnx``), whatever its name says.
* A bundle's precision comes from its manifest, ``provenance.precision`` (written by the export),
  then ``provenance.format``; without either, from its graph (quantize/dequantize or QLinear ops =
  int8, float16 weights = fp16, else fp32). ``format_source`` says which. The file name is never
  trusted for it.
* Siblings of the same family (``X.onnx``, ``X.fp32.onnx``, ``X.fp16.onnx``, ``X.int8.onnx``) that
  exist are added: by default the fp32 and int8 ones; with ``--format`` exactly the listed formats
  (the named file too is then kept only if its precision is listed). Every format asked for and
  not found, and every file left out, is reported in ``skipped`` with the reason. A sibling whose
  name says one precision and whose manifest another is left out; a named file is measured and
  flagged (``note``).
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
    format_source: str = ""
    named: bool = False
    note: str | None = None


DEFAULT_FORMATS = ("fp32", "int8")


def _stem(path: Path) -> tuple[Path, str | None]:
    """(path of the family's plain ``X.onnx``, format named by the file name or None)."""
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
    """``provenance.precision`` (or ``provenance.format``) of a bundle's manifest, if any."""
    fmt, source = bundle_precision(path)
    return fmt if source.startswith("provenance") else None


def bundle_precision(path: str | os.PathLike) -> tuple[str | None, str]:
    """(fp32/fp16/int8 or None, where that came from); read without onnxruntime or onnx."""
    from ..bundle import read_manifest

    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "unreadable"
    try:
        manifest = read_manifest(data, verify_checksum=False)
    except Exception:  # not a bundle; load_bundle reports it properly later
        manifest = None
    if manifest is not None:
        for key in ("precision", "format"):
            value = manifest.provenance.get(key)
            if value:
                return str(value).lower(), f"provenance.{key}"
    try:
        from .onnxwalk import parse_model

        graph = parse_model(data)
    except Exception:
        return None, "unreadable graph"
    ops = {n.op_type for n in graph.nodes}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
              "MatMulInteger", "QGemm"}:
        return "int8", "graph (quantization ops)"
    float_inits = [i for i in graph.initializers.values() if i.data_type in (1, 10, 11, 16)]
    if float_inits and sum(i.data_type == 10 for i in float_inits) > len(float_inits) / 2:
        return "fp16", "graph (float16 weights)"
    return "fp32", "graph (float32 weights, no quantization ops)"


def resolve_variants(models: Sequence[str], formats: Sequence[str] | None = None
                     ) -> tuple[list[Variant], list[dict[str, Any]]]:
    """Bundle files to measure for each ``--model`` (module rules) and what was left out, and why."""
    if formats is not None:
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise InvalidArgumentError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    wanted = tuple(formats) if formats is not None else DEFAULT_FORMATS
    listed = ",".join(wanted)
    variants: list[Variant] = []
    skipped: list[dict[str, Any]] = []

    def seen(path: Path) -> bool:
        return any(Path(v.path).resolve() == path.resolve() for v in variants)

    for model in models:
        named = Path(model)
        base, name_hint = _stem(named)
        group = str(base)
        found: set[str] = set()
        if not named.is_file():
            skipped.append({"model": group, "format": name_hint or "?", "path": str(named),
                            "reason": f"{named.name} does not exist"})
        elif not seen(named):
            fmt, source = bundle_precision(named)
            fmt = fmt or "unknown"
            note = (f"file name says {name_hint} but its {source} says {fmt}; measured as {fmt}"
                    if name_hint and name_hint != fmt else None)
            if formats is None or fmt in formats:
                variants.append(Variant(group, fmt, str(named), source, True, note))
                found.add(fmt)
            else:
                skipped.append({"model": group, "format": fmt, "path": str(named),
                                "reason": f"{named.name} is {fmt} ({source}), not in --format {listed}"})
        candidates = [(base, None)] + [(_sibling(base, f), f) for f in FORMATS]
        for path, hint in candidates:
            if not path.is_file() or seen(path) or path.resolve() == named.resolve():
                continue
            fmt, source = bundle_precision(path)
            if fmt is None:
                continue
            if hint and fmt != hint:
                skipped.append({"model": group, "format": hint, "path": str(path),
                                "reason": f"file name says {hint} but its manifest says format={fmt!r} ({source}); "
                                          "not measured"})
                continue
            if fmt in wanted and fmt not in found:
                variants.append(Variant(group, fmt, str(path), source, False))
                found.add(fmt)
        for fmt in wanted:
            if fmt in found or any(s["model"] == group and s["format"] == fmt for s in skipped):
                continue
            sib = _sibling(base, fmt)
            extra = f"; {base.name} is not {fmt}" if base.is_file() else ""
            skipped.append({"model": group, "format": fmt, "path": str(sib),
                            "reason": f"no {fmt} bundle in this family ({sib.name} does not exist{extra})"})
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
