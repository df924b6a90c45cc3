"""Helper of arm_qemu.sh: run cxr_edge on images and save the outputs, or compare two such runs.

    python benchmarks/arm_infer.py --bundle B.onnx --out run.npz IMAGE...   # on x86 or (emulated) arm64
    python benchmarks/arm_infer.py --compare x86_64.npz aarch64.npz        # table of differences

Runtime-only (cxr_edge + onnxruntime + numpy + OpenCV), so it runs in the bare aarch64 wheel set.
Saved per image: the probabilities of every label and the full-resolution CAMs of that run's three
most probable labels; the comparison uses the labels both runs chose.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

CAM_LABELS = 3


def infer(bundle: str, images: list[str], out: str, threads: int) -> None:
    import onnxruntime as ort

    from cxr_edge import Classifier

    t0 = time.perf_counter()
    clf = Classifier(bundle, threads=threads)
    load_s = time.perf_counter() - t0
    arrays: dict[str, np.ndarray] = {}
    meta = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "labels": list(clf.labels), "images": [], "load_s": load_s}
    for i, image in enumerate(images):
        t = time.perf_counter()
        pred = clf.predict(image, keep_image=False)
        probs = np.array([pred.probabilities[name] for name in clf.labels], dtype=np.float64)
        top = [clf.labels[j] for j in np.argsort(-probs)[:CAM_LABELS]]
        arrays[f"probs_{i}"] = probs
        for name in top:
            arrays[f"cam_{i}_{name}"] = pred.cam(name)
        seconds = time.perf_counter() - t
        meta["images"].append({"name": Path(image).name, "top": top, "seconds": seconds,
                               "timings_ms": pred.timings_ms})
        print(f"  {Path(image).name}: top {top[0]} p={probs.max():.4f} ({seconds:.1f} s)", flush=True)
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    ma, mb = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
    if ma["labels"] != mb["labels"] or len(ma["images"]) != len(mb["images"]):
        print("the two runs used different bundles or images", file=sys.stderr)
        return 1
    rows = []
    worst_p = worst_cam = 0.0
    for i, (ia, ib) in enumerate(zip(ma["images"], mb["images"])):
        pa, pb = a[f"probs_{i}"], b[f"probs_{i}"]
        dp = float(np.max(np.abs(pa - pb)))
        common = [n for n in ia["top"] if n in ib["top"]]
        cam_diffs = [float(np.max(np.abs(a[f"cam_{i}_{n}"] - b[f"cam_{i}_{n}"]))) for n in common]
        cam_mean = [float(np.mean(np.abs(a[f"cam_{i}_{n}"] - b[f"cam_{i}_{n}"]))) for n in common]
        worst_p, worst_cam = max(worst_p, dp), max([worst_cam] + cam_diffs)
        rows.append([ia["name"], ia["top"][0], "yes" if ia["top"][0] == ib["top"][0] else "NO", f"{dp:.2e}",
                     f"{len(common)}/{CAM_LABELS}", f"{max(cam_diffs):.2e}" if cam_diffs else "n/a",
                     f"{max(cam_mean):.2e}" if cam_mean else "n/a",
                     f"{ia['seconds']:.2f}", f"{ib['seconds']:.1f}"])
    head = ["image", "top label", "same top", "max |dp|", "CAM labels", "CAM max |d|", "CAM mean |d|",
            f"{ma['machine']} s", f"{mb['machine']} s (emulated)"]
    widths = [max(len(str(r[k])) for r in rows + [head]) for k in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\n{ma['machine']}: onnxruntime {ma['onnxruntime']}, numpy {ma['numpy']}, python {ma['python']}")
    print(f"{mb['machine']}: onnxruntime {mb['onnxruntime']}, numpy {mb['numpy']}, python {mb['python']}")
    print(f"max |probability difference| over {len(rows)} images x {len(ma['labels'])} labels: {worst_p:.2e}; "
          f"max |CAM difference| (values in [0, 1]): {worst_cam:.2e}")
    print("Speed under QEMU user-mode emulation is NOT a benchmark: every arm64 instruction is translated "
          "on the x86 host; measure on a real ARM device.")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="*")
    ap.add_argument("--bundle")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=1, help="1 keeps the float reduction order simple")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not (args.bundle and args.out and args.images):
        ap.error("--bundle, --out and at least one image are required")
    infer(args.bundle, args.images, args.out, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
