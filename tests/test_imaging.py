"""read_image / sniff_format: PNG, JPEG, arrays, PIL images, and every refusal as a typed error."""
from __future__ import annotations

import io
import struct
import types
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cxr_edge import imaging
from cxr_edge.errors import (CorruptImageError, CxrEdgeError, ImageError, InvalidArgumentError,
                             InvalidImageError, UnsupportedFormatError)
from cxr_edge.imaging import Radiograph, read_image, sniff_format
from tests.conftest import encode, need_shared, png_chunk

RNG_SEED = 1234


def gray8(h: int = 160, w: int = 192, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    img[:, : w // 3] = np.arange(h, dtype=np.uint8)[:, None]  # a smooth part too
    return img


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


@pytest.mark.parametrize("ext,name", [(".bmp", "BMP"), (".webp", "WebP")])  # TIFF is read (cxr_edge.tiff)
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


def interlaced_png(img: np.ndarray) -> bytes:
    """An 8-bit gray Adam7-interlaced PNG, built by hand (neither OpenCV nor Pillow writes one)."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[y0::dy, x0::dx][r].tobytes()
                   for x0, y0, dx, dy in imaging._ADAM7 if w > x0 and h > y0
                   for r in range(img[y0::dy, x0::dx].shape[0]))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw, 9))
            + png_chunk(b"IEND", b""))


def pil_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_kinds() -> dict[str, bytes]:
    g = gray8(131, 157)
    rgb = np.dstack([g, np.roll(g, 3, 1), g[::-1]])
    return {"gray8": encode(".png", g), "gray16": encode(".png", g.astype(np.uint16) * 257 + 3),
            "rgb": encode(".png", rgb), "rgba16": encode(".png", np.dstack([rgb, g]).astype(np.uint16) * 200),
            "palette": pil_png(Image.fromarray(rgb).quantize(17)), "bilevel": pil_png(Image.fromarray(g > 127)),
            "gray-alpha": pil_png(Image.fromarray(np.dstack([g, g[::-1]]), "LA")), "interlaced": interlaced_png(g),
            "multi-idat": encode(".png", gray8(300, 301)), "fast-filters": encode(".png", g, [cv2.IMWRITE_PNG_COMPRESSION, 1])}


@pytest.fixture(params=["isal", "zlib"])
def inflater(request, monkeypatch):
    """Both inflaters: ISA-L where installed (the default) and the standard library's zlib (the fallback)."""
    if request.param == "zlib":
        monkeypatch.setattr(imaging, "_zlib", zlib)
    elif imaging._zlib is zlib:
        pytest.skip("isal is not installed here: the zlib fallback is the only inflater")
    return request.param


@pytest.mark.parametrize("kind", sorted(png_kinds()))
def test_png_inflated_once_decodes_exactly_like_the_compressed_stream(kind, inflater, monkeypatch):
    """The kept-and-re-stored image data (one inflate) must give the very pixels OpenCV gives on the
    original stream; the large-image path (_PNG_KEEP_LIMIT = 0) must not keep the stream at all."""
    data = png_kinds()[kind]
    direct = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    fast = read_image(data)
    calls = []
    real_check = imaging._png_check_image_data
    monkeypatch.setattr(imaging, "_png_check_image_data",
                        lambda d, lay, keep=False: calls.append(keep) or real_check(d, lay, keep))
    monkeypatch.setattr(imaging, "_PNG_KEEP_LIMIT", 0)
    slow = read_image(data)
    assert calls == [False]
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    assert fast.info == slow.info and fast.bit_depth == slow.bit_depth
    if direct.ndim == 2 and kind != "bilevel":  # gray: the pixels are OpenCV's samples over the container max
        np.testing.assert_array_equal(fast.pixels, direct.astype(np.float32) / (65535 if direct.dtype == np.uint16 else 255))


@pytest.mark.parametrize("n", [0, 1, 65534, 65535, 65536, 2 * 65535, 2 * 65535 + 1, 300_007])
def test_png_restored_stream_is_a_valid_zlib_stream_of_the_same_bytes(n):
    """The stored-block zlib stream written for OpenCV inflates (with its checksum checked) to exactly
    the kept bytes, at and around the 65,535-byte block boundary."""
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    stored = imaging._zlib_stored(data)
    assert zlib.decompress(stored) == data
    assert len(stored) == n + 6 + 5 * max(1, -(-n // 65535))  # header + adler32, 5 bytes per block: no compression


def test_png_kept_stream_is_the_checked_one():
    data = encode(".png", gray8(40, 50))
    layout = imaging._png_header(data)
    kept = imaging._png_check_image_data(data, layout, keep=True)
    assert kept == zlib.decompress(b"".join(data[a:b] for a, b in layout.idat))
    assert imaging._png_check_image_data(data, layout) is None


@pytest.mark.parametrize("cut", ["half", "no_iend", "one_byte", "header_only"])
def test_truncated_png_is_corrupt_and_never_decoded(cut, monkeypatch):
    data = encode(".png", gray8())
    n = {"half": len(data) // 2, "no_iend": len(data) - 12, "one_byte": len(data) - 1, "header_only": 20}[cut]
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a, **k: pytest.fail("decoder reached"))
    with pytest.raises(CorruptImageError, match="truncated"):
        read_image(data[:n])


def test_png_with_damaged_image_data_but_valid_structure_is_corrupt(inflater):
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

@pytest.mark.parametrize("ext,name", [(".bmp", "BMP"), (".webp", "WebP")])  # TIFF is read (cxr_edge.tiff)
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


# --------------------------------------------------------------------------- hardening (issue 9)

def _no_decoder(monkeypatch):
    """Make every pixel decoder fail the test: a refusal must come from the header checks."""
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a, **k: pytest.fail("decoder reached"))
    monkeypatch.setattr(imaging, "_decode_jpeg", lambda *a, **k: pytest.fail("decoder reached"), raising=False)


def with_sof_size(data: bytes, height: int, width: int) -> bytes:
    out = bytearray(data)
    sof = max(out.find(b"\xff\xc0"), out.find(b"\xff\xc2"))
    struct.pack_into(">HH", out, sof + 5, height, width)
    return bytes(out)


def sos_offsets(data: bytes) -> list[int]:
    out, pos = [], 0
    while (pos := data.find(b"\xff\xda", pos)) >= 0:
        out.append(pos)
        pos += 2
    return out


def test_jpeg_huge_sof_with_tiny_data_refused_before_decoding(monkeypatch):
    """8000x8000 within a 64 MP max_pixels: the size check passes, the coded-data bound refuses."""
    data = with_sof_size(encode(".jpg", gray8()), 8000, 8000)
    assert len(data) < 40_000
    _no_decoder(monkeypatch)
    with pytest.raises(CorruptImageError, match="holds only"):
        read_image(data, max_pixels=64_000_000)
    with pytest.raises(InvalidImageError, match="max_pixels"):
        read_image(data)  # the default (36 MP) refuses it by size alone


def test_jpeg_header_check_reads_the_frame_sof_not_a_thumbnail_or_a_second_frame(monkeypatch):
    thumb = encode(".jpg", gray8(16, 16))  # a complete JPEG whose own SOF says 16x16
    main = encode(".jpg", gray8())
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb
    huge = with_sof_size(main, 6000, 6000)
    _no_decoder(monkeypatch)
    with pytest.raises(CorruptImageError, match="6000x6000"):
        read_image(huge[:2] + app1 + huge[2:])
    with pytest.raises(InvalidImageError, match="60000x60000"):
        big = with_sof_size(main, 60000, 60000)
        read_image(big[:2] + app1 + big[2:])
    sof = main.find(b"\xff\xc0")
    (length,) = struct.unpack_from(">H", main, sof + 2)
    second_frame = main[:sof] + with_sof_size(main[sof:sof + 2 + length], 100, 100) + main[sof:]
    with pytest.raises(CorruptImageError, match="more than one frame header"):
        read_image(second_frame)


def test_jpeg_app_segments_and_restart_markers_decode_exactly_like_opencv():
    """The stripped stream and the second (padded) decode must not change or refuse a good file."""
    img = gray8(300, 280)
    thumb = encode(".jpg", gray8(16, 16))
    for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 1],
                   [cv2.IMWRITE_JPEG_RST_INTERVAL, 3, cv2.IMWRITE_JPEG_QUALITY, 98]):
        data = encode(".jpg", img, params)
        data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb \
            + b"\xff\xfe\x00\x06hi\xff\x00" + data[2:]  # EXIF-like APP1 and a COM segment
        ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(read_image(data).pixels, ref / np.float32(255))
    colour = encode(".jpg", np.dstack([gray8(seed=1), gray8(seed=2), gray8(seed=3)]),
                    [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(colour, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(read_image(colour).pixels, ref / np.float32(255))


def test_jpeg_with_thousands_of_scans_refused_quickly(monkeypatch):
    data = encode(".jpg", gray8(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    last, eoi = sos_offsets(data)[-1], data.rfind(b"\xff\xd9")
    hostile = data[:eoi] + data[last:eoi] * 5000 + b"\xff\xd9"
    _no_decoder(monkeypatch)
    import time

    start = time.perf_counter()
    with pytest.raises(CorruptImageError, match="over 100 scans"):
        read_image(hostile)
    assert time.perf_counter() - start < 2.0
    assert imaging.MAX_JPEG_SCANS == 100


@pytest.mark.parametrize("kind", ["baseline", "progressive", "colour", "restart"])
@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97])
def test_jpeg_cut_short_with_eoi_appended_is_corrupt(kind, fraction):
    """libjpeg pads a scan that hits EOI with gray and only warns: the reader must refuse instead."""
    img = gray8(300, 280)
    params = {"baseline": [], "progressive": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "colour": [],
              "restart": [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]}[kind]
    if kind == "colour":
        img = np.dstack([img, gray8(300, 280, seed=2), gray8(300, 280, seed=3)])
    data = encode(".jpg", img, params)
    assert read_image(data).pixels.shape == (300, 280)
    cut = data[: int(len(data) * fraction)] + b"\xff\xd9"
    with pytest.raises(CorruptImageError):
        read_image(cut)


def test_progressive_jpeg_cut_between_scans_is_corrupt():
    data = encode(".jpg", gray8(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    scans = sos_offsets(data)
    assert len(scans) > 2
    for sos in scans[1:]:
        with pytest.raises(CorruptImageError, match="stops before all its coefficients"):
            read_image(data[:sos] + b"\xff\xd9")


def with_sbit(data: bytes, bits: bytes) -> bytes:
    chunks = png_chunks(data)
    return data[:8] + png_chunk(b"IHDR", chunks[0][1]) + png_chunk(b"sBIT", bits) \
        + b"".join(png_chunk(t, p) for t, p in chunks[1:])


def test_png_16bit_honours_sbit_and_reports_the_assumed_depth():
    v12 = np.random.default_rng(RNG_SEED).integers(0, 4096, (150, 140)).astype(np.uint16)
    v12[0, 0] = 4095
    plain = read_image(encode(".png", v12))
    assert (plain.bit_depth, plain.bit_depth_source) == (16, "container")  # no sBIT: 65535 assumed
    np.testing.assert_array_equal(plain.pixels, v12 / np.float32(65535))
    rad = read_image(with_sbit(encode(".png", v12), b"\x0c"))
    assert (rad.bit_depth, rad.bit_depth_source) == (12, "sBIT")
    np.testing.assert_allclose(rad.pixels, v12 / 4095.0, atol=1e-7)
    assert rad.pixels.max() == 1.0
    # a writer following the PNG spec scales 12-bit samples up to 16 bits: then 65535 is right
    scaled = (v12 << 4) | (v12 >> 8)
    spec = read_image(with_sbit(encode(".png", scaled), b"\x0c"))
    assert (spec.bit_depth, spec.bit_depth_source) == (12, "sBIT")
    np.testing.assert_array_equal(spec.pixels, scaled / np.float32(65535))
    assert "12 (sBIT)" in repr(rad)
    rgb = np.dstack([v12, v12, v12])
    assert read_image(with_sbit(encode(".png", rgb), b"\x0c\x0c\x0c")).bit_depth == 12
    with pytest.raises(CorruptImageError, match="sBIT"):
        read_image(with_sbit(encode(".png", v12), b"\x11"))  # 17 significant bits in a 16-bit sample


def adam7_png(img: np.ndarray) -> bytes:
    """An interlaced 8-bit gray PNG (OpenCV and Pillow cannot write one), filter type 0 on every row."""
    raw = b""
    for x0, y0, dx, dy in imaging._ADAM7:
        sub = img[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 0, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) \
        + png_chunk(b"IEND", b"")


def test_interlaced_png_row_layout_is_validated_exactly():
    img = gray8(133, 141)
    data = adam7_png(img)
    np.testing.assert_array_equal(read_image(data).pixels, img / np.float32(255))
    ihdr = struct.pack(">IIBBBBB", 141, 133, 8, 0, 0, 0, 1)
    raw = zlib.decompress(png_chunks(data)[1][1])
    last_filter = len(raw) - (1 + 141)  # the last row of pass 7 is a full-width row
    assert raw[last_filter] == 0
    for bad in (raw[:-1], raw + b"\x00", raw[:last_filter] + b"\x05" + raw[last_filter + 1:]):
        with pytest.raises(CorruptImageError):
            read_image(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bad))
                       + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("damage", ["crc", "filter", "extra_rows", "after_stream", "after_stream_next_idat",
                                    "unknown_critical", "split_idat", "checksum", "not_deflate"])
def test_png_image_data_is_validated_before_the_decoder(damage, inflater, monkeypatch):
    img = gray8()
    data = encode(".png", img)
    ihdr, idat = png_chunks(data)[0][1], b"".join(p for t, p in png_chunks(data) if t == b"IDAT")
    raw = zlib.decompress(idat)
    head = data[:8] + png_chunk(b"IHDR", ihdr)
    end = png_chunk(b"IEND", b"")
    if damage == "split_idat":  # not damage: many IDAT chunks are fine
        ok = head + b"".join(png_chunk(b"IDAT", idat[i:i + 97]) for i in range(0, len(idat), 97)) + end
        np.testing.assert_array_equal(read_image(ok).pixels, img / np.float32(255))
        return
    bad = {
        "crc": head + png_chunk(b"IDAT", idat)[:-4] + b"\x00\x00\x00\x00" + end,
        "filter": head + png_chunk(b"IDAT", zlib.compress(b"\x09" + raw[1:])) + end,
        "extra_rows": head + png_chunk(b"IDAT", zlib.compress(raw + raw[:500])) + end,
        "after_stream": head + png_chunk(b"IDAT", idat + b"junk") + end,
        "after_stream_next_idat": head + png_chunk(b"IDAT", idat) + png_chunk(b"IDAT", b"junk") + end,
        "unknown_critical": head + png_chunk(b"CgBI", b"\x00" * 4) + png_chunk(b"IDAT", idat) + end,
        "checksum": head + png_chunk(b"IDAT", idat[:-1] + bytes([idat[-1] ^ 1])) + end,  # the zlib stream's adler32
        "not_deflate": head + png_chunk(b"IDAT", b"\x78\x9c" + bytes(range(7, 200))) + end,
    }[damage]
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a, **k: pytest.fail("decoder reached"))
    with pytest.raises((CorruptImageError, UnsupportedFormatError)):
        read_image(bad)
    monkeypatch.setattr(imaging, "_PNG_KEEP_LIMIT", 0)  # the large-image path checks chunk by chunk
    with pytest.raises((CorruptImageError, UnsupportedFormatError)):
        read_image(bad)


def test_png_kept_stream_of_many_idat_chunks_is_inflated_in_one_call(monkeypatch):
    """Writers split the image data into 8 KiB IDAT chunks; inflating them one call each made every
    chunk a GIL hand-over, and parallel folder workers took 11-14% more time per image (A/B rounds,
    docs/results/firmware/PLAN-session22.md). The kept stream is joined and inflated in one call; the
    large-image path still goes chunk by chunk, so its memory stays at one piece."""
    data = encode(".png", gray8(600, 600))
    layout = imaging._png_header(data)
    assert len(layout.idat) > 4
    calls: list[int] = []
    real = imaging._zlib

    class Counting:
        def __init__(self) -> None:
            self.inner = real.decompressobj()

        def decompress(self, buf, max_length=0):
            calls.append(len(buf))
            return self.inner.decompress(buf, max_length)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(imaging, "_zlib", types.SimpleNamespace(decompressobj=Counting, error=real.error))
    kept = imaging._png_check_image_data(data, layout, keep=True)
    assert kept == zlib.decompress(b"".join(data[a:b] for a, b in layout.idat))
    assert len(calls) == 1
    calls.clear()
    assert imaging._png_check_image_data(data, layout, keep=False) is None
    assert len(calls) == len(layout.idat)


def test_png_damaged_ancillary_chunks_are_dropped_not_fatal():
    img = gray8()
    data = encode(".png", img)
    chunks = png_chunks(data)
    junk = png_chunk(b"iCCP", b"x\x00\x00garbage") + b"\x00\x00\x00\x04gAMA\x00\x00\x00\x00\xde\xad\xbe\xef"
    odd = data[:8] + png_chunk(b"IHDR", chunks[0][1]) + junk + b"".join(png_chunk(t, p) for t, p in chunks[1:])
    np.testing.assert_array_equal(read_image(odd).pixels, img / np.float32(255))


@pytest.mark.parametrize("dtype", [">u2", ">f4", ">f8", "<u2", ">u1"])
def test_big_endian_arrays_are_accepted(dtype):
    native = gray8().astype(np.uint16) * 257 if "u2" in dtype else gray8()
    if "f" in dtype:
        native = gray8() / np.float32(255)
    expected = read_image(np.ascontiguousarray(native.astype(np.dtype(dtype).newbyteorder("=")))).pixels
    arr = native.astype(dtype)
    rad = read_image(arr)
    np.testing.assert_array_equal(rad.pixels, expected)
    rgb = np.dstack([arr, arr[::-1], arr[:, ::-1]])
    assert read_image(rgb).pixels.shape == arr.shape


def test_float16_arrays_gray_and_rgb():
    g = (gray8() / 255.0).astype(np.float16)
    rad = read_image(g)
    assert rad.bit_depth == 16
    np.testing.assert_array_equal(rad.pixels, g.astype(np.float32))
    rgb = np.dstack([g, g[::-1], g[:, ::-1]])
    ref = cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2GRAY)
    np.testing.assert_allclose(read_image(rgb).pixels, np.clip(ref, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(read_image(rgb.astype(">f2")).pixels, read_image(rgb).pixels)
    with pytest.raises(InvalidImageError, match="NaN"):
        read_image(np.full((150, 150), np.nan, np.float16))


def test_non_finite_pixels_are_refused_whatever_reader_produced_them(monkeypatch):
    nan = np.full((150, 150), np.nan, np.float32)
    monkeypatch.setattr(imaging, "_read_png", lambda *a: Radiograph(nan, "png", 8, {}))
    with pytest.raises(InvalidImageError, match="NaN or inf"):
        read_image(encode(".png", gray8()))
    with pytest.raises(InvalidImageError, match="not finite"):
        imaging.to_unit_range(np.zeros((4, 4), np.float64), 0.0, float("nan"))
    with pytest.raises(InvalidImageError, match="NaN or inf"):
        imaging.to_unit_range(np.array([[0.0, np.inf]]), 0.0, 1.0)


@pytest.mark.parametrize("arr, hi", [
    (np.arange(256, dtype=np.uint8).reshape(16, 16), 255),             # 8-bit, every value
    (np.array([[0, 4095, 4096, 65535]], dtype=np.uint16), 4095),        # samples above the declared maximum
    (np.array([[-5, 0, 100, 4095]], dtype=np.int16), 4095),             # signed, below zero
    (np.array([[0, 1, 2]], dtype=np.uint8), 0.5),                       # a divisor below 1: the general path
    (np.array([[16777217, 3, 0]], dtype=np.int64), 16777217),           # not representable in float32
])
def test_integer_fast_path_of_to_unit_range_equals_divide_then_clip(arr, hi):
    """The fast path skips the clip when no sample lies outside [0, hi]: the result must be the same bits
    as dividing in float32 and clipping to [0, 1] always."""
    expected = np.clip(np.divide(arr, np.float32(hi), dtype=np.float32), 0.0, 1.0)
    out = imaging.to_unit_range(arr, 0, hi)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, expected)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_shared_names_still_importable_from_imaging():
    from cxr_edge import radiograph

    assert imaging.Radiograph is radiograph.Radiograph
    assert imaging.check_dimensions is radiograph.check_dimensions
    assert imaging.to_unit_range is radiograph.to_unit_range
    import cxr_edge.dicom as dicom

    assert dicom.Radiograph is radiograph.Radiograph


def test_colour_inputs_record_their_colour_fraction_for_the_scope_gate():
    from cxr_edge.scope import colour_fraction

    img = gray8()
    assert "colour_fraction" not in read_image(encode(".png", np.dstack([img, img, img]))).info  # gray as RGB
    assert "colour_fraction" not in read_image(np.dstack([img, img, img])).info
    bgr = np.dstack([gray8(seed=1), gray8(seed=2), gray8(seed=3)])
    png = read_image(encode(".png", bgr)).info["colour_fraction"]
    assert png == pytest.approx(colour_fraction(bgr), abs=1e-4) and png > 0.5
    assert read_image(encode(".jpg", bgr)).info["colour_fraction"] > 0.5
    assert read_image(bgr).info["colour_fraction"] == pytest.approx(png, abs=1e-4)  # uint8 array
    assert read_image(bgr.astype(np.float32) / 255).info["colour_fraction"] == pytest.approx(png, abs=1e-4)
    assert read_image(Image.fromarray(bgr[:, :, ::-1].copy(), "RGB")).info["colour_fraction"] == pytest.approx(png, abs=1e-4)
    slight = np.dstack([img, img, np.clip(img.astype(np.int16) + 3, 0, 255).astype(np.uint8)])  # chroma << 0.08
    assert read_image(encode(".png", slight)).info["colour_fraction"] == 0.0


# --------------------------------------------------------------------------- JPEG: reduced-size decode

def box_average(img: np.ndarray, s: int) -> np.ndarray:
    h, w = img.shape
    return img[: h // s * s, : w // s * s].reshape(h // s, s, w // s, s).mean(axis=(1, 3))


@pytest.mark.parametrize("at_least, scale", [((100, 60), 8), ((130, 60), 4), ((300, 140), 2), ((700, 600), 1)])
def test_jpeg_reduced_decode_picks_the_largest_scale_that_keeps_the_floor(at_least, scale):
    img = cv2.resize(gray8(200, 120), (600, 1000), interpolation=cv2.INTER_CUBIC)  # 1000 x 600, smooth
    data = encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = read_image(data)
    rad = read_image(data, decode_at_least=at_least)
    assert (rad.info["height"], rad.info["width"]) == (1000, 600)  # the declared size, whatever the scale
    assert rad.pixels.shape == (-(-1000 // scale), -(-600 // scale))
    assert rad.pixels.shape[0] >= at_least[0] and rad.pixels.shape[1] >= at_least[1]
    assert rad.info.get("decode_scale", 1) == scale and rad.bit_depth == 8
    if scale > 1:  # libjpeg's scaled IDCT is a box-like average of the full decode, not a subsample
        ref = box_average(full.pixels, scale)
        got = rad.pixels[: ref.shape[0], : ref.shape[1]]
        assert np.abs(got - ref).mean() < 1.5 / 255 and np.abs(got - ref).max() < 12 / 255
    else:
        np.testing.assert_array_equal(rad.pixels, full.pixels)


def test_jpeg_reduced_decode_keeps_the_full_size_checks():
    data = encode(".jpg", cv2.resize(gray8(), (800, 800)))
    with pytest.raises(InvalidImageError):  # 640,000 declared pixels, 10,000 decoded at 1/8: still refused
        read_image(data, max_pixels=600_000, decode_at_least=(64, 64))
    rad = read_image(data, min_side=128, decode_at_least=(64, 64))  # decodes 100 x 100 < min_side: accepted,
    assert rad.pixels.shape == (100, 100) and rad.info["width"] == 800  # the declared 800 is what is checked
    with pytest.raises(InvalidImageError):
        read_image(encode(".jpg", gray8(100, 100)), min_side=128, decode_at_least=(16, 16))


@pytest.mark.parametrize("bad", [(0, 5), (5,), "224", (2.5, 3), (True, 4)])
def test_decode_at_least_is_validated(bad):
    with pytest.raises(InvalidArgumentError):
        read_image(encode(".jpg", gray8()), decode_at_least=bad)


def test_png_and_arrays_ignore_decode_at_least():
    img = cv2.resize(gray8(), (800, 600))
    assert read_image(encode(".png", img), decode_at_least=(16, 16)).pixels.shape == (600, 800)
    assert read_image(img, decode_at_least=(16, 16)).pixels.shape == (600, 800)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "restart"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_reduced_decode_still_refuses_a_jpeg_cut_short(kind, fraction):
    params = {"baseline": [], "progressive": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
              "restart": [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]}[kind]
    data = encode(".jpg", gray8(640, 560), params)
    assert read_image(data, decode_at_least=(150, 130)).info["decode_scale"] == 4
    with pytest.raises(CorruptImageError):
        read_image(data[: int(len(data) * fraction)] + b"\xff\xd9", decode_at_least=(150, 130))


def test_classifier_reduces_only_when_the_pixels_are_not_kept(tmp_path):
    from cxr_edge import Classifier
    from cxr_edge.imaging import DECODE_MARGIN, decode_floor

    clf = Classifier(threads=1)
    h, w = clf.manifest.preprocessing.input_size
    assert decode_floor((h, w)) == (h * DECODE_MARGIN, w * DECODE_MARGIN)  # from the manifest's input size
    side = 2 * DECODE_MARGIN * max(h, w)  # large enough for exactly 1/2
    data = encode(".jpg", cv2.resize(gray8(), (side, side), interpolation=cv2.INTER_CUBIC))
    reduced, kept = clf.predict(data, keep_image=False), clf.predict(data, keep_image=True)
    assert reduced.image_info["decode_scale"] == 2 and "decode_scale" not in kept.image_info
    assert reduced.image_shape == kept.image_shape == (side, side)  # CAMs keep the declared grid
    assert reduced.to_dict()["image"]["width"] == side and reduced.cam(0).shape == (side, side)
    (batch,) = clf.predict_batch([data], keep_image=False)
    assert batch.image_info["decode_scale"] == 2


def test_reduced_jpeg_decode_barely_moves_probabilities_on_pool_images():
    """20 pool radiographs (1024 px, enlarged to a typical 2048 px CR size), JPEG q95: the default
    model's probabilities with the reduced decode are within 0.02 of the full decode (measured max
    0.010), and the scope verdict is the same."""
    from cxr_edge import Classifier

    folder = need_shared("data", "nih-cxr14-sample", "fullres")
    files = sorted(folder.glob("*.png"))[:20]
    assert len(files) >= 10
    clf = Classifier(threads=1)
    worst = 0.0
    for path in files:
        img = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (2048, 2048), interpolation=cv2.INTER_LANCZOS4)
        data = encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        full, red = clf.predict(data, keep_image=True), clf.predict(data, keep_image=False)
        assert red.image_info["decode_scale"] == 2 and red.to_dict()["image"]["height"] == 2048
        worst = max(worst, max(abs(full.probabilities[k] - red.probabilities[k]) for k in clf.labels))
        assert full.in_scope == red.in_scope
    assert 0.0 < worst <= 0.02  # > 0: the reduced path really ran


# --------------------------------------------------------------------------- JPEG: 12-bit and lossless

def _pydicom_test_file(name: str):
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.exists():
        pytest.skip(f"pydicom's test file {name} is not installed")
    return path


def _codestream(dicom_path) -> bytes:
    import pydicom
    from pydicom.encaps import generate_fragmented_frames

    ds = pydicom.dcmread(dicom_path)
    frag = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    return frag[: frag.rfind(b"\xff\xd9") + 2]


def jpeg_12bit() -> bytes:
    """pydicom's JPEG-lossy.dcm codestream (SOF1, 12-bit, 1024 x 256); its SOS says Ss=Se=0, which
    sequential JPEG forbids, so it is patched to the 0..63 every sequential decoder assumes."""
    data = bytearray(_codestream(_pydicom_test_file("JPEG-lossy.dcm")))
    sos = data.find(b"\xff\xda")
    ns = data[sos + 4]
    data[sos + 5 + 2 * ns: sos + 8 + 2 * ns] = bytes([0, 63, 0])
    return bytes(data)


def jpeg_lossless() -> bytes:
    """The JPEG lossless (SOF3, 10-bit) codestream of the shared dental panoramic DICOM."""
    return _codestream(need_shared("data", "dicom", "dental-panoramic-cr.dcm"))


@pytest.mark.parametrize("make, precision, sof", [(jpeg_12bit, 12, 0xC1), (jpeg_lossless, 10, 0xC3)])
def test_12bit_and_lossless_jpegs_decode_silently_through_pylibjpeg(make, precision, sof, capfd):
    from libjpeg import decode

    data = make()
    layout = imaging._jpeg_layout(data)
    assert (layout.precision, layout.sof) == (precision, sof)
    rad = read_image(data, min_side=64, decode_at_least=(16, 16))  # no DCT scaling for these frames
    ref = decode(data).astype(np.float32) / ((1 << precision) - 1)
    assert rad.bit_depth == precision and rad.bit_depth_source == "SOF" and "decode_scale" not in rad.info
    np.testing.assert_allclose(rad.pixels, ref, atol=1e-6)
    for cut in (0.5, 0.9):  # cut short with an EOI appended: refused, and nothing on stderr
        with pytest.raises(CorruptImageError):
            read_image(data[: int(len(data) * cut)] + b"\xff\xd9", min_side=64)
    damaged = bytearray(data)
    sos = damaged.find(b"\xff\xda")
    damaged[sos + 6] = 0x33  # the scan names Huffman tables 3/3, which the file never defines
    with pytest.raises(CorruptImageError):
        read_image(bytes(damaged), min_side=64)
    out, err = capfd.readouterr()  # file-descriptor level: a C library's fprintf(stderr) shows up here
    assert out == "" and err == ""


def test_high_precision_colour_jpeg_is_refused_clearly():
    layout = imaging._jpeg_layout(jpeg_12bit())
    from dataclasses import replace

    with pytest.raises(UnsupportedFormatError, match="only grayscale"):
        imaging._decode_jpeg(b"", replace(layout, components=3))


def test_predict_json_on_12bit_and_damaged_jpegs_keeps_stderr_pure_json(tmp_path):
    """Every stderr line of ``predict --json`` is a JSON object, including for the 12-bit frames that
    OpenCV's libjpeg used to print raw "Invalid SOS parameters" lines for."""
    import json
    import subprocess
    import sys

    good = jpeg_12bit()
    damaged = bytearray(good)
    sos = damaged.find(b"\xff\xda")
    damaged[sos + 5 + 2 * damaged[sos + 4]: sos + 7 + 2 * damaged[sos + 4]] = bytes([0, 0])  # the original SOS
    (tmp_path / "twelve.jpg").write_bytes(good)
    (tmp_path / "badsos.jpg").write_bytes(bytes(damaged))
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2] + b"\xff\xd9")
    proc = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", str(tmp_path), "--json", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # raises on any raw line
    errors = {r["source"].rsplit("/", 1)[-1]: r["error"]["type"] for r in records if r.get("error")}
    assert errors == {"badsos.jpg": "CorruptImageError", "cut.jpg": "CorruptImageError"}
    (ok,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert ok["image"]["bit_depth"] == 12 and ok["image"]["height"] == 1024
