"""Input scope gate: does an image look like a frontal adult chest radiograph the model can read?

The classifier answers for *any* pixels it is given; this module says when it should not. Two
layers, both cheap, both without a second network (details and numbers: ``docs/scope.md``):

1. **Pixel rules** (:func:`check_pixels`, pure numpy + one OpenCV resize, on the [0, 1] gray
   pixels of a :class:`~cxr_edge.radiograph.Radiograph`): near-constant images, extreme aspect
   ratios, inverted intensities (MONOCHROME mix-ups: lungs bright, mediastinum dark), upside-down
   or rotated images and images without a chest layout (a 16 x 16 template); and, on the
   raw decoded colour array when the caller has one, colour photographs (:func:`check_colour`).
   Each rule returns a reason string or ``None``.
2. **Feature density** (:class:`ScopeGate`): the manifest's ``scope`` block
   (:class:`~cxr_edge.manifest.ScopeSpec`) is a PCA + Mahalanobis model of the pooled
   ``features`` of the training images; an image whose score exceeds the manifest's threshold is
   unlike anything the model was trained on.

``ScopeGate.assess(pixels, features)`` runs both and returns a :class:`ScopeResult`. Lateral,
non-chest and non-radiograph DICOMs are refused earlier, by :mod:`cxr_edge.dicom`, from their
headers. No torch, no scipy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from .errors import InvalidArgumentError
from .manifest import Manifest, ScopeSpec

__all__ = ["ScopeGate", "ScopeResult", "check_pixels", "check_constant", "check_aspect", "check_inverted",
           "check_orientation", "check_layout", "check_colour", "inversion_score", "layout_scores",
           "colour_fraction", "summarize", "PixelSummary", "PIXEL_RULES", "CHEST_TEMPLATE"]

#: Pixel-rule limits (model-independent; how each was chosen: docs/scope.md, "Budget"). The three data-set
#: limits are split-conformal at a 0.1% false-flag budget each on the 1,070 in-scope non-evaluation NIH images
#: (the pool minus teacher_val_images.csv minus one image stored inverted): the most extreme of them, rounded
#: outwards, so P(a rule flags an in-scope image like them) <= 1/1071 each. Recompute with
#: ``python -m export.scope_fit pixel-limits --split-config docs/results/kd-session13/kd-s0.config.json --exclude
#: 00017625_000.png`` (tests/test_scope_fit.py checks these numbers against it when the data is there).
PIXEL_RULES: dict[str, float] = {
    #: near-constant (a priori): intensity standard deviation below this (in-scope NIH images: min 0.096) ...
    "min_std": 0.02,
    #: ... or 1st-99th percentile dynamic range below this (in-scope NIH images: min 0.37)
    "min_range": 0.08,
    #: (a priori) long side / short side above this (chest radiographs: ~0.8-1.25; 14 x 17 in film 1.21)
    "max_aspect": 2.0,
    #: inverted when the inversion score is below minus this (score > 0 for a normal radiograph; conformal:
    #: the lowest in-scope score is -0.1087; catches 100% of the inverses of those images with the later rules)
    "inversion_margin": 0.109,
    #: skewness weight in the inversion score (radiograph histograms are skewed towards bright; a design choice)
    "inversion_skew_weight": 0.1,
    #: upside down / rotated: a flipped or rotated copy fits the chest template better by more than this
    #: (conformal: the largest in-scope margin is 0.2232; catches 99.4% of those images' vertical flips)
    "orientation_margin": 0.224,
    #: no chest layout: correlation with the chest template below this (conformal: the lowest in-scope is 0.2469)
    "min_layout": 0.246,
    #: colour photograph (a priori; gray radiographs cannot calibrate it): more than this fraction of pixels has
    #: chroma (max - min channel) > ...
    "colour_fraction": 0.05,
    #: ... this, in [0, 1] units (gray stored as RGB: 0; JPEG chroma noise: < 0.03)
    "colour_chroma": 0.08,
}

#: Mean of the 1,071 NIH ChestX-ray14 training images (teacher_train_images.csv), each area-resized to
#: 16 x 16 and standardised (zero mean, unit std), standardised again: the frontal chest layout
#: (dark lungs either side of a bright mediastinum, bright diaphragm and abdomen below). 256 numbers,
#: not pixels of any one image.
CHEST_TEMPLATE = np.array([
    -2.37, -2.32, -2.24, -2.14, -1.90, -1.24, -0.31,  0.33,  0.38, -0.17, -1.06, -1.75, -2.03, -2.15, -2.20, -2.30,
    -1.90, -1.60, -1.41, -1.30, -1.17, -0.85, -0.27,  0.23,  0.28, -0.16, -0.75, -1.09, -1.23, -1.33, -1.44, -1.86,
    -1.02, -0.55, -0.38, -0.37, -0.49, -0.63, -0.43,  0.10,  0.20, -0.33, -0.67, -0.55, -0.38, -0.35, -0.49, -0.95,
    -0.34,  0.11,  0.18, -0.06, -0.56, -0.83, -0.62,  0.03,  0.23, -0.51, -0.91, -0.71, -0.20,  0.13,  0.12, -0.28,
     0.00,  0.34,  0.35, -0.11, -0.84, -1.13, -0.76,  0.11,  0.39, -0.55, -1.16, -1.02, -0.31,  0.25,  0.31,  0.02,
     0.07,  0.36,  0.38, -0.21, -0.96, -1.20, -0.73,  0.27,  0.60, -0.39, -1.15, -1.10, -0.42,  0.26,  0.33,  0.06,
    -0.06,  0.26,  0.34, -0.28, -0.94, -1.06, -0.47,  0.52,  0.81, -0.05, -0.89, -1.02, -0.46,  0.22,  0.24, -0.07,
    -0.29,  0.10,  0.28, -0.31, -0.83, -0.79, -0.12,  0.79,  1.02,  0.36, -0.48, -0.80, -0.44,  0.16,  0.09, -0.33,
    -0.54, -0.03,  0.22, -0.26, -0.62, -0.47,  0.20,  1.03,  1.23,  0.75,  0.01, -0.48, -0.34,  0.10, -0.02, -0.57,
    -0.74, -0.11,  0.19, -0.11, -0.29, -0.09,  0.50,  1.23,  1.40,  1.05,  0.51, -0.05, -0.16,  0.07, -0.09, -0.76,
    -0.91, -0.19,  0.21,  0.18,  0.20,  0.39,  0.85,  1.41,  1.53,  1.23,  0.85,  0.35,  0.07,  0.06, -0.19, -0.92,
    -1.09, -0.31,  0.26,  0.53,  0.73,  0.92,  1.22,  1.58,  1.64,  1.38,  1.08,  0.70,  0.36,  0.10, -0.33, -1.09,
    -1.31, -0.42,  0.37,  0.87,  1.18,  1.36,  1.53,  1.74,  1.76,  1.55,  1.32,  1.02,  0.66,  0.21, -0.46, -1.29,
    -1.48, -0.52,  0.45,  1.10,  1.46,  1.64,  1.75,  1.88,  1.87,  1.71,  1.52,  1.26,  0.87,  0.29, -0.56, -1.46,
    -1.59, -0.58,  0.51,  1.21,  1.59,  1.78,  1.87,  1.96,  1.93,  1.80,  1.65,  1.40,  1.00,  0.34, -0.63, -1.57,
    -1.53, -0.53,  0.56,  1.25,  1.61,  1.79,  1.87,  1.94,  1.92,  1.81,  1.68,  1.45,  1.07,  0.40, -0.61, -1.56
], dtype=np.float32).reshape(16, 16)

_SAMPLE_SIDE = 256  # every statistic reads one strided sample of at most ~256 x 256 pixels: O(1) cost
_THUMB = 64         # one 64 x 64 area average of that sample; the 32 x 32 region grid and 16 x 16 layout derive from it
_REGION_GRID = 32


@dataclass(frozen=True)
class PixelSummary:
    """What every pixel rule reads, computed once per image (:func:`summarize`)."""

    height: int
    width: int
    std: float
    p1: float
    p99: float
    skew: float
    thumb: np.ndarray  # 64 x 64 float64, area average of the (stretched) image
    layout: tuple[float, float, str]  # :func:`layout_scores`, computed once: two rules read it


def _check_2d(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise InvalidArgumentError(f"scope checks expect a 2-D gray image, got shape {pixels.shape}")
    return pixels


def summarize(pixels: np.ndarray | PixelSummary) -> PixelSummary:
    """Intensity statistics and the 64 x 64 area thumbnail, all from one strided sample of the image (every
    k-th pixel, at most ~256 px a side): the image itself is read once, sparsely, whatever its size.

    (An earlier summary took the thumbnail from a second, finer strided copy, up to 512 px a side: a third
    of the pixel rules' time inside ``predict``. The data-set limits in ``PIXEL_RULES`` were re-derived for
    this one: docs/results/scope-thumb/PLAN.md.)"""
    if isinstance(pixels, PixelSummary):
        return pixels
    pixels = _check_2d(pixels)
    h, w = pixels.shape
    step = max(1, int(np.ceil(max(h, w) / _SAMPLE_SIDE)))
    sample = np.ascontiguousarray(pixels[::step, ::step], dtype=np.float32)
    s = sample.ravel()
    mean = float(s.mean(dtype=np.float64))
    d = s - np.float32(mean)
    var = float(np.dot(d, d)) / d.size
    std = var ** 0.5
    skew = float(np.dot(d * d, d)) / d.size / std ** 3 if std > 1e-6 else 0.0
    q = s[:: 4] if s.size >= 4 * 4096 else s  # percentiles from >= 4k values of the sample
    lo_i, hi_i = int(0.01 * (q.size - 1)), int(0.99 * (q.size - 1))
    part = np.partition(q, (lo_i, hi_i))
    thumb = _area_thumbnail(sample, _THUMB).astype(np.float64)
    return PixelSummary(h, w, std, float(part[lo_i]), float(part[hi_i]), skew, thumb, _layout(thumb))


def _area_thumbnail(src: np.ndarray, side: int) -> np.ndarray:
    """``cv2.resize(src, (side, side), INTER_AREA)`` as two one-axis passes, the longer axis first.

    Area weights are separable, so the result is the same to float rounding (<= 3e-7 on pool images),
    and about twice as fast: OpenCV's integer-factor path often serves the first pass (256 -> 64 rows),
    and the second, generic pass sees ``side / h`` of the pixels."""
    h, w = src.shape
    if h >= w:
        rows = cv2.resize(src, (w, side), interpolation=cv2.INTER_AREA)
        return cv2.resize(rows, (side, side), interpolation=cv2.INTER_AREA)
    cols = cv2.resize(src, (side, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(cols, (side, side), interpolation=cv2.INTER_AREA)


def _block_mean(a: np.ndarray, n: int) -> np.ndarray:
    f = a.shape[0] // n
    return a.reshape(n, f, n, f).mean(axis=(1, 3))


def check_constant(pixels: np.ndarray | PixelSummary, *, min_std: float = PIXEL_RULES["min_std"],
                   min_range: float = PIXEL_RULES["min_range"]) -> str | None:
    """A blank or near-blank image (tiny standard deviation or dynamic range): no anatomy to read."""
    s = summarize(pixels)
    if s.std < min_std or (s.p99 - s.p1) < min_range:
        return (f"near-constant image: intensity std {s.std:.3f}, 1-99% range {s.p99 - s.p1:.3f} "
                f"(a radiograph has std >= {min_std} and range >= {min_range})")
    return None


def check_aspect(pixels: np.ndarray | PixelSummary, *, max_aspect: float = PIXEL_RULES["max_aspect"]) -> str | None:
    """An extreme aspect ratio (a panoramic, a strip, a screenshot of a scroll): not a chest film."""
    h, w = (pixels.height, pixels.width) if isinstance(pixels, PixelSummary) else _check_2d(pixels).shape
    ratio = max(h, w) / min(h, w)
    if ratio > max_aspect:
        return f"aspect ratio {ratio:.2f}:1 exceeds {max_aspect:g}:1 ({w} x {h} px)"
    return None


def inversion_score(pixels: np.ndarray | PixelSummary, *,
                    skew_weight: float = PIXEL_RULES["inversion_skew_weight"]) -> float:
    """Positive for a normally displayed frontal chest radiograph, negative for an inverted one.

    On a 32 x 32 area-averaged thumbnail (0 = black): the mean of the mediastinum (rows 20-65%,
    columns 44-56%) and of the lower band (rows 82-100%, columns 15-85%: diaphragm and abdomen)
    minus the mean of the two lung fields (rows 20-65%, columns 12-38% and 62-88%), averaged; minus
    ``skew_weight`` times the intensity skewness (radiographs: mostly negative). Inverting the
    image (1 - x) flips the sign of every term.
    """
    s = summarize(pixels)
    g = _block_mean(s.thumb, _REGION_GRID)
    n = _REGION_GRID

    def region(y0: float, y1: float, x0: float, x1: float) -> float:
        return float(g[int(y0 * n):int(y1 * n), int(x0 * n):int(x1 * n)].mean())

    lungs = 0.5 * (region(0.20, 0.65, 0.12, 0.38) + region(0.20, 0.65, 0.62, 0.88))
    mediastinum = region(0.20, 0.65, 0.44, 0.56)
    lower = region(0.82, 1.00, 0.15, 0.85)
    return 0.5 * (mediastinum - lungs) + 0.5 * (lower - lungs) - skew_weight * s.skew


def check_inverted(pixels: np.ndarray | PixelSummary, *,
                   margin: float = PIXEL_RULES["inversion_margin"]) -> str | None:
    """Lungs brighter than the mediastinum and abdomen: a MONOCHROME1/2 mix-up (or not a chest)."""
    score = inversion_score(pixels)
    if score < -margin:
        return (f"intensities look inverted (lung fields brighter than mediastinum and abdomen; inversion score "
                f"{score:.3f} < -{margin:g}): a MONOCHROME1/MONOCHROME2 mix-up?")
    return None


# (a chest is nearly left-right symmetric, so "flipped vertically" and "rotated 180" are told apart only weakly)
_ORIENTATIONS = (("upside down (flipped vertically)", lambda t: t[::-1]),
                 ("rotated 90 degrees clockwise", lambda t: np.rot90(t, 1)),
                 ("rotated 90 degrees counter-clockwise", lambda t: np.rot90(t, 3)),
                 ("upside down (rotated 180 degrees)", lambda t: t[::-1, ::-1]))


def _orientation_templates() -> np.ndarray:
    """5 x 256: row k holds the template's weights on the *given* thumbnail's pixels for view k (as given,
    then each of :data:`_ORIENTATIONS`), so that ``sum(view_k(t) * T) == rows[k] @ t.ravel()``: one
    matrix-vector product scores every orientation without building the flipped/rotated copies."""
    side = CHEST_TEMPLATE.shape[0]
    index = np.arange(side * side).reshape(side, side)
    template = CHEST_TEMPLATE.astype(np.float64).ravel()
    rows = np.empty((1 + len(_ORIENTATIONS), side * side))
    for k, view in enumerate([lambda t: t] + [f for _, f in _ORIENTATIONS]):
        rows[k, view(index).ravel()] = template  # view(t)[i, j] is t.flat[view(index)[i, j]]
    return rows / template.size


_VIEW_TEMPLATES = _orientation_templates()


def layout_scores(pixels: np.ndarray | PixelSummary) -> tuple[float, float, str]:
    """(c0, c_best, how): the image's correlation with :data:`CHEST_TEMPLATE` (on a 16 x 16 area thumbnail,
    stretched like the model's input), the best correlation after undoing a flip/rotation, and which one."""
    return summarize(pixels).layout


def _layout(thumb: np.ndarray) -> tuple[float, float, str]:
    """:func:`layout_scores` of a 64 x 64 thumbnail."""
    t = _block_mean(thumb, CHEST_TEMPLATE.shape[0])
    sd = float(t.std())
    t = (t - t.mean()) / sd if sd > 1e-9 else np.zeros_like(t)
    corr = _VIEW_TEMPLATES @ t.ravel()  # correlation of each view with the template (_orientation_templates)
    k = int(np.argmax(corr[1:]))  # the first of equals wins
    return float(corr[0]), float(corr[1 + k]), _ORIENTATIONS[k][0]


def check_orientation(pixels: np.ndarray | PixelSummary, *, margin: float = PIXEL_RULES["orientation_margin"],
                      min_corr: float = PIXEL_RULES["min_layout"]) -> str | None:
    """An upside-down or rotated radiograph: a flipped or rotated copy fits the chest layout clearly better
    (by more than ``margin``, and well enough to be a chest at all: ``min_corr``; else see :func:`check_layout`)."""
    c0, best, how = layout_scores(pixels)
    if best - c0 > margin and best >= min_corr:
        return (f"the image looks {how}: the chest template fits it better undone (correlation {best:.2f} vs "
                f"{c0:.2f} as given)")
    return None


def check_layout(pixels: np.ndarray | PixelSummary, *, min_corr: float = PIXEL_RULES["min_layout"]) -> str | None:
    """No frontal chest layout at all (correlation with the chest template below ``min_corr``)."""
    c0, _, _ = layout_scores(pixels)
    if c0 < min_corr:
        return f"no frontal chest layout: correlation with the chest template {c0:.2f} < {min_corr:g}"
    return None


def colour_fraction(rgb: np.ndarray, *, chroma: float = PIXEL_RULES["colour_chroma"]) -> float:
    """Fraction of pixels whose chroma (max - min of R, G, B, in [0, 1] units) exceeds ``chroma``."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InvalidArgumentError(f"check_colour expects an H x W x 3 (or x 4) array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    elif arr.dtype.kind == "f":
        scale = 1.0
    else:
        raise InvalidArgumentError(f"check_colour expects uint8, uint16 or float [0, 1] data, got {arr.dtype}")
    h, w = arr.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / _SAMPLE_SIDE)))
    s = arr[::step, ::step, :3].astype(np.float32)
    spread = (s.max(axis=2) - s.min(axis=2)) / np.float32(scale)
    return float((spread > chroma).mean())


def check_colour(rgb: np.ndarray | float, *, max_fraction: float = PIXEL_RULES["colour_fraction"],
                 chroma: float = PIXEL_RULES["colour_chroma"]) -> str | None:
    """A colour photograph (or a pseudo-coloured rendering): radiographs are gray.

    Needs the *decoded colour array* (``read_image`` converts to gray, and ``Radiograph.info``
    only keeps ``channels_in``): call it where the RGB pixels still exist. Gray stored as RGB,
    JPEG chroma noise and small coloured annotations (< 5% of the pixels) pass. ``rgb`` may also be
    a fraction already measured with :func:`colour_fraction` (a reader that keeps only that number).
    """
    frac = float(rgb) if isinstance(rgb, (float, int, np.floating)) else colour_fraction(rgb, chroma=chroma)
    if frac > max_fraction:
        return f"colour image: {frac:.0%} of the pixels are coloured (chroma > {chroma:g}); radiographs are gray"
    return None


def check_pixels(pixels: np.ndarray | PixelSummary, rgb: np.ndarray | float | None = None) -> list[str]:
    """Every pixel rule that fires on a [0, 1] gray image (and on its colour array or measured
    :func:`colour_fraction`, when given)."""
    summary = summarize(pixels)
    reasons = [r for r in (check_constant(summary), check_aspect(summary)) if r]
    # a blank image has no anatomy to test; an inverted one flips every template correlation; a rotated one
    # has no upright layout: each later test is only asked when the earlier ones had nothing to say
    if not any(r.startswith("near-constant") for r in reasons):
        for rule in (check_inverted, check_orientation, check_layout):
            reason = rule(summary)
            if reason:
                reasons.append(reason)
                break
    if rgb is not None:
        col = check_colour(rgb)
        if col:
            reasons.append(col)
    return reasons


@dataclass(frozen=True)
class ScopeResult:
    """The gate's verdict for one image.

    ``score`` / ``threshold`` are the feature-density numbers (``None`` when the bundle has no
    scope block or no features were given); ``reasons`` names every rule that fired (empty when
    in scope).
    """

    in_scope: bool
    score: float | None
    threshold: float | None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"in_scope": bool(self.in_scope),
                "score": None if self.score is None else round(float(self.score), 4),
                "threshold": None if self.threshold is None else round(float(self.threshold), 4),
                "reasons": list(self.reasons)}


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sqrt":
        return np.sign(x) * np.sqrt(np.abs(x))
    return x


class ScopeGate:
    """Pixel rules plus, when the manifest has a ``scope`` block, the feature-density score.

    ``ScopeGate.from_manifest(manifest)`` always works: without a scope block ``has_features`` is
    False and only the pixel rules judge.
    """

    def __init__(self, spec: ScopeSpec | None) -> None:
        self.spec = spec
        if spec is not None:
            spec.validate()
            self._mean = spec.mean.astype(np.float32)
            self._components_t = np.ascontiguousarray(spec.components.T, dtype=np.float32)  # C x k
            self._inv_var = (1.0 / spec.variances.astype(np.float64)).astype(np.float32)
            self._k = spec.k
            self._rho = float(spec.residual_scale)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ScopeGate":
        return cls(getattr(manifest, "scope", None))

    @property
    def has_features(self) -> bool:
        return self.spec is not None

    @property
    def threshold(self) -> float | None:
        return None if self.spec is None else float(self.spec.threshold)

    @property
    def features_output(self) -> str | None:
        return None if self.spec is None else self.spec.features_output

    def pooled(self, features: np.ndarray) -> np.ndarray:
        """C x h x w (or N x C x h x w) feature maps -> pooled C (N x C); pooled input is returned as is."""
        f = np.asarray(features, dtype=np.float32)
        if self.spec is not None and f.ndim in (1, 2) and f.shape[-1] == self.spec.channels:
            return f
        if f.ndim == 3:
            return f.mean(axis=(1, 2))
        if f.ndim == 4:
            return f.mean(axis=(2, 3))
        raise InvalidArgumentError(f"features must be C, N x C, C x h x w or N x C x h x w, got shape {f.shape}")

    def scores(self, pooled: np.ndarray) -> np.ndarray:
        """Scores of an N x C batch of pooled features (formula: :class:`~cxr_edge.manifest.ScopeSpec`)."""
        if self.spec is None:
            raise InvalidArgumentError("this bundle's manifest has no scope block: no feature score")
        x = np.asarray(pooled, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.channels:
            raise InvalidArgumentError(f"pooled features must be N x {self.spec.channels}, got shape {x.shape}")
        d = _transform(x, self.spec.transform) - self._mean
        z = d @ self._components_t
        inside = (z * z * self._inv_var).sum(axis=1, dtype=np.float64) / self._k
        residual = np.maximum((d * d).sum(axis=1, dtype=np.float64) - (z * z).sum(axis=1, dtype=np.float64), 0.0)
        return 0.5 * (inside + residual / self._rho)

    def score(self, pooled_features: np.ndarray) -> float:
        """The score of one image's pooled features (C,), or of its C x h x w feature maps."""
        f = np.asarray(pooled_features)
        if f.ndim == 3:
            f = self.pooled(f)
        if f.ndim != 1:
            raise InvalidArgumentError(f"score takes one image's pooled features (C,), got shape {f.shape}")
        return float(self.scores(f[None])[0])

    def check_pixels(self, pixels: np.ndarray, rgb: np.ndarray | float | None = None) -> list[str]:
        return check_pixels(pixels, rgb)

    def assess(self, pixels: np.ndarray | None, features: np.ndarray | None = None,
               rgb: np.ndarray | float | None = None) -> ScopeResult:
        """Pixel rules (when ``pixels`` is given) and the feature score (when ``features`` is given).

        ``features``: this image's pooled features (C,) or feature maps (C x h x w); ``rgb``: the
        decoded colour array, or its :func:`colour_fraction`, when the input was colour.
        """
        reasons = check_pixels(pixels, rgb) if pixels is not None else []
        score = None
        if features is not None and self.spec is not None:
            pooled = self.pooled(features)
            if pooled.ndim != 1:
                raise InvalidArgumentError(f"assess takes one image's features, got shape {np.shape(features)}")
            if not np.isfinite(pooled).all():
                reasons.append("the model's features are not finite (NaN/inf)")
            else:
                score = float(self.scores(pooled[None])[0])
                if not score <= self.spec.threshold:
                    reasons.append(f"unlike the training radiographs: feature score {score:.2f} > threshold "
                                   f"{self.spec.threshold:.2f}")
        return ScopeResult(in_scope=not reasons, score=score, threshold=self.threshold, reasons=reasons)
