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
SCOPE_METHODS = ("pca-mahalanobis",)
SCOPE_TRANSFORMS = ("none", "sqrt")


#: default ``preprocessing.max_pixels`` of new bundles and the runtime's own ceiling (``Classifier(max_pixels=)``):
#: 6000 x 6000. Every chest detector we know fits (flat panels 3000-4300 px a side, CR plates 3500 x 4300,
#: a 5000 x 5000 or 4000 x 6000 frame still passes), and ``predict --cam-dir`` of a 16-bit PNG at the limit
#: peaks at about 0.4 GB RSS (README "Input handling": peak memory per input size); a header claiming
#: more is refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 36_000_000


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a [0, 1] float grayscale radiograph becomes the model's input tensor.

    ``read_image`` already produced intensities in [0, 1] (8-bit / 255, 16-bit / 65535, DICOM
    through its LUTs). Then: resize to ``input_size`` (H, W) with ``resize`` (``area`` is
    OpenCV's antialiased box filter for downscaling), clip to [0, 1], normalise
    ``(x - mean) / std`` and lay out as N x C x H x W float32, gray repeated over ``channels``.

    Changing preprocessing (docs/refactor.md): a new field, or a new meaning of a field or value, bumps
    ``FORMAT_VERSION`` (a runtime refuses other versions and, in ``from_dict``, unknown keys, so no bundle is
    ever preprocessed by rules it was not trained with), and lands in one change in ``cxr_edge/preprocess.py``,
    in ``export/ingraph.py`` (``SPEC_HANDLED`` / ``SPEC_RESTRICTED``: implement it or refuse it;
    tests/test_ingraph.py fails otherwise) and in training (``models.config.TrainConfig.student_spec``).
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
    max_pixels: int = DEFAULT_MAX_PIXELS

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
        for key in ("min_side", "max_pixels", "channels"):
            v = getattr(self, key)
            _require(isinstance(v, int) and not isinstance(v, bool), f"preprocessing.{key} must be an integer, got {v!r}")
        _require(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (*self.mean, *self.std)),
                 "preprocessing.mean/std must be numbers")
        _require(self.min_side >= 1 and self.max_pixels >= self.min_side ** 2,
                 "preprocessing.min_side/max_pixels are inconsistent")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        _require(isinstance(d, Mapping), "preprocessing must be a JSON object")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        # a runtime must never silently skip a preprocessing step it does not know
        _require(not unknown, f"preprocessing has unknown key(s) {unknown}: this runtime does not implement them; "
                              "upgrade cxr-edge")
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


@dataclass(frozen=True, eq=False)
class ScopeSpec:
    """Input scope gate: is this image like the frontal adult chest radiographs the model learned from?

    A density model of the *pooled* features (the mean over h, w of ``features_output``: exactly
    the classifier's input), fitted at export on the training images (``export/scope_fit.py``,
    ``docs/scope.md``). ``method`` ``pca-mahalanobis``, with ``f = t(pooled)`` (``transform``:
    ``none`` = identity, ``sqrt`` = sign(x) sqrt|x|), ``d = f - mean``, ``z = components @ d``
    (``components``: k x C, orthonormal rows)::

        score = 0.5 * ( sum_j z_j^2 / variances_j / k  +  (|d|^2 - |z|^2) / residual_scale )

    i.e. the mean squared Mahalanobis distance inside the PCA subspace plus the energy outside it
    relative to its training mean; about 1 for a typical training image. An image is out of
    scope when ``score > threshold`` (the rule that chose it is ``threshold_rule``; the numbers
    it used are in ``statistics``). Optional block: a manifest without it has no feature gate.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_scale: float
    threshold: float
    method: str = "pca-mahalanobis"
    features_output: str = "features"
    transform: str = "none"
    threshold_rule: str = ""
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def validate(self) -> None:
        _require(self.method in SCOPE_METHODS, f"scope.method must be one of {SCOPE_METHODS}, got {self.method!r}")
        _require(self.transform in SCOPE_TRANSFORMS,
                 f"scope.transform must be one of {SCOPE_TRANSFORMS}, got {self.transform!r}")
        _require(bool(self.features_output), "scope.features_output is required")
        _require(isinstance(self.mean, np.ndarray) and self.mean.ndim == 1 and self.mean.size > 0,
                 "scope.mean must be a non-empty 1-D array")
        c = self.mean.shape[0]
        _require(isinstance(self.components, np.ndarray) and self.components.ndim == 2
                 and self.components.shape[1] == c and 1 <= self.components.shape[0] <= c,
                 f"scope.components must be a k x {c} array with 1 <= k <= {c}")
        k = self.components.shape[0]
        _require(isinstance(self.variances, np.ndarray) and self.variances.shape == (k,),
                 f"scope.variances must hold one value per component ({k})")
        _require(bool(np.all(self.variances > 0)), "scope.variances must be > 0")
        gram = self.components.astype(np.float64) @ self.components.astype(np.float64).T
        _require(float(np.max(np.abs(gram - np.eye(k)))) < 1e-3, "scope.components must have orthonormal rows")
        _require(math.isfinite(self.residual_scale) and self.residual_scale > 0, "scope.residual_scale must be > 0")
        _require(math.isfinite(self.threshold) and self.threshold > 0, "scope.threshold must be a finite number > 0")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "features_output": self.features_output, "pooling": "mean",
                "transform": self.transform, "mean": encode_array(self.mean),
                "components": encode_array(self.components), "variances": encode_array(self.variances),
                "residual_scale": float(self.residual_scale), "threshold": float(self.threshold),
                "threshold_rule": self.threshold_rule, "statistics": self.statistics}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScopeSpec":
        _require(isinstance(d, Mapping), "scope must be a JSON object")
        _require(d.get("pooling", "mean") == "mean", "scope.pooling must be 'mean'")
        for key in ("mean", "components", "variances", "residual_scale", "threshold"):
            _require(key in d, f"scope.{key} is required")
        _require(isinstance(d.get("statistics", {}), Mapping), "scope.statistics must be a JSON object")
        try:
            spec = cls(mean=decode_array(d["mean"]), components=decode_array(d["components"]),
                       variances=decode_array(d["variances"]), residual_scale=float(d["residual_scale"]),
                       threshold=float(d["threshold"]), method=str(d.get("method", "")),
                       features_output=str(d.get("features_output", "")), transform=str(d.get("transform", "none")),
                       threshold_rule=str(d.get("threshold_rule", "")), statistics=dict(d.get("statistics", {})))
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"scope has a bad field: {exc!r}") from None
        spec.validate()
        return spec


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
    #: optional input scope gate (``None``: the bundle has none; older manifests lack the key)
    scope: ScopeSpec | None = None
    #: SHA-256 over the graph bytes and this manifest's JSON with this field blank (cxr_edge.bundle):
    #: thresholds, labels, preprocessing, scope, provenance and notice are covered like the weights
    bundle_sha256: str = ""

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
        if self.scope is not None:
            self.scope.validate()
            if self.cam.method == "weights" and self.scope.features_output == self.cam.features_output:
                _require(self.scope.channels == self.cam.weights.shape[1],
                         f"scope arrays have {self.scope.channels} channels but the features have "
                         f"{self.cam.weights.shape[1]}")

    def to_json(self) -> str:
        d = {
            "format": self.format, "format_version": self.format_version, "model_id": self.model_id,
            "labels": list(self.labels),
            "thresholds": [None if t is None else float(t) for t in self.thresholds],
            "preprocessing": _plain(asdict(self.preprocessing)), "logits_output": self.logits_output,
            "cam": self.cam.to_dict(), "model_sha256": self.model_sha256,
            "provenance": self.provenance, "notice": self.notice, "bundle_sha256": self.bundle_sha256,
        }
        if self.scope is not None:
            d["scope"] = self.scope.to_dict()
        return json.dumps(d, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        except RecursionError:
            raise ManifestError("manifest is nested too deeply to be a cxr-edge manifest") from None
        _require(isinstance(d, dict), "manifest must be a JSON object")
        unknown = sorted(set(d) - _MANIFEST_KEYS)
        _require(not unknown, f"manifest has unknown top-level key(s) {unknown} (a newer format?): upgrade cxr-edge")
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
                scope=ScopeSpec.from_dict(d["scope"]) if d.get("scope") is not None else None,
                bundle_sha256=str(d.get("bundle_sha256", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"manifest is missing or has a bad field: {exc!r}") from None
        m.validate()
        return m

    @property
    def decided_labels(self) -> tuple[str, ...]:
        """Labels with a decision threshold (the others are reported as undetermined)."""
        return tuple(n for n, t in zip(self.labels, self.thresholds) if t is not None)

    def summary(self) -> dict[str, Any]:
        """Manifest as plain JSON-able data without the bulky CAM/scope arrays (for ``info``/JSON output)."""
        d = json.loads(self.to_json())
        for key in ("weights", "bias"):
            if key in d["cam"]:
                d["cam"][key] = {k: v for k, v in d["cam"][key].items() if k != "base64"}
        for key in ("mean", "components", "variances"):
            if key in d.get("scope", {}):
                d["scope"][key] = {k: v for k, v in d["scope"][key].items() if k != "base64"}
        return d


_MANIFEST_KEYS = frozenset({"format", "format_version", "model_id", "labels", "thresholds", "preprocessing",
                            "logits_output", "cam", "model_sha256", "provenance", "notice", "scope", "bundle_sha256"})


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
