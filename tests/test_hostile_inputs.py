"""Hostile inputs: paths that are not files, stderr silence, and every case of scripts/hostile_inputs.py.

The script runs each case through the CLI in a fresh process (slow); here the same cases go through
``read_image`` in-process, so the suite checks them in well under a second.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_edge import errors
from cxr_edge.errors import CorruptImageError, ImageError, InvalidImageError
from cxr_edge.imaging import read_image
from cxr_edge.radiograph import max_file_bytes
from conftest import encode, png_chunk

REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, sockets and /dev/zero are POSIX")


def load_script():
    spec = importlib.util.spec_from_file_location("hostile_inputs_script", REPO / "scripts" / "hostile_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def read_with_timeout(source, seconds: float = 10.0, **kw):
    """read_image in a daemon thread: a regression that blocks fails the test instead of hanging the suite."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = read_image(source, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"read_image did not return within {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def gray(h: int = 160, w: int = 150) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


# --------------------------------------------------------------------------- every scripted case, in-process

@posix_only
def test_every_hostile_case_gets_its_typed_outcome(tmp_path):
    script = load_script()
    cases = script.build_cases(tmp_path / "cases")
    assert 30 <= len(cases) <= 80
    wrong = []
    for case in cases:
        start = time.perf_counter()
        try:
            read_with_timeout(case.path)
            outcome = None
        except ImageError as exc:
            outcome = exc
        elapsed = time.perf_counter() - start
        if case.expect == "accept":
            if outcome is not None:
                wrong.append(f"{case.name}: refused ({type(outcome).__name__}: {outcome})")
        elif outcome is None:
            wrong.append(f"{case.name}: silently classified")
        elif case.error and not isinstance(outcome, getattr(errors, case.error)):
            wrong.append(f"{case.name}: {type(outcome).__name__}, expected {case.error} ({outcome})")
        if elapsed > 5:
            wrong.append(f"{case.name}: took {elapsed:.1f} s")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- paths

@posix_only
def test_fifo_device_socket_and_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="FIFO"):
        read_with_timeout(fifo)
    with pytest.raises(ImageError, match="character device"):
        read_with_timeout("/dev/zero")
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    try:
        with pytest.raises(ImageError, match="not a regular file"):
            read_with_timeout(sock_path)
    finally:
        sock.close()
    with pytest.raises(ImageError, match="directory"):
        read_with_timeout(tmp_path)


@posix_only
def test_symlinks_are_followed_to_regular_files_only(tmp_path):
    img = gray()
    target = tmp_path / "real.png"
    target.write_bytes(encode(".png", img))
    good = tmp_path / "link.png"
    good.symlink_to(target)
    np.testing.assert_array_equal(read_image(good).pixels, img / np.float32(255))
    to_device = tmp_path / "dev.png"
    to_device.symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="character device"):
        read_with_timeout(to_device)
    to_dir = tmp_path / "dir.png"
    to_dir.symlink_to(tmp_path)
    with pytest.raises(ImageError, match="directory"):
        read_with_timeout(to_dir)
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ImageError, match="symlink loop"):
        read_with_timeout(loop)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="no such file"):
        read_with_timeout(dangling)


def test_files_over_the_byte_cap_are_refused_before_reading(tmp_path, monkeypatch):
    max_pixels = 200 * 200
    cap = max_file_bytes(max_pixels)
    assert cap >= 8 * max_pixels
    big = tmp_path / "big.dcm"
    with open(big, "wb") as fh:
        fh.truncate(cap + 1)  # sparse: no disk used
    read_calls = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: read_calls.append(1) or real_fdopen(*a, **k))
    with pytest.raises(InvalidImageError, match="byte limit"):
        read_image(big, max_pixels=max_pixels)
    assert read_calls == []  # refused on st_size, never opened for reading
    with pytest.raises(InvalidImageError, match="byte limit"):
        read_image(b"\x89PNG\r\n\x1a\n" + bytes(cap), max_pixels=max_pixels)
    ok = tmp_path / "ok.png"
    ok.write_bytes(encode(".png", gray(200, 200)))
    assert read_image(ok, max_pixels=max_pixels).pixels.shape == (200, 200)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names")
def test_error_messages_never_echo_the_path(tmp_path):
    secret = "Smith_John_19650101_MRN4242"
    folder = tmp_path / secret
    folder.mkdir()
    cases = [folder / f"{secret}.png", folder]  # missing file, directory
    (folder / f"{secret}.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)  # corrupt DICOM
    (folder / f"{secret}.jpg").write_bytes(encode(".jpg", gray())[:-100])  # truncated JPEG
    (folder / f"{secret}.Doe").write_bytes(b"")  # a "suffix" that is part of a name
    os.mkfifo(folder / f"{secret}.fifo")
    cases += [folder / f"{secret}.dcm", folder / f"{secret}.jpg", folder / f"{secret}.Doe",
              folder / f"{secret}.fifo"]
    for path in cases:
        with pytest.raises(ImageError) as err:
            read_with_timeout(path)
        for text in (str(err.value), repr(err.value.args)):
            assert secret not in text and "Doe" not in text and str(tmp_path) not in text, text
    with pytest.raises(ImageError) as err:
        read_image(str(folder / f"{secret}.png") + "\x00")
    assert secret not in str(err.value)


# --------------------------------------------------------------------------- nothing on stderr

def test_damaged_inputs_print_nothing_even_at_the_file_descriptor_level(capfd):
    """libpng/libjpeg write to fd 2 directly ("libpng error: ...", "Corrupt JPEG data: ..."): never reached."""
    img = gray()
    png = encode(".png", img)
    ihdr = png[16:29]
    raw = b"".join(b"\x00" + row.tobytes() for row in img)
    good_idat = zlib.compress(raw)

    def build(payload: bytes, extra: bytes = b"") -> bytes:
        return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", payload) \
            + png_chunk(b"IEND", b"")

    bad_crc = bytearray(build(good_idat))
    bad_crc[33 + 8 + len(good_idat)] ^= 0xFF
    damaged_pngs = [
        build(good_idat[: len(good_idat) // 2]),  # libpng: "Not enough image data"
        build(zlib.compress(raw[: len(raw) // 2])),
        bytes(bad_crc),  # libpng: "IDAT: CRC error"
        build(zlib.compress(b"\x07" + raw[1:])),  # libpng: "bad adaptive filter value"
        build(zlib.compress(raw + raw[:300])),  # libpng warning: "Too much image data"
        build(good_idat[:-4] + b"\x00\x00\x00\x00"),  # zlib checksum wrong
    ]
    accepted_pngs = [build(good_idat, png_chunk(b"iCCP", b"x\x00\x00garbage"))]  # libpng warning: iCCP
    jpg = encode(".jpg", img)
    prog = encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    damaged_jpegs = [jpg[: len(jpg) // 2] + b"\xff\xd9", prog[: len(prog) * 9 // 10] + b"\xff\xd9",
                     jpg[:-50] + b"\xff\xd9"]
    capfd.readouterr()
    for data in damaged_pngs + damaged_jpegs:
        with pytest.raises(CorruptImageError):
            read_image(data)
    for data in accepted_pngs:
        read_image(data)
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
