"""``Classifier``: the runtime's front door — read, preprocess, infer, decide, explain."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence, Union

import numpy as np

from .bundle import Bundle, load_bundle
from .cam import class_activation_map, write_overlay_png
from .errors import CxrEdgeError, InferenceError, InvalidArgumentError
from .imaging import Radiograph, read_image
from .manifest import Manifest
from .preprocess import preprocess

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


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
    _features: np.ndarray | None = field(default=None, repr=False)
    _cam_weights: np.ndarray | None = field(default=None, repr=False)
    _pixels: np.ndarray | None = field(default=None, repr=False)

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

    def write_overlay(self, path: str | os.PathLike, label: str | int, alpha: float = 0.45) -> None:
        """Write an RGB PNG of the heatmap of ``label`` over the radiograph."""
        if self._pixels is None:
            raise InvalidArgumentError("the image pixels were not kept; predict with keep_image=True")
        write_overlay_png(os.fspath(path), self._pixels, self.cam(label), alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (no pixels, no patient data: only non-identifying image facts)."""
        return {
            "source": self.source, "ok": True, "model_id": self.model_id,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "decisions": {k: ("undetermined" if v is None else v) for k, v in self.decisions.items()},
            "thresholds": {k: (None if v is None else round(v, 6)) for k, v in self.thresholds.items()},
            "positive": self.positive_labels, "undetermined": self.undetermined_labels,
            "image": {"height": self.image_shape[0], "width": self.image_shape[1], **self.image_info},
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


def label_index(labels: Sequence[str], label: str | int) -> int:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(labels):
            return int(label)
    elif isinstance(label, str):
        if label in labels:
            return list(labels).index(label)
        lowered = [name.lower() for name in labels]
        if label.lower() in lowered:
            return lowered.index(label.lower())
    raise InvalidArgumentError(f"unknown label {label!r}; this model's labels are: {', '.join(labels)}")


class Classifier:
    """Multi-label chest radiograph classifier over a verified cxr-edge bundle.

    ``Classifier()`` loads the embedded default bundle; ``Classifier("model.onnx")`` any bundle.
    ``threads`` fixes onnxruntime's intra-op threads (results are deterministic for a fixed count).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, allow_any_body_part: bool = False) -> None:
        self.bundle: Bundle = load_bundle(model, threads=threads, providers=providers)
        self.manifest: Manifest = self.bundle.manifest
        self.allow_any_body_part = allow_any_body_part
        m = self.manifest
        self._outputs = [m.logits_output] + ([m.cam.features_output] if m.cam.method == "weights" else [])
        self._thresholds = np.asarray([np.nan if t is None else t for t in m.thresholds], dtype=np.float32)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def read(self, source: Source) -> Radiograph:
        """Read any supported source with the bundle's size limits (typed errors on bad input)."""
        spec = self.manifest.preprocessing
        return read_image(source, min_side=spec.min_side, max_pixels=spec.max_pixels,
                          allow_any_body_part=self.allow_any_body_part)

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self.bundle.session.run(self._outputs, {self.manifest.preprocessing.input_name: batch})
        logits = np.asarray(outs[0], dtype=np.float32)
        if not np.isfinite(logits).all():
            raise InferenceError("the model produced NaN/inf logits for this input; refusing to answer")
        return logits, (outs[1] if len(outs) > 1 else None)

    def _results(self, sources: Sequence[str], images: Sequence[Radiograph], decode_ms: Sequence[float],
                 keep_image: bool) -> list[Prediction]:
        t0 = time.perf_counter()
        batch = preprocess([img.pixels for img in images], self.manifest.preprocessing)
        t1 = time.perf_counter()
        logits, features = self._infer(batch)
        t2 = time.perf_counter()
        probs = _sigmoid(logits)
        n = len(images)
        share_pre, share_inf = (t1 - t0) * 1e3 / n, (t2 - t1) * 1e3 / n
        labels = self.labels
        results = []
        for i, img in enumerate(images):
            p = probs[i]
            timings = {"decode": decode_ms[i], "preprocess": share_pre, "inference": share_inf}
            timings["total"] = sum(timings.values())
            results.append(Prediction(
                source=sources[i], model_id=self.model_id, labels=labels,
                probabilities={name: float(v) for name, v in zip(labels, p)},
                decisions={name: (None if np.isnan(t) else bool(v >= t)) for name, v, t in
                           zip(labels, p, self._thresholds)},
                thresholds={name: (None if np.isnan(t) else float(t)) for name, t in zip(labels, self._thresholds)},
                timings_ms=timings, image_shape=img.pixels.shape, image_info={"format": img.format, **img.info},
                _features=None if features is None else np.array(features[i], dtype=np.float32),
                _cam_weights=self.manifest.cam.weights, _pixels=img.pixels if keep_image else None,
            ))
        return results

    def _read_timed(self, source: Source) -> tuple[Radiograph, float]:
        start = time.perf_counter()
        image = self.read(source)
        return image, (time.perf_counter() - start) * 1e3

    def predict(self, source: Source, *, keep_image: bool = True) -> Prediction:
        """Classify one image (path, bytes, array or PIL image)."""
        image, ms = self._read_timed(source)
        return self._results([describe_source(source)], [image], [ms], keep_image)[0]

    def predict_batch(self, sources: Iterable[Source], *, batch_size: int = 8, keep_image: bool = False,
                      errors: Literal["raise", "collect"] = "raise") -> list[Prediction | CxrEdgeError]:
        """Classify many images, running the model on real batches of ``batch_size``.

        ``errors="collect"`` puts the typed error in place of a failed input's result and goes on;
        ``"raise"`` stops at the first bad input.
        """
        if errors not in ("raise", "collect"):
            raise InvalidArgumentError("errors must be 'raise' or 'collect'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        sources = list(sources)
        out: list[Prediction | CxrEdgeError | None] = [None] * len(sources)
        pending: list[tuple[int, Radiograph, float]] = []

        def flush() -> None:
            if not pending:
                return
            idx = [i for i, _, _ in pending]
            results = self._results([describe_source(sources[i]) for i in idx], [im for _, im, _ in pending],
                                    [ms for _, _, ms in pending], keep_image)
            for i, r in zip(idx, results):
                out[i] = r
            pending.clear()

        for i, source in enumerate(sources):
            try:
                image, ms = self._read_timed(source)
            except CxrEdgeError as exc:
                if errors == "raise":
                    raise
                out[i] = exc
                continue
            pending.append((i, image, ms))
            if len(pending) == batch_size:
                flush()
        flush()
        return out  # type: ignore[return-value]

    def explain(self, source: Source, label: str | int) -> np.ndarray:
        """Heatmap (input image grid, [0, 1]) of where the model found evidence for ``label``."""
        label_index(self.labels, label)
        return self.predict(source, keep_image=False).cam(label)
