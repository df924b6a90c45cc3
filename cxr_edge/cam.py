"""Gradient-free class activation maps from one forward pass, and overlays that explain themselves.

For a head that is global-average-pool then linear, ``logit_c = mean_xy(W[c] . f[:, y, x]) + b_c``,
so ``W[c] . f`` is exactly the per-location contribution to the logit: no gradients needed.

Two scalings:

* :func:`class_activation_map` (``Prediction.cam``): each map divided by its own maximum, [0, 1]
  (the shape of the evidence for one label; the API's long-standing contract).
* Overlays (:func:`write_overlay_png` with a :class:`OverlayLegend`): **one absolute scale per
  image**: ``ReLU(W[c] . f)`` in logit units divided by the largest value of any label's map of
  that image, so a weak label's map is visibly weaker than a strong one's, and the colour bar is
  labelled in logit-contribution units. A map with no positive evidence is written as such.

Overlays use the perceptually uniform *viridis* colour map, are PNGs encoded from pixels only (no
text chunks, no source metadata) and are written atomically (a temporary file, then a rename). They
are drawn on a bounded grid (long side at most :data:`OVERLAY_MAX_SIDE` px by default, the input
downscaled with its aspect kept): the map itself comes from a 7 x 7-ish feature grid, and an overlay
at full detector resolution cost about 60 bytes per input pixel (4 GB for 8000 x 8000).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .errors import InvalidArgumentError, OutputError

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)

COLORMAP = cv2.COLORMAP_VIRIDIS
COLORMAP_NAME = "viridis"
SCALE_RULE = ("colour = per-location contribution to this label's logit (ReLU(W.f), logit units); one scale for "
              "every label of this image: the top of the bar is the strongest location of any label")


#: default longest side (px) of an overlay's image area; the input is downscaled to it, never enlarged
OVERLAY_MAX_SIDE = 1024
#: accepted range of a caller's overlay long side: small enough to stay bounded, large enough to read
OVERLAY_SIDE_RANGE = (64, 8192)


def check_max_side(max_side: int) -> int:
    """``max_side`` if it is an integer in :data:`OVERLAY_SIDE_RANGE`, else InvalidArgumentError."""
    lo, hi = OVERLAY_SIDE_RANGE
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or not lo <= max_side <= hi:
        raise InvalidArgumentError(f"the overlay's longest side must be an integer in [{lo}, {hi}] px, got {max_side!r}")
    return int(max_side)


def overlay_shape(image_hw: tuple[int, int], max_side: int = OVERLAY_MAX_SIDE) -> tuple[int, int]:
    """(H, W) of an overlay of an ``image_hw`` input: scaled so the long side is at most ``max_side``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def fit_pixels(pixels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``pixels`` on the ``hw`` grid (OpenCV INTER_AREA: the antialiased box filter); as is if it already fits."""
    if tuple(pixels.shape[:2]) == tuple(hw):
        return pixels
    return cv2.resize(pixels, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_AREA)


def activation_map_raw(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ReLU(W[c] . features) on the feature grid (h x w), in logit units, unscaled."""
    if features.ndim != 3 or weights.ndim != 1 or weights.shape[0] != features.shape[0]:
        raise ValueError(f"features C x h x w and weights C expected, got {features.shape} and {weights.shape}")
    c, h, w = features.shape
    raw = (weights.astype(np.float32) @ features.reshape(c, h * w).astype(np.float32)).reshape(h, w)
    np.maximum(raw, 0.0, out=raw)
    return raw


def class_activation_map(features: np.ndarray, weights: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """CAM of one label: ReLU(W[c] . features), upsampled to ``out_hw`` (H, W), scaled to [0, 1].

    ``features`` is C x h x w (one image), ``weights`` the label's C classifier weights. A map with no
    positive evidence anywhere is all zeros (not rescaled noise).
    """
    raw = activation_map_raw(features, weights)
    peak = float(raw.max())
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(out_hw, dtype=np.float32)
    heat = cv2.resize(raw, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    heat *= 1.0 / float(heat.max())  # bilinear interpolation can miss the peak: rescale on the output grid
    return np.clip(heat, 0.0, 1.0, out=heat)


def absolute_map(raw: np.ndarray, scale: float, out_hw: tuple[int, int]) -> np.ndarray:
    """``raw`` (feature grid, logit units) upsampled to ``out_hw`` and divided by ``scale``, in [0, 1]."""
    if not np.isfinite(scale) or scale <= 0.0 or float(raw.max()) <= 0.0:
        return np.zeros(out_hw, dtype=np.float32)
    heat = cv2.resize(raw.astype(np.float32), (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    heat *= np.float32(1.0 / scale)
    return np.clip(heat, 0.0, 1.0, out=heat)


#: fraction of the overlay scale at which the heat is blended at full ``alpha``
OPAQUE_AT = 0.1


def _colour(values01: np.ndarray) -> np.ndarray:
    """RGB float32 colours of values in [0, 1] under :data:`COLORMAP`."""
    idx = np.clip(values01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(idx, COLORMAP), cv2.COLOR_BGR2RGB).astype(np.float32)


def overlay_heatmap(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image: the radiograph in gray with the heatmap (viridis) blended where it is warm.

    Colour encodes the absolute evidence (the shared scale); opacity rises with it and saturates at
    :data:`OPAQUE_AT` of the scale, so a weak but real map is still visible (in the cold colours)
    while regions without evidence keep the plain radiograph.
    """
    if pixels.shape != heatmap.shape:
        raise ValueError(f"image {pixels.shape} and heatmap {heatmap.shape} must have the same grid")
    gray = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB).astype(np.float32)
    colour = _colour(heatmap)
    weight = (alpha * np.clip(heatmap / OPAQUE_AT, 0.0, 1.0))[..., None]
    return np.clip(base * (1.0 - weight) + colour * weight + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class OverlayLegend:
    """What an overlay says about itself (burnt into a panel under the image)."""

    label: str
    probability: float
    threshold: Optional[float]          # None = undetermined (no decision for this label)
    decision: Optional[bool]            # None = undetermined
    model_id: str
    notice: str
    scale: float                        # logit contribution at the top of the colour bar
    empty: bool                         # the map has no positive evidence
    scale_rule: str = SCALE_RULE
    out_of_scope: bool = False          # the input scope gate flagged the image: no decision
    scope_reason: Optional[str] = None  # why (the gate's reasons, joined)
    input_shape: Optional[tuple] = None  # (H, W) of the input; the legend says when the overlay shows it smaller


def _ascii(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in str(text))


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE, _GRAY, _AMBER, _RED, _GREEN = (255, 255, 255), (190, 190, 190), (255, 196, 0), (255, 90, 90), (120, 230, 120)


def _decision_text(legend: OverlayLegend) -> tuple[str, str, tuple[int, int, int]]:
    p = legend.probability
    if legend.out_of_scope:
        why = f": {legend.scope_reason}" if legend.scope_reason else ""
        return (f"{legend.label}: OUT OF SCOPE (no decision)",
                f"probability {p:.3f}; the image is not like the model's training radiographs{why}", _AMBER)
    if legend.threshold is None or legend.decision is None:
        return (f"{legend.label}: UNDETERMINED",
                f"probability {p:.3f}; no threshold: this bundle makes no decision for this label", _AMBER)
    margin = p - legend.threshold
    verdict = "POSITIVE" if legend.decision else "negative"
    return (f"{legend.label}: {verdict}", f"probability {p:.3f} vs threshold {legend.threshold:.3f} "
            f"(margin {margin:+.3f})", _RED if legend.decision else _GREEN)


class _Panel:
    """Lays out wrapped text lines and a colour bar on a dark strip of a given width."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.scale = float(np.clip(width / 1400.0, 0.45, 2.2))
        self.thick = max(1, int(round(self.scale * 1.6)))
        (_, h), base = cv2.getTextSize("Ag", _FONT, self.scale, self.thick)
        self.line_h = int((h + base) * 1.45)
        self.margin = max(8, int(self.line_h * 0.6))
        self.ops: list[tuple] = []
        self.y = self.margin

    def _wrap(self, text: str, scale: float) -> list[str]:
        """Greedy word wrap measured with the font itself."""
        limit = self.width - 2 * self.margin
        lines: list[str] = []
        current = ""
        for word in _ascii(text).split():
            trial = f"{current} {word}" if current else word
            (tw, _), _ = cv2.getTextSize(trial, _FONT, scale, self.thick)
            if tw <= limit or not current:
                current = trial
            else:
                lines.append(current)
                current = word
        lines.append(current)
        return lines

    def text(self, text: str, colour=_WHITE, bold: bool = False, size: float = 1.0) -> None:
        scale = self.scale * size
        for line in self._wrap(text, scale):
            self.y += int(self.line_h * size)
            self.ops.append(("text", line, self.margin, self.y - int(self.line_h * size * 0.3), scale,
                             colour, self.thick + (1 if bold else 0)))

    def colour_bar(self, scale_value: float) -> None:
        bar_h = max(10, int(self.line_h * 0.8))
        top = self.y + int(self.line_h * 0.4)
        self.ops.append(("bar", self.margin, top, self.width - 2 * self.margin, bar_h))
        self.y = top + bar_h
        ticks = [(0.0, "0"), (0.5, f"{scale_value / 2:.3g}"), (1.0, f"{scale_value:.3g}")]
        self.y += int(self.line_h * 0.9)
        for frac, label in ticks:
            (tw, _), _ = cv2.getTextSize(label, _FONT, self.scale * 0.85, self.thick)
            x = self.margin + int(frac * (self.width - 2 * self.margin)) - int(frac * tw)
            self.ops.append(("text", label, x, self.y - int(self.line_h * 0.3), self.scale * 0.85, _GRAY, self.thick))

    def render(self) -> np.ndarray:
        height = self.y + self.margin
        panel = np.full((height, self.width, 3), 24, dtype=np.uint8)
        for op in self.ops:
            if op[0] == "text":
                _, line, x, y, scale, colour, thick = op
                cv2.putText(panel, line, (int(x), int(y)), _FONT, scale, colour, thick, cv2.LINE_AA)
            else:
                _, x, y, w, h = op
                ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :].repeat(h, axis=0)
                panel[y:y + h, x:x + w] = _colour(ramp).astype(np.uint8)
                cv2.rectangle(panel, (x - 1, y - 1), (x + w, y + h), _GRAY, 1)
        return panel


def legend_panel(legend: OverlayLegend, width: int, shown_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The RGB legend strip: decision, probability vs threshold, colour bar and its meaning, model, the
    scale of the image when it is shown smaller than the input (``shown_hw``), notice."""
    panel = _Panel(width)
    title, detail, colour = _decision_text(legend)
    panel.text(title, colour, bold=True, size=1.15)
    panel.text(detail)
    if legend.empty:
        panel.text("no positive evidence: this label's map is empty (nothing is highlighted)", _AMBER, bold=True)
    panel.colour_bar(legend.scale if legend.scale > 0 else 0.0)
    panel.text(f"{COLORMAP_NAME}: {legend.scale_rule}", _GRAY, size=0.85)
    panel.text(f"model {legend.model_id}", _GRAY, size=0.85)
    if shown_hw is not None and legend.input_shape is not None and tuple(legend.input_shape) != tuple(shown_hw):
        ih, iw = legend.input_shape
        panel.text(f"image shown at {shown_hw[1]} x {shown_hw[0]} px (input {iw} x {ih}, downscaled)", _GRAY, size=0.85)
    panel.text(legend.notice, _AMBER, size=0.85)
    return panel.render()


def _stamp_empty(rgb: np.ndarray) -> None:
    """Write "no positive evidence" on the image itself (top left, on a dark box)."""
    h, w = rgb.shape[:2]
    scale = float(np.clip(w / 900.0, 0.4, 2.5))
    thick = max(1, int(round(scale * 2)))
    text = "no positive evidence"
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    pad = max(4, th // 2)
    x0, y0 = pad, pad
    x1, y1 = min(w - 1, x0 + tw + 2 * pad), min(h - 1, y0 + th + base + 2 * pad)
    rgb[y0:y1, x0:x1] = (rgb[y0:y1, x0:x1].astype(np.float32) * 0.3).astype(np.uint8)
    cv2.putText(rgb, text, (x0 + pad, y0 + pad + th), _FONT, scale, _AMBER, thick, cv2.LINE_AA)


def render_overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45,
                   legend: OverlayLegend | None = None) -> np.ndarray:
    """The overlay as RGB uint8 on the grid of ``pixels`` (callers bound it: :func:`overlay_shape`). With a
    legend: the image at the top left, the legend panel below it (canvas at least 640 px wide so the text
    stays legible; padding is dark gray)."""
    rgb = overlay_heatmap(pixels, heatmap, alpha)
    if legend is None:
        return rgb
    if legend.empty:
        _stamp_empty(rgb)
    h, w = rgb.shape[:2]
    width = max(w, 640)
    panel = legend_panel(legend, width, (h, w))
    canvas = np.full((h + panel.shape[0], width, 3), 24, dtype=np.uint8)
    canvas[:h, :w] = rgb
    canvas[h:] = panel
    return canvas


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image: IHDR, IDAT and IEND only (no text, time or colour-profile chunks)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OutputError("could not encode the overlay as PNG")
    return buf.tobytes()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Every failure (missing folder, a file where a folder should be, read-only, disk full) is an
    :class:`~cxr_edge.errors.OutputError` naming the reason; no partial file is left behind.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    shown = os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if os.path.isdir(path):
        raise OutputError(f"could not write {what} to {shown!r}: it is a directory")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cxr-edge-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual new-file mode
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, NotADirectoryError) or (os.path.exists(folder) and not os.path.isdir(folder)):
            reason = "a path component is a file, not a folder"
        elif isinstance(exc, FileNotFoundError):
            reason = "the folder does not exist"
        raise OutputError(f"could not write {what} to {shown!r}: {reason}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_overlay_png(path: str | os.PathLike, pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45,
                      legend: OverlayLegend | None = None) -> None:
    """Write the overlay as an RGB PNG (no metadata: nothing from the source file is carried over).

    Without ``legend`` the PNG is the plain H x W overlay; with one it carries the legend panel
    (see :func:`render_overlay`). Failures raise :class:`~cxr_edge.errors.OutputError`.
    """
    write_bytes_atomic(path, encode_png(render_overlay(pixels, heatmap, alpha, legend)), "overlay PNG")
