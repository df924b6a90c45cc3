"""The bundle manifest: the one source of truth shared by training, export and the runtime.

A manifest is JSON stored in the ONNX model's ``metadata_props`` under :data:`MANIFEST_KEY`.
Training reads :class:`PreprocessSpec` to prepare pixels, export writes the whole manifest,
the runtime and the benchmark read it. Nothing downstream guesses a number the manifest holds.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import ManifestError

MANIFEST_KEY = "cxr_edge.manifest"
FORMAT_NAME = "cxr-edge-bundle"
FORMAT_VERSION = 1
NOT_A_MEDICAL_DEVICE = (
    "Research and engineering demonstration only; not a medical device. "
    "Not for diagnosis or any clinical decision."
)

RESIZE_METHODS = ("area", "linear", "cubic", "lanczos")
ASPECT_MODES = ("stretch",)
CAM_METHODS = ("weights", "none")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a [0, 1] float grayscale radiograph becomes the model's input tensor.

    ``read_image`` already produced intensities in [0, 1] (8-bit / 255, 16-bit / 65535, DICOM
    through its LUTs). Then: resize to ``input_size`` (H, W) with ``resize`` (``area`` is
    OpenCV's antialiased box filter for downscaling), optional ``gamma``, normalise
    ``(x - mean) / std`` and lay out as N x C x H x W float32, gray repeated over ``channels``.
    """

    input_name: str = "image"
    input_size: tuple[int, int] = (224, 224)
    channels: int = 1
    resize: str = "area"
    aspect: str = "stretch"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    layout: str = "NCHW"
    dtype: str = "float32"
    min_side: int = 128
    max_pixels: int = 64_000_000

    def validate(self) -> None:
        h, w = self.input_size
        _require(isinstance(h, int) and isinstance(w, int) and 16 <= h <= 4096 and 16 <= w <= 4096,
                 f"preprocessing.input_size must be two ints in [16, 4096], got {self.input_size}")
        _require(self.channels in (1, 3), f"preprocessing.channels must be 1 or 3, got {self.channels}")
        _require(self.resize in RESIZE_METHODS,
                 f"preprocessing.resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        _require(self.aspect in ASPECT_MODES,
                 f"preprocessing.aspect must be one of {ASPECT_MODES}, got {self.aspect!r}")
        _require(len(self.mean) == self.channels and len(self.std) == self.channels,
                 "preprocessing.mean/std need one value per channel")
        _require(all(math.isfinite(s) and s > 0 for s in self.std), "preprocessing.std must be > 0")
        _require(all(math.isfinite(m) for m in self.mean), "preprocessing.mean must be finite")
        _require(self.layout == "NCHW", "preprocessing.layout must be NCHW")
        _require(self.dtype == "float32", "preprocessing.dtype must be float32")
        _require(self.min_side >= 1 and self.max_pixels >= self.min_side ** 2,
                 "preprocessing.min_side/max_pixels are inconsistent")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("input_size", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        if "input_size" in known:
            known["input_size"] = tuple(int(v) for v in known["input_size"])
        spec = cls(**known)
        spec.validate()
        return spec


@dataclass(frozen=True)
class CamSpec:
    """Where the class activation map comes from.

    ``weights``: the graph output ``features_output`` (N x C x h x w, before global average
    pooling) times the classifier weights ``W`` (labels x C); exact for a GAP + linear head.
    ``bias`` is kept so the loader can check that ``GAP(features) @ W.T + bias`` reproduces the
    logits (``head_check_atol``): the proof that the weights belong to this graph.
    """

    method: str = "weights"
    features_output: str = "features"
    weights: np.ndarray | None = None
    bias: np.ndarray | None = None
    head_check_atol: float = 1e-3

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "features_output": self.features_output,
                             "head_check_atol": self.head_check_atol}
        if self.weights is not None:
            d["weights"] = encode_array(self.weights)
        if self.bias is not None:
            d["bias"] = encode_array(self.bias)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CamSpec":
        method = d.get("method", "weights")
        _require(method in CAM_METHODS, f"cam.method must be one of {CAM_METHODS}, got {method!r}")
        weights = decode_array(d["weights"]) if "weights" in d else None
        bias = decode_array(d["bias"]) if "bias" in d else None
        if method == "weights":
            _require(weights is not None and weights.ndim == 2, "cam.weights must be a 2-D array")
            _require(bias is None or bias.shape == (weights.shape[0],), "cam.bias must have one value per label")
            _require(bool(d.get("features_output")), "cam.features_output is required")
        return cls(method=method, features_output=str(d.get("features_output", "features")),
                   weights=weights, bias=bias, head_check_atol=float(d.get("head_check_atol", 1e-3)))


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """Float32 little-endian bytes, base64, with shape and SHA-256: compact and tamper-evident."""
    a = np.ascontiguousarray(a, dtype="<f4")
    raw = a.tobytes()
    return {"dtype": "float32", "shape": list(a.shape), "sha256": hashlib.sha256(raw).hexdigest(),
            "base64": base64.b64encode(raw).decode("ascii")}


def decode_array(d: Mapping[str, Any]) -> np.ndarray:
    try:
        raw = base64.b64decode(d["base64"], validate=True)
        shape = tuple(int(s) for s in d["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"malformed array in manifest: {exc}") from None
    _require(d.get("dtype") == "float32", "manifest arrays must be float32")
    _require(hashlib.sha256(raw).hexdigest() == d.get("sha256"), "manifest array checksum mismatch")
    _require(len(raw) == 4 * int(np.prod(shape)), "manifest array size does not match its shape")
    arr = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    _require(bool(np.isfinite(arr).all()), "manifest array holds NaN or inf")
    return arr


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to run a bundle correctly, and where the bundle came from."""

    model_id: str
    labels: tuple[str, ...]
    #: per label: the decision threshold in (0, 1), or None = "undetermined" (the label is too rare
    #: or too weakly predicted on the calibration data to decide: probabilities only, no true/false)
    thresholds: tuple[float | None, ...]
    preprocessing: PreprocessSpec
    cam: CamSpec
    logits_output: str = "logits"
    model_sha256: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    notice: str = NOT_A_MEDICAL_DEVICE
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        _require(self.format == FORMAT_NAME, f"not a cxr-edge manifest (format={self.format!r})")
        _require(self.format_version == FORMAT_VERSION,
                 f"manifest format_version {self.format_version} is not supported (this runtime reads "
                 f"{FORMAT_VERSION}); upgrade cxr-edge or re-export the bundle")
        _require(bool(self.model_id), "model_id is required")
        _require(len(self.labels) > 0, "labels must not be empty")
        _require(len(set(self.labels)) == len(self.labels), "labels must be unique")
        _require(len(self.thresholds) == len(self.labels), "one threshold per label is required")
        _require(all(t is None or (isinstance(t, float) and 0.0 < t < 1.0) for t in self.thresholds),
                 "thresholds must lie in (0, 1) (or be null: undetermined)")
        self.preprocessing.validate()
        if self.cam.method == "weights":
            _require(self.cam.weights is not None and self.cam.weights.shape[0] == len(self.labels),
                     "cam.weights must have one row per label")
        _require(len(self.model_sha256) == 64, "model_sha256 must be a SHA-256 hex digest")

    def to_json(self) -> str:
        d = {
            "format": self.format, "format_version": self.format_version, "model_id": self.model_id,
            "labels": list(self.labels),
            "thresholds": [None if t is None else float(t) for t in self.thresholds],
            "preprocessing": _plain(asdict(self.preprocessing)), "logits_output": self.logits_output,
            "cam": self.cam.to_dict(), "model_sha256": self.model_sha256,
            "provenance": self.provenance, "notice": self.notice,
        }
        return json.dumps(d, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        _require(isinstance(d, dict), "manifest must be a JSON object")
        try:
            m = cls(
                model_id=str(d["model_id"]), labels=tuple(str(x) for x in d["labels"]),
                thresholds=tuple(None if x is None else float(x) for x in d["thresholds"]),
                preprocessing=PreprocessSpec.from_dict(d["preprocessing"]),
                cam=CamSpec.from_dict(d.get("cam", {"method": "none"})),
                logits_output=str(d.get("logits_output", "logits")),
                model_sha256=str(d.get("model_sha256", "")), provenance=dict(d.get("provenance", {})),
                notice=str(d.get("notice", NOT_A_MEDICAL_DEVICE)), format=str(d.get("format", "")),
                format_version=int(d.get("format_version", -1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest is missing or has a bad field: {exc!r}") from None
        m.validate()
        return m

    @property
    def decided_labels(self) -> tuple[str, ...]:
        """Labels with a decision threshold (the others are reported as undetermined)."""
        return tuple(n for n, t in zip(self.labels, self.thresholds) if t is not None)

    def summary(self) -> dict[str, Any]:
        """Manifest as plain JSON-able data without the bulky CAM arrays (for ``info``/JSON output)."""
        d = json.loads(self.to_json())
        for key in ("weights", "bias"):
            if key in d["cam"]:
                d["cam"][key] = {k: v for k, v in d["cam"][key].items() if k != "base64"}
        return d


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
