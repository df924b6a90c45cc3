"""DICOM -> [0, 1] grayscale radiograph, for single-frame monochrome projection chest images only.

Everything else is refused with :class:`~cxr_edge.errors.DicomRefusedError` naming the header field
(never a patient attribute). Pixel transforms are pydicom's own (modality LUT / rescale, VOI LUT or
window), so the rendering matches what a DICOM viewer shows by default.

Policy (decided here, tested in tests/test_dicom.py):

* Modality must be a projection radiograph: CR, DX, DR (a vendor variant of DX) or RG. Refused:
  CT, MR, US, NM, PT, MG (mammography), XA/RF (angio/fluoroscopy), PX/IO (dental), OT/SC, ...
  A missing Modality is refused too (it is a mandatory field).
* PresentationIntentType "FOR PROCESSING" (raw detector data, not meant to be looked at) is refused;
  so is anything but BitsAllocated 8/16/32 with a consistent BitsStored / PixelRepresentation.
* Anatomy (skipped with ``allow_any_body_part=True``):
  - BodyPartExamined, when present, must name the chest: its words must include CHEST, THORAX,
    TORAX, LUNG(S) or CXR and otherwise only view words (PA, AP, LAT, PORTABLE...). RIBCAGE,
    CHESTABDOMEN, HAND... are refused.
  - When it is absent, the AnatomicRegionSequence and the free-text descriptions (Study/Series
    Description, ProtocolName, ...) are read: any non-chest anatomy word (TEETH, DENTAL, PANORAMIC,
    SKULL, KNEE...) refuses the file; otherwise a chest word or a chest SNOMED code must be found, or
    the file is refused as "cannot confirm a chest". Descriptions are read, never echoed.
  - View: the classifier reads frontal (PA/AP) chests, so a lateral, oblique or decubitus
    ViewPosition (LL, RL, LATERAL, LLD, RLD, LLO, RLO...) or ViewCodeSequence is refused.
  - Geometry: an image longer than 1.6:1 on either axis is refused (chest detectors are at most
    17:14 ~ 1.21:1; dental panoramics are ~2:1 or wider). The shared dental-panoramic-cr.dcm is
    1976x1576 (1.25:1), so it is caught by the description/absent-body-part rule, not by geometry.
* Pixel data is checked before it is decoded: native data must be exactly
  Rows x Columns x SamplesPerPixel x BitsAllocated / 8 bytes (plus one pad byte), never more or
  less (a wrong Columns would otherwise decode to a sheared image); compressed data must start
  with a JPEG SOF / JPEG-LS SOF55 / JPEG 2000 SIZ declaring the size in Rows/Columns (and within
  ``max_pixels``) or an RLE header with the right segment count.
* Pixels: modality LUT -> VOI LUT (preferred, scaled over its LUT Descriptor's 2**bits output
  range) or the first window -> scaled to [0, 1] over the VOI output range (no VOI: the BitsStored
  range mapped through the modality LUT, so an 8-bit DICOM with no window is exactly pixel / 255)
  -> inverted (1 - x) for MONOCHROME1 or PresentationLUTShape INVERSE. In the DX module INVERSE
  is the shape a MONOCHROME1 image must declare, so the two together invert once, not twice.
  NaN/inf after any step (a NaN RescaleSlope or WindowWidth) is refused.

pydicom configuration: when this module is imported it sets
``pydicom.config.settings.reading_validation_mode = IGNORE``, once, for the whole process. Value
validation quotes header values (UIDs, dates, names) into warnings and the "pydicom" logger, and
the runtime never reads a value it has not checked itself. It also adds, once, a warnings filter
ignoring ``UserWarning`` raised from pydicom's own modules (what is left with validation off is
structural, e.g. "End of file reached before delimiter" on a cut file, which the runtime reports
as a typed error instead of printing it to stderr). Nothing is toggled per read, so reads in
several threads see one configuration (``warnings.catch_warnings`` and pydicom's
``disable_value_validation()`` both swap process-wide state and are not thread-safe).
"""
from __future__ import annotations

import io
import re
import struct
import warnings
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes,
                         RLETransferSyntaxes, UncompressedTransferSyntaxes)

from .errors import CorruptImageError, CxrEdgeError, DicomRefusedError, InvalidImageError, UnsupportedFormatError
from .radiograph import Radiograph, check_dimensions, check_finite, to_unit_range
from .manifest import DEFAULT_MAX_PIXELS

__all__ = ["read_dicom", "ACCEPTED_MODALITIES", "CHEST_WORDS", "MAX_ASPECT_RATIO", "LATERAL_VIEWS"]

# Once, at import (see the module docstring): never toggled per read.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")

ACCEPTED_MODALITIES = ("CR", "DX", "DR", "RG")
CHEST_WORDS = frozenset({"CHEST", "THORAX", "TORAX", "LUNG", "LUNGS", "CXR"})
_VIEW_WORDS = frozenset({"PA", "AP", "LAT", "LATERAL", "LL", "RL", "FRONTAL", "PORTABLE", "PORT", "ERECT",
                         "SUPINE", "UPRIGHT", "VIEW", "VIEWS", "XR", "X", "RAY", "DX", "CR"})
_NON_CHEST_WORDS = frozenset({
    "TEETH", "TOOTH", "DENTAL", "DENT", "PANORAMIC", "PANORAMA", "PANO", "OPG", "OPT", "OPTG",
    "ORTHOPANTOMOGRAM", "CEPH", "CEPHALOMETRIC", "JAW", "MANDIBLE", "MAXILLA", "SKULL", "HEAD", "FACE",
    "SINUS", "SINUSES", "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "ABDOMEN", "ABD", "PELVIS", "HIP",
    "KNEE", "ANKLE", "FOOT", "FEET", "HAND", "WRIST", "ELBOW", "SHOULDER", "HUMERUS", "FEMUR", "TIBIA",
    "FIBULA", "FOREARM", "FINGER", "TOE", "LEG", "ARM", "BREAST", "MAMMO", "MAMMOGRAPHY", "RIB", "RIBS",
    "RIBCAGE"})
_CHEST_CODES = frozenset({"T-D3000", "43799004", "51185008", "302551006", "T-D3010"})
_DESCRIPTION_FIELDS = ("StudyDescription", "SeriesDescription", "ProtocolName",
                       "RequestedProcedureDescription", "PerformedProcedureStepDescription")
#: ViewPosition codes that are not a frontal (PA/AP) projection: laterals, decubitus, obliques.
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO", "LLAT", "RLAT", "XTABLE"})
_NON_FRONTAL_WORDS = frozenset({"LATERAL", "LAT", "DECUBITUS", "OBLIQUE"})
MAX_ASPECT_RATIO = 1.6
_CODE_RE = re.compile(r"[A-Z0-9 _]{1,16}")
_ACCEPTED_BITS_ALLOCATED = (8, 16, 32)


def _code(value: Any) -> str | None:
    """A CS code string fit to echo (uppercase, <= 16 chars); None for anything free-text-like."""
    if value is None or isinstance(value, (Dataset, Sequence, bytes, bytearray)):
        return None
    text = str(value).strip().upper()
    return text if _CODE_RE.fullmatch(text) else None


def _shown(value: Any) -> str:
    code = _code(value)
    return f"'{code}'" if code else "(a non-standard value, not shown)"


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """A header value; a malformed one is a corrupt file (the value itself is never echoed)."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # pydicom raises many types on malformed values
        raise CorruptImageError(f"the DICOM field {keyword} is malformed") from None
    return default if value is None or value == "" else value


def _get_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = _get(ds, keyword, default)
    if value is None:
        return None
    if isinstance(value, (Dataset, Sequence, bytes, bytearray, str)) and not (
            isinstance(value, str) and value.strip().lstrip("+-").isdigit()):
        raise CorruptImageError(f"the DICOM field {keyword} is not an integer")
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise CorruptImageError(f"the DICOM field {keyword} is not an integer") from None


def _get_seq(ds: Dataset, keyword: str) -> list[Dataset]:
    """A sequence's items (empty when absent); anything but a sequence of datasets is corrupt."""
    value = _get(ds, keyword)
    if value is None:
        return []
    if not isinstance(value, Sequence) or not all(isinstance(item, Dataset) for item in value):
        raise CorruptImageError(f"the DICOM field {keyword} is not a sequence")
    return list(value)


def _get_numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """A numeric (possibly multi-valued) field as floats (None when absent); anything else is corrupt."""
    value = _get(ds, keyword)
    if value is None:
        return None
    if isinstance(value, (Dataset, Sequence, bytes, bytearray)):
        raise CorruptImageError(f"the DICOM field {keyword} is not a number")
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = [float(v) for v in items if not isinstance(v, (Dataset, bytes, bytearray))]
    except (TypeError, ValueError, OverflowError):
        raise CorruptImageError(f"the DICOM field {keyword} is not a number") from None
    if len(numbers) != len(items) or not numbers:
        raise CorruptImageError(f"the DICOM field {keyword} is not a number")
    return numbers


def _get_text(ds: Dataset, keyword: str) -> str:
    """A string-valued field as text ('' when absent); a sequence or binary value is corrupt."""
    value = _get(ds, keyword, "")
    if isinstance(value, (Dataset, Sequence, bytes, bytearray)):
        raise CorruptImageError(f"the DICOM field {keyword} is not text")
    return str(value)


def _parse(data: bytes) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError...
        raise CorruptImageError(f"the DICOM header could not be parsed ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise CorruptImageError("the DICOM file holds no data elements")
    meta = getattr(ds, "file_meta", None)
    if meta is None or not _get(meta, "TransferSyntaxUID"):
        # No file-meta header (ACR-NEMA style): the encoding pydicom detected is the transfer syntax.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = ImplicitVRLittleEndian if implicit in (True, None) else (
            ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)
        if not isinstance(meta, FileMetaDataset):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    value = _get(ds.file_meta, "TransferSyntaxUID")
    if not isinstance(value, str):
        raise CorruptImageError("the DICOM field TransferSyntaxUID is malformed")
    return UID(str(value).strip("\x00 "))


def _check_modality_and_layout(ds: Dataset) -> tuple[str, str, int]:
    modality = _get(ds, "Modality")
    accepted = ", ".join(ACCEPTED_MODALITIES)
    if modality is None:
        raise DicomRefusedError(f"the DICOM has no Modality; cannot confirm a projection radiograph "
                                f"(accepted: {accepted})", field="Modality")
    if _code(modality) not in ACCEPTED_MODALITIES:
        raise DicomRefusedError(f"Modality {_shown(modality)} is not a projection radiograph "
                                f"(accepted: {accepted})", field="Modality")
    intent = _get(ds, "PresentationIntentType")
    if intent is not None and _code(intent) == "FOR PROCESSING":
        raise DicomRefusedError("PresentationIntentType is 'FOR PROCESSING': raw detector data, not an image "
                                "meant to be viewed or classified (use the FOR PRESENTATION image)",
                                field="PresentationIntentType")
    spp = _get_int(ds, "SamplesPerPixel", 1)
    if spp != 1:
        raise DicomRefusedError(f"SamplesPerPixel is {spp}: colour images are refused, a radiograph has "
                                "one sample per pixel", field="SamplesPerPixel")
    photometric = _get(ds, "PhotometricInterpretation")
    if _code(photometric) not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomRefusedError(f"PhotometricInterpretation {_shown(photometric)} is refused "
                                "(accepted: MONOCHROME1, MONOCHROME2)", field="PhotometricInterpretation")
    frames = _get_int(ds, "NumberOfFrames", 1)
    if frames != 1:
        raise DicomRefusedError(f"NumberOfFrames is {frames}: multi-frame objects are refused, a radiograph "
                                "is a single frame", field="NumberOfFrames")
    return _code(modality), _code(photometric), spp


def _check_sample_layout(ds: Dataset) -> tuple[int, int, bool]:
    """(BitsAllocated, BitsStored, signed), validated before any of them sizes an array or a shift."""
    allocated = _get_int(ds, "BitsAllocated")
    if allocated is None:
        raise CorruptImageError("the DICOM has no BitsAllocated")
    if allocated not in _ACCEPTED_BITS_ALLOCATED:
        raise DicomRefusedError(f"BitsAllocated is {allocated}: only 8, 16 or 32-bit samples are read",
                                field="BitsAllocated")
    stored = _get_int(ds, "BitsStored") or allocated
    if not 1 <= stored <= allocated:
        raise CorruptImageError(f"the DICOM's BitsStored ({stored}) does not fit BitsAllocated ({allocated})")
    representation = _get_int(ds, "PixelRepresentation", 0)
    if representation not in (0, 1):
        raise CorruptImageError("the DICOM field PixelRepresentation is neither 0 (unsigned) nor 1 (signed)")
    return allocated, stored, representation == 1


def _words(value: Any) -> set[str]:
    return set(re.findall(r"[A-Z]+", str(value).upper()))


def _check_anatomy(ds: Dataset, rows: int, cols: int) -> None:
    """Refuse what is not (or cannot be confirmed as) a frontal chest; see the module docstring."""
    hint = "; pass allow_any_body_part=True to read it anyway"
    body_part = _get(ds, "BodyPartExamined")
    if body_part is not None:
        words = _words(_get_text(ds, "BodyPartExamined"))
        if not (words & CHEST_WORDS) or not words <= (CHEST_WORDS | _VIEW_WORDS):
            raise DicomRefusedError(f"BodyPartExamined {_shown(body_part)} is not a chest (accepted: CHEST, "
                                    f"THORAX, LUNG){hint}", field="BodyPartExamined")
    else:
        chest_found = False
        for item in _get_seq(ds, "AnatomicRegionSequence"):
            if _code(_get(item, "CodeValue")) in _CHEST_CODES:
                chest_found = True
            words = _words(_get_text(item, "CodeMeaning"))
            if words & _NON_CHEST_WORDS:
                raise DicomRefusedError(f"AnatomicRegionSequence names non-chest anatomy{hint}",
                                        field="AnatomicRegionSequence")
            chest_found = chest_found or bool(words & CHEST_WORDS)
        for keyword in _DESCRIPTION_FIELDS:
            words = _words(_get_text(ds, keyword))
            if words & _NON_CHEST_WORDS:  # the value is free text: name the field, never echo it
                raise DicomRefusedError(f"BodyPartExamined is absent and {keyword} names non-chest anatomy "
                                        f"(e.g. dental/panoramic){hint}", field=keyword)
            chest_found = chest_found or bool(words & CHEST_WORDS)
        if not chest_found:
            raise DicomRefusedError("BodyPartExamined is absent and no other field (AnatomicRegionSequence, "
                                    f"Study/SeriesDescription, ProtocolName) identifies a chest{hint}",
                                    field="BodyPartExamined")
    view = _get(ds, "ViewPosition")
    if view is not None:
        text = _get_text(ds, "ViewPosition")
        if _code(text) in LATERAL_VIEWS or _words(text) & _NON_FRONTAL_WORDS:  # free text: read, never echoed
            raise DicomRefusedError(f"ViewPosition {_shown(view)} is not a frontal (PA/AP) view: lateral, "
                                    f"decubitus and oblique views are refused{hint}", field="ViewPosition")
    for item in _get_seq(ds, "ViewCodeSequence"):
        if _words(_get_text(item, "CodeMeaning")) & _NON_FRONTAL_WORDS:
            raise DicomRefusedError(f"ViewCodeSequence names a lateral, decubitus or oblique view{hint}",
                                    field="ViewCodeSequence")
    ratio = max(rows, cols) / min(rows, cols)
    if ratio > MAX_ASPECT_RATIO:
        raise DicomRefusedError(f"Rows/Columns give a {cols}x{rows} image ({ratio:.2f}:1), wider than any chest "
                                f"radiograph (at most {MAX_ASPECT_RATIO}:1; panoramic dental images are ~2:1)"
                                f"{hint}", field="Rows/Columns")


# --------------------------------------------------------------------------- pixel data checks

def _pixel_data_bytes(ds: Dataset) -> bytes:
    value = _get(ds, "PixelData")
    if not isinstance(value, (bytes, bytearray)):
        raise CorruptImageError("the DICOM PixelData is not binary data")
    return bytes(value)


def _check_native_length(pixel_data: bytes, rows: int, cols: int, spp: int, allocated: int) -> None:
    """Uncompressed data must be exactly the size the header implies (one even-length pad byte allowed).

    Shorter data cannot fill the image; longer data means Rows/Columns/BitsAllocated do not describe
    it (a wrong Columns decodes to a sheared image, which pydicom would produce after a warning).
    """
    expected = rows * cols * spp * allocated // 8
    actual = len(pixel_data)
    if actual != expected and not (expected % 2 == 1 and actual == expected + 1):
        raise CorruptImageError(f"the DICOM pixel data is {actual:,} bytes, but Rows x Columns x SamplesPerPixel "
                                f"x BitsAllocated / 8 is {expected:,}: the header does not describe the data")


def _fragments(pixel_data: bytes) -> list[bytes]:
    """The fragments of encapsulated pixel data (the Basic Offset Table item dropped); at least one."""
    pos, items, n = 0, [], len(pixel_data)
    while pos + 8 <= n:
        group, element, length = struct.unpack_from("<HHI", pixel_data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            break
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF or pos + 8 + length > n:
            raise CorruptImageError("the DICOM's encapsulated pixel data is malformed or cut short (bad item)")
        items.append(pixel_data[pos + 8:pos + 8 + length])
        pos += 8 + length
    if len(items) < 2:
        raise CorruptImageError("the DICOM's encapsulated pixel data is cut short (no fragment)")
    return items[1:]


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # + JPEG-LS SOF55


def _jpeg_frame_header(stream: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the SOF of a JPEG / JPEG-LS codestream's header."""
    if stream[:2] != b"\xff\xd8":
        raise CorruptImageError("the DICOM's JPEG pixel data does not start with a JPEG codestream")
    pos, n = 2, len(stream)
    while True:
        while pos < n and stream[pos] == 0xFF and pos + 1 < n and stream[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > n or stream[pos] != 0xFF:
            raise CorruptImageError("the DICOM's JPEG codestream is damaged before its frame header")
        marker = stream[pos + 1]
        if marker in (0xDA, 0xD9):
            raise CorruptImageError("the DICOM's JPEG codestream has no frame header (SOF)")
        (length,) = struct.unpack_from(">H", stream, pos + 2)
        if length < 2 or pos + 2 + length > n:
            raise CorruptImageError("the DICOM's JPEG codestream is damaged before its frame header")
        if marker in _JPEG_SOF:
            if length < 8:
                raise CorruptImageError("the DICOM's JPEG frame header is damaged")
            _precision, height, width, comps = struct.unpack_from(">BHHB", stream, pos + 4)
            return height, width, comps
        pos += 2 + length


def _j2k_size(stream: bytes) -> tuple[int, int, int]:
    """(height, width, components) from a JPEG 2000 codestream's SIZ marker (JP2 boxes allowed)."""
    start = 0 if stream[:4] == b"\xff\x4f\xff\x51" else stream.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    if start < 0 or len(stream) < start + 42:
        raise CorruptImageError("the DICOM's JPEG 2000 pixel data does not start with a codestream header (SIZ)")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", stream, start + 8)
    (csiz,) = struct.unpack_from(">H", stream, start + 40)
    if xosiz > xsiz or yosiz > ysiz:
        raise CorruptImageError("the DICOM's JPEG 2000 size header (SIZ) is damaged")
    return ysiz - yosiz, xsiz - xosiz, csiz


def _check_encapsulated(pixel_data: bytes, ts: UID, rows: int, cols: int, spp: int, allocated: int,
                        max_pixels: int) -> None:
    """Compare the codestream's own header with Rows/Columns and max_pixels before any decoder runs.

    A JPEG frame (single-frame object: all fragments) then gets the same checks as a JPEG file
    (:func:`cxr_edge.jpeg.verify_jpeg_codestream`): pydicom's decoders, like libjpeg, fill a
    frame cut short (with an EOI appended) with gray instead of failing.
    """
    fragments = _fragments(pixel_data)
    fragment = fragments[0]
    if ts in RLETransferSyntaxes:
        if len(fragment) < 64:
            raise CorruptImageError("the DICOM's RLE pixel data is cut short (no RLE header)")
        (segments,) = struct.unpack_from("<I", fragment, 0)
        if segments != spp * allocated // 8:
            raise CorruptImageError(f"the DICOM's RLE data has {segments} segments, not the "
                                    f"{spp * allocated // 8} that SamplesPerPixel/BitsAllocated imply")
        return
    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        height, width, comps = _jpeg_frame_header(fragment)
        what = "JPEG codestream"
        if height == 0:
            raise UnsupportedFormatError("the DICOM's JPEG codestream defines its height later (DNL), "
                                         "which is not supported")
    elif ts in JPEG2000TransferSyntaxes:
        height, width, comps = _j2k_size(fragment)
        what = "JPEG 2000 codestream"
    else:
        return  # no header this module knows how to read: the decoder's own checks apply
    if height * width > max_pixels:
        check_dimensions(height, width, min_side=1, max_pixels=max_pixels, what=f"DICOM {what}")
    if (height, width) != (rows, cols) or comps != spp:
        raise CorruptImageError(f"the DICOM {what} declares {width}x{height} pixels with {comps} component(s), "
                                f"but Rows/Columns/SamplesPerPixel say {cols}x{rows} with {spp}")
    if ts in JPEGTransferSyntaxes:
        from .jpeg import verify_jpeg_codestream

        verify_jpeg_codestream(b"".join(fragments), what=f"DICOM {what}")


def _check_decoder(ts: UID) -> None:
    try:
        available = get_decoder(ts).is_available
    except (NotImplementedError, ValueError, KeyError):
        available = None
    if available is None:
        raise UnsupportedFormatError(f"DICOM transfer syntax '{ts.name}' is not supported")
    if not available:
        raise UnsupportedFormatError(f"DICOM transfer syntax '{ts.name}' needs a decoder plugin that is not "
                                     "installed (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)")


def _decode(ds: Dataset, rows: int, cols: int) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:  # truncated/short data, damaged codestream, inconsistent group 0028
        raise CorruptImageError(f"the DICOM pixel data could not be decoded ({type(exc).__name__})") from None
    if arr.shape != (rows, cols):
        raise CorruptImageError(f"the DICOM pixel data decoded to shape {arr.shape}, not Rows x Columns "
                                f"({rows}, {cols})")
    return arr


# --------------------------------------------------------------------------- rendering

def _finite_or_refuse(arr: np.ndarray, step: str) -> None:
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise InvalidImageError(f"the DICOM {step} produced NaN or inf values; refused rather than rendered")


def _render(ds: Dataset, arr: np.ndarray, bits: int, signed: bool) -> tuple[np.ndarray, str]:
    """Modality LUT -> VOI (LUT, else first window) -> [0, 1] over the VOI output range."""
    lo_raw, hi_raw = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    domain = np.arange(lo_raw, hi_raw + 1, dtype=np.int64) if bits <= 16 else np.array([lo_raw, hi_raw])
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        _get_numbers(ds, keyword)  # a sequence or text here is corrupt, not silently skipped
    _get_seq(ds, "ModalityLUTSequence")
    try:
        modality_out = apply_modality_lut(arr, ds)
        mapped_domain = apply_modality_lut(domain, ds)
    except Exception as exc:
        raise CorruptImageError(f"the DICOM modality LUT/rescale could not be applied ({type(exc).__name__})") \
            from None
    _finite_or_refuse(modality_out, "modality LUT / rescale (RescaleSlope, RescaleIntercept)")
    _finite_or_refuse(mapped_domain, "modality LUT / rescale (RescaleSlope, RescaleIntercept)")
    voi_items = _get_seq(ds, "VOILUTSequence")
    if voi_items and "LUTDescriptor" in voi_items[0] and "LUTData" in voi_items[0]:
        descriptor = _get(voi_items[0], "LUTDescriptor")
        try:
            n_entries, first_map, lut_bits = (int(v) for v in descriptor)
        except (TypeError, ValueError):
            raise CorruptImageError("the DICOM VOI LUT's LUTDescriptor is not three integers") from None
        if not (lut_bits == 8 or 10 <= lut_bits <= 16):
            raise CorruptImageError(f"the DICOM VOI LUT's LUTDescriptor declares {lut_bits}-bit entries "
                                    "(8 or 10-16 are valid)")
        top = (1 << lut_bits) - 1
        try:
            values = modality_out
            if not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)
            out = apply_voi(values, ds, 0)
            lut = apply_voi(np.arange(first_map, first_map + (n_entries or 65536), dtype=np.int64), ds, 0)
        except Exception as exc:
            raise CorruptImageError(f"the DICOM VOI LUT could not be applied ({type(exc).__name__})") from None
        if int(lut.max()) > top:
            raise CorruptImageError(f"the DICOM VOI LUT's data exceeds the {lut_bits}-bit range its LUTDescriptor "
                                    "declares")
        return to_unit_range(out, 0, top, what="DICOM image"), "voi_lut"  # the descriptor's range, not the data's
    centers, widths = _get_numbers(ds, "WindowCenter"), _get_numbers(ds, "WindowWidth")
    if centers is not None and widths is not None:
        try:
            out = apply_windowing(modality_out, ds, 0)
            y_lo, y_hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)  # the window's output range
            window_ok = True
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            window_ok = False  # an unusable window (width < 1, bad function): show the full range instead
        if window_ok:
            _finite_or_refuse(np.asarray(out), "window (WindowCenter, WindowWidth)")
            _finite_or_refuse(np.asarray([y_lo, y_hi], dtype=np.float64), "window (WindowCenter, WindowWidth)")
            return to_unit_range(out, float(y_lo), float(y_hi), what="DICOM image"), "window"
    return to_unit_range(modality_out, mapped_domain.min(), mapped_domain.max(), what="DICOM image"), "none"


# --------------------------------------------------------------------------- entry point

def read_dicom(data: bytes, *, min_side: int = 128, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_any_body_part: bool = False) -> Radiograph:
    """Decode one DICOM (bytes) into a :class:`Radiograph`, or refuse it with a typed error.

    Sizes are checked from Rows/Columns, and the pixel data's own length or codestream header
    against them, before the pixel data is decoded. Any other failure on a malformed header
    (a sequence where a number belongs, a string where an integer belongs) is a
    :class:`~cxr_edge.errors.CorruptImageError`, never a bare ``TypeError`` / ``ValueError``.
    """
    try:
        return _read_dicom(data, min_side, max_pixels, allow_any_body_part)
    except (CxrEdgeError, MemoryError):
        raise
    except Exception as exc:  # a malformed header this module did not foresee: still a typed refusal
        raise CorruptImageError(f"the DICOM file is malformed ({type(exc).__name__})") from None


def _read_dicom(data: bytes, min_side: int, max_pixels: int, allow_any_body_part: bool) -> Radiograph:
    ds = _parse(data)
    if "PixelData" not in ds:  # first: a file cut short also loses its later header fields
        raise CorruptImageError("the DICOM has no PixelData: the file is cut short, or it is not an image")
    modality, photometric, spp = _check_modality_and_layout(ds)
    rows, cols = _get_int(ds, "Rows"), _get_int(ds, "Columns")
    if rows is None or cols is None:
        raise CorruptImageError("the DICOM has no Rows/Columns")
    check_dimensions(rows, cols, min_side=min_side, max_pixels=max_pixels, what="DICOM image")
    allocated, bits, signed = _check_sample_layout(ds)
    if not allow_any_body_part:
        _check_anatomy(ds, rows, cols)
    ts = _transfer_syntax(ds)
    _check_decoder(ts)  # an unknown transfer syntax is "unsupported", before its data is looked at
    pixel_data = _pixel_data_bytes(ds)
    if ts not in UncompressedTransferSyntaxes:
        _check_encapsulated(pixel_data, ts, rows, cols, spp, allocated, max_pixels)
    else:
        _check_native_length(pixel_data, rows, cols, spp, allocated)
    del pixel_data
    arr = _decode(ds, rows, cols)
    with np.errstate(all="ignore"):  # overflow to inf / NaN is detected and refused, not warned about
        pixels, voi = _render(ds, arr, bits, signed)
    shape = _get(ds, "PresentationLUTShape")
    inverted = photometric == "MONOCHROME1" or _code(shape) == "INVERSE"
    if inverted:
        np.subtract(np.float32(1.0), pixels, out=pixels)
    check_finite(pixels, "DICOM image")
    info = {
        "width": cols, "height": rows, "channels_in": spp, "modality": modality, "photometric": photometric,
        "bits_stored": bits, "transfer_syntax": ts.name,
        "body_part": _code(_get(ds, "BodyPartExamined")), "voi": voi, "inverted": inverted,
    }
    return Radiograph(pixels, "dicom", bits, info, "BitsStored")
