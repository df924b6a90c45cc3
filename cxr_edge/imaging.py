"""Turn any supported input into one [0, 1] float32 grayscale radiograph, or refuse with a typed error.

Sources: a path, raw bytes (PNG, JPEG, DICOM), a numpy array or a PIL image. The format is
decided from magic bytes (never from a file extension). Every input is checked before any pixel
is decoded, and nothing a decoder would silently patch up is let through:

* Paths: only regular files are read (a FIFO, device, socket or directory is refused without
  being read, so ``/dev/zero`` or a pipe never hangs), symlinks are followed but must end at a
  regular file, and files over :func:`~cxr_edge.radiograph.max_file_bytes` are refused before
  reading. Error messages never quote the path (a file name can carry patient data).
* PNG: the chunk list is walked to IEND with CRCs checked, the header size is checked
  against ``max_pixels``, and the zlib stream is inflated in bounded pieces to check it yields
  exactly the rows the header declares with valid filter bytes. Only then does OpenCV decode a
  minimal copy (IHDR, PLTE, IDAT, IEND): libpng never meets a problem it would print to stderr.
  The checked stream is kept and re-stored uncompressed for OpenCV (inflated once, see
  ``_PNG_KEEP_LIMIT``), except for very large images.
  ``sBIT`` is honoured for the intensity scale (see :func:`_png_scale`).
* JPEG: the marker structure is walked to EOI (see :func:`_jpeg_layout`), the frame size is
  checked against ``max_pixels`` and against the least coded data such a frame needs, the scan
  count is bounded and the scans must code the whole image; decoding is Pillow's libjpeg-turbo
  for 8-bit frames (optionally at 1/2, 1/4, 1/8 size, see ``decode_at_least``) and
  pylibjpeg-libjpeg for 12-bit and lossless ones (both silent, unlike OpenCV's libjpeg, which
  prints raw warnings on stderr), and a scan that ends early is detected (see :func:`_read_jpeg`).
* Every format: NaN/inf pixels are refused before an image is returned.

DICOM lives in :mod:`cxr_edge.dicom`, imported only when a DICOM arrives (pydicom is slow to
import); the shared :class:`Radiograph` and checks live in :mod:`cxr_edge.radiograph`.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from .errors import (CorruptImageError, ImageError, InvalidArgumentError, InvalidImageError,
                     UnsupportedFormatError)
from .radiograph import Radiograph, check_dimensions, check_finite, max_file_bytes, to_unit_range
from .manifest import DEFAULT_MAX_PIXELS

try:  # ISA-L's inflate and checksums: about 3x faster than zlib's on radiograph PNGs (wheels for x86-64, aarch64)
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - platforms without an isal wheel keep the standard library's zlib
    _zlib = zlib
_ZLIB_ERRORS = tuple({zlib.error, _zlib.error})

__all__ = ["Radiograph", "read_image", "sniff_format", "SUPPORTED_FORMATS", "check_dimensions", "to_unit_range",
           "max_file_bytes", "decode_floor", "DECODE_MARGIN"]

SUPPORTED_FORMATS = "PNG (8/16-bit), JPEG, DICOM (CR/DX chest)"

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]


# --------------------------------------------------------------------------- format sniffing

from .jpeg import (_check_jpeg_coded_size, _check_scans_complete, _decode_jpeg, _jpeg_layout, _jpeg_stream,  # noqa: F401
                   MAX_JPEG_SCANS, dct_scale, decoded_shape, verify_jpeg_codestream)

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


# --------------------------------------------------------------------------- limits

def _validate_limits(min_side: int, max_pixels: int) -> None:
    if isinstance(min_side, bool) or not isinstance(min_side, (int, np.integer)) or min_side < 1:
        raise InvalidArgumentError(f"min_side must be a positive integer, got {min_side!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise InvalidArgumentError(f"max_pixels must be a positive integer, got {max_pixels!r}")


# --------------------------------------------------------------------------- gray conversion

def _to_gray(img: np.ndarray, order: str, info: dict | None = None) -> np.ndarray:
    """H x W x C -> H x W. Equal colour channels: take one (exact); else luminance. Alpha dropped.

    ``order`` is "bgr" for OpenCV decodes and "rgb" for arrays / PIL images. When the colour
    channels differ and ``info`` is given, ``info["colour_fraction"]`` records the fraction of
    coloured pixels (:func:`cxr_edge.scope.colour_fraction`), for the scope gate's colour rule.
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
    if img.dtype == np.float64 or img.dtype == np.float16:
        img = img.astype(np.float32)
    if info is not None:
        from .scope import colour_fraction  # chroma is max - min: channel order does not matter

        info["colour_fraction"] = round(colour_fraction(img), 4)
    code = {("bgr", 3): cv2.COLOR_BGR2GRAY, ("bgr", 4): cv2.COLOR_BGRA2GRAY,
            ("rgb", 3): cv2.COLOR_RGB2GRAY, ("rgb", 4): cv2.COLOR_RGBA2GRAY}[(order, channels)]
    try:
        return cv2.cvtColor(np.ascontiguousarray(img), code)
    except cv2.error:
        raise InvalidImageError(f"cannot convert a {img.dtype} colour image to grayscale") from None


# --------------------------------------------------------------------------- PNG

_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # what the pixels represent (palette -> RGB)
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel as stored (palette: one index)
_PNG_SBIT_LEN = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
_PNG_CHUNK_TYPE = re.compile(rb"[A-Za-z]{4}")
_PNG_MAX_CHUNKS = 1_000_000  # the walk is Python: a file of millions of empty chunks is refused, not walked
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_PIECE = 4 << 20
#: Inflated streams up to this size are kept from the check and handed to OpenCV re-stored without
#: compression (deflate's stored blocks), so the image data is inflated once, by ISA-L (``isal``) where it
#: is installed, else Python's zlib. OpenCV's own inflate is about 3x slower than Python's zlib on a
#: 1024 x 1024 radiograph (14 of its 17 ms, measured on the README sample), and ISA-L's is 3.5x faster
#: again (4.7 -> 1.3 ms on the README sample), which made decode most of the end-to-end time. Larger streams (a 36 MP
#: 16-bit RGBA image is 288 MB) keep the old path: checked in pieces, then inflated again by OpenCV,
#: so peak memory stays at one decoded image.
_PNG_KEEP_LIMIT = 64 << 20


@dataclass(frozen=True)
class _PngLayout:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlace: int
    sbit: tuple[int, ...] | None  # the sBIT chunk's values, when one precedes the image data
    idat: tuple[tuple[int, int], ...]  # (start, end) of each IDAT payload
    plte: bytes  # the PLTE chunk (length, type, payload, CRC) of a palette image, else b""
    minimal: bytes  # signature + IHDR (+ PLTE) + IDAT chunks + IEND: what the decoder is given


def _png_header(data: bytes) -> _PngLayout:
    """The IHDR facts and chunk layout, after walking the chunk list to IEND.

    The walk reads chunk headers and checks the CRC of every chunk that is used (IHDR, PLTE, IDAT,
    sBIT, IEND; other ancillary chunks are dropped, as libpng would drop a damaged one). It refuses
    any file whose chunks run past the end or which lacks IEND (a truncated PNG never reaches the
    decoder), unknown critical chunks, IDAT chunks that are not consecutive, and a PLTE that
    a grayscale image must not have or a palette image lacks.
    """
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise CorruptImageError("the PNG is truncated or damaged: no valid IHDR header")
    width, height, bit_depth, colour_type, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if colour_type not in _PNG_BIT_DEPTHS or bit_depth not in _PNG_BIT_DEPTHS[colour_type]:
        raise CorruptImageError(f"the PNG header is invalid (bit depth {bit_depth}, colour type {colour_type})")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise CorruptImageError("the PNG header is invalid (unknown compression, filter or interlace method)")
    view = memoryview(data)
    pos, n = 8, len(data)
    idat: list[tuple[int, int]] = []
    idat_done = False
    sbit: tuple[int, ...] | None = None
    plte: tuple[int, int] | None = None
    count = 0
    while True:
        if pos + 12 > n:
            raise CorruptImageError("the PNG is truncated: its chunks end before the IEND chunk")
        count += 1
        if count > _PNG_MAX_CHUNKS:
            raise CorruptImageError(f"the PNG has over {_PNG_MAX_CHUNKS:,} chunks; refused as damaged")
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            raise CorruptImageError("the PNG is truncated: a chunk runs past the end of the data")
        if not _PNG_CHUNK_TYPE.fullmatch(ctype):
            raise CorruptImageError("the PNG is damaged: a chunk has an invalid type code")
        critical = ctype in _PNG_CRITICAL
        if not critical and not (ctype[0] & 0x20):  # uppercase first letter: the decoder must understand it
            raise UnsupportedFormatError(f"the PNG has an unknown critical chunk {ctype.decode('ascii')!r}; "
                                         "it cannot be decoded safely")
        if critical or ctype == b"sBIT":
            (crc,) = struct.unpack_from(">I", data, end - 4)
            if _zlib.crc32(view[pos + 4:end - 4]) != crc:
                raise CorruptImageError(f"the PNG is damaged: the {ctype.decode('ascii')} chunk fails its CRC check")
        if ctype == b"IHDR" and pos != 8:
            raise CorruptImageError("the PNG has more than one IHDR chunk")
        if ctype == b"IDAT":
            if idat_done:
                raise CorruptImageError("the PNG is damaged: its IDAT chunks are not consecutive")
            idat.append((pos + 8, end - 4))
        elif idat:
            idat_done = True
        if ctype == b"PLTE":
            if idat or plte is not None or length % 3 or not 3 <= length <= 768:
                raise CorruptImageError("the PNG has an invalid or misplaced palette (PLTE)")
            if colour_type in (0, 4):
                raise CorruptImageError("the PNG is grayscale but carries a palette (PLTE)")
            plte = (pos, end)
        elif ctype == b"sBIT" and not idat and sbit is None:
            if length != _PNG_SBIT_LEN[colour_type]:
                raise CorruptImageError("the PNG's sBIT chunk has the wrong length for its colour type")
            sbit = tuple(data[pos + 8:pos + 8 + length])
            limit = 8 if colour_type == 3 else bit_depth
            if any(not 1 <= b <= limit for b in sbit):
                raise CorruptImageError("the PNG's sBIT chunk declares impossible significant bits")
        elif ctype == b"IEND":
            break
        pos = end
    if not idat:
        raise CorruptImageError("the PNG has no image data (IDAT chunk)")
    if colour_type == 3 and plte is None:
        raise CorruptImageError("the PNG is a palette image without a palette (PLTE)")
    first, last = idat[0][0] - 8, idat[-1][1] + 4
    palette = data[plte[0]:plte[1]] if colour_type == 3 and plte else b""
    minimal = b"".join((data[:33], palette, data[first:last], _PNG_IEND))
    return _PngLayout(width, height, bit_depth, colour_type, interlace, sbit, tuple(idat), palette, minimal)


def _png_filter_offsets(layout: _PngLayout) -> tuple[np.ndarray, int]:
    """Offsets of every row's filter-type byte in the inflated stream, and the stream's exact length."""
    bpp = layout.bit_depth * _PNG_SAMPLES[layout.colour_type]
    passes = _ADAM7 if layout.interlace else ((0, 0, 1, 1),)
    offsets, total = [], 0
    for x0, y0, dx, dy in passes:
        pw = (layout.width - x0 + dx - 1) // dx if layout.width > x0 else 0
        ph = (layout.height - y0 + dy - 1) // dy if layout.height > y0 else 0
        if pw == 0 or ph == 0:
            continue
        stride = 1 + (pw * bpp + 7) // 8
        offsets.append(total + stride * np.arange(ph, dtype=np.int64))
        total += stride * ph
    return np.concatenate(offsets), total


def _png_check_image_data(data: bytes, layout: _PngLayout, keep: bool = False) -> bytes | None:
    """Inflate the IDAT stream in bounded pieces: it must give exactly the header's rows, each with a
    valid filter type (0-4), end its zlib stream (checksum verified) and carry nothing after it.

    A zlib bomb stops at the declared size. ``keep``: return the inflated (still filtered) stream, the
    IDAT payloads joined first so that one call inflates them all; otherwise nothing is kept, each
    chunk is inflated apart, and memory stays at one piece.
    """
    offsets, expected = _png_filter_offsets(layout)
    kept: list[bytes] | None = [] if keep else None
    inflater = _zlib.decompressobj()
    view = memoryview(data)
    spans = layout.idat
    if keep and len(spans) > 1:  # one call, not one per chunk: writers split IDAT into 8 KiB chunks (41
        # for a 1024 px radiograph), each call a GIL hand-over; parallel folder workers took 11-14% less
        # time per image with one call (A/B rounds, docs/results/firmware/PLAN-session22.md)
        view = memoryview(b"".join([view[begin:end] for begin, end in spans]))
        spans = ((0, len(view)),)
    pieces = [(at, min(at + _INFLATE_PIECE, end)) for begin, end in spans
              for at in range(begin, end, _INFLATE_PIECE)]
    done, used = 0, 0
    try:
        for start, end in pieces:  # bounded input slices: unconsumed_tail copies stay small
            used += 1
            buf: Any = view[start:end]
            while True:
                out = inflater.decompress(buf, _INFLATE_PIECE)
                if out:
                    if done + len(out) > expected:
                        raise CorruptImageError("the PNG holds more image data than its header declares")
                    lo, hi = np.searchsorted(offsets, (done, done + len(out)))
                    if hi > lo:
                        filters = np.frombuffer(out, dtype=np.uint8)[offsets[lo:hi] - done]
                        if int(filters.max()) > 4:
                            raise CorruptImageError("the PNG's image data is damaged (invalid row filter type)")
                    done += len(out)
                    if kept is not None:
                        kept.append(out)
                buf = inflater.unconsumed_tail
                if not buf and len(out) < _INFLATE_PIECE:
                    break
            if inflater.eof:
                break
    except _ZLIB_ERRORS:
        raise CorruptImageError("the PNG's compressed image data is damaged (zlib stream error)") from None
    if not inflater.eof or done < expected:
        raise CorruptImageError("the PNG's image data is cut short: it ends before the last row")
    if inflater.unused_data or used < len(pieces):
        raise CorruptImageError("the PNG has data after the end of its compressed image stream")
    return b"".join(kept) if kept is not None else None


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return b"".join((struct.pack(">I", len(payload)), ctype, payload, struct.pack(">I", _zlib.crc32(payload, _zlib.crc32(ctype)))))


_STORED_BLOCK = 65535  # the largest deflate stored block


def _zlib_stored(data: bytes) -> bytes:
    """``data`` as a zlib stream of stored (uncompressed) deflate blocks (RFC 1950/1951): what
    ``zlib.compress(data, 0)`` makes, with one copy and the faster checksum (0.8 -> 0.1 ms for 1 MB)."""
    view, n = memoryview(data), len(data)
    parts: list[Any] = [b"\x78\x01"]  # deflate, 32 KiB window, no dictionary, fastest; header check bits valid
    for at in range(0, max(n, 1), _STORED_BLOCK):
        block = view[at:at + _STORED_BLOCK]
        parts += [struct.pack("<BHH", at + _STORED_BLOCK >= n, len(block), len(block) ^ 0xFFFF), block]
    parts.append(struct.pack(">I", _zlib.adler32(data)))
    return b"".join(parts)


def _png_stored(layout: _PngLayout, inflated: bytes) -> bytes:
    """The minimal PNG again, its image data re-stored uncompressed (level 0: a copy and a checksum),
    so the decoder only unfilters rows the check has already inflated and verified."""
    head = layout.minimal[:33]  # signature + IHDR
    return b"".join((head, layout.plte, _png_chunk(b"IDAT", _zlib_stored(inflated)), _PNG_IEND))


def _png_scale(gray: np.ndarray, layout: _PngLayout) -> tuple[int, int, str]:
    """(maxval, bit_depth, bit_depth_source) for the decoded samples.

    Without sBIT the container is assumed: a 16-bit sample is divided by 65535, an 8-bit one by
    255 (OpenCV expands 1/2/4-bit samples to 0..255). With an sBIT chunk declaring ``b`` < container
    significant bits (equal for all colour channels): when every sample fits in ``b`` bits, the
    writer stored the values as they are (what medical exporters do: 12-bit data in 0..4095) and
    they are divided by ``2**b - 1``; when samples exceed that, the writer scaled them up to the
    container as the PNG specification asks (left shift or bit replication) and the container
    maximum is the right divisor. Either way ``bit_depth`` reports ``b`` with source ``"sBIT"``.
    """
    container = 65535 if gray.dtype == np.uint16 else 255
    sbit = layout.sbit
    if sbit is not None and layout.colour_type != 3 and layout.bit_depth >= 8:
        colour = sbit[:1] if layout.colour_type in (0, 4) else sbit[:3]
        if len(set(colour)) == 1 and colour[0] < layout.bit_depth:
            significant = colour[0]
            top = (1 << significant) - 1
            return (top if int(gray.max()) <= top else container), significant, "sBIT"
    return container, layout.bit_depth, "container"


def _read_png(data: bytes, min_side: int, max_pixels: int) -> Radiograph:
    layout = _png_header(data)
    width, height = layout.width, layout.height
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what="PNG")
    keep = _png_filter_offsets(layout)[1] <= _PNG_KEEP_LIMIT
    inflated = _png_check_image_data(data, layout, keep=keep)
    encoded = _png_stored(layout, inflated) if inflated is not None else layout.minimal
    img = cv2.imdecode(np.frombuffer(encoded, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape[:2] != (height, width):
        raise CorruptImageError("the PNG could not be decoded (damaged image data)")
    colour: dict = {}
    gray = _to_gray(img, "bgr", colour)
    maxval, bit_depth, source = _png_scale(gray, layout)
    pixels = to_unit_range(gray, 0, maxval, what="PNG")
    info = {"width": width, "height": height, "channels_in": _PNG_CHANNELS[layout.colour_type], **colour}
    return Radiograph(pixels, "png", bit_depth, info, source)


# --------------------------------------------------------------------------- JPEG

# A marker is 0xFF followed by anything but 0x00 (stuffing), RST0-7 (inside scans) or 0xFF (fill).

#: A reduced JPEG decode keeps each side at least this many times the model input's. libjpeg's 1/2
#: decode is within 2/255 of an exact 2 x 2 box average; what moves the model input is resizing in
#: two steps (box, then area to the input) instead of one. Measured on 1024 and 2048 px JPEG copies
#: of pool images (224 input, benchmarks/jpeg_reduce.py): a reduced grid 4.6x the input moves
#: probabilities by <= 0.01, one 2.3x the input by up to 0.045, 1.1x by 0.22. Hence 4.
DECODE_MARGIN = 4


def decode_floor(input_size: tuple[int, int], margin: int = DECODE_MARGIN) -> tuple[int, int]:
    """``decode_at_least`` for a model input of ``input_size`` (H, W): ``margin`` times each side."""
    return int(input_size[0]) * margin, int(input_size[1]) * margin

def _read_jpeg(data: bytes, min_side: int, max_pixels: int, at_least: tuple[int, int] | None = None) -> Radiograph:
    """Structure checks (:func:`_jpeg_layout`), size checks, then decode twice and compare.

    libjpeg does not fail on a scan whose coded data stops early (a file cut in half with an EOI
    appended): it warns "Corrupt JPEG data: premature end of data segment" and fills the rest with
    zeros, and neither OpenCV nor Pillow reports that warning. So the file is decoded once as it is
    and once with 256 non-marker bytes inserted after each scan's coded data. A complete scan never
    reads past its end, so the extra bytes are skipped and both decodes are identical; an unfinished
    scan decodes them as data instead of zeros, and the two decodes differ: the file is refused.
    (Arithmetic-coded scans are exempt: that decoder reads ahead past the end of a complete scan.)

    ``at_least`` (H, W): an 8-bit DCT frame at least twice that size on both sides is decoded at
    1/2, 1/4 or 1/8 scale (:func:`~cxr_edge.jpeg.dct_scale`), both decodes at the same scale. The
    size checks use the frame's declared size, and so do ``info["width"]``/``info["height"]``;
    ``info["decode_scale"]`` says the pixels are the reduced decode.
    """
    layout = _jpeg_layout(data)
    width, height = layout.width, layout.height
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what="JPEG")
    _check_jpeg_coded_size(layout, "JPEG")
    scale = dct_scale(layout, at_least)
    img, order = _decode_jpeg(_jpeg_stream(data, layout, pad=False), layout, scale)
    if img.shape[:2] != decoded_shape(layout, scale):
        raise CorruptImageError("the JPEG decoded to a different size than its header declares")
    _check_scans_complete(data, layout, img, "JPEG", scale)
    colour: dict = {}
    gray = _to_gray(img, order, colour)
    maxval = 255 if gray.dtype == np.uint8 else (1 << layout.precision) - 1  # 12-bit JPEG decodes to uint16
    pixels = to_unit_range(gray, 0, maxval, what="JPEG")
    info = {"width": width, "height": height, "channels_in": layout.components, **colour}
    if scale > 1:
        info["decode_scale"] = scale
    return Radiograph(pixels, "jpeg", layout.precision, info, "SOF")


# --------------------------------------------------------------------------- arrays and PIL

def _from_array(arr: np.ndarray, min_side: int, max_pixels: int, fmt: str = "array",
                channels_in: int | None = None) -> Radiograph:
    """uint8 -> /255, uint16 -> /65535, float -> as is (must be finite and in [0, 1]); others refused.

    Byte order does not matter (big-endian ``>u2`` / ``>f4`` arrays are converted to native
    order); float16 is widened to float32 before any OpenCV call.
    """
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        pass
    elif arr.ndim != 2:
        raise InvalidImageError(f"expected a 2-D (H x W) or H x W x 1/3/4 array, got shape {arr.shape}")
    height, width = arr.shape[:2]
    check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what=f"{fmt} image")
    dtype = arr.dtype
    colour: dict = {}
    if dtype.kind in "uif" and not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
        dtype = arr.dtype
    if dtype == np.uint8 or dtype == np.uint16:
        gray = _to_gray(arr, "rgb", colour)
        pixels = to_unit_range(gray, 0, 255 if dtype == np.uint8 else 65535, what=f"{fmt} image")
        bit_depth = dtype.itemsize * 8
    elif dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        if not np.isfinite(arr).all():
            raise InvalidImageError("the float image contains NaN or inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidImageError(f"the float image has values in [{lo:.6g}, {hi:.6g}], out of range: "
                                    "float images must lie in [0, 1]")
        bit_depth = dtype.itemsize * 8
        if dtype == np.float16:
            arr = arr.astype(np.float32)
        gray = _to_gray(arr, "rgb", colour)
        pixels = np.array(gray, dtype=np.float32, order="C", copy=True)  # never alias the caller's array
        np.clip(pixels, 0.0, 1.0, out=pixels)  # luminance rounding can step a hair outside
    else:
        raise InvalidImageError(f"unsupported pixel dtype {dtype}: use uint8, uint16 or float in [0, 1]")
    channels = channels_in if channels_in is not None else (1 if arr.ndim == 2 else arr.shape[2])
    return Radiograph(pixels, fmt, bit_depth, {"width": width, "height": height, "channels_in": channels, **colour})


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
    except MemoryError:
        raise
    except Exception as exc:  # OSError, ValueError, SyntaxError, struct.error, zlib.error... from a lazy load
        raise CorruptImageError(f"the PIL image could not be loaded ({type(exc).__name__})") from None
    if mode == "I":  # 32-bit signed container, in practice 16-bit PNG samples
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise InvalidImageError(f"PIL mode 'I' values span [{lo}, {hi}]; only 0..65535 (16-bit) is accepted")
        arr = arr.astype(np.uint16)
    elif mode == "LA":
        arr = arr[:, :, 0]
    return _from_array(arr, min_side, max_pixels, fmt="pil", channels_in=_PIL_CHANNELS[mode])


# --------------------------------------------------------------------------- paths

# Suffixes that may be echoed in an error message: a known format extension says nothing about a
# patient, while anything else in a file name (including an odd "suffix" like ".Smith") might.
_ECHOED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".dcm", ".dicom", ".dic", ".ima", ".img",
                              ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jp2", ".j2k", ".npy", ".pdf", ".bin",
                              ".raw", ".zip", ".gz"})
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _describe_path(path: Any) -> str:
    """"the input file", plus its suffix when that is a known format extension; never the name."""
    try:
        suffix = Path(os.fsdecode(path)).suffix.lower()
    except Exception:
        suffix = ""
    return f"the input file (*{suffix})" if suffix in _ECHOED_SUFFIXES else "the input file"


def _read_path(path: Any, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most ``max_bytes``; typed errors that never quote the path.

    The file is opened non-blocking (opening a FIFO with no writer would otherwise wait for
    ever) and ``fstat`` of the open descriptor decides: anything but a regular file (directory,
    FIFO, device such as /dev/zero, socket) is refused without reading a byte. Symlinks are
    followed and it is the target that must be a regular file; checking the descriptor rather
    than the name means the file read is the file checked. The size cap is checked on ``st_size``
    and enforced again while reading (a file that grows meanwhile).
    """
    what = _describe_path(path)
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_CLOEXEC", "O_NOCTTY", "O_BINARY"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"no such file: {what} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{what} is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"permission denied reading {what}") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # open() on a socket
            raise ImageError(f"{what} is not a regular file (a socket or device); only regular files are read") \
                from None
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{what} is a symlink loop, not an image file") from None
        raise ImageError(f"could not open {what} ({errno.errorcode.get(exc.errno, type(exc).__name__)})") from None
    except (ValueError, TypeError):  # an embedded NUL byte, an unusable path object
        raise ImageError("the input path is not a valid file path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise ImageError(f"{what} is {kind}, not a regular image file; only regular files are read")
        if st.st_size > max_bytes:
            raise InvalidImageError(f"{what} is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit derived "
                                    "from max_pixels; refused before reading")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"could not read {what} ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})") \
            from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise InvalidImageError(f"{what} is over the {max_bytes:,}-byte limit derived from max_pixels")
    return data


# --------------------------------------------------------------------------- entry point

def read_image(source: Source, *, min_side: int = 128, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_any_body_part: bool = False, decode_at_least: tuple[int, int] | None = None) -> Radiograph:
    """Read a radiograph from a path, bytes, numpy array or PIL image into float32 [0, 1] grayscale.

    Every refusal is an :class:`~cxr_edge.errors.ImageError` subclass with a message naming the
    problem (and, for DICOM, the header field), never a patient attribute or the file's path.
    Encoded inputs over :func:`~cxr_edge.radiograph.max_file_bytes` of ``max_pixels`` are refused
    unread. ``allow_any_body_part`` only relaxes the DICOM anatomy checks (body part, lateral
    views, panoramic geometry), never modality, presentation intent or format.

    ``decode_at_least`` (H, W): the smallest pixel grid the caller needs (e.g.
    :func:`decode_floor` of the model input). An 8-bit JPEG much larger than that is decoded at
    1/2, 1/4 or 1/8 size by libjpeg's DCT scaling (faster, and a box-like low-pass, so the model
    input barely changes); all size checks and ``info["width"]``/``info["height"]`` keep the
    declared size, and ``info["decode_scale"]`` records the reduction. Other formats ignore it.
    """
    _validate_limits(min_side, max_pixels)
    if decode_at_least is not None:
        if (len(decode_at_least) != 2 or
                not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                        for v in decode_at_least)):
            raise InvalidArgumentError(f"decode_at_least must be (height, width) positive integers, "
                                       f"got {decode_at_least!r}")
    rad = _read(source, min_side, max_pixels, allow_any_body_part, decode_at_least)
    check_finite(rad.pixels, f"{rad.format} image")  # every format, whatever path produced the pixels
    return rad


def _read(source: Source, min_side: int, max_pixels: int, allow_any_body_part: bool,
          decode_at_least: tuple[int, int] | None = None) -> Radiograph:
    if isinstance(source, np.ndarray):
        return _from_array(source, min_side, max_pixels)
    if _is_pil_image(source):
        return _from_pil(source, min_side, max_pixels)
    max_bytes = max_file_bytes(max_pixels)
    if isinstance(source, (str, os.PathLike)):
        data = _read_path(source, max_bytes)
    elif isinstance(source, bytes):
        data = source
    elif isinstance(source, (bytearray, memoryview)):
        data = bytes(source)
    else:
        raise InvalidArgumentError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes, "
                                   "a numpy array or a PIL image")
    if len(data) > max_bytes:
        raise InvalidImageError(f"the input is {len(data):,} bytes, over the {max_bytes:,}-byte limit derived "
                                "from max_pixels")
    if data[:4] in (b"II*\x00", b"MM\x00*"):  # classic TIFF (8/16-bit gray): cxr_edge.tiff, through Pillow
        from .tiff import read_tiff

        return read_tiff(data, min_side=min_side, max_pixels=max_pixels)
    fmt = sniff_format(data)
    if fmt == "png":
        return _read_png(data, min_side, max_pixels)
    if fmt == "jpeg":
        return _read_jpeg(data, min_side, max_pixels, decode_at_least)
    from .dicom import read_dicom  # lazy: pydicom costs import time that PNG users should not pay

    return read_dicom(data, min_side=min_side, max_pixels=max_pixels, allow_any_body_part=allow_any_body_part)


def _is_pil_image(obj: Any) -> bool:
    """True for PIL images without importing PIL for callers that never use it."""
    mod = type(obj).__module__
    if not mod.startswith("PIL."):
        return False
    from PIL import Image

    return isinstance(obj, Image.Image)
