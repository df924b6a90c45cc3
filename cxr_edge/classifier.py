"""``Classifier``: the runtime's front door — read, preprocess, infer, decide, explain."""
from __future__ import annotations

import difflib
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence, Union

import numpy as np

from .bundle import Bundle, load_bundle
from .cam import (OVERLAY_MAX_SIDE, OverlayLegend, absolute_map, activation_map_raw, check_max_side,
                  class_activation_map, fit_pixels, overlay_shape, write_overlay_png)
from .errors import CxrEdgeError, DicomRefusedError, InferenceError, InvalidArgumentError, OutOfScopeError
from .imaging import Radiograph, decode_floor, read_image
from .manifest import DEFAULT_MAX_PIXELS, NOT_A_MEDICAL_DEVICE, Manifest
from .operating_points import sigmoid
from .preprocess import preprocess_one
from .scope import ScopeGate, ScopeResult
from .signature import SignatureStatus

#: version of the JSON objects ``Prediction.to_dict`` / ``cxr-edge predict --json`` / ``serve`` emit
#: (``cxr_edge/schema/prediction.schema.json``)
SCHEMA_VERSION = 2

#: ``Classifier(scope=...)``: what to do with images the input scope gate flags (``docs/scope.md``)
SCOPE_MODES = ("flag", "refuse", "off")

#: the reason added when ``allow_any_body_part`` let through a DICOM that would have been refused
OVERRIDE_REASON = "DICOM anatomy override (allow_any_body_part): not a confirmed chest radiograph"

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]


@dataclass(frozen=True)
class Prepared:
    """What :meth:`Classifier._prepare` computed for one image: its model input and pixel-rule verdict."""

    tensor: np.ndarray | None   # C x H x W float32, the preprocessed input; None: refused by the pixel rules
    pixel_reasons: list[str]    # the scope gate's pixel rules that flagged it (empty: none, or no gate)
    scope_ms: float
    preprocess_ms: float


def _declared_shape(img: Radiograph) -> tuple[int, int]:
    """(H, W) of the image as stored: a JPEG decoded at reduced size keeps its declared grid for CAMs."""
    if img.info.get("decode_scale"):
        return int(img.info["height"]), int(img.info["width"])
    return img.pixels.shape  # type: ignore[return-value]


def describe_source(source: Source) -> str:
    """A printable name for a source: the path for files, the kind for in-memory inputs."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, np.ndarray):
        return "<ndarray>"
    return f"<{type(source).__name__}>"


@dataclass
class Prediction:
    """One image's result: per-label probabilities and decisions, with what is needed for its CAMs."""

    source: str
    model_id: str
    labels: tuple[str, ...]
    probabilities: dict[str, float]
    #: True/False at the manifest threshold; None = undetermined (the bundle makes no decision for it)
    decisions: dict[str, bool | None]
    thresholds: dict[str, float | None]
    timings_ms: dict[str, float]
    image_shape: tuple[int, int]
    image_info: dict[str, Any] = field(default_factory=dict)
    #: sample precision the [0, 1] scaling assumed, and where it came from (container/sBIT/SOF/BitsStored)
    bit_depth: int | None = None
    bit_depth_source: str | None = None
    #: ``allow_any_body_part`` was set for this read; ``out_of_scope``: and the image would have been
    #: refused without it (a non-chest or unconfirmed-anatomy DICOM): the result is out of scope
    override_used: bool = False
    out_of_scope: bool = False
    #: the input scope gate's verdict: True/False, or None when no gate ran (the bundle has no scope block,
    #: or ``scope="off"``). False: every decision is None (undetermined); probabilities are still reported
    in_scope: bool | None = None
    #: ``{"in_scope", "score", "threshold", "reasons"}`` of the gate (:meth:`ScopeResult.to_dict`), or None
    scope: dict[str, Any] | None = None
    notice: str = NOT_A_MEDICAL_DEVICE
    _features: np.ndarray | None = field(default=None, repr=False)
    _cam_weights: np.ndarray | None = field(default=None, repr=False)
    _pixels: np.ndarray | None = field(default=None, repr=False)
    _overlay_max_side: int = field(default=OVERLAY_MAX_SIDE, repr=False)

    @property
    def positive_labels(self) -> list[str]:
        """Labels decided positive, most probable first."""
        pos = [name for name in self.labels if self.decisions[name]]
        return sorted(pos, key=lambda n: -self.probabilities[n])

    @property
    def undetermined_labels(self) -> list[str]:
        return [name for name in self.labels if self.decisions[name] is None]

    def _label_index(self, label: str | int) -> int:
        return label_index(self.labels, label)

    def cam(self, label: str | int) -> np.ndarray:
        """Heatmap of ``label`` on the input image's own pixel grid, float32 in [0, 1]."""
        if self._features is None or self._cam_weights is None:
            raise InvalidArgumentError("this bundle carries no CAM (manifest cam.method is 'none')")
        start = time.perf_counter()
        heat = class_activation_map(self._features, self._cam_weights[self._label_index(label)], self.image_shape)
        self.timings_ms["cam"] = (time.perf_counter() - start) * 1e3
        return heat

    def cam_raw(self, label: str | int) -> np.ndarray:
        """ReLU(W[c] . features) of ``label`` on the feature grid (h x w), in logit units, unscaled."""
        if self._features is None or self._cam_weights is None:
            raise InvalidArgumentError("this bundle carries no CAM (manifest cam.method is 'none')")
        return activation_map_raw(self._features, self._cam_weights[self._label_index(label)])

    def cam_scale(self) -> float:
        """The largest per-location logit contribution of any label of this image (the overlay scale)."""
        if self._features is None or self._cam_weights is None:
            raise InvalidArgumentError("this bundle carries no CAM (manifest cam.method is 'none')")
        c = self._features.shape[0]
        raw = self._cam_weights.astype(np.float32) @ self._features.reshape(c, -1).astype(np.float32)
        peak = float(raw.max()) if raw.size else 0.0
        return peak if np.isfinite(peak) and peak > 0.0 else 0.0

    def cam_is_empty(self, label: str | int) -> bool:
        """True when the map of ``label`` has no positive evidence anywhere (all zeros)."""
        return not float(self.cam_raw(label).max()) > 0.0

    def margins(self) -> dict[str, float | None]:
        """probability - threshold per label (None for undetermined labels)."""
        return {k: (None if self.thresholds[k] is None else self.probabilities[k] - self.thresholds[k])
                for k in self.labels}

    def overlay_legend(self, label: str | int) -> OverlayLegend:
        name = self.labels[self._label_index(label)]
        flagged = self.in_scope is False
        reason = "; ".join((self.scope or {}).get("reasons") or []) if flagged else None
        return OverlayLegend(label=name, probability=self.probabilities[name], threshold=self.thresholds[name],
                             decision=self.decisions[name], model_id=self.model_id, notice=self.notice,
                             scale=self.cam_scale(), empty=self.cam_is_empty(name),
                             out_of_scope=flagged, scope_reason=reason or None)

    def write_overlay(self, path: str | os.PathLike, label: str | int, alpha: float = 0.45,
                      max_side: int | None = None) -> bool:
        """Write an RGB PNG of the heatmap of ``label`` over the radiograph, with its legend burnt in.

        The image is at the top left, its long side at most ``max_side`` px (default: the Classifier's
        ``overlay_max_side``; a larger input is downscaled, its aspect kept, and the legend says so:
        memory stays bounded whatever the input size); the panel below names the label, its
        probability vs threshold and decision (or "undetermined"), the colour bar and its meaning,
        the model id and the not-a-medical-device notice. The heat uses one absolute scale per
        image (see :mod:`cxr_edge.cam`). Returns True when the map was empty ("no positive
        evidence"). Failures to write raise :class:`~cxr_edge.errors.OutputError`.
        """
        if self._pixels is None:
            raise InvalidArgumentError("the image pixels were not kept; predict with keep_image=True")
        hw = overlay_shape(self._pixels.shape, check_max_side(max_side or self._overlay_max_side))
        legend = replace(self.overlay_legend(label), input_shape=tuple(self.image_shape))
        start = time.perf_counter()
        heat = absolute_map(self.cam_raw(label), legend.scale, hw)
        self.timings_ms["cam"] = (time.perf_counter() - start) * 1e3
        write_overlay_png(os.fspath(path), fit_pixels(self._pixels, hw), heat, alpha, legend)
        return legend.empty

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (no pixels, no patient data: only non-identifying image facts).

        Layout: ``cxr_edge/schema/prediction.schema.json`` (``schema_version`` 2).
        """
        image = {"height": self.image_shape[0], "width": self.image_shape[1], **self.image_info}
        if self.bit_depth is not None:
            image["bit_depth"] = int(self.bit_depth)
            image["bit_depth_source"] = self.bit_depth_source
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source, "ok": True, "model_id": self.model_id,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "decisions": {k: ("undetermined" if v is None else v) for k, v in self.decisions.items()},
            "thresholds": {k: (None if v is None else round(v, 6)) for k, v in self.thresholds.items()},
            "margins": {k: (None if v is None else round(v, 6)) for k, v in self.margins().items()},
            "positive": self.positive_labels, "undetermined": self.undetermined_labels,
            "image": image,
            "override_used": bool(self.override_used), "out_of_scope": bool(self.out_of_scope),
            "in_scope": None if self.in_scope is None else bool(self.in_scope),
            "scope": None if self.scope is None else dict(self.scope, reasons=list(self.scope.get("reasons") or [])),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


def normalize_label(name: str) -> str:
    """Case, spaces, hyphens and underscores do not matter: "pleural thickening" == "Pleural_Thickening"."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip()).lower()


def label_index(labels: Sequence[str], label: str | int) -> int:
    """Index of ``label`` (name, any case/spacing, or integer index); unknown -> a suggestion."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(labels):
            return int(label)
    elif isinstance(label, str):
        if label in labels:
            return list(labels).index(label)
        normal = [normalize_label(name) for name in labels]
        key = normalize_label(label)
        if key in normal and normal.count(key) == 1:
            return normal.index(key)
        close = difflib.get_close_matches(key, normal, n=1, cutoff=0.6)
        hint = f"did you mean {labels[normal.index(close[0])]!r}? " if close else ""
        raise InvalidArgumentError(f"unknown label {label!r}; {hint}this model's labels are: {', '.join(labels)}")
    raise InvalidArgumentError(f"unknown label {label!r}; this model's labels are: {', '.join(labels)}")


class Classifier:
    """Multi-label chest radiograph classifier over a verified cxr-edge bundle.

    ``Classifier()`` loads the embedded default bundle; ``Classifier("model.onnx")`` any bundle.
    ``threads`` fixes onnxruntime's intra-op threads (results are deterministic for a fixed count).

    ``scope`` (the input scope gate, ``docs/scope.md``; it runs only when the bundle's manifest has a
    ``scope`` block, otherwise ``in_scope`` is None):

    * ``"flag"`` (default): an out-of-scope image is still classified, but every decision is None
      (undetermined), ``in_scope`` is False and ``scope["reasons"]`` says why;
    * ``"refuse"``: an out-of-scope image raises :class:`~cxr_edge.errors.OutOfScopeError`
      (collected per input by ``predict_batch(errors="collect")``);
    * ``"off"``: **unsafe**, no checks at all: decisions for any pixels, ``in_scope``/``scope`` None.

    Trust (:mod:`cxr_edge.signature`): ``public_key`` (PEM path or bytes) makes a signed bundle verify
    against it or be refused (:class:`~cxr_edge.signature.BundleSignatureError`); ``require_signature``
    also refuses unsigned bundles. ``self.signature`` says what was established. The key is only
    what is passed here (the ``cxr-edge`` commands also read ``CXR_EDGE_PUBLIC_KEY``).

    Memory: inputs over ``max_pixels`` (default :data:`~cxr_edge.manifest.DEFAULT_MAX_PIXELS`, never
    above the bundle's own ``preprocessing.max_pixels``) are refused before decoding; overlays are
    drawn with their long side at most ``overlay_max_side`` px (:data:`~cxr_edge.cam.OVERLAY_MAX_SIDE`).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, allow_any_body_part: bool = False,
                 scope: str = "flag", public_key: str | os.PathLike | bytes | None = None,
                 require_signature: bool = False, max_pixels: int | None = None,
                 overlay_max_side: int = OVERLAY_MAX_SIDE) -> None:
        if scope not in SCOPE_MODES:
            raise InvalidArgumentError(f"scope must be one of {', '.join(SCOPE_MODES)}, got {scope!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise InvalidArgumentError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        self.overlay_max_side = check_max_side(overlay_max_side)
        self.bundle: Bundle = load_bundle(model, threads=threads, providers=providers, public_key=public_key,
                                          require_signature=require_signature)
        self.manifest: Manifest = self.bundle.manifest
        self.signature: SignatureStatus = self.bundle.signature
        spec = self.manifest.preprocessing
        #: the input size limit in force: the smaller of the bundle's and this runtime's (or the caller's)
        self.max_pixels: int = min(spec.max_pixels, max_pixels or DEFAULT_MAX_PIXELS)
        if self.max_pixels < spec.min_side ** 2:
            raise InvalidArgumentError(f"max_pixels {self.max_pixels:,} is below the bundle's smallest image "
                                       f"({spec.min_side} x {spec.min_side}): no input could be read")
        self.allow_any_body_part = allow_any_body_part
        self.scope_mode = scope
        m = self.manifest
        self._outputs = [m.logits_output] + ([m.cam.features_output] if m.cam.method == "weights" else [])
        #: None when the bundle has no scope block or the gate is off
        self.scope_gate: ScopeGate | None = (ScopeGate.from_manifest(m)
                                             if scope != "off" and getattr(m, "scope", None) is not None else None)
        if self.scope_gate is not None and self.scope_gate.features_output not in self._outputs:
            self._outputs.append(self.scope_gate.features_output)  # e.g. a bundle with cam.method "none"
        self._thresholds = np.asarray([np.nan if t is None else t for t in m.thresholds], dtype=np.float32)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def read(self, source: Source) -> Radiograph:
        """Read any supported source with the bundle's size limits (typed errors on bad input).

        ``read_image`` reads every format (TIFF through :mod:`cxr_edge.tiff`).
        """
        return self.read_scoped(source)[0]

    def read_scoped(self, source: Source, *, reduce: bool = False) -> tuple[Radiograph, bool]:
        """``(radiograph, out_of_scope)``: out_of_scope is True when ``allow_any_body_part`` let through
        an image that would otherwise have been refused (the anatomy checks of a DICOM).

        ``reduce``: the pixels only feed the model input (they are not kept for an overlay), so a JPEG
        much larger than the input is decoded at reduced size (``read_image(decode_at_least=...)``)."""
        spec = self.manifest.preprocessing
        floor = decode_floor(spec.input_size) if reduce else None
        try:
            return read_image(source, min_side=spec.min_side, max_pixels=self.max_pixels, decode_at_least=floor), False
        except DicomRefusedError:
            if not self.allow_any_body_part:
                raise
        # refused by a check the override relaxes (or not: then this read raises the same refusal)
        return read_image(source, min_side=spec.min_side, max_pixels=self.max_pixels, allow_any_body_part=True,
                          decode_at_least=floor), True

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(logits, CAM features or None, scope-gate features or None)."""
        outs = self.bundle.session.run(self._outputs, {self.manifest.preprocessing.input_name: batch})
        logits = np.asarray(outs[0], dtype=np.float32)
        if not np.isfinite(logits).all():
            raise InferenceError("the model produced NaN/inf logits for this input; refusing to answer")
        by_name = dict(zip(self._outputs, outs))
        m = self.manifest
        cam = by_name.get(m.cam.features_output) if m.cam.method == "weights" else None
        gate = by_name.get(self.scope_gate.features_output) if self.scope_gate is not None else None
        return logits, cam, gate

    @staticmethod
    def _refusal(result: ScopeResult) -> OutOfScopeError:
        return OutOfScopeError("the image is out of scope for this model (not like the frontal adult chest "
                               "radiographs it was trained on): " + "; ".join(result.reasons), scope=result)

    def _prepare(self, image: Radiograph) -> Prepared:
        """The per-image work between decoding and the model: the scope gate's pixel rules and the
        preprocessing. Thread-safe and mostly GIL-free, so a decoder thread can do it ahead of the model
        (:meth:`cxr_edge.engine.Engine.decode`) and the model's thread only runs the graph. An image the
        pixel rules refuse (``scope="refuse"``) is not preprocessed: it never reaches the model."""
        reasons: list[str] = []
        scope_ms = 0.0
        if self.scope_gate is not None:
            ts = time.perf_counter()
            reasons = self.scope_gate.check_pixels(image.pixels, image.info.get("colour_fraction"))
            scope_ms = (time.perf_counter() - ts) * 1e3
            if reasons and self.scope_mode == "refuse":
                return Prepared(None, reasons, scope_ms, 0.0)
        t0 = time.perf_counter()
        tensor = preprocess_one(image.pixels, self.manifest.preprocessing)
        return Prepared(tensor, reasons, scope_ms, (time.perf_counter() - t0) * 1e3)

    def _results(self, sources: Sequence[str], images: Sequence[Radiograph], decode_ms: Sequence[float],
                 keep_image: bool, scopes: Sequence[bool] | None = None,
                 prepared: Sequence[Prepared | None] | None = None) -> list[Prediction | OutOfScopeError]:
        """One Prediction per image; in ``scope="refuse"`` mode an :class:`OutOfScopeError` instead for each
        image the gate flags (images the pixel rules flag are not even run through the model).
        ``prepared``: :meth:`_prepare` already done for an image (by a decoder thread); None = do it here."""
        n = len(images)
        scopes = list(scopes) if scopes else [False] * n
        prep = [p if p is not None else self._prepare(img)
                for img, p in zip(images, prepared if prepared is not None else [None] * n)]
        gate = self.scope_gate
        out: list[Prediction | OutOfScopeError | None] = [None] * n
        pixel_reasons = [list(p.pixel_reasons) for p in prep]
        scope_ms = [p.scope_ms for p in prep]
        if gate is not None:
            for i in range(n):
                if pixel_reasons[i] and self.scope_mode == "refuse":  # no inference for a blank frame
                    reasons = pixel_reasons[i] + ([OVERRIDE_REASON] if self.allow_any_body_part and scopes[i] else [])
                    out[i] = self._refusal(ScopeResult(False, None, gate.threshold, reasons))
        run = [i for i in range(n) if out[i] is None]
        if not run:
            return out  # type: ignore[return-value]
        batch = np.stack([prep[i].tensor for i in run])
        t1 = time.perf_counter()
        logits, features, gate_features = self._infer(batch)
        t2 = time.perf_counter()
        probs = sigmoid(logits).astype(np.float32)
        share_inf = (t2 - t1) * 1e3 / len(run)
        labels = self.labels
        thresholds = {name: (None if np.isnan(t) else float(t)) for name, t in zip(labels, self._thresholds)}
        for j, i in enumerate(run):
            img = images[i]
            p = probs[j]
            decisions = {name: (None if np.isnan(t) else bool(v >= t)) for name, v, t in zip(labels, p, self._thresholds)}
            timings = {"decode": decode_ms[i], "preprocess": prep[i].preprocess_ms, "inference": share_inf}
            in_scope: bool | None = None
            scope_dict: dict[str, Any] | None = None
            if gate is not None:
                ts = time.perf_counter()
                feats = None if gate_features is None else gate_features[j]
                res = gate.assess(None, feats)  # the feature score (pixel rules ran above)
                reasons = pixel_reasons[i] + res.reasons
                if self.allow_any_body_part and scopes[i]:  # the DICOM anatomy override let it through
                    reasons.append(OVERRIDE_REASON)
                res = ScopeResult(not reasons, res.score, res.threshold, reasons)
                timings["scope"] = scope_ms[i] + (time.perf_counter() - ts) * 1e3
                if not res.in_scope and self.scope_mode == "refuse":
                    out[i] = self._refusal(res)
                    continue
                in_scope, scope_dict = res.in_scope, res.to_dict()
                if not res.in_scope:  # flagged: probabilities stay, decisions are withheld
                    decisions = {name: None for name in labels}
            timings["total"] = sum(timings.values())
            out[i] = Prediction(
                source=sources[i], model_id=self.model_id, labels=labels,
                probabilities={name: float(v) for name, v in zip(labels, p)},
                decisions=decisions, thresholds=dict(thresholds),
                timings_ms=timings, image_shape=_declared_shape(img), image_info={"format": img.format, **img.info},
                bit_depth=img.bit_depth, bit_depth_source=img.bit_depth_source,
                override_used=self.allow_any_body_part, out_of_scope=bool(scopes[i]),
                in_scope=in_scope, scope=scope_dict,
                notice=self.manifest.notice,
                _features=None if features is None else np.array(features[j], dtype=np.float32),
                _cam_weights=self.manifest.cam.weights, _pixels=img.pixels if keep_image else None,
                _overlay_max_side=self.overlay_max_side,
            )
        return out  # type: ignore[return-value]

    def _read_timed(self, source: Source, reduce: bool = False) -> tuple[Radiograph, float, bool]:
        start = time.perf_counter()
        image, scope = self.read_scoped(source, reduce=reduce)
        return image, (time.perf_counter() - start) * 1e3, scope

    def predict(self, source: Source, *, keep_image: bool = True) -> Prediction:
        """Classify one image (path, bytes, array or PIL image)."""
        image, ms, scope = self._read_timed(source, reduce=not keep_image)
        res = self._results([describe_source(source)], [image], [ms], keep_image, [scope])[0]
        if isinstance(res, OutOfScopeError):
            raise res
        return res

    def predict_batch(self, sources: Iterable[Source], *, batch_size: int = 8, keep_image: bool = False,
                      errors: Literal["raise", "collect"] = "raise") -> list[Prediction | CxrEdgeError]:
        """Classify many images, running the model on real batches of ``batch_size``.

        ``errors="collect"`` puts the typed error in place of a failed input's result and goes on
        (with ``scope="refuse"``, out-of-scope inputs become :class:`OutOfScopeError` entries);
        ``"raise"`` stops at the first bad input.
        """
        if errors not in ("raise", "collect"):
            raise InvalidArgumentError("errors must be 'raise' or 'collect'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        sources = list(sources)
        out: list[Prediction | CxrEdgeError | None] = [None] * len(sources)
        pending: list[tuple[int, Radiograph, float, bool]] = []

        def flush() -> None:
            if not pending:
                return
            idx = [i for i, _, _, _ in pending]
            results = self._results([describe_source(sources[i]) for i in idx], [im for _, im, _, _ in pending],
                                    [ms for _, _, ms, _ in pending], keep_image, [sc for _, _, _, sc in pending])
            pending.clear()
            for i, r in zip(idx, results):
                if isinstance(r, OutOfScopeError) and errors == "raise":
                    raise r
                out[i] = r

        for i, source in enumerate(sources):
            try:
                image, ms, scope = self._read_timed(source, reduce=not keep_image)
            except CxrEdgeError as exc:
                if errors == "raise":
                    raise
                out[i] = exc
                continue
            pending.append((i, image, ms, scope))
            if len(pending) == batch_size:
                flush()
        flush()
        return out  # type: ignore[return-value]

    def explain(self, source: Source, label: str | int) -> np.ndarray:
        """Heatmap (input image grid, [0, 1]) of where the model found evidence for ``label``."""
        label_index(self.labels, label)
        return self.predict(source, keep_image=False).cam(label)
