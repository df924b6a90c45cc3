"""DICOM -> [0, 1] grayscale radiograph, for single-frame monochrome projection chest images only.

Everything else is refused with :class:`~cxr_edge.errors.DicomRefusedError` naming the header field
(never a patient attribute). Pixel transforms are pydicom's own (modality LUT / rescale, VOI LUT or
window), so the rendering matches what a DICOM viewer shows by default.

Policy (decided here, tested in tests/test_dicom.py):

* Modality must be a projection radiograph: CR, DX, DR (a vendor variant of DX) or RG. Refused:
  CT, MR, US, NM, PT, MG (mammography), XA/RF (angio/fluoroscopy), PX/IO (dental), OT/SC, ...
  A missing Modality is refused too (it is a mandatory field).
* Anatomy (skipped with ``allow_any_body_part=True``):
  - BodyPartExamined, when present, must name the chest: its words must include CHEST, THORAX,
    TORAX, LUNG(S) or CXR and otherwise only view words (PA, AP, LAT, PORTABLE...). RIBCAGE,
    CHESTABDOMEN, HAND... are refused.
  - When it is absent, the AnatomicRegionSequence and the free-text descriptions (Study/Series
    Description, ProtocolName, ...) are read: any non-chest anatomy word (TEETH, DENTAL, PANORAMIC,
    SKULL, KNEE...) refuses the file; otherwise a chest word or a chest SNOMED code must be found, or
    the file is refused as "cannot confirm a chest". Descriptions are read, never echoed.
  - Geometry: an image longer than 1.6:1 on either axis is refused (chest detectors are at most
    17:14 ~ 1.21:1; dental panoramics are ~2:1 or wider). The shared dental-panoramic-cr.dcm is
    1976x1576 (1.25:1), so it is caught by the description/absent-body-part rule, not by geometry.
* Pixels: modality LUT -> VOI LUT (preferred) or the first window -> scaled to [0, 1] over the VOI
  output range (no VOI: the BitsStored range mapped through the modality LUT, so an 8-bit DICOM
  with no window is exactly pixel / 255) -> MONOCHROME1 inverted (1 - x).
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import CorruptImageError, DicomRefusedError, UnsupportedFormatError
from .imaging import Radiograph, check_dimensions, to_unit_range

__all__ = ["read_dicom", "ACCEPTED_MODALITIES", "CHEST_WORDS", "MAX_ASPECT_RATIO"]

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
MAX_ASPECT_RATIO = 1.6
_CODE_RE = re.compile(r"[A-Z0-9 _]{1,16}")


def _code(value: Any) -> str | None:
    """A CS code string fit to echo (uppercase, <= 16 chars); None for anything free-text-like."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text if _CODE_RE.fullmatch(text) else None


def _shown(value: Any) -> str:
    code = _code(value)
    return f"'{code}'" if code else "(a non-standard value, not shown)"


def _get(ds: pydicom.Dataset, keyword: str, default: Any = None) -> Any:
    """A header value; a malformed one is a corrupt file (the value itself is never echoed)."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # pydicom raises many types on malformed values
        raise CorruptImageError(f"the DICOM field {keyword} is malformed") from None
    return default if value is None or value == "" else value


def _get_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int | None:
    value = _get(ds, keyword, default)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CorruptImageError(f"the DICOM field {keyword} is not an integer") from None


def _parse(data: bytes) -> pydicom.Dataset:
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


def _check_modality_and_layout(ds: pydicom.Dataset) -> tuple[str, str, int]:
    modality = _get(ds, "Modality")
    accepted = ", ".join(ACCEPTED_MODALITIES)
    if modality is None:
        raise DicomRefusedError(f"the DICOM has no Modality; cannot confirm a projection radiograph "
                                f"(accepted: {accepted})", field="Modality")
    if _code(modality) not in ACCEPTED_MODALITIES:
        raise DicomRefusedError(f"Modality {_shown(modality)} is not a projection radiograph "
                                f"(accepted: {accepted})", field="Modality")
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


def _words(value: Any) -> set[str]:
    return set(re.findall(r"[A-Z]+", str(value).upper()))


def _check_anatomy(ds: pydicom.Dataset, rows: int, cols: int) -> None:
    """Refuse what is not (or cannot be confirmed as) a chest; see the module docstring."""
    hint = "; pass allow_any_body_part=True to read it anyway"
    body_part = _get(ds, "BodyPartExamined")
    if body_part is not None:
        words = _words(body_part)
        if not (words & CHEST_WORDS) or not words <= (CHEST_WORDS | _VIEW_WORDS):
            raise DicomRefusedError(f"BodyPartExamined {_shown(body_part)} is not a chest (accepted: CHEST, "
                                    f"THORAX, LUNG){hint}", field="BodyPartExamined")
    else:
        chest_found = False
        for item in _get(ds, "AnatomicRegionSequence", []) or []:
            if _code(_get(item, "CodeValue")) in _CHEST_CODES:
                chest_found = True
            words = _words(_get(item, "CodeMeaning", ""))
            if words & _NON_CHEST_WORDS:
                raise DicomRefusedError(f"AnatomicRegionSequence names non-chest anatomy{hint}",
                                        field="AnatomicRegionSequence")
            chest_found = chest_found or bool(words & CHEST_WORDS)
        for keyword in _DESCRIPTION_FIELDS:
            words = _words(_get(ds, keyword, ""))
            if words & _NON_CHEST_WORDS:  # the value is free text: name the field, never echo it
                raise DicomRefusedError(f"BodyPartExamined is absent and {keyword} names non-chest anatomy "
                                        f"(e.g. dental/panoramic){hint}", field=keyword)
            chest_found = chest_found or bool(words & CHEST_WORDS)
        if not chest_found:
            raise DicomRefusedError("BodyPartExamined is absent and no other field (AnatomicRegionSequence, "
                                    f"Study/SeriesDescription, ProtocolName) identifies a chest{hint}",
                                    field="BodyPartExamined")
    ratio = max(rows, cols) / min(rows, cols)
    if ratio > MAX_ASPECT_RATIO:
        raise DicomRefusedError(f"Rows/Columns give a {cols}x{rows} image ({ratio:.2f}:1), wider than any chest "
                                f"radiograph (at most {MAX_ASPECT_RATIO}:1; panoramic dental images are ~2:1)"
                                f"{hint}", field="Rows/Columns")


def _decode(ds: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        available = get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        available = None
    if available is None:
        raise UnsupportedFormatError(f"DICOM transfer syntax '{ts.name}' is not supported")
    if not available:
        raise UnsupportedFormatError(f"DICOM transfer syntax '{ts.name}' needs a decoder plugin that is not "
                                     "installed (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # truncated/short data, damaged codestream, inconsistent group 0028
        raise CorruptImageError(f"the DICOM pixel data could not be decoded ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from None
    if arr.shape != (rows, cols):
        raise CorruptImageError(f"the DICOM pixel data decoded to shape {arr.shape}, not Rows x Columns "
                                f"({rows}, {cols})")
    return arr


def _render(ds: pydicom.Dataset, arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Modality LUT -> VOI (LUT, else first window) -> [0, 1] over the VOI output range."""
    bits = _get_int(ds, "BitsStored") or _get_int(ds, "BitsAllocated", 16)
    signed = _get_int(ds, "PixelRepresentation", 0) == 1
    lo_raw, hi_raw = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    domain = np.arange(lo_raw, hi_raw + 1, dtype=np.int64) if bits <= 16 else np.array([lo_raw, hi_raw])
    try:
        modality_out = apply_modality_lut(arr, ds)
        mapped_domain = apply_modality_lut(domain, ds)
    except Exception as exc:
        raise CorruptImageError(f"the DICOM modality LUT/rescale could not be applied ({type(exc).__name__})") \
            from None
    voi_items = _get(ds, "VOILUTSequence")
    if voi_items and "LUTDescriptor" in voi_items[0] and "LUTData" in voi_items[0]:
        try:
            values = modality_out
            if not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)
            out = apply_voi(values, ds, 0)
            n_entries, first_map = int(voi_items[0].LUTDescriptor[0]) or 65536, int(voi_items[0].LUTDescriptor[1])
            lut = apply_voi(np.arange(first_map, first_map + n_entries, dtype=np.int64), ds, 0)
        except Exception as exc:
            raise CorruptImageError(f"the DICOM VOI LUT could not be applied ({type(exc).__name__})") from None
        return to_unit_range(out, float(lut.min()), float(lut.max())), "voi_lut"
    if _get(ds, "WindowCenter") is not None and _get(ds, "WindowWidth") is not None:
        try:
            out = apply_windowing(modality_out, ds, 0)
            y_lo, y_hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)  # the window's output range
            return to_unit_range(out, float(y_lo), float(y_hi)), "window"
        except (ValueError, TypeError, IndexError, KeyError):
            pass  # an unusable window (width < 1, bad function): show the full range instead
    return to_unit_range(modality_out, mapped_domain.min(), mapped_domain.max()), "none"


def read_dicom(data: bytes, *, min_side: int = 128, max_pixels: int = 64_000_000,
               allow_any_body_part: bool = False) -> Radiograph:
    """Decode one DICOM (bytes) into a :class:`Radiograph`, or refuse it with a typed error.

    Sizes are checked from Rows/Columns before the pixel data is decoded. pydicom's value
    validation is off and its warnings silenced here: they quote header values (UIDs, dates)
    into warnings and the "pydicom" logger.
    """
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        ds = _parse(data)
        if "PixelData" not in ds:  # first: a file cut short also loses its later header fields
            raise CorruptImageError("the DICOM has no PixelData: the file is cut short, or it is not an image")
        modality, photometric, spp = _check_modality_and_layout(ds)
        rows, cols = _get_int(ds, "Rows"), _get_int(ds, "Columns")
        if rows is None or cols is None:
            raise CorruptImageError("the DICOM has no Rows/Columns")
        check_dimensions(rows, cols, min_side=min_side, max_pixels=max_pixels, what="DICOM image")
        if not allow_any_body_part:
            _check_anatomy(ds, rows, cols)
        arr = _decode(ds, rows, cols)
        pixels, voi = _render(ds, arr)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        np.subtract(np.float32(1.0), pixels, out=pixels)
    bits = _get_int(ds, "BitsStored") or _get_int(ds, "BitsAllocated", 16)
    info = {
        "width": cols, "height": rows, "channels_in": spp, "modality": modality, "photometric": photometric,
        "bits_stored": bits, "transfer_syntax": UID(str(ds.file_meta.TransferSyntaxUID)).name,
        "body_part": _code(_get(ds, "BodyPartExamined")), "voi": voi, "inverted": inverted,
    }
    return Radiograph(pixels, "dicom", bits, info)
