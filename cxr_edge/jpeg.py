"""JPEG codestream checks shared by the PNG/JPEG reader and the DICOM reader: the frame's own SOF,
scan coverage, least coded size, and the two-decode test for scans that stopped early (see
:func:`verify_jpeg_codestream`). Its own module so that ``imaging`` and ``dicom`` both import it
without importing each other."""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CorruptImageError, InvalidArgumentError, UnsupportedFormatError


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_SOF_HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE, 0xDF})  # differential SOFs, DHP, EXP
_SOF_PROGRESSIVE = frozenset({0xC2, 0xCA})
_SOF_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB})
_SOF_LOSSLESS = frozenset({0xC3, 0xCB})
_SOF_PILLOW = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})  # 8-bit DCT frames Pillow's libjpeg-turbo decodes
# APPn/COM segments are not given to the decoder, except APP0 (JFIF) and APP14 (Adobe), which tell
# libjpeg the colour transform: EXIF (with its thumbnails), XMP, ICC and comments never matter to pixels.
_JPEG_DROPPED = frozenset(range(0xE1, 0xEE)) | {0xEF, 0xFE}
#: More scans than this is refused: libjpeg-turbo's own ``max_scans`` guard against progressive
#: JPEGs whose thousands of tiny scans each make the decoder walk the whole coefficient buffer.
MAX_JPEG_SCANS = 100
_MAX_JPEG_SEGMENTS = 5000
# Bytes inserted after each scan's coded data for the second decode (see _read_jpeg). No 0xFF, so
# libjpeg reads them as coded data where a scan is unfinished, and skips them where it is finished.
_JPEG_PAD = bytes((i * 97 + 13) % 255 for i in range(256))


@dataclass(frozen=True)
class _JpegLayout:
    width: int
    height: int
    precision: int
    components: int
    sof: int
    scans: int
    pieces: tuple[tuple[int, int, bool], ...]  # (start, end, is coded data): the ranges the decoder is given
    coded_bytes: int  # entropy-coded bytes in all scans
    least_bytes: int  # the fewest such bytes a complete image of this size can have


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """The frame header and segment layout of a JPEG, after walking its structure to EOI.

    Segments are skipped by their lengths (so the markers of an EXIF thumbnail inside APP1 never
    count) and each scan's entropy-coded data is searched for the marker that ends it with a C-speed
    regex. The frame header read is the one of the actual frame: the single SOF before the first
    scan (a second SOF, a scan before SOF, hierarchical or DNL frames are refused). Without EOI the
    file is cut. More than :data:`MAX_JPEG_SCANS` scans are refused, and the scans must code the
    whole image: every component, and in a progressive file every coefficient down to its last
    bit (a file cut between two scans, with an EOI appended, decodes silently to a blurred image).
    Finally a frame must carry at least the coded data its size needs: a Huffman-coded block takes
    at least one bit (its DC code), so a tiny file that declares 8000 x 8000 pixels is refused here,
    before the decoder allocates them.
    """
    pos, n = 2, len(data)
    sof: tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None = None
    scans: list[tuple[tuple[int, ...], int, int, int]] = []
    pieces: list[tuple[int, int, bool]] = [(0, 2, False)]
    segments, coded = 0, 0
    while True:
        m = _JPEG_MARKER.search(data, pos)
        if m is None:
            raise CorruptImageError("the JPEG is truncated: it ends before its end-of-image marker")
        start = m.start()
        marker = data[start + 1]
        if marker == 0xD9:  # EOI
            pieces.append((start, start + 2, False))
            break
        if marker == 0xD8:
            raise CorruptImageError("the JPEG is damaged: a second start-of-image marker inside the image")
        if marker == 0x01:  # TEM: no length field
            pos = m.end()
            continue
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            raise CorruptImageError(f"the JPEG has over {_MAX_JPEG_SEGMENTS:,} marker segments; refused as damaged")
        if start + 4 > n:
            raise CorruptImageError("the JPEG is truncated inside a marker segment")
        (length,) = struct.unpack_from(">H", data, start + 2)
        seg_end = start + 2 + length
        if length < 2 or seg_end > n:
            raise CorruptImageError("the JPEG is truncated or damaged: a segment runs past the end")
        if marker in _SOF_HIERARCHICAL:
            raise UnsupportedFormatError("the JPEG uses hierarchical coding, which is not supported")
        if marker == 0xDC:
            raise UnsupportedFormatError("the JPEG defines its height later in the stream (DNL), "
                                         "which is not supported")
        if marker in _SOF_MARKERS:
            if sof is not None:
                raise CorruptImageError("the JPEG is damaged: it has more than one frame header (SOF)")
            if length < 8:
                raise CorruptImageError("the JPEG frame header is damaged")
            precision, height, width, nf = struct.unpack_from(">BHHB", data, start + 4)
            if nf not in (1, 3, 4) or length != 8 + 3 * nf:
                raise CorruptImageError("the JPEG frame header is damaged (component count and length disagree)")
            comps = tuple((data[start + 10 + 3 * i], data[start + 11 + 3 * i] >> 4, data[start + 11 + 3 * i] & 15)
                          for i in range(nf))
            if any(not (1 <= h <= 4 and 1 <= v <= 4) for _, h, v in comps):
                raise CorruptImageError("the JPEG frame header is damaged (invalid sampling factors)")
            sof = (marker, precision, height, width, comps)
        elif marker == 0xDA:  # SOS, then entropy-coded data up to the next marker that is not RSTn
            if sof is None:
                raise CorruptImageError("the JPEG is damaged: image data comes before the frame header")
            ns = data[start + 4] if length >= 3 else 0
            if ns == 0 or length != 6 + 2 * ns:
                raise CorruptImageError("the JPEG scan header is damaged")
            selectors = tuple(data[start + 5 + 2 * i] for i in range(ns))
            ss, se, approx = data[start + 5 + 2 * ns:start + 8 + 2 * ns]
            if any(c not in {cid for cid, _, _ in sof[4]} for c in selectors):
                raise CorruptImageError("the JPEG scan header names a component the frame does not have")
            scans.append((selectors, ss, se, approx & 15))
            if len(scans) > MAX_JPEG_SCANS:
                raise CorruptImageError(f"the JPEG has over {MAX_JPEG_SCANS} scans; refused as damaged or "
                                        "hostile (decoding cost grows with every scan)")
            pieces.append((start, seg_end, False))
            t = _JPEG_MARKER.search(data, seg_end)
            if t is None:
                raise CorruptImageError("the JPEG is truncated: it ends inside its image data")
            end = t.start()
            while end > seg_end and data[end - 1] == 0xFF:  # fill bytes before the marker are not coded data
                end -= 1
            pieces.append((seg_end, end, True))
            coded += end - seg_end
            pos = t.start()
            continue
        if marker not in _JPEG_DROPPED:
            pieces.append((start, seg_end, False))
        pos = seg_end
    if sof is None:
        raise CorruptImageError("the JPEG has no frame header (SOF)")
    if not scans:
        raise CorruptImageError("the JPEG has no image data (no scan)")
    marker, precision, height, width, comps = sof
    if height == 0:
        raise UnsupportedFormatError("the JPEG defines its height later in the stream (DNL), which is not supported")
    _jpeg_check_coverage(marker, comps, scans)
    return _JpegLayout(width, height, precision, len(comps), marker, len(scans), tuple(pieces), coded,
                       _jpeg_least_coded_bytes(marker, width, height, comps))


def _jpeg_check_coverage(marker: int, comps: tuple, scans: list) -> None:
    ids = [cid for cid, _, _ in comps]
    if marker in _SOF_PROGRESSIVE:
        done = {cid: bytearray(64) for cid in ids}
        for selectors, ss, se, al in scans:
            if al == 0 and ss <= se <= 63:
                for c in selectors:
                    done[c][ss:se + 1] = b"\x01" * (se - ss + 1)
        if any(0 in bits for bits in done.values()):
            raise CorruptImageError("the progressive JPEG stops before all its coefficients are coded "
                                    "(its last scans are missing: the file is cut short)")
    elif set(ids) - {c for selectors, *_ in scans for c in selectors}:
        raise CorruptImageError("the JPEG is cut short: some of its colour components are never coded")


def _jpeg_least_coded_bytes(marker: int, width: int, height: int, comps: tuple) -> int:
    """The fewest bytes of entropy-coded data any Huffman JPEG of this size holds (0: no bound known).

    Huffman codes are at least one bit long, and every 8 x 8 block of every component (DCT) or
    every sample (lossless) gets at least its DC / difference code. Arithmetic coding can go
    below one bit per block, so it has no bound here.
    """
    if marker in _SOF_ARITHMETIC:
        return 0
    hmax, vmax = max(h for _, h, _ in comps), max(v for _, _, v in comps)
    units = 0
    for _, h, v in comps:
        cw, ch = -(-width * h // hmax), -(-height * v // vmax)
        units += cw * ch if marker in _SOF_LOSSLESS else -(-cw // 8) * -(-ch // 8)
    return units // 8


def _jpeg_stream(data: bytes, layout: _JpegLayout, pad: bool) -> bytes:
    view = memoryview(data)
    parts: list[Any] = []
    for start, end, is_coded in layout.pieces:
        parts.append(view[start:end])
        if pad and is_coded:
            parts.append(_JPEG_PAD)
    return b"".join(parts)


#: DCT scale factors libjpeg can decode at (1/8, 1/4, 1/2 of each side) through Pillow's ``draft``
DCT_SCALES = (8, 4, 2)


def dct_scale(layout: _JpegLayout, at_least: tuple[int, int] | None) -> int:
    """The largest reduction (8, 4, 2 or 1) that keeps both decoded sides >= ``at_least`` (H, W).

    Only 8-bit DCT frames (the ones Pillow decodes) can be reduced: libjpeg then runs a smaller
    inverse DCT per 8 x 8 block (1/2: 4 x 4 outputs, ...), which costs less and is itself a box-like
    low-pass filter, so the image downscaled from it to the model input barely changes. Lossless
    and 12-bit frames, and ``at_least`` None, give 1 (full size).
    """
    if at_least is None or layout.precision != 8 or layout.sof not in _SOF_PILLOW:
        return 1
    need_h, need_w = (max(1, int(v)) for v in at_least)
    for s in DCT_SCALES:
        if layout.height // s >= need_h and layout.width // s >= need_w:
            return s
    return 1


def decoded_shape(layout: _JpegLayout, scale: int) -> tuple[int, int]:
    """(H, W) libjpeg produces at ``scale``: each side divided by it, rounded up."""
    return -(-layout.height // scale), -(-layout.width // scale)


def _decode_jpeg(stream: bytes, layout: _JpegLayout, scale: int = 1) -> tuple[np.ndarray, str]:
    """Decode with Pillow (8-bit DCT, optionally at 1/``scale`` size) or pylibjpeg-libjpeg (12-bit,
    lossless); (array, channel order). Both are silent: errors come back as exceptions, never as
    lines on stderr (OpenCV's libjpeg prints its warnings there, and cannot decode those frames)."""
    if layout.precision == 8 and layout.sof in _SOF_PILLOW:
        from PIL import JpegImagePlugin  # the plugin class directly: no format guessing, no MPO, no bomb warning

        try:
            image = JpegImagePlugin.JpegImageFile(io.BytesIO(stream))
            if scale > 1:
                # draft picks the largest s in 8/4/2 with W // s >= w and H // s >= h: asking for
                # (W // scale, H // scale) gives exactly ``scale`` (W // (W // s) == s when W // s >= s)
                image.draft(image.mode, (layout.width // scale, layout.height // scale))
                if image.decoderconfig[:1] != (scale,):
                    raise InvalidArgumentError(f"the JPEG decoder did not accept scale 1/{scale}")
            image = image.convert("RGB") if image.mode == "CMYK" else image
            image.load()
            return np.asarray(image), "rgb"
        except (MemoryError, InvalidArgumentError):
            raise
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error... from a damaged stream
            raise CorruptImageError(f"the JPEG could not be decoded ({type(exc).__name__})") from None
    if layout.components != 1:
        raise UnsupportedFormatError(f"the JPEG is a {layout.precision}-bit "
                                     f"{'lossless' if layout.sof in _SOF_LOSSLESS else 'extended'} image with "
                                     f"{layout.components} colour components; only grayscale is read at that "
                                     "precision or coding (export a grayscale image)")
    from libjpeg import decode as libjpeg_decode  # pylibjpeg-libjpeg: 12-bit and lossless, errors raised

    try:
        img = np.asarray(libjpeg_decode(stream))
    except MemoryError:
        raise
    except Exception as exc:  # RuntimeError "libjpeg error code ...", ValueError...
        raise CorruptImageError(f"the JPEG could not be decoded ({type(exc).__name__}: damaged or unsupported "
                                "coding)") from None
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        raise CorruptImageError("the JPEG decoded to an unexpected layout")
    return img, "gray"


def _check_jpeg_coded_size(layout: _JpegLayout, what: str) -> None:
    if layout.coded_bytes < layout.least_bytes:
        raise CorruptImageError(f"the {what} declares {layout.width}x{layout.height} pixels but holds only "
                                f"{layout.coded_bytes:,} bytes of image data, less than any complete image of that "
                                f"size needs ({layout.least_bytes:,}); refused before decoding")


def _check_scans_complete(data: bytes, layout: _JpegLayout, first: np.ndarray, what: str, scale: int = 1) -> None:
    """Decode again (at the same ``scale``) with padding after every scan: any difference, or a
    padded stream the decoder refuses, means a scan stopped early."""
    if layout.sof in _SOF_ARITHMETIC:
        return
    try:
        again, _ = _decode_jpeg(_jpeg_stream(data, layout, pad=True), layout, scale)
    except CorruptImageError:
        again = None
    if again is None or not np.array_equal(first, again):
        raise CorruptImageError(f"the {what} is truncated or damaged: a scan's image data ends before the image "
                                "is complete (the decoder would fill the rest with gray)")


def verify_jpeg_codestream(data: bytes, what: str = "JPEG codestream") -> None:
    """All the JPEG file checks (structure, scan count and coverage, coded-data bound, scans complete)
    on a codestream another decoder will decode (DICOM's JPEG pixel data); raises typed errors.

    The completeness check decodes twice with Pillow, so it runs for 8-bit DCT frames only; other
    frames (12-bit, lossless) get the structural checks.
    """
    layout = _jpeg_layout(data)
    _check_jpeg_coded_size(layout, what)
    if layout.precision == 8 and layout.sof in _SOF_PILLOW:
        first, _ = _decode_jpeg(_jpeg_stream(data, layout, pad=False), layout)
        _check_scans_complete(data, layout, first, what)
