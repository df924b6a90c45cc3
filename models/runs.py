"""Run directories and splits: what a training run is made of, for training, export and evaluation.

Why a module of its own: ``models.train`` (which trains), ``models.distill`` (which loads a run as a
teacher) and ``models.evaluate`` (which scores a run on its evaluation split) all need the same
split and run-loading code; keeping it here means none of them imports another in a circle.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr_edge.errors import InvalidArgumentError
from models.config import TrainConfig
from models.datasets import read_image_list


def load_table(cfg: TrainConfig):
    """The run's label table (``models.datasets.LabelTable``) with every image's file in
    ``extra["path"]``: the one reader behind training, ``models.evaluate score`` and export, so the
    label names of a run, its metrics and its bundle all come from the same data."""
    from models.datasets import load_dataset

    return load_dataset(cfg.dataset, cfg.labels_path(), cfg.image_root(), policy=cfg.uncertainty_policy,
                        label_set=cfg.label_set, frontal_only=cfg.frontal_only,
                        label_columns=cfg.label_columns or None, padchest_min_images=cfg.padchest_min_images,
                        skip_missing_images=cfg.skip_missing_images)


def image_paths(table, rows=None) -> list[Path]:
    """Files of ``rows`` (default: all) of a table from :func:`load_table`."""
    paths = table.extra["path"]
    return [Path(paths[int(i)]) for i in (range(len(table)) if rows is None else rows)]


def cache_parts(table, parts: dict[str, np.ndarray], dtype: str = "auto", workers: int = 2):
    """Decode the images of several row sets once: (``models.data.ImageCache`` of their union, each set's
    rows as indices into that cache). Training and ``models.soup`` read their splits through it."""
    from models.data import ImageCache

    needed = np.unique(np.concatenate([np.asarray(v, dtype=np.int64) for v in parts.values()]))
    images = ImageCache(image_paths(table, needed), [table.image_ids[i] for i in needed], dtype, workers=workers)
    pos = {int(r): k for k, r in enumerate(needed)}
    return images, {k: np.array([pos[int(r)] for r in v], dtype=np.int64) for k, v in parts.items()}


def split_indices(cfg: TrainConfig, table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, eval) row indices of the table; patient-disjoint.

    split=teacher: the teacher's training images are trained on, its validation images evaluated
    (the teacher never trained on them). split=patient: a random patient-wise cut (``split_seed``).
    ``val_fraction`` > 0 carves a patient-wise validation part out of the training images.
    """
    from models.datasets import patient_split

    if cfg.split == "teacher":
        train_csv, eval_csv = cfg.split_lists()
        for p in (train_csv, eval_csv):
            if not p.is_file():
                raise InvalidArgumentError(f"split=teacher needs {p} (set --shared-dir or --train-list/--eval-list)")
        row = {img: k for k, img in enumerate(table.image_ids)}
        parts = []
        for p in (train_csv, eval_csv):
            names = read_image_list(p)
            missing = [n for n in names if n not in row]
            if missing:
                raise InvalidArgumentError(f"{len(missing)} images of {p.name} are not in the label table, "
                                           f"e.g. {missing[0]}")
            parts.append(np.array(sorted(row[n] for n in names), dtype=np.int64))
        train, evaluation = parts
        if set(np.asarray(table.patient_ids)[train]) & set(np.asarray(table.patient_ids)[evaluation]):
            raise InvalidArgumentError("teacher split lists share patients")
    else:
        train, evaluation = patient_split(table, (1.0 - cfg.eval_fraction, cfg.eval_fraction), seed=cfg.split_seed)
    val = np.zeros(0, dtype=np.int64)
    if cfg.val_fraction > 0:
        keep, hold = patient_split(table.subset(train), (1.0 - cfg.val_fraction, cfg.val_fraction),
                                   seed=cfg.split_seed + 1)
        train, val = train[keep], train[hold]
    if cfg.limit_train:
        train = train[:cfg.limit_train]
    if cfg.limit_eval:
        evaluation = evaluation[:cfg.limit_eval]
    return train, val, evaluation


def fold_indices(cfg: TrainConfig, table, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitting (``n_folds`` > 1): (rows trained on, held-out fold rows). The folds are a
    patient-wise cut of the training rows (``split_seed``), the same for every fold index, so the
    held-out folds of runs fold=0..K-1 partition the training images: their out-of-fold predictions
    are honest soft labels for every training image."""
    from models.datasets import patient_split

    if cfg.n_folds < 2:
        return train, np.zeros(0, dtype=np.int64)
    parts = patient_split(table.subset(train), (1.0 / cfg.n_folds,) * cfg.n_folds, seed=cfg.split_seed + 2)
    held = train[parts[cfg.fold]]
    keep = np.setdiff1d(train, held)
    return keep, np.sort(held)


def build_model(cfg: TrainConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The run's model; ``pretrained`` loads ImageNet weights (only at the start of training:
    checkpoints are loaded over a randomly initialised model)."""
    from models.registry import create_model

    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault("drop_rate", cfg.drop_rate)
    return create_model(cfg.model, num_classes=num_classes, in_chans=cfg.channels, pretrained=pretrained, **kwargs)


def load_run_model(run_dir: str | os.PathLike, checkpoint: str = "final",
                   map_location: str = "cpu") -> tuple[nn.Module, TrainConfig, list[str], Path]:
    """(model in eval mode, its config, label names, file) from a run directory.

    ``checkpoint``: final (model_final.pt), best (model_best.pt, when --val-fraction > 0) or last.
    """
    run = Path(run_dir)
    path = run / {"final": "model_final.pt", "best": "model_best.pt", "last": "last.pt"}[checkpoint]
    if not path.is_file():
        raise InvalidArgumentError(f"{run}: no {path.name} (finished runs have model_final.pt)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    cfg = TrainConfig.from_dict(ckpt["config"])
    labels = list(ckpt["labels"])
    model = build_model(cfg, len(labels))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, labels, path
