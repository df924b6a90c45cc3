"""Real images and their labels for calibration, verification and threshold choice.

Every image goes through :func:`cxr_edge.imaging.read_image` and :func:`cxr_edge.preprocess.preprocess`,
the exact path the runtime takes, so calibration and verification see what devices will see.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from models.config import shared_dir
from models.datasets import read_csv_labels

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


def read_labels_and_patients(labels_csv: str | os.PathLike, names: Sequence[str],
                             labels: Sequence[str]) -> tuple[np.ndarray, int | None]:
    """N x L float32 targets (1/0, NaN = unknown) for ``names`` (file names) and their number of distinct
    patients, from one read of the labels file with the training toolchain's generic reader
    (``models.datasets.read_csv_labels``: ``image``, ``patient_id``, label columns), so export and
    training parse a labels file the same way.

    A name absent from the CSV, or a label column the CSV lacks, is an error: AUCs on made-up
    labels would be a wrong answer.
    """
    table = read_csv_labels(labels_csv, label_columns=list(labels))
    index = {Path(i).name: k for k, i in enumerate(table.image_ids)}
    rows = []
    for name in names:
        k = index.get(Path(name).name)
        if k is None:
            raise InvalidArgumentError(f"{labels_csv} has no row for image {Path(name).name}")
        rows.append(k)
    targets = table.targets[rows].astype(np.float32) if rows else np.zeros((0, len(labels)), np.float32)
    return targets, len({table.patient_ids[k] for k in rows}) or None


def read_labels(labels_csv: str | os.PathLike, names: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """The targets of :func:`read_labels_and_patients`."""
    return read_labels_and_patients(labels_csv, names, labels)[0]
