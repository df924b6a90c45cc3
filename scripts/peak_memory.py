"""Peak memory (max RSS) of ``cxr-edge predict IMG --cam-dir D`` per input size, each in a fresh process.

    .venv/bin/python scripts/peak_memory.py                  # 1024^2 ... 6000^2 (the default max_pixels), 8-/16-bit
    .venv/bin/python scripts/peak_memory.py --sizes 1024 2048 --cam-label top

The inputs are the repository's sample chest radiograph (cxr_edge/data/sample_chest_pa.png) resized to
N x N and written as PNG in a temporary folder; every label gets an overlay (``--cam-label all``) so the
overlay path is always measured. The peak is the child's ``ru_maxrss`` (os.wait4), which includes the
Python interpreter and onnxruntime (the 1024^2 row is close to that floor). Memory, unlike timing,
does not depend on other load on the machine. Prints a Markdown table for the README.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cxr_edge" / "data" / "sample_chest_pa.png"


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_MAKE = """
import sys, cv2, numpy as np
src = cv2.imread(sys.argv[1], cv2.IMREAD_GRAYSCALE)
side, bits = int(sys.argv[3]), int(sys.argv[4])
img = cv2.resize(src, (side, side), interpolation=cv2.INTER_CUBIC)
cv2.imwrite(sys.argv[2], img.astype(np.uint16) * 257 if bits == 16 else img)
"""


def make_png(path: Path, side: int, bits: int) -> int:
    """Write the test PNG from a separate process: Linux carries a parent's RSS at fork into the child's
    ``ru_maxrss``, so this process must stay small for the measurement to be the child's own."""
    subprocess.run([sys.executable, "-c", _MAKE, str(SAMPLE), str(path), str(side), str(bits)], check=True)
    return path.stat().st_size


def run(image: Path, cam_dir: Path, cam_label: str, extra: list[str]) -> tuple[int, int, float]:
    """(exit code, peak RSS in bytes, seconds) of one predict in a fresh process."""
    cmd = [sys.executable, "-m", "cxr_edge.cli", "predict", str(image), "--cam-dir", str(cam_dir),
           "--cam-label", cam_label, "--json", "--threads", "1", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 6000, 8000])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 16], choices=(8, 16))
    parser.add_argument("--cam-label", default="all", help="predict --cam-label (default all: 14 overlays)")
    parser.add_argument("extra", nargs="*", help="more predict flags after --, e.g. -- --max-pixels 64000000")
    args = parser.parse_args(argv)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python -m cxr_edge.cli predict IMG --cam-dir D "
          f"--cam-label {args.cam_label} --json --threads 1 {' '.join(args.extra)}".rstrip())
    print("\n| input (PNG) | file size | exit | peak RSS | wall s |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="cxr-mem-") as tmp:
        for side in args.sizes:
            for bits in args.bits:
                image = Path(tmp) / f"chest_{side}_{bits}.png"
                size = make_png(image, side, bits)
                rc, peak, seconds = run(image, Path(tmp) / "cams", args.cam_label, args.extra)
                note = " (refused: over max_pixels)" if rc == 3 else ""
                print(f"| {side} x {side}, {bits}-bit | {size / 1e6:.2f} MB | {rc}{note} | {peak / 2**20:,.0f} MiB "
                      f"| {seconds:.1f} |", flush=True)
                image.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
