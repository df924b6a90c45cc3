"""Where an export starts: the trained model, its preprocessing, labels, image sets and provenance.

Two ways in, one result (:class:`ExportSource`):
  * :func:`source_from_run` - a ``models.train`` run directory: config.json/model_final.pt give the
    model, the PreprocessSpec (``TrainConfig.student_spec``, the one source of truth) and the
    labels; ``models.train.split_indices`` gives the run's own train / validation / evaluation
    images, so calibration uses training images and the gate uses images the model never saw.
  * :func:`source_from_checkpoint` - a checkpoint plus either a TrainConfig JSON or explicit
    flags (architecture, input size, normalisation, labels) and explicit image lists.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec

from models.datasets import read_image_list
from models.distill import file_sha256

from .images import list_image_dir, read_labels_and_patients, resolve_images


@dataclass
class ImageSet:
    """Real images (paths) and, when known, their N x L targets (0/1, NaN unknown)."""

    name: str
    paths: list[Path]
    targets: np.ndarray | None = None
    patients: int | None = None
    patient_ids: list[str] | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "images": len(self.paths), "patients": self.patients,
                "labelled": self.targets is not None}


@dataclass
class ExportSource:
    model: nn.Module
    spec: PreprocessSpec
    labels: tuple[str, ...]
    model_id: str
    architecture: str
    calibration_pool: ImageSet | None = None
    verification: ImageSet | None = None
    threshold_set: ImageSet | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _rows_to_set(name: str, table, rows: np.ndarray) -> ImageSet:
    from models.runs import image_paths

    rows = np.asarray(rows, dtype=np.int64)
    return ImageSet(name, image_paths(table, rows),
                    np.asarray(table.targets)[rows].astype(np.float32),
                    len({table.patient_ids[i] for i in rows}), [str(table.patient_ids[i]) for i in rows])


def source_from_run(run_dir: str | os.PathLike, checkpoint: str = "final") -> ExportSource:
    """Everything from a ``models.train`` run directory (see the module docstring)."""
    from models.registry import model_config
    from models.runs import load_run_model, load_table, split_indices

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise InvalidArgumentError(f"{run} is not a training run directory (no config.json)")
    model, cfg, labels, ckpt_path = load_run_model(run, checkpoint)
    from models.runs import fold_indices

    spec = cfg.student_spec()
    table = load_table(cfg)  # the run's dataset (--dataset, label set, policy): its labels are the bundle's
    if tuple(table.label_names) != tuple(labels):
        raise InvalidArgumentError(f"the run's labels {labels} differ from the label table's {table.label_names}")
    train_rows, val_rows, eval_rows = split_indices(cfg, table)
    train_rows, _ = fold_indices(cfg, table, train_rows)
    train_set = _rows_to_set("run train split", table, train_rows)
    eval_set = _rows_to_set("run evaluation split (held out)", table, eval_rows)
    val_set = (_rows_to_set("run calibration split (validation patients: epoch and thresholds)", table, val_rows)
               if len(val_rows) else None)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
    try:
        arch_desc = model_config(cfg.model).description
        pcfg = model_config(cfg.model).pretrained if cfg.pretrained else None
    except Exception:
        arch_desc, pcfg = "", None
    pretrained = ({"package": pcfg.package, "file": pcfg.file_name, "sha256": pcfg.sha256, "license": pcfg.license,
                   "mean": list(pcfg.mean), "std": list(pcfg.std), "stem": "RGB filters summed to 1 channel"}
                  if pcfg else None)
    prov: dict[str, Any] = {
        "architecture": cfg.model, "architecture_description": arch_desc,
        "model_kwargs": cfg.model_kwargs, "run_dir": run.name, "pretrained": pretrained,
        "checkpoint": {"file": ckpt_path.name, "sha256": file_sha256(ckpt_path)},
        "teachers": (metrics or {}).get("teachers") or list(cfg.teachers),
        "distillation": {"kd_alpha": cfg.kd_alpha, "kd_temperature": cfg.kd_temperature, "at_beta": cfg.at_beta},
        "training_data": {"dataset": table.dataset, "label_file": Path(table.source).name,
                          "label_set": cfg.label_set, "uncertainty_policy": cfg.uncertainty_policy,
                          "train": train_set.describe(), "validation": val_set.describe() if val_set else None,
                          "evaluation": eval_set.describe(), "split": cfg.split, "split_seed": cfg.split_seed},
        "seed": cfg.seed, "epochs": cfg.epochs, "training_config": cfg.to_dict(),
        "metrics": _metrics_summary(metrics),
    }
    return ExportSource(model=model, spec=spec, labels=tuple(labels), model_id=f"{cfg.model}-{run.name}",
                        architecture=cfg.model, calibration_pool=train_set, verification=eval_set,
                        threshold_set=val_set or eval_set, provenance=prov)


def _metrics_summary(metrics: dict | None) -> dict[str, Any] | None:
    """The evaluation numbers worth carrying in a manifest (mean AUC with CI, per-label AUC)."""
    if not metrics:
        return None
    keep = ("mean_auc", "mean_ci_low", "mean_ci_high", "n_images", "n_patients", "skipped_labels", "checkpoint",
            "split")
    out = {k: metrics[k] for k in keep if k in metrics}
    if "per_label" in metrics:
        out["per_label_auc"] = {k: v.get("auc") for k, v in metrics["per_label"].items()}
    if "pointing_game" in metrics and metrics["pointing_game"]:
        out["pointing_game"] = metrics["pointing_game"].get("overall")
    out["source"] = "metrics.json of the training run (PyTorch fp32 model, held-out evaluation images)"
    return out


def _labelled_set(name: str, list_file: str | None, image_dir: Path, labels_csv: Path | None,
                  labels: Sequence[str], exclude: set[str] = frozenset()) -> ImageSet:
    names = read_image_list(list_file) if list_file else [p.name for p in list_image_dir(image_dir)
                                                          if p.name not in exclude]
    paths = resolve_images(names, image_dir)
    targets, patients = (read_labels_and_patients(labels_csv, [p.name for p in paths], labels) if labels_csv
                         else (None, None))
    return ImageSet(f"{name} ({Path(list_file).name if list_file else image_dir.name})", paths, targets, patients)


def source_from_checkpoint(checkpoint: str | os.PathLike, *, config: str | None = None, arch: str | None = None,
                           labels: Sequence[str] | None = None, input_size: int | None = None,
                           channels: int = 1, mean: float | None = None, std: float | None = None,
                           resize: str = "area", image_dir: str | os.PathLike | None = None,
                           labels_csv: str | os.PathLike | None = None, calib_list: str | None = None,
                           verify_list: str | None = None, threshold_list: str | None = None) -> ExportSource:
    """A checkpoint plus a TrainConfig JSON (preferred) or explicit flags, with explicit image lists.

    Without ``calib_list`` the calibration pool is every image of ``image_dir`` not in the
    verification list; without ``verify_list`` there is no gate set (INT8 export will refuse).
    """
    import torch

    from models.registry import create_model, load_state_dict_file

    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise InvalidArgumentError(f"checkpoint not found: {ckpt_path}")
    obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt_labels = list(obj["labels"]) if isinstance(obj, dict) and "labels" in obj else None
    ckpt_cfg = obj.get("config") if isinstance(obj, dict) else None
    cfg = None
    if config or ckpt_cfg:
        from models.config import TrainConfig

        cfg = TrainConfig.load(config) if config else TrainConfig.from_dict(ckpt_cfg)
    labels = tuple(labels or ckpt_labels or ())
    if not labels:
        raise InvalidArgumentError("label names are needed: pass --labels (the checkpoint does not carry them)")
    if cfg is not None:
        if any(v is not None for v in (arch, input_size, mean, std)):
            raise InvalidArgumentError("--arch/--input-size/--mean/--std conflict with --config: the run's config "
                                       "is the one source of truth for the model and its preprocessing")
        spec, arch_name = cfg.student_spec(), cfg.model
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("drop_rate", cfg.drop_rate)
        model = create_model(cfg.model, num_classes=len(labels), in_chans=cfg.channels, **kwargs)
    else:
        if not arch or not input_size or mean is None or std is None:
            raise InvalidArgumentError("without --config, pass --arch, --input-size, --mean and --std")
        spec = PreprocessSpec(input_size=(input_size, input_size), channels=channels, resize=resize,
                              mean=(mean,) * channels, std=(std,) * channels, min_side=min(128, input_size))
        spec.validate()
        arch_name = arch
        model = create_model(arch, num_classes=len(labels), in_chans=channels)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        model.load_state_dict(obj["model"])
    else:
        load_state_dict_file(model, ckpt_path)
    model.eval()
    img_dir = Path(image_dir) if image_dir else None
    lab_csv = Path(labels_csv) if labels_csv else None
    verification = calib = thresholds = None
    if img_dir is not None:
        if verify_list:
            verification = _labelled_set("verification", verify_list, img_dir, lab_csv, labels)
        held = {p.name for p in verification.paths} if verification else set()
        calib = _labelled_set("calibration", calib_list, img_dir, None, labels, exclude=held)
        overlap = held & {p.name for p in calib.paths}
        if overlap:
            raise InvalidArgumentError(f"{len(overlap)} images are in both the calibration and verification lists")
        thresholds = (_labelled_set("thresholds", threshold_list, img_dir, lab_csv, labels)
                      if threshold_list else verification)
    prov = {"architecture": arch_name, "checkpoint": {"file": ckpt_path.name, "sha256": file_sha256(ckpt_path)},
            "training_config": cfg.to_dict() if cfg else None, "seed": cfg.seed if cfg else None,
            "teachers": list(cfg.teachers) if cfg else None}
    return ExportSource(model=model, spec=spec, labels=labels, model_id=f"{arch_name}-{ckpt_path.stem}",
                        architecture=arch_name, calibration_pool=calib, verification=verification,
                        threshold_set=thresholds, provenance=prov)
