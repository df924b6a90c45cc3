"""Real images and their labels for calibration, verification and threshold choice.

Every image goes through :func:`cxr_edge.imaging.read_image` and :func:`cxr_edge.preprocess.preprocess`,
the exact path the runtime takes, so calibration and verification see what devices will see.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxr_edge.errors import CxrEdgeError, InvalidArgumentError
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


def read_labels(labels_csv: str | os.PathLike, names: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """N x L float32 targets (1/0, NaN = unknown) for ``names`` (file names), read with the training
    toolchain's generic reader (``models.datasets.read_csv_labels``: ``image``, ``patient_id``, label
    columns), so export and training parse a labels file the same way.

    A name absent from the CSV, or a label column the CSV lacks, is an error: AUCs on made-up
    labels would be a wrong answer.
    """
    table = read_csv_labels(labels_csv, label_columns=list(labels))
    index = {Path(i).name: k for k, i in enumerate(table.image_ids)}
    out = np.zeros((len(names), len(labels)), dtype=np.float32)
    for i, name in enumerate(names):
        k = index.get(Path(name).name)
        if k is None:
            raise InvalidArgumentError(f"{labels_csv} has no row for image {Path(name).name}")
        out[i] = table.targets[k]
    return out


def patient_count(labels_csv: str | os.PathLike, names: Sequence[str], labels: Sequence[str]) -> int | None:
    """Distinct ``patient_id`` values among ``names`` (None when the file is not in the generic layout)."""
    try:
        table = read_csv_labels(labels_csv, label_columns=list(labels))
    except (CxrEdgeError, OSError):
        return None
    rows = {Path(i).name: pid for i, pid in zip(table.image_ids, table.patient_ids)}
    ids = {rows.get(Path(n).name) for n in names}
    ids.discard(None)
    return len(ids) or None
