"""Assemble the full :class:`cxr_edge.manifest.Manifest` of an exported model.

Everything comes from one place each: preprocessing from the training run's config, CAM weights
from the model's own classifier, thresholds from :mod:`export.thresholds`, numbers from the
verification step. Provenance records what a reader needs to trust (or distrust) the bundle.
"""
from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from typing import Any, Mapping, Sequence

import numpy as np

from cxr_edge.manifest import CamSpec, Manifest, PreprocessSpec

#: Head identity tolerance written into the manifest (checked by ``load_bundle`` on a probe image).
#: fp32: the head is the same float Gemm, only summation order differs (~1e-6 measured).
#: int8: the head is kept float and reads the very same float ``features`` tensor, so the identity
#: holds as tightly; a little more room covers the QDQ graph's different kernel choices.
HEAD_ATOL = {"fp32": 1e-3, "int8": 2e-3}


def tool_versions() -> dict[str, str]:
    """Versions of everything that shaped the bytes of the bundle."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "onnxruntime-extensions", "numpy",
                 "opencv-python-headless", "cxr-edge"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "cxr-edge" not in out:
        import cxr_edge

        out["cxr-edge"] = getattr(cxr_edge, "__version__", "unknown")
    return out


def build_manifest(*, model_id: str, labels: Sequence[str], thresholds: Sequence[float | None], spec: PreprocessSpec,
                   weights: np.ndarray, bias: np.ndarray, precision: str, logits_output: str = "logits",
                   features_output: str = "features", provenance: Mapping[str, Any] | None = None,
                   head_check_atol: float | None = None) -> Manifest:
    """A validated manifest (checksum placeholder; :func:`cxr_edge.bundle.write_bundle` fills it)."""
    prov = dict(provenance or {})
    prov.setdefault("precision", precision)
    prov.setdefault("export_date", _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
    prov.setdefault("tool_versions", tool_versions())
    cam = CamSpec(method="weights", features_output=features_output, weights=np.asarray(weights, np.float32),
                  bias=np.asarray(bias, np.float32),
                  head_check_atol=head_check_atol if head_check_atol is not None else HEAD_ATOL[precision])
    manifest = Manifest(model_id=model_id, labels=tuple(labels), thresholds=tuple(None if t is None else float(t) for t in thresholds),
                        preprocessing=spec, cam=cam, logits_output=logits_output, model_sha256="0" * 64,
                        provenance=_jsonable(prov))
    manifest.validate()
    return manifest


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (the manifest is strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
