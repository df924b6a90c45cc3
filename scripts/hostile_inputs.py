#!/usr/bin/env python
"""Feed hostile and broken inputs to ``cxr-edge predict FILE --json`` and classify what happens.

Every case is built here, in a temporary folder (nothing is read from or written to the repository),
and run in a fresh process with a timeout and an address-space cap, so a hang, a memory blow-up or
a crash in one case cannot hide another. Each outcome is one of:

* ``refused``   exit 3 with a JSON error object on stderr: the typed refusal the runtime promises;
* ``classified`` exit 0: fine for the control cases, a **silent wrong answer** for a case that
  must be refused;
* ``out_of_scope`` exit 6: the reader accepted it and the input scope gate withheld the decisions
  (not as expected either way: a control must be classified, a hostile input refused by the reader);
* ``crash``     any other exit code, or a Python traceback on stderr;
* ``hang``      still running at the timeout.

Usage::

    .venv/bin/python scripts/hostile_inputs.py            # all cases, table + totals
    .venv/bin/python scripts/hostile_inputs.py -k jpeg    # only cases whose name contains "jpeg"

Exit status: 0 when every case behaved as expected, 1 otherwise. ``build_cases`` is importable
(tests/test_hostile_inputs.py runs the same cases in-process through ``read_image``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPARSE_SIZE = 600_000_000  # over max_file_bytes(36_000_000) = 8 * 36e6 + 64 MiB, the CLI's default limit


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    expect: str  # "refuse" or "accept"
    error: str | None = None  # the error class read_image must raise (None: any ImageError, or accept)
    why: str = ""
    args: tuple[str, ...] = ()  # more predict flags (e.g. --cam-dir: the overlay path's memory)


# --------------------------------------------------------------------------- image builders

SAMPLE = REPO / "cxr_edge" / "data" / "sample_chest_pa.png"


def chest(h: int = 384, w: int = 362) -> np.ndarray:
    """The repository's sample PA radiograph, area-resized to h x w (8-bit).

    A real radiograph, so the controls pass the default model's input scope gate and are classified
    (exit 0; a synthetic blob image is flagged out of scope, exit 6). 384 x 362 keeps the aspect and a
    margin under the gate's threshold (the score rises as detail is lost below ~320 px).
    """
    return cv2.resize(cv2.imread(str(SAMPLE), cv2.IMREAD_GRAYSCALE), (w, h), interpolation=cv2.INTER_AREA)


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_parts(data: bytes) -> tuple[bytes, bytes]:
    """(IHDR payload, joined IDAT payloads) of a PNG."""
    pos, ihdr, idat = 8, b"", b""
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        ctype, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if ctype == b"IHDR":
            ihdr = payload
        elif ctype == b"IDAT":
            idat += payload
        pos += 12 + n
    return ihdr, idat


def png_from(ihdr: bytes, idat: bytes, extra: bytes = b"") -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_16bit_with_sbit(bits: int = 12) -> bytes:
    img = (chest().astype(np.uint32) * ((1 << bits) - 1) // 255).astype(np.uint16)
    ihdr, idat = png_parts(encode(".png", img))
    return png_from(ihdr, idat, png_chunk(b"sBIT", bytes([bits])))


def jpeg_scans(data: bytes) -> list[int]:
    """Offsets of the SOS markers of a JPEG written by OpenCV (no APPn holding 0xFFDA)."""
    out, pos = [], 0
    while (pos := data.find(b"\xff\xda", pos)) >= 0:
        out.append(pos)
        pos += 2
    return out


def jpeg_with_size(data: bytes, height: int, width: int) -> bytes:
    out = bytearray(data)
    sof = out.find(b"\xff\xc0")
    if sof < 0:
        sof = out.find(b"\xff\xc2")
    struct.pack_into(">HH", out, sof + 5, height, width)
    return bytes(out)


def jpeg_many_scans(n: int = 2000) -> bytes:
    """A small progressive JPEG whose last scan is repeated n times (each a valid refinement-free scan)."""
    data = encode(".jpg", chest(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    last, eoi = jpeg_scans(data)[-1], data.rfind(b"\xff\xd9")
    return data[:eoi] + data[last:eoi] * n + b"\xff\xd9"


def jpeg_thumbnail_main_huge() -> bytes:
    """An APP1 with a complete small JPEG inside (its SOF says 16x16) before a main SOF claiming 6000x6000."""
    thumb = encode(".jpg", chest(16, 16))
    main = jpeg_with_size(encode(".jpg", chest()), 6000, 6000)
    return main[:2] + b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb + main[2:]


def jpeg_two_frames() -> bytes:
    data = encode(".jpg", chest())
    sof = data.find(b"\xff\xc0")
    (length,) = struct.unpack_from(">H", data, sof + 2)
    segment = data[sof:sof + 2 + length]
    return data[:sof] + segment + data[sof:]


# --------------------------------------------------------------------------- DICOM builders

def dicom(pixels: np.ndarray | None = None, *, encapsulated: list[bytes] | None = None, ts: str | None = None,
          body_part: str | None = "CHEST", bits_stored: int | None = None, **tags) -> bytes:
    """A DX chest DICOM (no patient data) as bytes; ``tags`` set or override header fields."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    pixels = chest() if pixels is None else pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts or (JPEGBaseline8Bit if encapsulated else ExplicitVRLittleEndian)
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "DX"
        if body_part:
            ds.BodyPartExamined = body_part
        ds.ViewPosition = "PA"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if encapsulated is not None:
            ds.PixelData = encapsulate(encapsulated)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = pixels.tobytes()
        for key, value in tags.items():
            if isinstance(value, tuple):  # (VR, value): a type-confused element
                tag = pydicom.datadict.tag_for_keyword(key)
                if key in ds:
                    del ds[key]
                ds.add_new(tag, value[0], value[1])
            elif value is None:
                if key in ds:
                    del ds[key]
            else:
                setattr(ds, key, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_j2k_wrong_size() -> bytes:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(dicom()))
        ds.compress(JPEG2000Lossless)
        data = bytearray(ds.PixelData)
        siz = data.find(b"\xff\x4f\xff\x51")
        x, y = struct.unpack_from(">II", data, siz + 8)
        struct.pack_into(">II", data, siz + 8, x + 40, y + 40)
        ds.PixelData = bytes(data)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_rle() -> bytes:
    import pydicom
    from pydicom.uid import RLELossless

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(dicom()))
        ds.compress(RLELossless)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def voi_lut_item(bits: int, data: np.ndarray):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(data), 0, bits])
    item.add_new("LUTData", "OW", data.astype("<u2").tobytes())
    return Sequence([item])


# --------------------------------------------------------------------------- the cases

def build_cases(root: Path) -> list[Case]:
    """Write every case under ``root`` and return them (FIFO/socket/sparse cases need a POSIX system)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes, expect: str = "refuse", error: str | None = None, why: str = "",
            suffix: str = "", args: tuple[str, ...] = ()) -> None:
        path = root / f"{name}{suffix}"
        path.write_bytes(data)
        cases.append(Case(name, str(path), expect, error, why, args))

    img = chest()
    png = encode(".png", img)
    jpg = encode(".jpg", img)
    prog = encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    colour = encode(".jpg", np.dstack([img, img[::-1], img[:, ::-1]]))
    ihdr, idat = png_parts(png)
    raw = zlib.decompress(idat)

    # controls: must be classified
    add("ok_png", png, "accept", why="valid 8-bit PNG")
    add("ok_jpeg_progressive", prog, "accept", why="valid progressive JPEG")
    add("ok_png16_sbit12", png_16bit_with_sbit(), "accept", why="12-bit data in a 16-bit PNG with sBIT")
    add("ok_dicom", dicom(), "accept", why="valid DX chest DICOM")
    add("ok_dicom_jpeg", dicom(encapsulated=[jpg]), "accept", why="valid JPEG baseline DICOM")
    add("ok_dicom_inverse", dicom(255 - chest(), PresentationLUTShape="INVERSE"), "accept",
        why="inverted pixels + PresentationLUTShape INVERSE (unapplied, the gate would flag it inverted)")

    # the older bad inputs
    add("empty", b"", error="UnsupportedFormatError", why="0 bytes")
    add("random_bytes", np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
        error="UnsupportedFormatError", why="no signature")
    add("bmp", encode(".bmp", img), error="UnsupportedFormatError", why="BMP")
    add("ok_tiff", encode(".tiff", img), "accept", why="valid 8-bit gray TIFF (read through cxr_edge.tiff)")
    add("tiff_truncated", encode(".tiff", img)[:4000], error="CorruptImageError", why="TIFF cut short")
    add("png_truncated", png[: len(png) // 2], error="CorruptImageError", why="PNG cut in half")
    add("jpeg_truncated", jpg[: len(jpg) // 2], error="CorruptImageError", why="JPEG cut in half, no EOI")
    add("png_tiny", encode(".png", np.zeros((1, 1), np.uint8)), error="InvalidImageError", why="1x1 pixel")
    # memory: the 69 KB 8000 x 8000 PNG with overlays took 3.9 GB; now over the default max_pixels, and
    # the largest accepted size (6000 x 6000) with an overlay of every label stays under the 2 GiB cap
    cams = ("--cam-dir", str(root / "cams"), "--cam-label", "all")
    add("png_8000_smooth_cams", encode(".png", np.full((8000, 8000), 128, np.uint8)), error="InvalidImageError",
        why="8000x8000 flat PNG (~70 KB) with --cam-dir: over the 36 MP default", args=cams)
    sample = cv2.imread(str(SAMPLE), cv2.IMREAD_GRAYSCALE)
    add("ok_png_6000_cams", encode(".png", cv2.resize(sample, (6000, 6000), interpolation=cv2.INTER_CUBIC)), "accept",
        why="6000x6000 sample chest (= max_pixels) with 14 overlays, 2 GiB cap", args=cams)
    bomb_ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    add("png_bomb", png_from(bomb_ihdr, zlib.compress(b"\x00" * 30001 * 4)), error="InvalidImageError",
        why="IHDR 30000x30000, 100 bytes")

    # PNG image data damaged behind an intact chunk structure (libpng would print to stderr)
    add("png_idat_cut", png_from(ihdr, idat[: len(idat) // 2]), error="CorruptImageError", why="zlib stream cut")
    add("png_idat_short", png_from(ihdr, zlib.compress(raw[: len(raw) // 2])), error="CorruptImageError",
        why="complete zlib stream, too few rows")
    bad_crc = bytearray(png_from(ihdr, idat))
    bad_crc[33 + 8 + len(idat)] ^= 0xFF
    add("png_bad_crc", bytes(bad_crc), error="CorruptImageError", why="IDAT CRC wrong")
    add("png_bad_filter", png_from(ihdr, zlib.compress(b"\x07" + raw[1:])), error="CorruptImageError",
        why="row filter type 7")
    add("png_extra_rows", png_from(ihdr, zlib.compress(raw + raw[:1000])), error="CorruptImageError",
        why="more image data than IHDR")
    add("png_unknown_critical", png_from(ihdr, idat, png_chunk(b"CgBI", b"\x00" * 4)),
        error="UnsupportedFormatError", why="unknown critical chunk")

    # JPEG
    add("jpeg_sof_6000_tiny", jpeg_with_size(jpg, 6000, 6000), error="CorruptImageError",
        why="SOF 6000x6000 (= the default max_pixels), a few KB of data")
    add("jpeg_sof_60000", jpeg_with_size(jpg, 60000, 60000), error="InvalidImageError",
        why="SOF over max_pixels")
    add("jpeg_thumb_then_huge_frame", jpeg_thumbnail_main_huge(), error="CorruptImageError",
        why="16x16 EXIF-style thumbnail, frame 6000x6000")
    add("jpeg_2000_scans", jpeg_many_scans(), error="CorruptImageError", why="progressive, 2000 SOS")
    add("jpeg_half_plus_eoi", jpg[: len(jpg) // 2] + b"\xff\xd9", error="CorruptImageError",
        why="baseline cut in half, EOI appended")
    add("jpeg_colour_half_plus_eoi", colour[: len(colour) // 2] + b"\xff\xd9", error="CorruptImageError",
        why="colour baseline cut, EOI appended")
    add("jpeg_progressive_half_plus_eoi", prog[: len(prog) // 2] + b"\xff\xd9", error="CorruptImageError",
        why="progressive cut in half, EOI appended")
    add("jpeg_progressive_90pct_plus_eoi", prog[: len(prog) * 9 // 10] + b"\xff\xd9", error="CorruptImageError",
        why="progressive cut inside its last scan")
    add("jpeg_progressive_cut_at_scan", prog[: jpeg_scans(prog)[3]] + b"\xff\xd9", error="CorruptImageError",
        why="progressive cut between scans")
    add("jpeg_two_sof", jpeg_two_frames(), error="CorruptImageError", why="two frame headers")
    add("jpeg_height_0_dnl", jpeg_with_size(jpg, 0, img.shape[1]), error="UnsupportedFormatError",
        why="height 0 (DNL)")

    # DICOM: pixel data that disagrees with the header
    add("dicom_jpeg_sof_mismatch", dicom(encapsulated=[encode(".jpg", chest(368, 362))]), error="CorruptImageError",
        why="JPEG SOF 362x368, Rows/Columns 362x384")
    add("dicom_jpeg_half_plus_eoi", dicom(encapsulated=[jpg[: len(jpg) // 2] + b"\xff\xd9"]),
        error="CorruptImageError", why="JPEG frame cut in half, EOI appended")
    add("dicom_rle_truncated", dicom_rle()[:-300], error="CorruptImageError", why="RLE file cut short")
    add("dicom_jpeg_sof_huge", dicom(encapsulated=[jpeg_with_size(jpg, 60000, 60000)]), error="InvalidImageError",
        why="JPEG SOF 60000x60000 in a small DICOM")
    add("dicom_j2k_siz_mismatch", dicom_j2k_wrong_size(), error="CorruptImageError",
        why="J2K SIZ 40 px larger than Rows/Columns")
    add("dicom_native_too_long", dicom(Columns=img.shape[1] - 1), error="CorruptImageError",
        why="Columns one short: would shear")
    add("dicom_native_too_short", dicom(img[:200], Rows=img.shape[0]), error="CorruptImageError",
        why="Rows says more than the data")
    short = dicom(img)
    add("dicom_truncated", short[: len(short) - 5000], error="CorruptImageError", why="file cut short")
    # DICOM: numbers that make NaN/inf
    add("dicom_rescale_nan", dicom(RescaleSlope="NaN", RescaleIntercept="0"), error="InvalidImageError",
        why="RescaleSlope NaN")
    add("dicom_rescale_inf", dicom(RescaleSlope="1e308", RescaleIntercept="1e308"), error="InvalidImageError",
        why="rescale overflows to inf")
    add("dicom_window_nan", dicom(WindowCenter="128", WindowWidth="NaN"), error="InvalidImageError",
        why="WindowWidth NaN")
    # DICOM: type-confused elements
    add("dicom_rows_is_sequence", dicom(Rows=("SQ", Sequence([Dataset()]))), error="CorruptImageError",
        why="Rows holds a sequence")
    add("dicom_bits_stored_is_text", dicom(BitsStored=("LO", "twelve")), error="CorruptImageError",
        why="BitsStored holds a string")
    add("dicom_bits_stored_99", dicom(BitsStored=99), error="CorruptImageError", why="BitsStored > BitsAllocated")
    add("dicom_anatomic_region_is_number", dicom(body_part=None, AnatomicRegionSequence=("US", 5)),
        error="CorruptImageError", why="AnatomicRegionSequence holds a number")
    add("dicom_voi_lut_is_text", dicom(VOILUTSequence=("LO", "abc")), error="CorruptImageError",
        why="VOILUTSequence holds a string")
    add("dicom_window_is_sequence", dicom(WindowCenter=("SQ", Sequence([Dataset()])), WindowWidth="100"),
        error="CorruptImageError", why="WindowCenter holds a sequence")
    add("dicom_voi_lut_over_range", dicom(VOILUTSequence=voi_lut_item(8, np.arange(256) * 4)),
        error="CorruptImageError", why="LUT data over its 8-bit descriptor")
    # DICOM: policy refusals
    add("dicom_for_processing", dicom(PresentationIntentType="FOR PROCESSING"), error="DicomRefusedError",
        why="raw detector data")
    add("dicom_lateral", dicom(ViewPosition="LL"), error="DicomRefusedError", why="ViewPosition LL")
    add("dicom_ct", dicom(Modality="CT"), error="DicomRefusedError", why="Modality CT")

    # paths that are not regular files
    fifo = root / "fifo.png"
    os.mkfifo(fifo)
    cases.append(Case("path_fifo", str(fifo), "refuse", "ImageError", "a FIFO with no writer"))
    cases.append(Case("path_dev_zero", "/dev/zero", "refuse", "ImageError", "character device, endless"))
    link = root / "zero_link.dcm"
    link.symlink_to("/dev/zero")
    cases.append(Case("path_symlink_to_dev_zero", str(link), "refuse", "ImageError", "symlink to a device"))
    loop = root / "loop.png"
    loop.symlink_to(loop)
    cases.append(Case("path_symlink_loop", str(loop), "refuse", "ImageError", "symlink to itself"))
    good_link = root / "good_link.png"
    good_link.symlink_to(root / "ok_png")
    cases.append(Case("ok_symlink_to_png", str(good_link), "accept", None, "symlink to a regular PNG"))
    sock_path = root / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    sock.close()  # the socket file stays
    cases.append(Case("path_socket", str(sock_path), "refuse", "ImageError", "a UNIX socket"))
    empty_dir = root / "empty_dir.png"
    empty_dir.mkdir()
    cases.append(Case("path_directory", str(empty_dir), "refuse", None,
                      "a directory: read_image refuses it, the CLI walks it and finds no image"))
    sparse = root / "sparse_huge.dcm"
    with open(sparse, "wb") as fh:
        fh.truncate(SPARSE_SIZE)
    cases.append(Case("path_over_byte_cap", str(sparse), "refuse", "InvalidImageError",
                      f"{SPARSE_SIZE / 1e6:.0f} MB sparse file"))
    return cases


# --------------------------------------------------------------------------- running

@dataclass(frozen=True)
class Outcome:
    case: Case
    kind: str  # refused / classified / silent_wrong_answer / false_refusal / out_of_scope / crash / hang
    rc: int | None
    seconds: float
    detail: str


def _limit_memory(limit_bytes: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


def _error_of(stderr: str) -> dict | None:
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("ok") is False and isinstance(obj.get("error"), dict):
                return obj["error"]
    return None


def run_case(case: Case, command: list[str], timeout: float, memory_bytes: int) -> Outcome:
    start = time.perf_counter()
    try:
        proc = subprocess.run(command + ["predict", case.path, "--json", *case.args], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=_limit_memory(memory_bytes), cwd=REPO,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Outcome(case, "hang", None, time.perf_counter() - start, f"no exit after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    err = _error_of(proc.stderr)
    if "Traceback (most recent call last)" in proc.stderr:
        last = proc.stderr.strip().splitlines()[-1]
        return Outcome(case, "crash", proc.returncode, seconds, f"traceback: {last[:90]}")
    if proc.returncode == 3 and err is not None:
        kind = "refused" if case.expect == "refuse" else "false_refusal"
        note = f" (expected {case.error})" if case.error and err.get("type") != case.error else ""
        return Outcome(case, kind, 3, seconds, f"{err.get('type')}{note}: {str(err.get('message'))[:80]}")
    if proc.returncode == 0:
        kind = "classified" if case.expect == "accept" else "silent_wrong_answer"
        return Outcome(case, kind, 0, seconds, "classified")
    if proc.returncode == 6:  # read and classified, but the input scope gate withheld every decision
        return Outcome(case, "out_of_scope", 6, seconds, "read, then flagged by the scope gate (no decisions)")
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    return Outcome(case, "crash", proc.returncode, seconds, f"exit {proc.returncode}: {tail[:90]}")


GOOD = {"refused", "classified"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case (default 20)")
    parser.add_argument("--memory-gib", type=float, default=2.0, help="RLIMIT_AS per case (default 2 GiB)")
    parser.add_argument("--cli", default=None, help="the command to run (default: this Python -m cxr_edge.cli)")
    args = parser.parse_args(argv)
    command = args.cli.split() if args.cli else [sys.executable, "-m", "cxr_edge.cli"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-hostile-") as tmp:
        cases = [c for c in build_cases(Path(tmp)) if args.k in c.name]
        outcomes = []
        print(f"{'case':34} {'expect':7} {'outcome':20} {'rc':>4} {'sec':>5}  detail")
        for case in cases:
            out = run_case(case, command, args.timeout, int(args.memory_gib * (1 << 30)))
            outcomes.append(out)
            flag = "" if out.kind in GOOD else "  <-- "
            rc = "-" if out.rc is None else str(out.rc)
            print(f"{case.name:34} {case.expect:7} {out.kind:20} {rc:>4} {out.seconds:5.1f}  {out.detail}{flag}",
                  flush=True)
    totals: dict[str, int] = {}
    for out in outcomes:
        totals[out.kind] = totals.get(out.kind, 0) + 1
    bad = sum(n for kind, n in totals.items() if kind not in GOOD)
    print(f"\n{len(outcomes)} cases in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(totals.items())))
    print("all as expected" if bad == 0 else f"{bad} case(s) NOT as expected (silent wrong answers, false "
          "refusals, crashes or hangs)")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
