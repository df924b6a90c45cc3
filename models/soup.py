"""Weight averaging of fine-tuned runs (a "model soup", Wortsman et al., ICML 2022).

Why: on 918 training images the mean of three seeds' probabilities gains about 3 AUC points over one
seed, but an ensemble ships three networks and triples the device's compute. Runs fine-tuned from the
same ImageNet weights with the same recipe stay in one loss basin, so the mean of their *weights* is one
network of the student's size and speed that can keep part of the ensemble's gain. This module makes that
network, and measures it, without touching the evaluation split to choose anything:

* ``uniform``: the mean of every run's weights;
* ``greedy``: runs ordered by calibration-split AUC, each added only when the soup's calibration-split
  AUC does not drop (the paper's greedy soup, on the split that already chooses epochs and thresholds).

BatchNorm statistics of a weight average are not the average of the statistics; ``--bn recompute``
re-estimates them on the training images (clean and flipped, no other augmentation: what the network
sees at run time), as SWA does; ``--bn average`` keeps the mean of the ingredients' buffers.

The output is a run directory that export, ``models.evaluate`` and ``select`` read like any other:
``config.json`` (the ingredients' shared recipe), ``model_final.pt``, ``metrics.json`` and
``predictions.npz`` on the evaluation split, and ``soup.json`` (ingredients, checksums, the calibration
AUC of every step).

    python -m models.soup runs/kd2/plain-s0 runs/kd2/plain-s1 runs/kd2/plain-s2 --out runs/kd2/soup-plain
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cxr_edge.errors import CxrEdgeError, InvalidArgumentError
from models.config import TrainConfig

# fields that may differ between the ingredients of one soup (everything else is the recipe); soup.json
# records each ingredient's initial-weights seed, which decides whether they can share a basin
INGREDIENT_FIELDS = frozenset({"seed", "init_seed", "out_dir"})


def average_states(states: Sequence[dict]) -> dict:
    """The element-wise mean of floating-point tensors; integer buffers (BN's step counters) from the first."""
    if not states:
        raise InvalidArgumentError("a soup needs at least one ingredient")
    keys = list(states[0])
    for k, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise InvalidArgumentError(f"ingredient {k} has other parameters than ingredient 0")
    out = {}
    for name in keys:
        first = states[0][name]
        if first.is_floating_point():
            out[name] = torch.stack([s[name].to(torch.float64) for s in states]).mean(0).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def shared_recipe(configs: Sequence[TrainConfig]) -> TrainConfig:
    """The ingredients' common config; refuses runs whose recipes differ (other model, data, split, ...),
    since their weights need not share a basin and the soup's split must be every ingredient's split."""
    for k, cfg in enumerate(configs[1:], 1):
        diff = [f for f in configs[0].math_diff(cfg) if f not in INGREDIENT_FIELDS]  # operational fields may differ
        if diff:
            raise InvalidArgumentError(f"ingredient {k} has another recipe than ingredient 0 (fields {diff})")
    return configs[0]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Sequence[np.ndarray]) -> None:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over ``batches``
    (momentum None), with everything else (dropout, drop-path) in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in batches:
        model(torch.from_numpy(batch))
    for m in bns:
        m.momentum = 0.1
    model.eval()


class _Data:
    """The recipe's images: training rows (for BN), calibration rows (for greedy), evaluation rows (report)."""

    def __init__(self, cfg: TrainConfig, threads: int) -> None:
        from models.runs import cache_parts, fold_indices, load_table, split_indices

        self.table = load_table(cfg)
        train, val, evaluation = split_indices(cfg, self.table)
        train, _ = fold_indices(cfg, self.table, train)
        if not len(val):
            raise InvalidArgumentError("the ingredients have no calibration split (--val-fraction 0): "
                                       "nothing to choose or report a soup on without the evaluation split")
        self.rows = {"train": train, "val": val, "eval": evaluation}
        self.images, self.ci = cache_parts(self.table, self.rows, cfg.cache_dtype, workers=threads)
        self.spec = cfg.student_spec()

    def train_batches(self, batch_size: int, hflip: bool) -> list[np.ndarray]:
        from models.data import preprocess_batch

        idx = self.ci["train"]
        out = []
        for b in range(0, len(idx), batch_size):
            x = preprocess_batch(self.images, idx[b:b + batch_size], self.spec)
            out.append(x)
            if hflip:
                out.append(np.ascontiguousarray(x[..., ::-1]))
        return out


def _logits(model: nn.Module, data: _Data, part: str, batch_size: int) -> np.ndarray:
    from models.train import evaluate_model

    return evaluate_model(model, data.spec, data.images, data.ci[part], torch.device("cpu"), batch_size)


def _mean_auc(targets: np.ndarray, logits: np.ndarray) -> float:
    from cxr_edge.operating_points import auc_per_label

    return float(np.nanmean(auc_per_label(targets, logits)))


def make_soup(runs: Sequence[str | Path], out: str | Path, recipe: str = "uniform", bn: str = "recompute",
              threads: int = 2, input_size: int = 0) -> dict:
    """Average the runs' final weights (see the module docstring); writes the soup's run directory and
    returns its ``soup.json`` record. ``input_size`` > 0 runs the soup at another input size than the
    ingredients were trained at (BN statistics re-estimated there, as FixRes does; the config says it)."""
    from models.evaluate import evaluate_logits, format_table
    from models.runs import build_model
    from models.distill import file_sha256

    if recipe not in ("uniform", "greedy"):
        raise InvalidArgumentError(f"recipe must be uniform or greedy, got {recipe!r}")
    if bn not in ("recompute", "average"):
        raise InvalidArgumentError(f"bn must be recompute or average, got {bn!r}")
    out = Path(out)
    if (out / "model_final.pt").exists():
        raise InvalidArgumentError(f"{out} already holds a model; pick another --out")
    torch.set_num_threads(threads)
    ckpts, paths = [], []
    for r in runs:
        p = Path(r) / "model_final.pt"
        if not p.is_file():
            raise InvalidArgumentError(f"{r}: no model_final.pt (not a finished models.train run)")
        ckpts.append(torch.load(p, map_location="cpu", weights_only=True))
        paths.append(p)
    configs = [TrainConfig.from_dict(c["config"]) for c in ckpts]
    cfg = shared_recipe(configs)
    trained_size = cfg.input_size
    if input_size:
        if input_size < 32 or input_size % 32:
            raise InvalidArgumentError(f"--input-size must be a multiple of 32 (the network's stride), got {input_size}")
        if bn != "recompute":
            raise InvalidArgumentError("--input-size needs --bn recompute: the statistics change with the input size")
        cfg = cfg.replace(input_size=input_size)
    labels = list(ckpts[0]["labels"])
    if any(list(c["labels"]) != labels for c in ckpts):
        raise InvalidArgumentError("the ingredients have different label lists")
    data = _Data(cfg, threads)
    val_targets = data.table.targets[data.rows["val"]]
    batches = data.train_batches(cfg.eval_batch_size, cfg.hflip) if bn == "recompute" else []

    def cook(states: Sequence[dict], reestimate: bool = bn == "recompute") -> nn.Module:
        model = build_model(cfg, len(labels))
        model.load_state_dict(average_states(states))
        if reestimate:
            recompute_batchnorm(model, batches)
        return model.eval()

    # each ingredient as it was trained (its own BN statistics): the order greedy adds them in
    ingredient_auc = [_mean_auc(val_targets, _logits(cook([c["model"]], reestimate=False), data, "val",
                                                     cfg.eval_batch_size)) for c in ckpts]
    order = sorted(range(len(ckpts)), key=lambda k: -ingredient_auc[k])
    steps = []
    if recipe == "uniform":
        chosen = list(range(len(ckpts)))
        model = cook([c["model"] for c in ckpts])
        best = _mean_auc(val_targets, _logits(model, data, "val", cfg.eval_batch_size))
        steps.append({"ingredients": [str(runs[k]) for k in chosen], "calibration_mean_auc": round(best, 5)})
    else:
        chosen = [order[0]]
        model = cook([ckpts[order[0]]["model"]])
        best = _mean_auc(val_targets, _logits(model, data, "val", cfg.eval_batch_size))
        steps.append({"ingredients": [str(runs[order[0]])], "calibration_mean_auc": round(best, 5), "kept": True})
        for k in order[1:]:
            trial = cook([ckpts[j]["model"] for j in chosen + [k]])
            auc = _mean_auc(val_targets, _logits(trial, data, "val", cfg.eval_batch_size))
            kept = auc >= best
            steps.append({"ingredients": [str(runs[j]) for j in chosen + [k]], "calibration_mean_auc": round(auc, 5),
                          "kept": kept})
            if kept:
                chosen, model, best = chosen + [k], trial, auc
    names = ", ".join(Path(runs[k]).name for k in chosen)
    bn_text = f"BN statistics {'re-estimated on the training images' if bn == 'recompute' else 'averaged'}"
    describe = (f"{recipe} soup of {len(chosen)} runs ({names}), {bn_text}" if len(chosen) > 1 else
                f"{recipe} soup that kept 1 run ({names}): its weights, {bn_text}")
    if cfg.input_size != trained_size:
        describe += f", run at {cfg.input_size} px (trained at {trained_size} px)"
    soup_cfg = cfg.replace(out_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    soup_cfg.save(out / "config.json")
    torch.save({"model": model.state_dict(), "config": soup_cfg.to_dict(), "labels": labels, "epoch": cfg.epochs,
                "checkpoint": describe}, out / "model_final.pt")
    logits = _logits(model, data, "eval", cfg.eval_batch_size)
    sub = data.table.subset(data.rows["eval"])
    np.savez(out / "predictions.npz", image_ids=np.array(sub.image_ids), logits=logits, targets=sub.targets,
             patient_ids=np.array(sub.patient_ids), label_names=np.array(labels))
    metrics = evaluate_logits(sub.targets, logits, sub.patient_ids, labels, n_boot=cfg.bootstrap, seed=0,
                              context=f"{out.name}: {len(sub)} held-out evaluation images")
    metrics.update({"dataset": cfg.dataset, "label_set": cfg.label_set, "model": cfg.model, "checkpoint": describe,
                    "split": cfg.split, "input_size": cfg.input_size, "kd_alpha": cfg.kd_alpha, "seed": cfg.seed,
                    "epochs": cfg.epochs, "n_folds": cfg.n_folds, "fold": cfg.fold})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    record = {"recipe": recipe, "bn": bn, "describe": describe,
              "rule": "greedy: ingredients in order of calibration-split AUC, each kept when the soup's "
                      "calibration-split AUC does not drop" if recipe == "greedy" else "uniform: every ingredient",
              "ingredients": [{"run": str(r), "model_final_sha256": file_sha256(p), "seed": c.seed,
                               "init_seed": c.init_seed if c.init_seed >= 0 else c.seed,
                               "calibration_mean_auc": round(a, 5), "in_soup": k in chosen}
                              for k, (r, p, a, c) in enumerate(zip(runs, paths, ingredient_auc, configs))],
              "steps": steps, "calibration_mean_auc": round(best, 5),
              "bn_images": int(len(data.ci["train"])) if bn == "recompute" else 0,
              "input_size": cfg.input_size, "trained_input_size": trained_size}
    (out / "soup.json").write_text(json.dumps(record, indent=2) + "\n")
    print(format_table(metrics, title=f"{out}: {describe}; evaluation on {len(sub)} held-out images"), flush=True)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.soup", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished models.train run directories with one recipe")
    p.add_argument("--out", required=True, help="the soup's run directory (new)")
    p.add_argument("--recipe", choices=("uniform", "greedy"), default="uniform")
    p.add_argument("--bn", choices=("recompute", "average"), default="recompute",
                   help="BatchNorm statistics: re-estimated on the training images, or the ingredients' mean")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-size", type=int, default=0,
                   help="run the soup at this input size (default: the ingredients'); BN re-estimated there")
    args = p.parse_args(argv)
    try:
        make_soup(args.runs, args.out, args.recipe, args.bn, args.threads, args.input_size)
    except CxrEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
