"""DICOM reading: synthetic files made here with pydicom (no shared data), then the shared real files.

Every refusal is checked for its error class and field; a sentinel patient identity is planted in
the synthetic files and must never appear in an error message, warning, info value or repr.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, UID)

from cxr_edge.dicom import read_dicom
from cxr_edge.errors import (CorruptImageError, CxrEdgeError, DicomRefusedError, InvalidImageError,
                             UnsupportedFormatError)
from cxr_edge.imaging import read_image, sniff_format
from tests.conftest import need_shared

DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
SENTINELS = ("Zebediah", "ZZSENTINEL42", "19010203", "19020304", "ACCSENTINEL", "Sentinel General",
             "999888777", "Quux^Sentinel", "SENTINELSTUDY")


def chest_pixels(h: int = 160, w: int = 144, maxval: int = 255, seed: int = 7) -> np.ndarray:
    """A deterministic image that uses the full range: a ramp plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, maxval, w)[None, :].repeat(h, 0)
    img = np.clip(ramp + rng.normal(0, maxval * 0.05, (h, w)), 0, maxval)
    img[0, 0], img[0, 1] = 0, maxval
    return img.astype(np.uint8 if maxval < 256 else np.uint16)


def make_ds(pixels: np.ndarray, **kw) -> Dataset:
    """A DX chest Dataset with a planted patient identity (pydicom's value warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _make_ds(pixels, **kw)


def _make_ds(pixels: np.ndarray, *, modality: str | None = "DX", body_part: str | None = "CHEST",
            photometric: str = "MONOCHROME2", bits_stored: int | None = None, ts: UID = ExplicitVRLittleEndian,
            frames: int | None = None, samples: int = 1, **tags) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1999888777")
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID("1.2.826.0.1.3680043.8.498.2999888777")
    ds.PatientName = "Sentinel^Zebediah"
    ds.PatientID = "ZZSENTINEL42"
    ds.PatientBirthDate = "19010203"
    ds.StudyDate = "19020304"
    ds.AccessionNumber = "ACCSENTINEL"
    ds.InstitutionName = "Sentinel General"
    ds.ReferringPhysicianName = "Quux^Sentinel"
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.SamplesPerPixel = samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    if frames:
        ds.NumberOfFrames = frames
    itemsize = pixels.dtype.itemsize
    ds.BitsAllocated = itemsize * 8
    ds.BitsStored = bits_stored or itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def write(tmp_path: Path, pixels: np.ndarray, name: str = "x.dcm", **kw) -> Path:
    return save(make_ds(pixels, **kw), tmp_path / name)


def assert_private(*texts: str) -> None:
    for text in texts:
        for s in SENTINELS:
            assert s.lower() not in text.lower(), f"patient sentinel {s!r} leaked into: {text}"


def refuse(path_or_bytes, error=DicomRefusedError, **kw) -> CxrEdgeError:
    with pytest.raises(error) as err:
        read_image(path_or_bytes, **kw)
    assert_private(str(err.value), repr(err.value), repr(err.value.args))
    return err.value


# --------------------------------------------------------------------------- reading

def test_8bit_dicom_equals_png_of_the_same_pixels(tmp_path):
    img = chest_pixels()
    rad = read_image(write(tmp_path, img))
    assert rad.format == "dicom" and rad.bit_depth == 8
    assert rad.pixels.dtype == np.float32 and rad.pixels.flags.c_contiguous
    ok, png = cv2.imencode(".png", img)
    np.testing.assert_array_equal(rad.pixels, read_image(png.tobytes()).pixels)
    np.testing.assert_array_equal(rad.pixels, img / np.float32(255))
    assert rad.info == {"width": 144, "height": 160, "channels_in": 1, "modality": "DX",
                        "photometric": "MONOCHROME2", "bits_stored": 8, "transfer_syntax": "Explicit VR Little Endian",
                        "body_part": "CHEST", "voi": "none", "inverted": False}


def test_12bit_no_window_scales_over_bits_stored(tmp_path):
    img = chest_pixels(maxval=4095)
    rad = read_image(write(tmp_path, img, bits_stored=12, ts=ImplicitVRLittleEndian))
    assert rad.bit_depth == 12 and rad.info["transfer_syntax"] == "Implicit VR Little Endian"
    np.testing.assert_allclose(rad.pixels, img / 4095.0, atol=1e-6)
    assert rad.pixels.max() == 1.0


def test_monochrome1_is_inverted(tmp_path):
    img = chest_pixels(maxval=4095)
    mono2 = read_image(write(tmp_path, img, "a.dcm", bits_stored=12)).pixels
    rad1 = read_image(write(tmp_path, img, "b.dcm", bits_stored=12, photometric="MONOCHROME1"))
    assert rad1.info["inverted"] is True
    np.testing.assert_allclose(rad1.pixels, 1.0 - mono2, atol=1e-6)


def test_window_follows_the_dicom_linear_formula(tmp_path):
    img = chest_pixels(maxval=4095)
    c, w = 1500.0, 1001.0
    rad = read_image(write(tmp_path, img, bits_stored=12, WindowCenter=[c, 3000], WindowWidth=[w, 200]))
    assert rad.info["voi"] == "window"
    # PS3.3 C.11.2.1.2.1, output range [0, 1]; the first of several windows is used
    x = img.astype(np.float64)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    expected[x <= c - 0.5 - (w - 1) / 2] = 0
    expected[x > c - 0.5 + (w - 1) / 2] = 1
    np.testing.assert_allclose(rad.pixels, expected, atol=1e-6)
    assert (rad.pixels == 0).any() and (rad.pixels == 1).any()


def test_window_after_rescale(tmp_path):
    img = chest_pixels(maxval=4095)
    slope, intercept, c, w = 2.0, -1000.0, 2000.0, 4001.0
    rad = read_image(write(tmp_path, img, bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept,
                           WindowCenter=c, WindowWidth=w))
    v = img * slope + intercept
    expected = np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(rad.pixels, expected, atol=1e-6)


def test_rescale_without_window_uses_the_mapped_bits_stored_range(tmp_path):
    img = chest_pixels(maxval=4095)
    rad = read_image(write(tmp_path, img, bits_stored=12, RescaleSlope=3.0, RescaleIntercept=-50.0))
    np.testing.assert_allclose(rad.pixels, img / 4095.0, atol=1e-6)  # a linear map of the same range
    neg = read_image(write(tmp_path, img, "n.dcm", bits_stored=12, RescaleSlope=-1.0, RescaleIntercept=4095.0))
    np.testing.assert_allclose(neg.pixels, 1.0 - img / 4095.0, atol=1e-6)  # higher output value = brighter


def test_voi_lut_sequence_is_preferred(tmp_path):
    img = chest_pixels(maxval=4095)
    lut = np.sqrt(np.arange(4096) / 4095.0) * 4000 + 10
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    rad = read_image(write(tmp_path, img, bits_stored=12, VOILUTSequence=Sequence([item]),
                           WindowCenter=100.0, WindowWidth=10.0))
    assert rad.info["voi"] == "voi_lut"
    lut_i = lut.astype(int)
    # scaled over the LUT Descriptor's declared output range (12 bits: 0..4095), not the data's min/max
    np.testing.assert_allclose(rad.pixels, lut_i[img] / 4095.0, atol=1e-6)


def test_signed_pixels(tmp_path):
    img = (chest_pixels(maxval=4095).astype(np.int32) - 2048).astype(np.int16)
    rad = read_image(write(tmp_path, img, bits_stored=12))
    np.testing.assert_allclose(rad.pixels, (img + 2048) / 4095.0, atol=1e-6)


def test_unusable_window_falls_back_to_full_range(tmp_path):
    img = chest_pixels()
    rad = read_image(write(tmp_path, img, WindowCenter=100.0, WindowWidth=0.0))
    assert rad.info["voi"] == "none"
    np.testing.assert_array_equal(rad.pixels, img / np.float32(255))


def test_rle_and_jpeg2000_compressed_equal_uncompressed(tmp_path):
    img = chest_pixels(maxval=4095)
    plain = read_image(write(tmp_path, img, "p.dcm", bits_stored=12)).pixels
    for ts in (RLELossless, JPEG2000Lossless):
        ds = make_ds(img, bits_stored=12)
        ds.compress(ts)
        rad = read_image(save(ds, tmp_path / f"{ts.name[:4]}.dcm"))
        assert rad.info["transfer_syntax"] == ts.name
        np.testing.assert_array_equal(rad.pixels, plain)


def test_dicom_without_file_meta_header(tmp_path):
    img = chest_pixels()
    ds = make_ds(img)
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "acr.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = path.read_bytes()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    assert sniff_format(data) == "dicom"
    rad = read_image(data)
    assert rad.info["transfer_syntax"] == "Implicit VR Little Endian"
    np.testing.assert_array_equal(rad.pixels, img / np.float32(255))


def test_read_dicom_direct_call(tmp_path):
    data = write(tmp_path, chest_pixels()).read_bytes()
    assert read_dicom(data).pixels.shape == (160, 144)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "PT", "MG", "XA", "RF", "PX", "IO", "OT", "SC"])
def test_non_projection_modalities_refused(tmp_path, modality):
    err = refuse(write(tmp_path, chest_pixels(), modality=modality))
    assert err.field == "Modality" and f"'{modality}'" in str(err) and "CR" in str(err)
    refuse(write(tmp_path, chest_pixels(), "b.dcm", modality=modality), allow_any_body_part=True)


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG", "dx"])
def test_projection_modalities_accepted(tmp_path, modality):
    assert read_image(write(tmp_path, chest_pixels(), modality=modality)).info["modality"] == modality.upper()


def test_missing_modality_refused(tmp_path):
    assert refuse(write(tmp_path, chest_pixels(), modality=None)).field == "Modality"


def test_colour_dicoms_refused(tmp_path):
    rgb = np.dstack([chest_pixels(seed=s) for s in (1, 2, 3)])
    err = refuse(write(tmp_path, rgb, samples=3, photometric="RGB"))
    assert err.field == "SamplesPerPixel"
    for photometric in ("PALETTE COLOR", "YBR_FULL"):
        err = refuse(write(tmp_path, chest_pixels(), "p.dcm", photometric=photometric))
        assert err.field == "PhotometricInterpretation" and photometric in str(err)


def test_multiframe_refused(tmp_path):
    frames = np.stack([chest_pixels(seed=1), chest_pixels(seed=2)])
    err = refuse(write(tmp_path, frames, frames=2))
    assert err.field == "NumberOfFrames" and "2" in str(err)


@pytest.mark.parametrize("part", ["HAND", "RIBCAGE", "CHESTABDOMEN", "SKULL", "ABDOMEN CHEST"])
def test_non_chest_body_part_refused_unless_allowed(tmp_path, part):
    path = write(tmp_path, chest_pixels(), body_part=part)
    err = refuse(path)
    assert err.field == "BodyPartExamined" and "allow_any_body_part" in str(err)
    rad = read_image(path, allow_any_body_part=True)
    assert rad.info["body_part"] == part


@pytest.mark.parametrize("part", ["CHEST", "chest", "THORAX", "LUNG", "CHEST PA", "CHEST_LAT", "TORAX"])
def test_chest_body_parts_accepted(tmp_path, part):
    assert read_image(write(tmp_path, chest_pixels(), body_part=part)).pixels.shape == (160, 144)


def test_absent_body_part_uses_other_fields_without_echoing_them(tmp_path):
    err = refuse(write(tmp_path, chest_pixels(), "t.dcm", body_part=None,
                       StudyDescription="SENTINELSTUDY - TEETH", SeriesDescription="SENTINELSTUDY"))
    assert err.field == "StudyDescription"
    err = refuse(write(tmp_path, chest_pixels(), "p.dcm", body_part=None, ProtocolName="OPG panoramic"))
    assert err.field == "ProtocolName"
    err = refuse(write(tmp_path, chest_pixels(), "n.dcm", body_part=None))
    assert err.field == "BodyPartExamined" and "absent" in str(err)
    assert read_image(tmp_path / "n.dcm", allow_any_body_part=True).info["body_part"] is None
    ok = read_image(write(tmp_path, chest_pixels(), "c.dcm", body_part=None, StudyDescription="XR CHEST PA"))
    assert ok.info["body_part"] is None
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
    read_image(write(tmp_path, chest_pixels(), "r.dcm", body_part=None, AnatomicRegionSequence=Sequence([region])))


def test_panoramic_geometry_refused_even_if_tagged_chest(tmp_path):
    wide = chest_pixels(h=150, w=320)
    err = refuse(write(tmp_path, wide))
    assert err.field == "Rows/Columns" and "320x150" in str(err)
    assert read_image(tmp_path / "x.dcm", allow_any_body_part=True).pixels.shape == (150, 320)
    read_image(write(tmp_path, chest_pixels(h=170, w=140), "ok.dcm"))  # 17:14 portrait is fine


def test_truncated_dicoms_are_corrupt(tmp_path):
    data = write(tmp_path, chest_pixels()).read_bytes()
    for n in (len(data) - 1000, len(data) // 2, 400):
        refuse(data[:n], CorruptImageError)
    ds = make_ds(chest_pixels(maxval=4095), bits_stored=12)
    ds.compress(RLELossless)
    rle = save(ds, tmp_path / "rle.dcm").read_bytes()
    refuse(rle[: len(rle) - 300], CorruptImageError)


def test_dicom_without_pixel_data_is_corrupt(tmp_path):
    ds = make_ds(chest_pixels())
    del ds.PixelData
    err = refuse(save(ds, tmp_path / "np.dcm"), CorruptImageError)
    assert "PixelData" in str(err)


def test_dicom_size_limits_checked_before_decoding(tmp_path):
    ds = make_ds(chest_pixels())
    ds.Rows = ds.Columns = 30000  # pixel data is far too short: decoding would say "corrupt"
    err = refuse(save(ds, tmp_path / "bomb.dcm"), InvalidImageError)
    assert "max_pixels" in str(err)
    err = refuse(write(tmp_path, chest_pixels(h=100, w=100), "small.dcm"), InvalidImageError)
    assert "too small" in str(err)


def test_unknown_transfer_syntax_is_unsupported(tmp_path):
    data = write(tmp_path, chest_pixels()).read_bytes()
    explicit = str(ExplicitVRLittleEndian).encode()
    assert data.count(explicit) == 1
    bogus = data.replace(explicit, b"1.2.840.99999.1.2.1")  # same length, so the meta group stays valid
    err = refuse(bogus, UnsupportedFormatError)
    assert "transfer syntax" in str(err)


def test_garbage_after_dicm_is_corrupt():
    data = b"\x00" * 128 + b"DICM" + np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    with pytest.raises((CorruptImageError, DicomRefusedError)):
        read_image(data)


# --------------------------------------------------------------------------- privacy

def test_patient_attributes_never_leak(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    img = chest_pixels()
    bad_uid = {"SeriesInstanceUID": "999888777.01.02"}  # invalid UID: pydicom would warn and quote it
    too_long = "SENTINELSTUDY " * 6 + "TEETH"  # LO over 64 chars: pydicom's validation would quote it
    cases = [
        dict(modality="CT"), dict(body_part="KNEE"), dict(body_part=None, StudyDescription=too_long),
        dict(body_part=None, SeriesDescription=too_long + " CHEST"),
        dict(photometric="RGB"), dict(frames=None, NumberOfFrames=3), dict(body_part=None),
    ]
    ok = write(tmp_path, img, "ok.dcm", **bad_uid)
    bad = [write(tmp_path, img, f"bad{i}.dcm", **bad_uid, **kw) for i, kw in enumerate(cases)]
    cut = write(tmp_path, img, "cut.dcm", **bad_uid).read_bytes()
    cut = cut[: len(cut) - 500]
    caplog.clear()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rad = read_image(ok)
        for path in bad:
            refuse(path)
        refuse(cut, CorruptImageError)
    assert_private(repr(rad), str(rad.info), *(str(w.message) for w in caught), caplog.text)
    assert caught == [] and caplog.records == []
    out, err = capfd.readouterr()
    assert_private(out, err)
    assert out == ""


# --------------------------------------------------------------------------- shared real files

def chest_contrast(p: np.ndarray) -> float:
    """Mediastinum minus lungs at mid height: positive when bone/soft tissue is bright (correct polarity)."""
    h, w = p.shape
    rows = slice(int(h * 0.3), int(h * 0.6))
    mid = p[rows, int(w * 0.45):int(w * 0.55)].mean()
    lungs = (p[rows, int(w * 0.2):int(w * 0.35)].mean() + p[rows, int(w * 0.65):int(w * 0.8)].mean()) / 2
    return float(mid - lungs)


def sane(rad) -> None:
    p = rad.pixels
    assert p.dtype == np.float32 and p.flags.c_contiguous and 0 <= p.min() and p.max() <= 1
    assert 0.2 < p.mean() < 0.9 and p.std() > 0.1


def test_shared_rg1_jpeg2000_monochrome1_15bit():
    rad = read_image(need_shared("data", "dicom", "RG1_J2KI.dcm"))
    sane(rad)
    assert rad.pixels.shape == (1955, 1841) and rad.bit_depth == 15
    assert rad.info["inverted"] and rad.info["voi"] == "window" and "2000" in rad.info["transfer_syntax"]
    assert chest_contrast(rad.pixels) > 0.1


def test_shared_cr_mono1_without_meta_header():
    path = need_shared("data", "dicom", "CR-MONO1-10-chest.dcm")
    assert path.read_bytes()[128:132] != b"DICM"
    rad = read_image(path)
    sane(rad)
    assert rad.pixels.shape == (440, 440) and rad.bit_depth == 10
    assert rad.info["inverted"] and rad.info["transfer_syntax"] == "Implicit VR Little Endian"
    assert chest_contrast(rad.pixels) > 0.1


def test_shared_siim_and_fake_monochrome1_are_inverses():
    siim = read_image(need_shared("data", "dicom", "siim-cr-jpeg-baseline.dcm"))
    fake = read_image(need_shared("data", "dicom", "Fake_MONOHR1.dcm"))
    sane(siim)
    assert siim.pixels.shape == (1024, 1024) and siim.info["transfer_syntax"].startswith("JPEG Baseline")
    assert not siim.info["inverted"] and fake.info["inverted"]
    np.testing.assert_allclose(siim.pixels, 1.0 - fake.pixels, atol=1e-6)
    assert chest_contrast(siim.pixels) > 0.1 > -0.1 > chest_contrast(fake.pixels)


def test_shared_test1_equals_png_of_its_raw_pixels(tmp_path):
    path = need_shared("data", "dicom", "test1.dcm")
    rad = read_image(path)
    sane(rad)
    assert rad.info["modality"] == "DX" and rad.info["body_part"] == "CHEST"
    raw = pydicom.dcmread(path).pixel_array
    assert cv2.imwrite(str(tmp_path / "t1.png"), raw)
    np.testing.assert_array_equal(rad.pixels, read_image(tmp_path / "t1.png").pixels)
    assert chest_contrast(rad.pixels) > 0.1


def test_shared_test4_ribcage_refused():
    path = need_shared("data", "dicom", "test4.dcm")
    err = refuse(path)
    assert err.field == "BodyPartExamined" and "'RIBCAGE'" in str(err)
    sane(read_image(path, allow_any_body_part=True))


def test_shared_test5_ct_refused():
    path = need_shared("data", "dicom", "test5.dcm")
    err = refuse(path)
    assert err.field == "Modality" and "'CT'" in str(err)
    refuse(path, allow_any_body_part=True)


def test_shared_dental_panoramic_refused():
    path = need_shared("data", "dicom", "dental-panoramic-cr.dcm")
    err = refuse(path)
    assert err.field == "StudyDescription" and "TEETH" not in str(err)
    rad = read_image(path, allow_any_body_part=True)
    assert rad.pixels.shape == (1576, 1976) and rad.info["inverted"]


# --------------------------------------------------------------------------- hardening (issue 9)

import struct  # noqa: E402
import threading  # noqa: E402

import cxr_edge.dicom as dicom_module  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEGBaseline8Bit  # noqa: E402


def encapsulated_ds(codestream: bytes, rows: int, cols: int, ts: UID = JPEGBaseline8Bit) -> Dataset:
    ds = make_ds(np.zeros((rows, cols), np.uint8), ts=ts)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def jpeg_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def no_decode(monkeypatch):
    monkeypatch.setattr(dicom_module, "_decode", lambda *a, **k: pytest.fail("pixel data decoded"))


def test_encapsulated_jpeg_reads_when_its_sof_matches(tmp_path):
    img = chest_pixels()
    data = jpeg_bytes(img)
    rad = read_image(save(encapsulated_ds(data, 160, 144), tmp_path / "j.dcm"))
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_allclose(rad.pixels, ref / 255.0, atol=1.5 / 255)  # the decoder may differ by 1 LSB
    assert rad.info["transfer_syntax"].startswith("JPEG Baseline")


def test_encapsulated_jpeg_sof_must_match_rows_columns_before_decoding(tmp_path, monkeypatch):
    no_decode(monkeypatch)
    other = jpeg_bytes(chest_pixels(h=170, w=150))  # SOF 150x170; Rows/Columns say 144x160
    err = refuse(save(encapsulated_ds(other, 160, 144), tmp_path / "m.dcm"), CorruptImageError)
    assert "150x170" in str(err) and "144x160" in str(err)
    huge = bytearray(jpeg_bytes(chest_pixels()))
    struct.pack_into(">HH", huge, huge.find(b"\xff\xc0") + 5, 60000, 60000)
    err = refuse(save(encapsulated_ds(bytes(huge), 160, 144), tmp_path / "h.dcm"), InvalidImageError)
    assert "max_pixels" in str(err)
    refuse(save(encapsulated_ds(b"\x00" * 64, 160, 144), tmp_path / "g.dcm"), CorruptImageError)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_encapsulated_jpeg_cut_short_with_eoi_appended_is_corrupt(tmp_path, fraction):
    """pydicom's JPEG decoders pad a frame that hits EOI early with gray: refused like a JPEG file."""
    data = jpeg_bytes(chest_pixels())
    cut = data[: int(len(data) * fraction)] + b"\xff\xd9"
    refuse(save(encapsulated_ds(cut, 160, 144), tmp_path / "c.dcm"), CorruptImageError)
    no_eoi = data[: int(len(data) * fraction)]
    refuse(save(encapsulated_ds(no_eoi + b"\x00" * (len(no_eoi) % 2), 160, 144), tmp_path / "n.dcm"),
           CorruptImageError)


def test_encapsulated_jpeg2000_siz_must_match_rows_columns(tmp_path, monkeypatch):
    ds = make_ds(chest_pixels(maxval=4095), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    siz = data.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", data, siz + 8, 144 + 16, 160)  # Xsiz wider than Columns
    ds.PixelData = bytes(data)
    no_decode(monkeypatch)
    err = refuse(save(ds, tmp_path / "j2k.dcm"), CorruptImageError)
    assert "JPEG 2000" in str(err) and "160x160" in str(err)


@pytest.mark.parametrize("change", ["one_column_less", "extra_row", "short"])
def test_native_pixel_data_length_must_match_the_header(tmp_path, change, monkeypatch):
    img = chest_pixels()
    ds = make_ds(img)
    if change == "one_column_less":  # same bytes, one column less: would decode sheared
        ds.Columns = 143
    elif change == "extra_row":
        ds.PixelData = img.tobytes() + img[:1].tobytes()
    else:
        ds.PixelData = img.tobytes()[:-144 * 3]
    no_decode(monkeypatch)
    err = refuse(save(ds, tmp_path / "n.dcm"), CorruptImageError)
    assert "Rows x Columns" in str(err)


def test_odd_length_native_pixel_data_with_its_pad_byte_reads(tmp_path):
    img = chest_pixels(h=129, w=129)  # 16641 bytes: stored padded to even length
    assert read_image(write(tmp_path, img)).pixels.shape == (129, 129)


@pytest.mark.parametrize("tags", [dict(RescaleSlope="NaN", RescaleIntercept="0"),
                                  dict(RescaleSlope="1", RescaleIntercept="inf"),
                                  dict(RescaleSlope="1e308", RescaleIntercept="1e308"),
                                  dict(WindowCenter="100", WindowWidth="NaN"),
                                  dict(WindowCenter="NaN", WindowWidth="100")])
def test_non_finite_modality_or_window_output_is_refused(tmp_path, tags):
    err = refuse(write(tmp_path, chest_pixels(), **tags), InvalidImageError)
    assert "NaN or inf" in str(err)


def confused(ds: Dataset, keyword: str, vr: str, value) -> Dataset:
    ds["PixelData"].VR = "OB"  # so the writer need not read BitsAllocated to pick OB/OW
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if keyword in ds:
        del ds[keyword]
    ds.add_new(tag, vr, value)
    return ds


@pytest.mark.parametrize("keyword,vr,value,kw", [
    ("Rows", "SQ", "seq", {}),
    ("Columns", "LO", "wide", {}),
    ("BitsStored", "LO", "twelve", {}),
    ("BitsAllocated", "SQ", "seq", {}),
    ("RescaleSlope", "SQ", "seq", {}),
    ("WindowCenter", "SQ", "seq", dict(WindowWidth=100.0)),
    ("WindowWidth", "LO", "wide", dict(WindowCenter=100.0)),
    ("AnatomicRegionSequence", "US", 5, dict(body_part=None)),
    ("VOILUTSequence", "LO", "abc", {}),
    ("ViewPosition", "SQ", "seq", {}),
    ("BodyPartExamined", "SQ", "seq", {}),
    ("PixelRepresentation", "US", 7, {}),
    ("BitsStored", "US", 0, {}),
    ("BitsStored", "US", 40, {}),
])
def test_type_confused_elements_are_typed_errors(tmp_path, keyword, vr, value, kw):
    if value == "seq":
        value = Sequence([Dataset()])
    ds = confused(make_ds(chest_pixels(), **kw), keyword, vr, value)
    with pytest.raises(CxrEdgeError) as err:
        read_image(save(ds, tmp_path / "t.dcm"))
    assert isinstance(err.value, (CorruptImageError, DicomRefusedError))
    assert_private(str(err.value))


def test_unforeseen_header_failures_become_corrupt_image_errors(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise TypeError("unexpected")

    monkeypatch.setattr(dicom_module, "_render", boom)
    err = refuse(write(tmp_path, chest_pixels()), CorruptImageError)
    assert "TypeError" in str(err) and not isinstance(err, TypeError)


def test_bits_allocated_must_be_a_sample_size(tmp_path):
    ds = make_ds(chest_pixels())
    ds.BitsAllocated = 1
    assert refuse(save(ds, tmp_path / "b.dcm")).field == "BitsAllocated"


def test_presentation_lut_shape_inverse_inverts_once(tmp_path):
    img = chest_pixels(maxval=4095)
    normal = read_image(write(tmp_path, img, "n.dcm", bits_stored=12)).pixels
    inv = read_image(write(tmp_path, img, "i.dcm", bits_stored=12, PresentationLUTShape="INVERSE"))
    assert inv.info["inverted"] is True
    np.testing.assert_allclose(inv.pixels, 1.0 - normal, atol=1e-6)
    # DX: MONOCHROME1 must declare INVERSE; the two describe one inversion, not two
    mono1 = read_image(write(tmp_path, img, "m.dcm", bits_stored=12, photometric="MONOCHROME1",
                             PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(mono1.pixels, 1.0 - normal, atol=1e-6)
    ident = read_image(write(tmp_path, img, "d.dcm", bits_stored=12, PresentationLUTShape="IDENTITY"))
    np.testing.assert_array_equal(ident.pixels, normal)


def test_for_processing_images_are_refused_whatever_the_override(tmp_path):
    path = write(tmp_path, chest_pixels(), PresentationIntentType="FOR PROCESSING")
    assert refuse(path).field == "PresentationIntentType"
    assert refuse(path, allow_any_body_part=True).field == "PresentationIntentType"
    read_image(write(tmp_path, chest_pixels(), "p.dcm", PresentationIntentType="FOR PRESENTATION"))


def test_voi_lut_output_is_scaled_by_its_descriptor_range(tmp_path):
    img = chest_pixels()  # 8-bit
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "OW", (np.arange(256) * 100 // 255).astype("<u2").tobytes())  # output 0..100
    rad = read_image(write(tmp_path, img, VOILUTSequence=Sequence([item])))
    assert rad.info["voi"] == "voi_lut"
    np.testing.assert_allclose(rad.pixels, (img.astype(int) * 100 // 255) / 255.0, atol=1e-6)
    assert rad.pixels.max() == pytest.approx(100 / 255)  # not stretched to 1 by the data's own max
    over = Dataset()
    over.add_new("LUTDescriptor", "US", [4096, 0, 12])
    over.add_new("LUTData", "OW", (np.arange(4096) * 16).astype("<u2").tobytes())  # 16-bit data, "12-bit" LUT
    err = refuse(write(tmp_path, chest_pixels(maxval=4095), "o.dcm", bits_stored=12,
                       VOILUTSequence=Sequence([over])), CorruptImageError)
    assert "LUTDescriptor" in str(err)


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LLD", "RLD", "RLO", "ll", "left lateral decubitus view"])
def test_lateral_views_refused_unless_allowed(tmp_path, view):
    path = write(tmp_path, chest_pixels(), ViewPosition=view)
    err = refuse(path)
    assert err.field == "ViewPosition" and "allow_any_body_part" in str(err)
    assert read_image(path, allow_any_body_part=True).pixels.shape == (160, 144)


def test_frontal_views_accepted_and_view_code_sequence_checked(tmp_path):
    for view in ("PA", "AP"):
        read_image(write(tmp_path, chest_pixels(), f"{view}.dcm", ViewPosition=view))
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10236", "SRT", "left lateral"
    path = write(tmp_path, chest_pixels(), "v.dcm", ViewCodeSequence=Sequence([code]))
    assert refuse(path).field == "ViewCodeSequence"
    read_image(path, allow_any_body_part=True)


def test_concurrent_reads_never_toggle_pydicom_settings_or_warning_filters(tmp_path, monkeypatch):
    """Reads from 4 threads: no per-read catch_warnings / disable_value_validation, same state after."""
    img = chest_pixels(maxval=4095)
    good = write(tmp_path, img, "g.dcm", bits_stored=12, WindowCenter=1500.0, WindowWidth=1001.0).read_bytes()
    refused = write(tmp_path, img, "r.dcm", bits_stored=12, modality="CT").read_bytes()
    cut = good[: len(good) - 3000]
    expected = read_image(good).pixels
    settings_before = pydicom.config.settings.reading_validation_mode
    filters_before = list(warnings.filters)
    calls = []
    real_catch = warnings.catch_warnings

    def recording_catch(*args, **kwargs):
        calls.append("catch_warnings")
        return real_catch(*args, **kwargs)

    def no_toggle(*args, **kwargs):
        calls.append("disable_value_validation")
        raise AssertionError("validation toggled per read")

    monkeypatch.setattr(warnings, "catch_warnings", recording_catch)
    monkeypatch.setattr(pydicom.config, "disable_value_validation", no_toggle)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(15):
                assert np.array_equal(read_image(good).pixels, expected)
                with pytest.raises(DicomRefusedError):
                    read_image(refused)
                with pytest.raises(CorruptImageError):
                    read_image(cut)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    monkeypatch.undo()
    assert not errors, errors[0]
    assert calls == []
    assert pydicom.config.settings.reading_validation_mode == settings_before == pydicom.config.IGNORE
    assert list(warnings.filters) == filters_before
