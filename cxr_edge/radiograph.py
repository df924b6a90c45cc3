"""The decoded-radiograph type and the checks every reader shares (PNG, JPEG, arrays, DICOM).

Kept apart from :mod:`cxr_edge.imaging` (which dispatches by format) and :mod:`cxr_edge.dicom`
(which imports pydicom) so neither has to import the other: the old names stay importable from
``cxr_edge.imaging``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import CorruptImageError, InvalidImageError

__all__ = ["Radiograph", "check_dimensions", "to_unit_range", "check_finite", "max_file_bytes",
           "BIT_DEPTH_SOURCES"]

#: What ``Radiograph.bit_depth`` was taken from:
#: ``"container"`` the sample size of the storage (8/16-bit PNG without sBIT, array dtype), an assumption;
#: ``"sBIT"`` the PNG sBIT chunk (significant bits); ``"SOF"`` the JPEG frame header's sample precision;
#: ``"BitsStored"`` the DICOM header field.
BIT_DEPTH_SOURCES = ("container", "sBIT", "SOF", "BitsStored")


@dataclass(frozen=True, eq=False, repr=False)
class Radiograph:
    """A decoded radiograph: float32 H x W pixels in [0, 1] (0 = black) plus non-identifying facts.

    ``bit_depth`` is the sample precision the [0, 1] scaling assumed and ``bit_depth_source`` says
    where it came from (see :data:`BIT_DEPTH_SOURCES`): a 16-bit PNG without sBIT is scaled by
    65535 and reports ``16, "container"``; with ``sBIT`` = 12 it reports ``12, "sBIT"``.
    ``info`` never holds patient attributes (names, IDs, dates, institutions, UIDs), so it can be
    logged or returned to a client as is.
    """

    pixels: np.ndarray
    format: str
    bit_depth: int
    info: dict = field(default_factory=dict)
    bit_depth_source: str = "container"

    def __repr__(self) -> str:  # the default repr would dump the pixel array
        return (f"Radiograph(format={self.format!r}, shape={tuple(self.pixels.shape)}, "
                f"bit_depth={self.bit_depth} ({self.bit_depth_source}), info={self.info!r})")


def max_file_bytes(max_pixels: int) -> int:
    """The largest encoded input (file or bytes) accepted for a given ``max_pixels``.

    The most bytes a legitimate encoding of ``max_pixels`` pixels needs is 8 per pixel (a 16-bit
    RGBA PNG stored without compression; native DICOM needs at most 4: 32 bits allocated, one
    sample), plus room for headers, DICOM private data and icons (64 MiB). Anything larger is not
    an image this runtime would decode anyway, so it is refused before it is read into memory.
    """
    return 8 * int(max_pixels) + (64 << 20)


def check_dimensions(height: int, width: int, *, min_side: int, max_pixels: int, what: str = "image") -> None:
    """Refuse sizes no chest radiograph has: a side under ``min_side``, or over ``max_pixels`` in all.

    Called on header values, before decoding, so a decompression bomb never allocates its pixels.
    """
    if height <= 0 or width <= 0:
        raise CorruptImageError(f"the {what} declares an empty size {width}x{height}")
    if height * width > max_pixels:
        raise InvalidImageError(f"the {what} is {width}x{height} = {height * width:,} pixels, over the limit of "
                                f"{max_pixels:,} (max_pixels); refused before decoding")
    if min(height, width) < min_side:
        raise InvalidImageError(f"the {what} is {width}x{height}, too small to be a radiograph "
                                f"(each side must be at least {min_side} pixels, min_side)")


def check_finite(arr: np.ndarray, what: str = "image") -> None:
    """Refuse NaN/inf values (float data only: integer arrays are always finite)."""
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise InvalidImageError(f"the {what} contains NaN or inf values after its intensity transforms; "
                                "refused rather than passed to the model")


def to_unit_range(arr: np.ndarray, lo: float, hi: float, what: str = "image") -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 1`` (float32, C-contiguous, clipped to [0, 1]).

    Integer data with ``lo == 0`` takes one float32 division, so an 8-bit PNG and an 8-bit
    DICOM without a window give bit-identical results (``pixel / 255``). Non-finite bounds or
    pixels (a NaN rescale slope or window, an overflow to inf) are refused: clipping would turn
    them into silent black/white pixels.
    """
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidImageError(f"the {what}'s declared intensity range is not finite (NaN/inf); cannot scale it")
    if hi == lo:
        raise CorruptImageError(f"the {what}'s declared intensity range is empty; cannot scale it")
    check_finite(arr, what)
    if np.issubdtype(arr.dtype, np.integer) and lo == 0 and hi > 0:
        out = np.divide(arr, np.float32(hi), dtype=np.float32)
        if np.float32(hi) >= 1:
            # the common case (a decoded PNG/JPEG/TIFF: 0..maxval): integers over a float32 divisor >= 1 are
            # finite, and every sample within [0, hi] maps into [0, 1] exactly (rounding is monotonic), so the
            # clip is needed only when a sample lies outside (two cheap integer reductions decide) and the
            # second finite scan never
            if arr.size and ((arr.dtype.kind == "i" and int(arr.min()) < 0) or int(arr.max()) > hi):
                np.clip(out, 0.0, 1.0, out=out)
            return np.ascontiguousarray(out)
    else:
        scaled = np.subtract(arr, lo, dtype=np.float64)
        scaled *= 1.0 / (hi - lo)
        out = scaled.astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    check_finite(out, what)  # (x - lo) / (hi - lo) can still overflow float32 for extreme finite inputs
    return np.ascontiguousarray(out)
