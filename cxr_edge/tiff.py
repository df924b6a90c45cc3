"""TIFF (8/16-bit grayscale, single image) -> :class:`~cxr_edge.radiograph.Radiograph`, with Pillow.

Why a module of its own: :func:`cxr_edge.imaging.read_image` refuses TIFF by its magic bytes;
:meth:`cxr_edge.Classifier.read` routes TIFF bytes (``II*\\0`` / ``MM\\0*``) here first. The same
rules as the other readers apply: the size from the header is checked against ``min_side`` /
``max_pixels`` before any pixel is decoded, and the encoded input against ``max_file_bytes``.

Accepted: one image (one page), one sample per pixel, 8-bit (``L``) or 16-bit unsigned (``I;16``,
little or big endian), any compression Pillow decodes (none, LZW, Deflate, PackBits...),
MinIsBlack, and MinIsWhite (inverted so that 0 is black, like a MONOCHROME1 DICOM). Scaling: 8-bit
/ 255, 16-bit / 65535 (``bit_depth_source`` "container": TIFF has no significant-bits field that
is used in practice). Refused: BigTIFF, multi-page, colour/palette, bilevel, signed or float
samples, truncated data. No tag value (ImageDescription, Artist, DateTime, ...) is ever copied into
``info``: only size, compression and photometric interpretation, none of them identifying.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from typing import Any

import numpy as np

from .errors import CorruptImageError, InvalidImageError, UnsupportedFormatError
from .radiograph import Radiograph, check_dimensions, check_finite, max_file_bytes, to_unit_range
from .manifest import DEFAULT_MAX_PIXELS

TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_MODES = {"L": 8, "I;16": 16, "I;16L": 16, "I;16B": 16}
_PHOTOMETRIC = {0: "MINISWHITE", 1: "MINISBLACK"}

# Pillow's TIFF plugin warns about odd tags ("Corrupt EXIF data", "Metadata Warning, tag ..."): tag
# trouble is not an image problem, and log lines about a file's metadata are not wanted on a device.
# Scoped to that module, process-wide (like pydicom's validation mode in cxr_edge.dicom).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

__all__ = ["TIFF_MAGIC", "is_tiff", "peek_path", "read_tiff"]


def is_tiff(data: bytes) -> bool:
    """True when ``data`` starts with a classic TIFF signature (little or big endian)."""
    return bytes(data[:4]) in TIFF_MAGIC


def peek_path(path: Any, n: int = 4) -> bytes:
    """The first ``n`` bytes of a regular file, or b"" for anything else (never blocks, never raises).

    Errors are left to :func:`cxr_edge.imaging.read_image`, which reports them with typed messages.
    """
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_CLOEXEC", "O_NOCTTY", "O_BINARY"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError, TypeError):
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, n)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _rawmode(image: Any) -> str:
    """The unpacker Pillow will use (``L;I`` = Pillow inverts MinIsWhite itself)."""
    try:
        args = image.tile[0][3]
    except (IndexError, TypeError, AttributeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return str(args)


def read_tiff(data: bytes, *, min_side: int = 128, max_pixels: int = DEFAULT_MAX_PIXELS) -> Radiograph:
    """Decode a TIFF (bytes) into a Radiograph, or refuse it with a typed error (module rules)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_file_bytes(max_pixels):
        raise InvalidImageError(f"the TIFF input is {len(data):,} bytes, over the limit derived from max_pixels")
    if not is_tiff(data):
        raise UnsupportedFormatError("the input is not a TIFF file")
    try:
        image = Image.open(io.BytesIO(data), formats=["TIFF"])
    except Image.DecompressionBombError:
        raise InvalidImageError(f"the TIFF image is over the limit of {max_pixels:,} pixels (max_pixels); "
                                "refused before decoding") from None
    except UnidentifiedImageError:  # a cut file loses its IFD (often written after the pixels)
        raise CorruptImageError("the TIFF structure could not be read: the file is truncated or damaged, or a "
                                "variant other than 8/16-bit unsigned grayscale TIFF") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error on bad headers
        raise CorruptImageError(f"the TIFF header could not be parsed ({type(exc).__name__})") from None
    with image:
        width, height = image.size
        check_dimensions(height, width, min_side=min_side, max_pixels=max_pixels, what="TIFF image")
        frames = int(getattr(image, "n_frames", 1) or 1)
        if frames > 1:
            raise InvalidImageError(f"the TIFF holds {frames} pages; only single-image TIFFs are read")
        mode = image.mode
        if mode not in _MODES:
            raise UnsupportedFormatError(f"TIFF pixel mode {mode!r} is not supported: only 8-bit or 16-bit "
                                         "unsigned grayscale, one sample per pixel")
        bits = _MODES[mode]
        photometric = int(image.tag_v2.get(262, 1))
        if photometric not in _PHOTOMETRIC:
            raise UnsupportedFormatError(f"TIFF PhotometricInterpretation {photometric} is not grayscale")
        compression = str(image.info.get("compression", "unknown"))
        pillow_inverts = _rawmode(image).endswith((";I", ";IR"))
        try:
            image.load()
            arr = np.asarray(image)
        except MemoryError:
            raise
        except Exception as exc:  # truncated strips, bad compression streams
            raise CorruptImageError(f"the TIFF pixel data could not be decoded: the file is truncated or damaged "
                                    f"({type(exc).__name__})") from None
    if arr.shape != (height, width):
        raise CorruptImageError(f"the TIFF decoded to shape {arr.shape}, not its declared {width}x{height}")
    maxval = 255 if bits == 8 else 65535
    arr = arr.astype(np.uint8 if bits == 8 else np.uint16, copy=False)
    if photometric == 0 and not pillow_inverts:
        arr = (maxval - arr.astype(np.int32)).astype(arr.dtype)
    pixels = to_unit_range(arr, 0, maxval, what="TIFF image")
    check_finite(pixels, "TIFF image")
    info = {"width": width, "height": height, "channels_in": 1, "compression": compression,
            "photometric": _PHOTOMETRIC[photometric]}
    return Radiograph(pixels, "tiff", bits, info, "container")
