"""Train a model on the NIH sample or any labelled dataset: supervised (teachers) or with multi-label
knowledge distillation.

    python -m models.train --model eeea_c2 --input-size 128 --epochs 25 --out-dir runs/plain_s0
    python -m models.train --dataset csv --data-root my_xrays --out-dir runs/mine  # my_xrays/labels.csv
    python -m models.train --model eeea_c2 --input-size 128 --epochs 25 --out-dir runs/kd_s0 \\
        --teachers /work/shared/teachers/densenet121-nih1071.onnx --kd-alpha 0.5 --kd-temperature 2
    torchrun --nproc_per_node 2 -m models.train ...        # DDP (gloo on CPU, nccl on CUDA)

Why it is built this way: the run must be reproducible and resumable exactly (every random draw
is a function of the config, checkpoints hold optimizer/scheduler/RNG state), and it must be lean
enough for a 2-core CPU (images decoded once into memory, a slow teacher's outputs cached).
No epoch is picked on the evaluation images: the last epoch is evaluated, or the best epoch on a
patient-wise validation part of the *training* images when ``--val-fraction`` > 0.

Data (``--dataset``, :func:`models.runs.load_table`): the NIH sample (default), ChestX-ray14, CheXpert
(``--uncertainty-policy``), PadChest, or the generic CSV layout (``image``, ``patient_id``, label
columns of 1/0/blank, optional ``view``; README "Training on your own data"); ``--label-set common``
maps them onto the labels the public datasets share. Unknown targets (blank, uncertain under
U-Ignore, a label a dataset lacks) are NaN and masked in the BCE loss and in every AUC.

Exit codes: 0 done; 2 bad arguments, a bad label file or an unreadable image (a one-line message).

A run directory holds ``config.json``, ``last.pt`` (full training state, every epoch),
``model_final.pt`` (weights + config), ``metrics.json`` (per-label AUC with patient-bootstrap 95% CIs)
and ``predictions.npz`` (evaluation image ids, logits, targets, patients) for re-evaluation.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from cxr_edge.errors import CxrEdgeError, InvalidArgumentError
from models.config import TrainConfig, parse_config
from models.data import AugmentParams, CxrDataset, ImageCache
from models.distill import (CsvTeacher, Predictor, TorchPredictor, attention_map, box_cam_loss,
                            cached_teacher_outputs, distillation_loss, load_predictor,
                            platt_recalibrate)
from models.evaluate import (auc_per_label, degenerate_predictions, evaluate_logits, format_table, predict,
                             warn_degenerate)
from models.runs import (build_model, cache_parts, fold_indices, load_run_model,  # noqa: F401
                         load_table, read_image_list, split_indices)


# ============================================================================ plumbing
class WithFeatures(nn.Module):
    """forward -> (logits, features): DDP only syncs gradients of what goes through one forward()."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(x)
        return self.model.head(feats), feats


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on CUDA, gloo on CPU)."""
    cuda = cfg.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device(cfg.device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local, device)


def set_threads(cfg: TrainConfig, d: DistInfo) -> int:
    """CPU threads per process: the flag, else the cores shared evenly among ranks (max 2 by default)."""
    n = cfg.threads or max(1, min(2, os.cpu_count() or 1) // d.world) if d.device.type == "cpu" else \
        (cfg.threads or 2)
    torch.set_num_threads(n)
    cv2.setNumThreads(1)  # 320-px warps: OpenCV's own pool only competes with torch's
    return n


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _listify(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# ============================================================================ data
def _training_boxes(cfg: TrainConfig, table, train_rows: np.ndarray, labels: Sequence[str]):
    """Per training image, its radiologist boxes as (label index, x, y, w, h) in stored-image pixels;
    only boxes of the rows trained on (never validation or evaluation images); the CAM grid of the model."""
    from models.datasets import read_bboxes
    from models.evaluate import FINDING_TO_LABEL

    column = {n: j for j, n in enumerate(labels)}
    by_image: dict[str, list] = defaultdict(list)
    bbox_csv = cfg.data_path() / "bbox.csv"
    if not bbox_csv.is_file():
        raise InvalidArgumentError(f"--box-beta needs radiologist boxes in {bbox_csv} (image, finding, x, y, w, h)")
    for b in read_bboxes(bbox_csv):
        label = FINDING_TO_LABEL.get(b.finding, b.finding)
        if label in column:
            by_image[b.image].append((column[label], b.x, b.y, b.w, b.h))
    ids = [table.image_ids[r] for r in train_rows]
    boxes = [by_image.get(i, []) for i in ids]
    probe = build_model(cfg, len(labels)).eval()
    with torch.no_grad():
        grid = tuple(probe.features(torch.zeros(1, cfg.channels, cfg.input_size, cfg.input_size)).shape[-2:])
    return boxes, grid, sum(len(b) for b in boxes)


def augment_params(cfg: TrainConfig) -> AugmentParams | None:
    if not cfg.augment:
        return None
    return AugmentParams(scale=cfg.aug_scale, rotate=cfg.aug_rotate, shift=cfg.aug_shift, gamma=cfg.aug_gamma,
                         contrast=cfg.aug_contrast, hflip=cfg.hflip)


# ============================================================================ model / optimiser
def build_ema(cfg: TrainConfig, model: nn.Module) -> "torch.optim.swa_utils.AveragedModel | None":
    """An exponential moving average of the weights and BN buffers (``--ema-decay``), with timm's
    warm-up (decay min(d, (1 + n) / (10 + n)) after n updates) so the pretrained start and the
    random head fade out within the first steps rather than weighing on a 200-step run."""
    if cfg.ema_decay <= 0:
        return None
    decay = cfg.ema_decay

    def update(ema_params, params, num_averaged) -> None:
        n = float(num_averaged)
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats],
                                 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
        for e, p in zip(ema_params, params):
            if not e.is_floating_point():  # BN's num_batches_tracked: the count, not an average
                e.copy_(p)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation parameters (1-D tensors); the classifier's
    learning rate is ``head_lr_mult`` x the backbone's (a fresh head on a pretrained backbone), and with
    ``layer_decay`` < 1 each backbone stage below the top one learns ``layer_decay`` x slower than the
    stage above it (layer-wise decay: the generic ImageNet filters near the input move least)."""
    mult = {id(p): cfg.head_lr_mult for p in model.classifier.parameters()}
    if cfg.layer_decay < 1.0:
        if not hasattr(model, "lr_stages"):
            raise ValueError(f"--layer-decay needs a model with lr_stages(); {cfg.model} has none")
        stages = model.lr_stages()
        for depth, modules in enumerate(reversed(stages)):
            for m in modules:
                for p in m.parameters():
                    mult.setdefault(id(p), cfg.layer_decay ** depth)
    groups: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((mult.get(id(p), 1.0), p.ndim > 1), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr": cfg.lr * m} for (m, decay), params in groups.items()], lr=cfg.lr)


class WarmupCosine:
    """LR factor: linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= 4:  # torch's OneCycleLR needs >= 1 step per phase
        pct = min(max(cfg.warmup_frac, 2.0 / total), (total - 1.5) / total)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total, pct_start=pct)
    return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total, int(cfg.warmup_frac * total)))


# ============================================================================ checkpoints
def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ============================================================================ training
@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    history: list = field(default_factory=list)
    metrics: dict | None = None
    finished: bool = False


def _teacher_outputs(cfg: TrainConfig, d: DistInfo, teachers: Sequence[Predictor], images: ImageCache,
                     cache_idx: np.ndarray, threads: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cached (augmentation-free) outputs: N x K x L logits and K attention-map arrays."""
    logits, maps = [], []
    for t in teachers:
        if d.main:
            start = time.perf_counter()
            _, _, cache = cached_teacher_outputs(t, cfg.teacher_cache_dir, images, cache_idx, progress=True)
            print(f"teacher {t.name}: {cache.hits} cached, {cache.misses} computed "
                  f"({time.perf_counter() - start:.1f}s) {cache.path}", flush=True)
        d.barrier()
        lo, mp, _ = cached_teacher_outputs(t, cfg.teacher_cache_dir, images, cache_idx)
        logits.append(lo)
        maps.append(mp)
    return np.stack(logits, axis=1), maps


def _online_teacher(teachers: Sequence[Predictor], batch: dict, device: torch.device,
                    need_maps: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    logits, maps = [], []
    for t, x in zip(teachers, batch["teacher_images"]):
        if isinstance(t, TorchPredictor):
            lo, fe = t.forward_torch(x.to(device))
        else:
            lo_np, fe_np = t.run(x.numpy())
            lo = torch.from_numpy(lo_np).to(device)
            fe = None if fe_np is None else torch.from_numpy(fe_np).to(device)
        logits.append(lo.float())
        if need_maps:
            if fe is None:
                raise InvalidArgumentError(f"teacher {t.name} has no features output (needed for --at-beta)")
            maps.append(attention_map(fe))
    return torch.stack(logits, dim=1), (maps if need_maps else None)


def evaluate_model(model: nn.Module, spec, images: ImageCache, cache_idx: Sequence[int], device: torch.device,
                   batch_size: int) -> np.ndarray:
    """Logits of clean images, computed as ``models.evaluate score`` computes them for the saved
    checkpoint: an eval-mode copy in the default (contiguous) memory format, batches of
    ``batch_size`` (the run's ``eval_batch_size``, also evaluate's default). The training model itself
    may be channels_last, whose kernels round differently (~1e-7): on a near-constant model that
    alone reorders the images and moves the AUC by points, so both paths must run the same math."""
    clone = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    pred = TorchPredictor(clone, spec, name="eval", checksum="", device=str(device))
    logits, _ = predict(pred, images, cache_idx, batch_size=batch_size)
    return logits


def mixup_draw(rng: np.random.Generator, alpha: float, n: int) -> tuple[float, torch.Tensor | None]:
    """Mixup's (lam, partner permutation) for one batch of ``n``; (1.0, None) when off (alpha 0) or n < 2."""
    if alpha <= 0 or n < 2:
        return 1.0, None
    return float(rng.beta(alpha, alpha)), torch.from_numpy(rng.permutation(n))


def mixed_losses(losses, lam: float, perm: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mixup's loss: ``lam`` x the losses against each image's own targets (and teachers, boxes) plus
    ``1 - lam`` x those against its partner's. Blending the losses, not the targets, keeps every mask
    (a label unknown for one image, a box only the partner has) exact: each term masks its own."""
    own, parts = losses(None)
    if perm is None:
        return own, parts
    other, other_parts = losses(perm)
    return lam * own + (1.0 - lam) * other, {k: lam * v + (1.0 - lam) * other_parts.get(k, 0.0)
                                              for k, v in parts.items()}


def _mean_auc(targets: np.ndarray, logits: np.ndarray) -> float | None:
    auc = auc_per_label(targets, logits)
    return round(float(np.nanmean(auc)), 5) if np.isfinite(auc).any() else None


def _final_evaluation(cfg: TrainConfig, run: Path, model: nn.Module, suffix: str, *, table, labels, spec, images,
                      eval_rows, eval_ci, oof_rows, oof_ci, device, has_val: bool, info: dict,
                      calibration: float | None) -> dict:
    """Write ``model_final.pt``, ``predictions.npz`` (and out-of-fold ones) and ``metrics.json`` of ``run``:
    its best validation epoch when it has one (``model_best.pt``), else ``model`` (the last epoch).
    ``calibration``: that epoch's calibration-split mean AUC (``models.evaluate select`` reads it)."""
    chosen, eval_model = "last" + (f" ({suffix.lstrip(', ')})" if suffix else ""), model
    final_state, recorded = eval_model.state_dict(), None
    if has_val and (run / "model_best.pt").is_file():
        recorded = calibration
        best_ckpt = torch.load(run / "model_best.pt", map_location="cpu", weights_only=True)
        eval_model = build_model(cfg, len(labels)).to(device)
        eval_model.load_state_dict(best_ckpt["model"])
        final_state, chosen = eval_model.state_dict(), f"best on validation (epoch {best_ckpt['epoch']})" + suffix
    _atomic_save({"model": final_state, "config": cfg.to_dict(), "labels": labels, "epoch": cfg.epochs,
                  "checkpoint": chosen}, run / "model_final.pt")
    logits = evaluate_model(eval_model, spec, images, eval_ci, device, cfg.eval_batch_size)
    sub = table.subset(eval_rows)
    np.savez(run / "predictions.npz", image_ids=np.array(sub.image_ids), logits=logits, targets=sub.targets,
             patient_ids=np.array(sub.patient_ids), label_names=np.array(labels))
    if len(oof_ci):
        oof_logits = evaluate_model(eval_model, spec, images, oof_ci, device, cfg.eval_batch_size)
        np.savez(run / "oof_predictions.npz", image_ids=np.array([table.image_ids[r] for r in oof_rows]),
                 logits=oof_logits, label_names=np.array(labels), fold=cfg.fold, n_folds=cfg.n_folds)
    metrics = evaluate_logits(sub.targets, logits, sub.patient_ids, labels, n_boot=cfg.bootstrap, seed=0,
                              context=f"{run.name}: {len(eval_rows)} held-out evaluation images")
    metrics.update({"dataset": cfg.dataset, "label_set": cfg.label_set, "model": cfg.model,
                    "pretrained": info["pretrained"], "checkpoint": chosen, "n_folds": cfg.n_folds, "fold": cfg.fold,
                    "epochs": cfg.epochs, "teachers": info["teachers"], "split": cfg.split,
                    "input_size": cfg.input_size, "kd_alpha": cfg.kd_alpha, "kd_temperature": cfg.kd_temperature,
                    "at_beta": cfg.at_beta, "seed": cfg.seed, "seconds_per_epoch": info["seconds_per_epoch"],
                    "world_size": info["world_size"], "threads": info["threads"],
                    "train_images": info.get("train_images"), "train_patients": info.get("train_patients"),
                    "calibration_mean_auc": recorded})
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    print(format_table(metrics, title=f"{run}: evaluation on {len(eval_rows)} held-out images ({chosen} epoch)"),
          flush=True)
    return metrics


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one training run; returns the run dir and the trained (unwrapped) model."""
    cfg.validate()
    d = setup_distributed(cfg)
    threads = set_threads(cfg, d)
    run = Path(cfg.out_dir)
    last = run / "last.pt"
    if cfg.batch_size % d.world:
        raise InvalidArgumentError(f"batch_size {cfg.batch_size} must be divisible by the {d.world} processes")
    if last.exists() and not cfg.resume:
        raise InvalidArgumentError(f"{run} already holds a checkpoint: pass --resume, or another --out-dir")
    ckpt = torch.load(last, map_location="cpu", weights_only=True) if (cfg.resume and last.exists()) else None
    if ckpt is not None:
        diff = TrainConfig.from_dict(ckpt["config"]).math_diff(cfg)
        if diff:
            raise InvalidArgumentError(f"--resume with a different config (fields {diff}); use the run's config.json")
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        cfg.save(run / "config.json")

    # ---- data
    t0 = time.perf_counter()
    table = load_table(cfg)
    labels = list(table.label_names)
    train_rows, val_rows, eval_rows = split_indices(cfg, table)
    train_rows, oof_rows = fold_indices(cfg, table, train_rows)
    images, ci = cache_parts(table, {"train": train_rows, "val": val_rows, "eval": eval_rows, "oof": oof_rows},
                             cfg.cache_dtype, workers=threads)
    train_ci, val_ci, eval_ci, oof_ci = ci["train"], ci["val"], ci["eval"], ci["oof"]
    if d.main:
        print(f"data: {cfg.dataset} ({len(labels)} labels, label set {cfg.label_set}"
              + (f", skipped {dict(table.skipped)}" if any(table.skipped.values()) else "") + "); "
              f"{len(train_rows)} train / {len(val_rows)} val / {len(eval_rows)} eval / {len(oof_rows)} "
              f"out-of-fold images "
              f"(split={cfg.split}); decoded {len(images)} in {time.perf_counter() - t0:.1f}s "
              f"({images.nbytes / 2**20:.0f} MiB); {threads} threads, world {d.world}", flush=True)

    # ---- teachers
    use_kd = cfg.kd_alpha > 0 or cfg.at_beta > 0
    teachers: list[Predictor] = []
    csv_teachers: dict[int, CsvTeacher] = {}
    teacher_info = []
    if use_kd:
        train_ids = [images.ids[i] for i in train_ci]
        for k, src in enumerate(cfg.teachers):
            if str(src).lower().endswith(".csv"):
                if cfg.teacher_mode != "cache" or cfg.at_beta > 0:
                    raise InvalidArgumentError(f"teacher {src}: cached probabilities work with --teacher-mode cache "
                                               "and without --at-beta (no features)")
                ct = CsvTeacher(src, labels)
                csv_teachers[k] = ct
                teacher_info.append({"source": str(src), "name": ct.name, "checksum": ct.checksum,
                                     "kind": "cached probabilities (CSV)",
                                     "train_images_covered": ct.coverage(train_ids), "train_images": len(train_ids)})
                continue
            t = load_predictor(src, spec=cfg.teacher_spec(), device=str(d.device), num_classes=len(labels),
                               threads=threads)
            if t.labels is not None and list(t.labels) != labels:
                raise InvalidArgumentError(f"teacher {src}: labels {t.labels} differ from the table's {labels}")
            teachers.append(t)
            teacher_info.append({"source": src, "name": t.name, "checksum": t.checksum, "kind": "model",
                                 "input_size": list(t.spec.input_size), "mean": list(t.spec.mean),
                                 "std": list(t.spec.std), "resize": t.spec.resize})
    t_logits = None
    t_maps = None
    if use_kd and cfg.teacher_mode == "cache":
        if teachers:
            t_logits, t_maps = _teacher_outputs(cfg, d, teachers, images, train_ci, threads)
        else:
            t_logits, t_maps = np.zeros((len(train_ci), 0, len(labels)), np.float32), []
        if csv_teachers:  # put every teacher back in --teachers order
            model_logits = iter(np.moveaxis(t_logits, 1, 0))
            t_logits = np.stack([csv_teachers[k].logits(train_ids) if k in csv_teachers else next(model_logits)
                                 for k in range(len(cfg.teachers))], axis=1)
        if t_logits.shape[-1] != len(labels):
            raise InvalidArgumentError(f"teacher gives {t_logits.shape[-1]} logits for {len(labels)} labels")
        if cfg.teacher_calibration == "platt":  # fitted on the training images only
            t_logits, calibration = platt_recalibrate(t_logits, table.targets[train_rows])
            for info, per_label in zip(teacher_info, calibration):
                info["calibration"] = {"method": "platt (training images)",
                                       "per_label": dict(zip(labels, per_label))}
        if cfg.at_beta == 0:
            t_maps = None
        teachers, t = [], None  # outputs are in memory; free the sessions

    boxes, box_grid = None, None
    if cfg.box_beta > 0:
        boxes, box_grid, n_boxes = _training_boxes(cfg, table, train_rows, labels)
        if d.main:
            print(f"box guidance: {n_boxes} radiologist boxes on {sum(1 for b in boxes if b)} training images, "
                  f"CAM grid {box_grid[0]}x{box_grid[1]}", flush=True)
    train_ds = CxrDataset(images, train_ci, table.targets[train_rows], cfg.student_spec(), augment_params(cfg),
                          seed=cfg.seed, teacher_logits=t_logits, teacher_maps=t_maps,
                          teacher_specs=[t.spec for t in teachers] if teachers else None,
                          boxes=boxes, box_grid=box_grid)
    per_rank = cfg.batch_size // d.world
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=len(sampler) > per_rank, worker_init_fn=_worker_init,
                        pin_memory=d.device.type == "cuda")
    steps = len(loader)
    if steps == 0:
        raise InvalidArgumentError("no training batches: too few training images for the batch size")

    # ---- model, optimiser, schedule
    shared_init = cfg.init_seed >= 0 and cfg.init_seed != cfg.seed
    seed_everything(cfg.init_seed if shared_init else cfg.seed)
    model = build_model(cfg, len(labels), pretrained=cfg.pretrained and ckpt is None).to(d.device)
    if shared_init:  # the initial weights are init_seed's; everything random after them is seed's
        seed_everything(cfg.seed)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps)
    ema = build_ema(cfg, model)
    start_epoch, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        if d.main:
            print(f"resumed {last} at epoch {start_epoch}/{cfg.epochs}", flush=True)
    net: nn.Module = WithFeatures(model)
    if d.world > 1:
        net = DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    best = max((h.get("val_mean_auc") or -1.0 for h in history), default=-1.0)
    best_raw = max((h.get("raw_val_mean_auc") or -1.0 for h in history), default=-1.0)
    twin, twin_cfg = run / "raw", cfg.replace(ema_decay=0.0, out_dir=str(run / "raw"))
    if ema is not None and d.main:
        twin.mkdir(exist_ok=True)
        twin_cfg.save(twin / "config.json")
    spec = cfg.student_spec()
    need_maps = cfg.at_beta > 0
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + d.rank)  # dropout / drop-path draws
        net.train()
        sums: dict[str, float] = defaultdict(float)
        start, cpu_start = time.perf_counter(), time.process_time()
        mix_rng = np.random.default_rng([cfg.seed, epoch, d.rank, 0x6D6978])  # mixup draws, apart from the rest
        for step, batch in enumerate(loader):
            x = batch["image"].to(d.device, non_blocking=True)
            y = batch["target"].to(d.device, non_blocking=True)
            tl, tm = batch.get("teacher_logits"), batch.get("teacher_maps")
            if teachers:
                tl, tm = _online_teacher(teachers, batch, d.device, need_maps)
            tl = None if tl is None else tl.to(d.device)  # on the device once: mixup reads each twice
            tm = None if tm is None else [m.to(d.device) for m in tm]
            boxes = (batch["box_mask"].to(d.device), batch["box_has"].to(d.device)) if cfg.box_beta > 0 else None
            lam, perm = mixup_draw(mix_rng, cfg.mixup_alpha, x.shape[0])
            if perm is not None:
                x = lam * x + (1.0 - lam) * x[perm]
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                logits, feats = net(x)

            def losses(idx: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
                """The losses against images ``idx``'s targets, teachers and boxes (None: the batch as is)."""
                pick = (lambda t: t) if idx is None else (lambda t: t[idx])  # noqa: E731
                total, parts = distillation_loss(
                    logits.float(), pick(y), None if tl is None else pick(tl), cfg.kd_alpha,
                    cfg.kd_temperature, cfg.teacher_combine, feats if need_maps else None,
                    None if tm is None else [pick(m) for m in tm], cfg.at_beta,
                    cfg.teacher_weights or None, cfg.kd_loss)
                if boxes is not None:
                    bl = box_cam_loss(feats, model.classifier.weight, pick(boxes[0]), pick(boxes[1]))
                    total = total + cfg.box_beta * bl
                    parts["box"] = float(bl.detach())
                return total, parts

            loss, parts = mixed_losses(losses, lam, perm)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
            if cfg.log_every and d.main and (step + 1) % cfg.log_every == 0:
                print(f"  step {step + 1}/{steps} loss {sums['loss'] / (step + 1):.4f}", flush=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        record = {"epoch": epoch + 1, "steps": steps, "seconds": round(seconds, 2),
                  "cpu_seconds": round(cpu_seconds, 2), "lr": opt.param_groups[0]["lr"],
                  **{k: round(v / steps, 5) for k, v in sums.items()}}
        shipped = ema.module if ema is not None else model  # what is validated, checkpointed and exported
        if len(val_ci) and d.main:
            vl = evaluate_model(shipped, spec, images, val_ci, d.device, cfg.eval_batch_size)
            record["val_mean_auc"] = _mean_auc(table.targets[val_rows], vl)
            degenerate = degenerate_predictions(vl, labels, table.targets[val_rows])
            if degenerate:
                record["val_degenerate_labels"] = sorted(degenerate)
                warn_degenerate(degenerate, f"epoch {epoch + 1} validation ({len(val_rows)} images)")
            if ema is not None:  # the raw weights too: the run's plain twin picks its epoch the same way
                record["raw_val_mean_auc"] = _mean_auc(
                    table.targets[val_rows], evaluate_model(model, spec, images, val_ci, d.device, cfg.eval_batch_size))
        history.append(record)
        if d.main:
            if record.get("val_mean_auc") is not None and record["val_mean_auc"] > best:
                best = record["val_mean_auc"]
                _atomic_save({"model": shipped.state_dict(), "config": cfg.to_dict(), "labels": labels,
                              "epoch": epoch + 1}, run / "model_best.pt")
            if record.get("raw_val_mean_auc") is not None and record["raw_val_mean_auc"] > best_raw:
                best_raw = record["raw_val_mean_auc"]
                _atomic_save({"model": model.state_dict(), "config": twin_cfg.to_dict(), "labels": labels,
                              "epoch": epoch + 1}, twin / "model_best.pt")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch + 1, "config": cfg.to_dict(), "history": history, "labels": labels,
                     "rng": rng_state(), **({"ema": ema.state_dict()} if ema is not None else {})}
            _atomic_save(state, last)
            if cfg.keep_checkpoints:
                _atomic_save(state, run / f"epoch_{epoch + 1:03d}.pt")
            extra = " ".join(f"{k} {record[k]:.4f}" for k in ("bce", "kd", "at", "box") if k in record)
            val = f" val mAUC {record['val_mean_auc']:.4f}" if record.get("val_mean_auc") is not None else ""
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} ({extra}) lr {record['lr']:.2e} "
                  f"{seconds:.1f}s ({seconds / steps:.2f}s/step, cpu {cpu_seconds:.0f}s){val}", flush=True)
        if cfg.stop_after_epochs and epoch + 1 - start_epoch >= cfg.stop_after_epochs and epoch + 1 < cfg.epochs:
            d.barrier()
            return TrainResult(run, model, history, None, finished=False)

    # ---- final evaluation on the held-out images (rank 0)
    metrics = None
    d.barrier()
    if d.main:
        final = ema.module if ema is not None else model
        suffix = f", EMA of the weights (decay {cfg.ema_decay})" if ema is not None else ""
        parts = dict(table=table, labels=labels, spec=spec, images=images, eval_rows=eval_rows, eval_ci=eval_ci,
                     oof_rows=oof_rows, oof_ci=oof_ci, device=d.device, has_val=len(val_ci) > 0,
                     info={"teachers": teacher_info, "world_size": d.world, "threads": threads,
                           "train_images": len(train_ci), "train_patients": len(set(table.patient_ids[r]
                                                                                     for r in train_rows)),
                           "pretrained": getattr(model, "pretrained_source", None) or cfg.pretrained,
                           "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2)
                           if history else None})
        best_of = lambda key: max((h[key] for h in history if h.get(key) is not None), default=None)  # noqa: E731
        metrics = _final_evaluation(cfg, run, final, suffix, calibration=best_of("val_mean_auc"), **parts)
        if ema is not None:  # the same trajectory's raw weights: a paired no-EMA control at no training cost
            _final_evaluation(twin_cfg, twin, model, ", raw weights of the EMA run",
                              calibration=best_of("raw_val_mean_auc"), **parts)
    d.barrier()
    return TrainResult(run, model, history, metrics, finished=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, prog="python -m models.train")
        train(cfg)
    except CxrEdgeError as exc:  # bad flags, a bad label file (LabelFileError), an unreadable image
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
