"""Turn any supported input into one [0, 1] float32 grayscale radiograph, or refuse with a typed error.

Sources: a path, raw bytes (PNG, JPEG, DICOM), a numpy array or a PIL image. The format is
decided from magic bytes (never from a file extension). PNG/JPEG headers are checked for size
before any pixel is decoded (decompression bombs) and their chunk/marker structure is walked
so a truncated file never yields silently padded pixels. Decoding is OpenCV's (fast, 16-bit).
DICOM lives in :mod:`cxr_edge.dicom`, imported only when a DICOM arrives (pydicom is slow to import).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from .errors import (CorruptImageError, ImageError, InvalidArgumentError, InvalidImageError,
                     UnsupportedFormatError)

__all__ = ["Radiograph", "read_image", "sniff_format", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = "PNG (8/16-bit), JPEG, DICOM (CR/DX chest)"

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]


@dataclass(frozen=True, eq=False, repr=False)
class Radiograph:
    """A decoded radiograph: float32 H x W pixels in [0, 1] (0 = black) plus non-identifying facts.

    ``info`` never holds patient attributes (names, IDs, dates, institutions, UIDs), so it can be
    logged or returned to a client as is.
    """

    pixels: np.ndarray
    format: str
    bit_depth: int
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # the default repr would dump the pixel array
        return (f"Radiograph(format={self.format!r}, shape={tuple(self.pixels.shape)}, "
                f"bit_depth={self.bit_depth}, info={self.info!r})")


# --------------------------------------------------------------------------- format sniffing

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# (prefix, offset, what it looks like) for recognised formats the runtime does not read.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, int, str], ...] = (
    (b"BM", 0, "a BMP image"),
    (b"II*\x00", 0, "a TIFF image"),
    (b"MM\x00*", 0, "a TIFF image"),
    (b"II+\x00", 0, "a BigTIFF image"),
    (b"MM\x00+", 0, "a BigTIFF image"),
    (b"GIF87a", 0, "a GIF image"),
    (b"GIF89a", 0, "a GIF image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "a JPEG 2000 (JP2) file"),
    (b"\xffO\xffQ", 0, "a raw JPEG 2000 codestream"),
    (b"\xff\x0a", 0, "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "a JPEG XL image"),
    (b"ftyp", 4, "an ISO media file (HEIC/AVIF/MP4)"),
    (b"%PDF", 0, "a PDF document"),
    (b"\x93NUMPY", 0, "a NumPy .npy file (load it and pass the array instead)"),
    (b"\x89HDF", 0, "an HDF5 file"),
    (b"PK\x03\x04", 0, "a ZIP archive"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"8BPS", 0, "a Photoshop PSD file"),
    (b"\x76\x2f\x31\x01", 0, "an OpenEXR image"),
    (b"qoif", 0, "a QOI image"),
    (b"n+1\x00", 344, "a NIfTI volume"),
    (b"ni1\x00", 344, "a NIfTI volume"),
)


def _looks_like_headerless_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble/"DICM" (old ACR-NEMA style, e.g. CR-MONO1-10-chest.dcm).

    It starts directly with a little-endian group 0x0002 or 0x0008 tag, followed either by an
    explicit two-letter VR or by an implicit 32-bit length that fits in the data.
    """
    if len(data) < 12:
        return False
    group, _element = struct.unpack_from("<HH", data, 0)
    if group not in (0x0002, 0x0008):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length < len(data) - 8


def sniff_format(data: bytes) -> str:
    """Return "png", "jpeg" or "dicom" from the leading bytes; raise UnsupportedFormatError otherwise.

    The message says what the bytes look like (BMP, TIFF, GIF, WebP, ...) and what is supported.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) == 0:
        raise UnsupportedFormatError(f"the input is empty (0 bytes); supported formats: {SUPPORTED_FORMATS}")
    if data.startswith(_PNG_SIG):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[128:132] == b"DICM" or _looks_like_headerless_dicom(data):
        return "dicom"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise UnsupportedFormatError(f"the input looks like a WebP image, which is not supported; "
                                     f"supported formats: {SUPPORTED_FORMATS}")
    for prefix, offset, what in _KNOWN_UNSUPPORTED:
        if data[offset:offset + len(prefix)] == prefix:
            raise UnsupportedFormatError(f"the input looks like {what}, which is not supported; "
                                         f"supported formats: {SUPPORTED_FORMATS}")
    raise UnsupportedFormatError(f"unrecognised data ({len(data)}+ bytes, no known image signature); "
                                 f"supported formats: {SUPPORTED_FORMATS}")


# --------------------------------------------------------------------------- shared checks

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


def to_unit_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 1`` (float32, C-contiguous, clipped to [0, 1]).

    Integer data with ``lo == 0`` takes one float32 division, so an 8-bit PNG and an 8-bit
    DICOM without a window give bit-identical results (``pixel / 255``).
    """
    if hi == lo:
        raise CorruptImageError("the image's declared intensity range is empty; cannot scale it")
    if np.issubdtype(arr.dtype, np.integer) and lo == 0 and hi > 0:
        out = np.divide(arr, np.float32(hi), dtype=np.float32)
    else:
        scaled = np.subtract(arr, lo, dtype=np.float64)
        scaled *= 1.0 / (hi - lo)
        out = scaled.astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out)


def _validate_limits(min_side: int, max_pixels: int) -> None:
    if isinstance(min_side, bool) or not isinstance(min_side, (int, np.integer)) or min_side < 1:
        raise InvalidArgumentError(f"min_side must be a positive integer, got {min_side!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise InvalidArgumentError(f"max_pixels must be a positive integer, got {max_pixels!r}")


# --------------------------------------------------------------------------- gray conversion

def _to_gray(img: np.ndarray, order: str) -> np.ndarray:
    """H x W x C -> H x W. Equal colour channels: take one (exact); else luminance. Alpha dropped.

    ``order`` is "bgr" for OpenCV decodes and "rgb" for arrays / PIL images.
    """
    if img.ndim == 2:
        return img
    channels = img.shape[2]
    if channels == 1:
        return img[:, :, 0]
    if channels == 2:  # gray + alpha
        return img[:, :, 0]
    if channels not in (3, 4):
        raise InvalidImageError(f"the image has {channels} channels; expected 1 (gray), 3 (colour) or 4 (+alpha)")
    c0, c1, c2 = img[:, :, 0], img[:, :, 1], img[:, :, 2]
    if np.array_equal(c0, c1) and np.array_equal(c0, c2):
        return c0
    if img.dtype == np.float64:
        img = img.astype(np.float32)
    code = {("bgr", 3): cv2.COLOR_BGR2GRAY, ("bgr", 4): cv2.COLOR_BGRA2GRAY,
            ("rgb", 3): cv2.COLOR_RGB2GRAY, ("rgb", 4): cv2.COLOR_RGBA2GRAY}[(order, channels)]
    return cv2.cvtColor(np.ascontiguousarray(img), code)


# --------------------------------------------------------------------------- PNG

_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit_depth, colour_type) from IHDR, after walking the chunk list to IEND.

    The walk reads only 8-byte chunk headers (no CRC, no inflate) and refuses any file whose
    chunks run past the end or which lacks IEND: a truncated PNG never reaches the decoder.
    """
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise CorruptImageError("the PNG is truncated or damaged: no valid IHDR header")
    width, height, bit_depth, colour_type = struct.unpack_from(">IIBB", data, 16)
    if colour_type not in _PNG_BIT_DEPTHS or bit_depth not in _PNG_BIT_DEPTHS[colour_type]:
        raise CorruptImageError(f"the PNG header is invalid (bit depth {bit_depth}, colour type {colour_type})")
    pos, n, seen_idat = 8, len(data), False
    while True:
        if pos + 12 > n:
            raise CorruptImageError("the PNG is truncated: its chunks end before the IEND chunk")
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            raise CorruptImageError("the PNG is truncated: a chunk runs past the end of the data")
        if ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            break
        pos = end
    if not seen_idat:
        raise CorruptImageError("the PNG has no image data (IDAT chunk)")
    return width, height, bit_depth, colour_type


def _read_png(data: bytes, min_side: int, max_pixels: int) -> Radiograph:
    width, height, bit_depth, colour_type = _png_header(data)
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what="PNG")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape[:2] != (height, width):
        raise CorruptImageError("the PNG could not be decoded (damaged image data)")
    gray = _to_gray(img, "bgr")
    maxval = 65535 if gray.dtype == np.uint16 else 255  # OpenCV expands 1/2/4-bit samples to 0..255
    pixels = to_unit_range(gray, 0, maxval)
    info = {"width": width, "height": height, "channels_in": _PNG_CHANNELS[colour_type]}
    return Radiograph(pixels, "png", bit_depth, info)


# --------------------------------------------------------------------------- JPEG

# A marker is 0xFF followed by anything but 0x00 (stuffing), RST0-7 (inside scans) or 0xFF (fill).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC


def _jpeg_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, precision, components) from SOF, after checking the stream reaches EOI.

    Segments are skipped by their lengths (so EXIF thumbnails do not count) and entropy-coded
    scans are searched for the next marker with a C-speed regex. Without EOI the file is cut.
    """
    pos, n = 2, len(data)
    sof: tuple[int, int, int, int] | None = None
    while True:
        m = _JPEG_MARKER.search(data, pos)
        if m is None:
            raise CorruptImageError("the JPEG is truncated: it ends before its end-of-image marker")
        marker = data[m.start() + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, 0xD8):  # TEM, SOI: no length field
            pos = m.end()
            continue
        if m.start() + 4 > n:
            raise CorruptImageError("the JPEG is truncated inside a marker segment")
        (length,) = struct.unpack_from(">H", data, m.start() + 2)
        seg_end = m.start() + 2 + length
        if length < 2 or seg_end > n:
            raise CorruptImageError("the JPEG is truncated or damaged: a segment runs past the end")
        if marker in _SOF_MARKERS and sof is None:
            if length < 8:
                raise CorruptImageError("the JPEG frame header is damaged")
            precision, height, width, comps = struct.unpack_from(">BHHB", data, m.start() + 4)
            sof = (width, height, precision, comps)
        pos = seg_end  # after SOS the entropy-coded data follows; the regex skips it
    if sof is None:
        raise CorruptImageError("the JPEG has no frame header (SOF)")
    return sof


def _read_jpeg(data: bytes, min_side: int, max_pixels: int) -> Radiograph:
    width, height, precision, comps = _jpeg_header(data)
    if height == 0:
        raise UnsupportedFormatError("the JPEG defines its height later in the stream (DNL), which is not supported")
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what="JPEG")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape[:2] != (height, width):
        raise CorruptImageError("the JPEG could not be decoded (damaged or unsupported coding)")
    gray = _to_gray(img, "bgr")
    maxval = 255 if gray.dtype == np.uint8 else (1 << precision) - 1  # 12-bit JPEG decodes to uint16
    pixels = to_unit_range(gray, 0, maxval)
    return Radiograph(pixels, "jpeg", precision, {"width": width, "height": height, "channels_in": comps})


# --------------------------------------------------------------------------- arrays and PIL

def _from_array(arr: np.ndarray, min_side: int, max_pixels: int, fmt: str = "array",
                channels_in: int | None = None) -> Radiograph:
    """uint8 -> /255, uint16 -> /65535, float -> as is (must be finite and in [0, 1]); others refused."""
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        pass
    elif arr.ndim != 2:
        raise InvalidImageError(f"expected a 2-D (H x W) or H x W x 1/3/4 array, got shape {arr.shape}")
    height, width = arr.shape[:2]
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what=f"{fmt} image")
    dtype = arr.dtype
    if dtype == np.uint8 or dtype == np.uint16:
        gray = _to_gray(arr, "rgb")
        pixels = to_unit_range(gray, 0, 255 if dtype == np.uint8 else 65535)
        bit_depth = dtype.itemsize * 8
    elif dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidImageError("the float image contains NaN or inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidImageError(f"the float image has values in [{lo:.6g}, {hi:.6g}], out of range: "
                                    "float images must lie in [0, 1]")
        gray = _to_gray(arr, "rgb")
        pixels = np.array(gray, dtype=np.float32, order="C", copy=True)  # never alias the caller's array
        np.clip(pixels, 0.0, 1.0, out=pixels)  # luminance rounding can step a hair outside
        bit_depth = dtype.itemsize * 8
    else:
        raise InvalidImageError(f"unsupported pixel dtype {dtype}: use uint8, uint16 or float in [0, 1]")
    channels = channels_in if channels_in is not None else (1 if arr.ndim == 2 else arr.shape[2])
    return Radiograph(pixels, fmt, bit_depth, {"width": width, "height": height, "channels_in": channels})


_PIL_CHANNELS = {"L": 1, "LA": 2, "I;16": 1, "I;16B": 1, "I;16L": 1, "I": 1, "F": 1, "RGB": 3, "RGBA": 4,
                 "P": 1, "PA": 2, "CMYK": 4, "YCbCr": 3}


def _from_pil(image: Any, min_side: int, max_pixels: int) -> Radiograph:
    """PIL image -> numpy with the array rules; size is checked before a lazy image is loaded."""
    width, height = image.size
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what="PIL image")
    mode = image.mode
    if mode not in _PIL_CHANNELS:
        raise InvalidImageError(f"unsupported PIL image mode {mode!r}; use L, I;16, I, F, RGB or RGBA")
    try:
        if mode in ("P", "PA", "CMYK", "YCbCr"):
            image = image.convert("RGB")
        arr = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImageError(f"the PIL image could not be loaded ({type(exc).__name__})") from None
    if mode == "I":  # 32-bit signed container, in practice 16-bit PNG samples
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise InvalidImageError(f"PIL mode 'I' values span [{lo}, {hi}]; only 0..65535 (16-bit) is accepted")
        arr = arr.astype(np.uint16)
    elif mode == "LA":
        arr = arr[:, :, 0]
    elif arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return _from_array(arr, min_side, max_pixels, fmt="pil", channels_in=_PIL_CHANNELS[mode])


# --------------------------------------------------------------------------- entry point

def _read_path(path: str | os.PathLike) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"no such file: {os.fspath(path)}") from None
    except IsADirectoryError:
        raise ImageError(f"is a directory, not an image file: {os.fspath(path)}") from None
    except PermissionError:
        raise ImageError(f"permission denied reading: {os.fspath(path)}") from None
    except OSError as exc:
        raise ImageError(f"could not read {os.fspath(path)}: {exc.strerror or type(exc).__name__}") from None


def read_image(source: Source, *, min_side: int = 128, max_pixels: int = 64_000_000,
               allow_any_body_part: bool = False) -> Radiograph:
    """Read a radiograph from a path, bytes, numpy array or PIL image into float32 [0, 1] grayscale.

    Every refusal is an :class:`~cxr_edge.errors.ImageError` subclass with a message naming the
    problem (and, for DICOM, the header field), never a patient attribute. ``allow_any_body_part``
    only relaxes the DICOM anatomy checks (body part, panoramic geometry), never modality or format.
    """
    _validate_limits(min_side, max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, min_side, max_pixels)
    if _is_pil_image(source):
        return _from_pil(source, min_side, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        data = _read_path(source)
    elif isinstance(source, bytes):
        data = source
    elif isinstance(source, (bytearray, memoryview)):
        data = bytes(source)
    else:
        raise InvalidArgumentError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes, "
                                   "a numpy array or a PIL image")
    fmt = sniff_format(data)
    if fmt == "png":
        return _read_png(data, min_side, max_pixels)
    if fmt == "jpeg":
        return _read_jpeg(data, min_side, max_pixels)
    from .dicom import read_dicom  # lazy: pydicom costs import time that PNG users should not pay

    return read_dicom(data, min_side=min_side, max_pixels=max_pixels, allow_any_body_part=allow_any_body_part)


def _is_pil_image(obj: Any) -> bool:
    """True for PIL images without importing PIL for callers that never use it."""
    mod = type(obj).__module__
    if not mod.startswith("PIL."):
        return False
    from PIL import Image

    return isinstance(obj, Image.Image)
