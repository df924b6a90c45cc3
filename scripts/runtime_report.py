"""Print what the runtime does with every shared DICOM and with a list of bad inputs, in one process.

    python scripts/runtime_report.py [--model BUNDLE] [--shared ../shared]

Part 1: each file in <shared>/data/dicom -> top probabilities, or the refusal (error class + message).
Part 2: bad inputs (made here, in a temp folder) -> the typed error each gets; the process stays alive.
"""
from __future__ import annotations

import argparse
import struct
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np

from cxr_edge import Classifier, CxrEdgeError


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bad_inputs(tmp: Path, shared: Path) -> list[tuple[str, object]]:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((256, 256)) * 255).astype(np.uint8), (0, 0), 4)
    good_png = cv2.imencode(".png", img)[1].tobytes()
    good_jpg = cv2.imencode(".jpg", img)[1].tobytes()
    cases: list[tuple[str, object]] = [
        ("empty file", b""),
        ("random bytes (4 KiB)", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("truncated PNG (first half)", good_png[: len(good_png) // 2]),
        ("truncated JPEG (first half)", good_jpg[: len(good_jpg) // 2]),
        ("BMP", cv2.imencode(".bmp", img)[1].tobytes()),
        ("TIFF", cv2.imencode(".tiff", img)[1].tobytes()),
        ("1x1 PNG", cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()),
        ("PNG bomb (IHDR 30000x30000)", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
         + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")),
        ("NaN array", np.full((256, 256), np.nan, np.float32)),
        ("inf array", np.full((256, 256), np.inf, np.float32)),
        ("float array out of [0, 1]", np.full((256, 256), 3.0, np.float32)),
        ("bool array", np.zeros((256, 256), bool)),
        ("missing file", str(tmp / "does-not-exist.png")),
    ]
    img16 = (img.astype(np.uint16) * 257)
    cases.append(("16-bit PNG (valid: must be read)", cv2.imencode(".png", img16)[1].tobytes()))
    dicom = shared / "data" / "dicom"
    for name in ("test5.dcm", "dental-panoramic-cr.dcm", "test4.dcm"):
        if (dicom / name).exists():
            cases.append((f"DICOM {name}", str(dicom / name)))
    if (dicom / "test1.dcm").exists():
        data = (dicom / "test1.dcm").read_bytes()
        cases.append(("DICOM with truncated pixel data", data[: len(data) - 100_000]))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    args = parser.parse_args()
    clf = Classifier(args.model, threads=2)
    shared = Path(args.shared)
    print(f"model {clf.model_id}\n\n| file | result |\n|---|---|")
    for path in sorted((shared / "data" / "dicom").glob("*.dcm")):
        try:
            res = clf.predict(path)
        except CxrEdgeError as exc:
            print(f"| {path.name} | refused: `{type(exc).__name__}`: {exc} |")
            continue
        top = sorted(res.probabilities.items(), key=lambda kv: -kv[1])[:3]
        info = res.image_info
        print(f"| {path.name} | {res.image_shape[1]}x{res.image_shape[0]} {info.get('modality')} {info.get('photometric')} "
              f"{info.get('bits_stored')}-bit {info.get('transfer_syntax')}: top "
              + ", ".join(f"{k} {v:.3f}" for k, v in top) + f"; positive: {', '.join(res.positive_labels) or 'none'} |")
    print("\n| bad input | result |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in bad_inputs(Path(tmp), shared):
            try:
                res = clf.predict(source)
                print(f"| {name} | read: {res.image_shape}, top {max(res.probabilities, key=res.probabilities.get)} |")
            except CxrEdgeError as exc:
                print(f"| {name} | `{type(exc).__name__}`: {exc} |")
    print("\nprocess alive after all inputs: yes")


if __name__ == "__main__":
    main()
