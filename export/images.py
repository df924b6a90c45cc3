"""Real images and their labels for calibration, verification and threshold choice.

Every image goes through :func:`cxr_edge.imaging.read_image` and :func:`cxr_edge.preprocess.preprocess`,
the exact path the runtime takes, so calibration and verification see what devices will see.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from models.config import shared_dir

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


def nih_sample_dir() -> Path:
    return shared_dir() / "data" / "nih-cxr14-sample"


def resolve_images(names: Iterable[str], image_dir: str | os.PathLike) -> list[Path]:
    """Names (or paths) -> existing files under ``image_dir``; a missing one is an error, not a skip."""
    base = Path(image_dir)
    out: list[Path] = []
    for name in names:
        p = Path(name)
        p = p if p.is_absolute() or p.exists() else base / name
        if not p.is_file():
            raise InvalidArgumentError(f"image not found: {p}")
        out.append(p)
    return out


def list_image_dir(image_dir: str | os.PathLike) -> list[Path]:
    """All image files of a folder, sorted (deterministic order)."""
    d = Path(image_dir)
    if not d.is_dir():
        raise InvalidArgumentError(f"image folder not found: {d}")
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_batch(paths: Sequence[str | os.PathLike], spec: PreprocessSpec) -> np.ndarray:
    """Read and preprocess images exactly like the runtime: N x C x H x W float32."""
    from cxr_edge.imaging import read_image
    from cxr_edge.preprocess import preprocess

    pixels = [read_image(p, min_side=spec.min_side, max_pixels=spec.max_pixels).pixels for p in paths]
    return preprocess(pixels, spec)


def read_labels(labels_csv: str | os.PathLike, names: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """N x L 0/1 float32 targets for ``names`` (file names) from a labels CSV with one column per label.

    A name absent from the CSV, or a label column the CSV lacks, is an error: AUCs on made-up
    labels would be a wrong answer.
    """
    try:
        with open(labels_csv, newline="") as fh:
            rows = {Path(r["image"]).name: r for r in csv.DictReader(fh)}
    except (OSError, KeyError) as exc:
        raise InvalidArgumentError(f"cannot read labels from {labels_csv}: {exc}") from None
    missing_cols = [lab for lab in labels if rows and lab not in next(iter(rows.values()))]
    if missing_cols:
        raise InvalidArgumentError(f"{labels_csv} has no column(s) {missing_cols}")
    out = np.zeros((len(names), len(labels)), dtype=np.float32)
    for i, name in enumerate(names):
        row = rows.get(Path(name).name)
        if row is None:
            raise InvalidArgumentError(f"{labels_csv} has no row for image {Path(name).name}")
        out[i] = [float(row[lab]) for lab in labels]
    return out


def patient_count(labels_csv: str | os.PathLike, names: Sequence[str]) -> int | None:
    """Distinct ``patient_id`` values among ``names`` (None when the CSV has no such column)."""
    try:
        with open(labels_csv, newline="") as fh:
            rows = {Path(r["image"]).name: r.get("patient_id") for r in csv.DictReader(fh)}
    except (OSError, KeyError):
        return None
    ids = {rows.get(Path(n).name) for n in names}
    ids.discard(None)
    return len(ids) or None
