"""End-to-end time split (decode, preprocess, inference, scope gate, CAM) on a real-sized radiograph file.

Why a 1024 x 1024 8-bit PNG: it is the size of the ChestX-ray14 release, so decode and resize cost
what they cost in practice; a 224 x 224 tensor would hide them. When the user gives no image, a
deterministic synthetic one (fixed seed, chest-like intensity layout plus noise) is written.
The split uses the public :class:`cxr_edge.Classifier` path, so it measures what an app pays.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

STAGES = ("decode", "preprocess", "inference", "scope", "cam")  # scope: the input scope gate, when the bundle has one


def synthetic_radiograph(size: int = 1024, seed: int = 0) -> np.ndarray:
    """uint8 size x size image: bright mediastinum and ribs-like bands over dark lung fields, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    lungs = np.exp(-(((xx - 0.32) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
        np.exp(-(((xx - 0.68) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    ribs = 0.08 * np.sin(yy * 60.0 + 4.0 * np.abs(xx - 0.5)) ** 2
    img = 0.75 - 0.5 * lungs + ribs + 0.04 * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_synthetic_png(path: str | os.PathLike, size: int = 1024, seed: int = 0) -> str:
    """Write the synthetic radiograph as an 8-bit grayscale PNG and return its path."""
    import cv2

    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(path, synthetic_radiograph(size, seed)):
        raise OSError(f"could not write {path!r}")
    return path


def stage_split(model: str | os.PathLike, image: str | os.PathLike, threads: int,
                providers: Sequence[str] | None, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median per-stage milliseconds of ``Classifier.predict`` + ``Prediction.cam`` on one image file.

    The CAM stage is one label's map at the image's own resolution (the top-scoring label).
    """
    from ..classifier import Classifier

    clf = Classifier(model, threads=threads, providers=providers)
    has_cam = clf.manifest.cam.method == "weights"
    rows: list[dict[str, float]] = []
    for i in range(warmup + repeats):
        pred = clf.predict(image, keep_image=False)
        timings = {k: float(pred.timings_ms[k]) for k in ("decode", "preprocess", "inference", "scope")
                   if k in pred.timings_ms}
        if has_cam:
            top = max(pred.probabilities, key=pred.probabilities.get)
            pred.cam(top)
            timings["cam"] = float(pred.timings_ms["cam"])
        if i >= warmup:
            rows.append(timings)
    med = {k: float(np.median([r[k] for r in rows])) for k in STAGES if k in rows[0]}
    totals = [sum(r.values()) for r in rows]
    total = float(np.median(totals))
    shape = pred.image_shape
    return {
        "image_hw": [int(shape[0]), int(shape[1])], "repeats": repeats, "threads": threads,
        "stages_ms": {k: med.get(k) for k in STAGES},
        "total_ms": total,
        "share": {k: (v / sum(med.values()) if sum(med.values()) else None) for k, v in med.items()},
        "method": "Classifier.predict timings_ms + Prediction.cam (median over repeats, batch 1)",
        "cam_available": has_cam,
    }
