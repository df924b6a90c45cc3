"""read_image / sniff_format: PNG, JPEG, arrays, PIL images, and every refusal as a typed error."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from cxr_edge import imaging
from cxr_edge.errors import (CorruptImageError, CxrEdgeError, ImageError, InvalidArgumentError,
                             InvalidImageError, UnsupportedFormatError)
from cxr_edge.imaging import Radiograph, read_image, sniff_format
from tests.conftest import need_shared

RNG_SEED = 1234


def gray8(h: int = 160, w: int = 192, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    img[:, : w // 3] = np.arange(h, dtype=np.uint8)[:, None]  # a smooth part too
    return img


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def assert_contract(rad: Radiograph) -> None:
    p = rad.pixels
    assert isinstance(rad, Radiograph)
    assert p.dtype == np.float32 and p.ndim == 2 and p.flags.c_contiguous
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert rad.info["height"] == p.shape[0] and rad.info["width"] == p.shape[1]


# --------------------------------------------------------------------------- sniffing

def test_sniff_recognises_supported_signatures():
    img = gray8()
    assert sniff_format(encode(".png", img)) == "png"
    assert sniff_format(encode(".jpg", img)) == "jpeg"
    assert sniff_format(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00") == "dicom"
    # no preamble / file meta: starts with an implicit-VR (0008,0000) group length element
    assert sniff_format(b"\x08\x00\x00\x00\x04\x00\x00\x00" + b"\x00" * 64) == "dicom"
    assert sniff_format(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\x00" * 16) == "dicom"


@pytest.mark.parametrize("ext,name", [(".bmp", "BMP"), (".tiff", "TIFF"), (".webp", "WebP")])
def test_sniff_names_recognised_unsupported_formats(ext, name):
    data = encode(ext, gray8())
    with pytest.raises(UnsupportedFormatError) as err:
        sniff_format(data)
    msg = str(err.value)
    assert name in msg and "PNG" in msg and "JPEG" in msg and "DICOM" in msg


def test_sniff_names_gif_and_pdf():
    buf = io.BytesIO()
    Image.fromarray(gray8()).save(buf, format="GIF")
    with pytest.raises(UnsupportedFormatError, match="GIF"):
        sniff_format(buf.getvalue())
    with pytest.raises(UnsupportedFormatError, match="PDF"):
        sniff_format(b"%PDF-1.7\n" + b"x" * 100)


def test_sniff_empty_and_random():
    with pytest.raises(UnsupportedFormatError, match="empty"):
        sniff_format(b"")
    rnd = np.random.default_rng(RNG_SEED).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(UnsupportedFormatError, match="unrecognised"):
        sniff_format(rnd)


# --------------------------------------------------------------------------- PNG

def test_png_8bit_gray_is_exactly_pixel_over_255_from_every_source_kind(tmp_path):
    img = gray8()
    data = encode(".png", img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = img.astype(np.float32) / np.float32(255)
    for src in (path, str(path), data, bytearray(data), memoryview(data)):
        rad = read_image(src)
        assert_contract(rad)
        assert rad.format == "png" and rad.bit_depth == 8
        assert rad.info == {"width": img.shape[1], "height": img.shape[0], "channels_in": 1}
        np.testing.assert_array_equal(rad.pixels, expected)


def test_png_16bit_reads_scaled_by_65535():
    img = (np.random.default_rng(RNG_SEED).integers(0, 65536, (150, 140))).astype(np.uint16)
    img[0, 0], img[0, 1] = 0, 65535
    rad = read_image(encode(".png", img))
    assert_contract(rad)
    assert rad.bit_depth == 16
    np.testing.assert_array_equal(rad.pixels, img.astype(np.float32) / np.float32(65535))
    assert rad.pixels[0, 1] == 1.0 and rad.pixels[0, 0] == 0.0


def test_png_rgb_with_equal_channels_is_exact_gray():
    img = gray8()
    rad = read_image(encode(".png", np.dstack([img, img, img])))
    assert rad.info["channels_in"] == 3
    np.testing.assert_array_equal(rad.pixels, img / np.float32(255))


def test_png_colour_uses_luminance_and_drops_alpha():
    bgr = np.dstack([gray8(seed=1), gray8(seed=2), gray8(seed=3)])
    expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) / np.float32(255)
    rad = read_image(encode(".png", bgr))
    np.testing.assert_array_equal(rad.pixels, expected)
    alpha = np.random.default_rng(RNG_SEED).integers(0, 256, bgr.shape[:2], dtype=np.uint8)
    rad4 = read_image(encode(".png", np.dstack([bgr, alpha])))
    assert rad4.info["channels_in"] == 4
    np.testing.assert_array_equal(rad4.pixels, expected)


def test_png_16bit_rgba_equal_channels():
    g = (np.arange(130 * 140, dtype=np.uint32).reshape(130, 140) * 3 % 65536).astype(np.uint16)
    rad = read_image(encode(".png", np.dstack([g, g, g, np.full_like(g, 65535)])))
    assert rad.bit_depth == 16
    np.testing.assert_array_equal(rad.pixels, g / np.float32(65535))


@pytest.mark.parametrize("cut", ["half", "no_iend", "one_byte", "header_only"])
def test_truncated_png_is_corrupt_and_never_decoded(cut, monkeypatch):
    data = encode(".png", gray8())
    n = {"half": len(data) // 2, "no_iend": len(data) - 12, "one_byte": len(data) - 1, "header_only": 20}[cut]
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a, **k: pytest.fail("decoder reached"))
    with pytest.raises(CorruptImageError, match="truncated"):
        read_image(data[:n])


def test_png_with_damaged_image_data_but_valid_structure_is_corrupt():
    """IEND present, chunks intact, but the zlib stream stops half way: the decoder must refuse."""
    img = gray8()
    data = encode(".png", img)
    chunks = png_chunks(data)
    idat = b"".join(p for t, p in chunks if t == b"IDAT")
    bad = data[:8] + png_chunk(b"IHDR", chunks[0][1]) + png_chunk(b"IDAT", idat[: len(idat) // 2]) \
        + png_chunk(b"IEND", b"")
    with pytest.raises(CorruptImageError):
        read_image(bad)
    short_stream = zlib.compress(zlib.decompress(idat)[: img.size // 2])  # complete zlib, too few rows
    bad2 = data[:8] + png_chunk(b"IHDR", chunks[0][1]) + png_chunk(b"IDAT", short_stream) + png_chunk(b"IEND", b"")
    with pytest.raises(CorruptImageError):
        read_image(bad2)


def bomb_png(side: int) -> bytes:
    """A ~100-byte PNG whose IHDR declares side x side 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * (side + 1) * 4)) + png_chunk(b"IEND", b""))


def test_png_decompression_bomb_refused_before_decoding(monkeypatch):
    bomb = bomb_png(30000)
    assert len(bomb) < 200
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a, **k: pytest.fail("decoder reached"))
    with pytest.raises(InvalidImageError, match="max_pixels") as err:
        read_image(bomb)
    assert "900,000,000" in str(err.value)
    # a lazy PIL image (PIL opens up to ~179 Mpx itself) is refused before PIL loads its pixels
    with pytest.raises(InvalidImageError, match="max_pixels"):
        read_image(Image.open(io.BytesIO(bomb_png(9000))))


def test_max_pixels_is_the_callers_limit():
    data = encode(".png", gray8(200, 200))
    with pytest.raises(InvalidImageError, match="max_pixels"):
        read_image(data, max_pixels=200 * 200 - 1)
    assert read_image(data, max_pixels=200 * 200).pixels.shape == (200, 200)


def test_tiny_png_is_too_small():
    with pytest.raises(InvalidImageError, match="too small to be a radiograph"):
        read_image(encode(".png", np.zeros((1, 1), np.uint8)))
    with pytest.raises(InvalidImageError, match="too small"):
        read_image(encode(".png", gray8(127, 400)))
    assert read_image(encode(".png", gray8(40, 50)), min_side=32).pixels.shape == (40, 50)


# --------------------------------------------------------------------------- JPEG

def test_jpeg_gray_matches_decoder_output():
    data = encode(".jpg", gray8(), [cv2.IMWRITE_JPEG_QUALITY, 90])
    rad = read_image(data)
    assert_contract(rad)
    assert rad.format == "jpeg" and rad.bit_depth == 8 and rad.info["channels_in"] == 1
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(rad.pixels, ref / np.float32(255))
    assert np.abs(rad.pixels - gray8() / 255.0).mean() < 0.1  # lossy, but the same picture


def test_progressive_and_colour_jpeg_and_trailing_bytes():
    img = gray8()
    prog = encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert read_image(prog).pixels.shape == img.shape
    colour = encode(".jpg", np.dstack([gray8(seed=1), gray8(seed=2), gray8(seed=3)]))
    rad = read_image(colour)
    assert rad.info["channels_in"] == 3 and rad.pixels.ndim == 2
    # bytes after EOI (some writers append data) do not make a whole file corrupt
    plain = encode(".jpg", img)
    np.testing.assert_array_equal(read_image(plain + b"\x00" * 37).pixels, read_image(plain).pixels)


@pytest.mark.parametrize("cut", ["half", "no_eoi", "header_only"])
def test_truncated_jpeg_is_corrupt(cut):
    data = encode(".jpg", gray8())
    n = {"half": len(data) // 2, "no_eoi": len(data) - 2, "header_only": 30}[cut]
    with pytest.raises(CorruptImageError, match="truncated"):
        read_image(data[:n])


def test_truncated_jpeg_with_complete_thumbnail_inside_is_still_corrupt():
    """An EXIF-style APP1 holding a whole small JPEG (with its own EOI) must not hide a cut main image."""
    thumb = encode(".jpg", gray8(16, 16))
    main = encode(".jpg", gray8())
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb
    full = main[:2] + app1 + main[2:]
    assert read_image(full).pixels.shape == gray8().shape
    with pytest.raises(CorruptImageError):
        read_image(full[: len(full) - 200])


def test_jpeg_bomb_refused_before_decoding(monkeypatch):
    data = bytearray(encode(".jpg", gray8()))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a, **k: pytest.fail("decoder reached"))
    with pytest.raises(InvalidImageError, match="max_pixels"):
        read_image(bytes(data))


# --------------------------------------------------------------------------- unsupported / bad files

@pytest.mark.parametrize("ext,name", [(".bmp", "BMP"), (".tiff", "TIFF"), (".webp", "WebP")])
def test_unsupported_files_are_refused_by_read_image(tmp_path, ext, name):
    path = tmp_path / f"x{ext}"
    path.write_bytes(encode(ext, gray8()))
    with pytest.raises(UnsupportedFormatError, match=name):
        read_image(path)


def test_empty_file_and_random_bytes(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="empty"):
        read_image(empty)
    rnd = np.random.default_rng(RNG_SEED).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    with pytest.raises(UnsupportedFormatError):
        read_image(rnd)


def test_missing_path_and_directory_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file") as err:
        read_image(tmp_path / "nope.png")
    assert not isinstance(err.value, FileNotFoundError)
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        read_image(12345)
    with pytest.raises(InvalidArgumentError):
        read_image(gray8(), min_side=0)
    with pytest.raises(InvalidArgumentError):
        read_image(gray8(), max_pixels=-1)


# --------------------------------------------------------------------------- arrays

def test_uint8_and_uint16_arrays():
    img = gray8()
    rad = read_image(img)
    assert rad.format == "array" and rad.bit_depth == 8
    np.testing.assert_array_equal(rad.pixels, img / np.float32(255))
    img16 = img.astype(np.uint16) * 257
    rad16 = read_image(img16)
    assert rad16.bit_depth == 16
    np.testing.assert_array_equal(rad16.pixels, rad.pixels)  # 257 * x / 65535 == x / 255


def test_float_array_is_copied_not_aliased():
    img = (gray8() / 255.0).astype(np.float32)
    rad = read_image(img)
    np.testing.assert_array_equal(rad.pixels, img)
    assert not np.shares_memory(rad.pixels, img)
    rad64 = read_image(img.astype(np.float64)[:, ::-1])  # non-contiguous float64
    assert_contract(rad64)
    np.testing.assert_allclose(rad64.pixels, img[:, ::-1], atol=1e-7)


def test_channel_arrays_are_rgb_ordered():
    rgb = np.dstack([gray8(seed=1), gray8(seed=2), gray8(seed=3)])
    np.testing.assert_array_equal(read_image(rgb).pixels, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) / np.float32(255))
    g = gray8()
    np.testing.assert_array_equal(read_image(g[:, :, None]).pixels, g / np.float32(255))
    rgba = np.dstack([g, g, g, np.zeros_like(g)])
    np.testing.assert_array_equal(read_image(rgba).pixels, g / np.float32(255))


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf"),
                                         (1.5, "out of range"), (-0.01, "out of range")])
def test_bad_float_arrays(value, match):
    img = np.full((150, 150), 0.5, np.float32)
    img[3, 4] = value
    with pytest.raises(InvalidImageError, match=match):
        read_image(img)


@pytest.mark.parametrize("dtype", [bool, np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64,
                                   np.complex64, object])
def test_wrong_dtypes_refused(dtype):
    with pytest.raises(InvalidImageError, match="dtype"):
        read_image(np.zeros((150, 150), dtype=dtype))


@pytest.mark.parametrize("shape", [(150,), (150, 150, 2), (150, 150, 5), (3, 150, 150), (1, 150, 150, 1)])
def test_wrong_shapes_refused(shape):
    with pytest.raises(InvalidImageError):
        read_image(np.zeros(shape, np.uint8))


def test_small_and_huge_arrays():
    with pytest.raises(InvalidImageError, match="too small"):
        read_image(np.zeros((1, 1), np.uint8))
    with pytest.raises(InvalidImageError, match="max_pixels"):
        read_image(np.zeros((300, 300), np.uint8), max_pixels=300 * 299)


# --------------------------------------------------------------------------- PIL

def test_pil_modes():
    g = gray8()
    expected = g / np.float32(255)
    for im in (Image.fromarray(g, "L"), Image.fromarray(np.dstack([g, g, g]), "RGB"),
               Image.fromarray(np.dstack([g, g, g, g]), "RGBA")):
        rad = read_image(im)
        assert rad.format == "pil"
        np.testing.assert_array_equal(rad.pixels, expected)
    g16 = g.astype(np.uint16) * 257
    rad16 = read_image(Image.fromarray(g16))  # mode I;16
    assert rad16.bit_depth == 16
    np.testing.assert_array_equal(rad16.pixels, expected)
    rad_i = read_image(Image.fromarray(g16.astype(np.int32), "I"))
    np.testing.assert_array_equal(rad_i.pixels, expected)
    rad_f = read_image(Image.fromarray(expected, "F"))
    np.testing.assert_array_equal(rad_f.pixels, expected)


def test_pil_16bit_png_file_matches_bytes_path():
    img = (np.random.default_rng(RNG_SEED).integers(0, 65536, (150, 160))).astype(np.uint16)
    data = encode(".png", img)
    np.testing.assert_array_equal(read_image(Image.open(io.BytesIO(data))).pixels, read_image(data).pixels)


def test_pil_refusals():
    with pytest.raises(InvalidImageError, match="mode"):
        read_image(Image.new("1", (150, 150)))
    neg = np.full((150, 150), -5, np.int32)
    with pytest.raises(InvalidImageError, match="0..65535"):
        read_image(Image.fromarray(neg, "I"))
    with pytest.raises(InvalidImageError, match="out of range"):
        read_image(Image.fromarray(np.full((150, 150), 2.0, np.float32), "F"))
    truncated = encode(".png", gray8())[:-200]
    with pytest.raises(CorruptImageError):
        read_image(Image.open(io.BytesIO(truncated)))


# --------------------------------------------------------------------------- misc

def test_every_refusal_is_an_image_error_family_member():
    for bad in (b"", b"BM" + b"\x00" * 60, np.zeros((2, 2), np.uint8), np.full((150, 150), np.nan)):
        with pytest.raises(CxrEdgeError):
            read_image(bad)


def test_repr_is_short():
    r = repr(read_image(gray8()))
    assert "shape=(160, 192)" in r and len(r) < 300


def test_reading_prints_nothing(capfd):
    read_image(encode(".png", gray8()))
    read_image(encode(".jpg", gray8()))
    for bad in (encode(".png", gray8())[:100], encode(".jpg", gray8())[:-2]):
        with pytest.raises(CorruptImageError):
            read_image(bad)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_shared_nih_fullres_png_matches_opencv_grayscale():
    folder = need_shared("data", "nih-cxr14-sample", "fullres")
    path = sorted(folder.glob("*.png"))[0]
    rad = read_image(path)
    assert_contract(rad)
    assert rad.pixels.shape == (1024, 1024)
    ref = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(rad.pixels, ref / np.float32(255))
