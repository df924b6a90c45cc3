"""Learning curve: how much does the evaluation AUC gain per doubling of the training set?

Why: every recipe tried for the default student lands at 0.69-0.72 mean AUC on the 918 training
images (docs/results/*). Whether a better recipe or more data is what is missing is a measurable
question: train the same recipe on nested fractions of the training patients, fit mean AUC against
log2(training images), and read off the slope per doubling and how many images the fitted line
needs to reach a target. The fit is a straight line in log(n), the usual shape of a learning
curve over one to two doublings; it is not trusted far beyond the data, so the extrapolated size
is reported as an order of magnitude, with its interval.

Uncertainty has two sources, both resampled in each bootstrap round: the evaluation patients
(one patient resample applied to every run: paired) and the seeds (the runs of each training-set
size resampled with replacement).

CLI::

    python -m models.curve runs/curve/sub2-s* runs/curve/sub4-s* runs/curve/plain-s* --target 0.75 --out curve.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr_edge.errors import CxrEdgeError, InvalidArgumentError
from models.evaluate import (_f, _interval, load_predictions, patient_resamples, resampled_mean_auc,
                             scorable_labels, write_json)


def fit_log2(n_images: np.ndarray, aucs: np.ndarray) -> tuple[float, float]:
    """Least-squares ``auc = intercept + slope * log2(n)``: (intercept, slope per doubling)."""
    x = np.log2(np.asarray(n_images, dtype=np.float64))
    if np.ptp(x) == 0:
        raise InvalidArgumentError("a learning curve needs runs on at least two training-set sizes")
    slope, intercept = np.polyfit(x, np.asarray(aucs, dtype=np.float64), 1)
    return float(intercept), float(slope)


def images_for(target: float, intercept: float, slope: float) -> float:
    """Training images at which the fitted line reaches ``target`` (inf when it never does)."""
    doublings = (target - intercept) / slope if slope > 0 else float("inf")
    return float(2.0 ** doublings) if doublings < 1000 else float("inf")  # a near-flat line: never (no overflow)


def learning_curve(runs: Sequence[str], target: float, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """The curve of ``runs`` (run directories with ``predictions.npz`` and ``metrics.json``, all on the
    same evaluation images), its slope and the size that reaches ``target``, with bootstrap intervals."""
    preds = [load_predictions(r) for r in runs]
    sizes, arms = [], []
    for r in runs:
        metrics = json.loads((Path(r) / "metrics.json").read_text())
        if not metrics.get("train_images"):
            raise InvalidArgumentError(f"{r}: metrics.json does not record train_images (trained before the "
                                       "learning-curve change?)")
        sizes.append(int(metrics["train_images"]))
        arms.append(int(metrics.get("n_folds") or 0))  # the nominal fraction (K-1)/K; folds differ by a few images
    ref = preds[0]
    for r, p in zip(runs, preds):
        if not (np.array_equal(p["image_ids"], ref["image_ids"]) and np.array_equal(p["label_names"],
                                                                                  ref["label_names"])):
            raise InvalidArgumentError(f"{r}: evaluated on other images or labels than {runs[0]}")
    targets = np.asarray(ref["targets"], dtype=np.float64)
    valid = scorable_labels(targets)
    sizes_arr = np.array(sizes)
    # runs of one nominal size (the same n_folds; its folds hold a few images more or less) are resampled together
    members = {a: [k for k, b in enumerate(arms) if b == a] for a in set(arms)}
    groups = dict(sorted(members.items(), key=lambda item: np.mean([sizes[k] for k in item[1]])))  # smallest first
    aucs = np.array([resampled_mean_auc(targets, p["logits"], valid, None) for p in preds])
    intercept, slope = fit_log2(sizes_arr, aucs)
    n_max = max(sizes)
    rng = np.random.default_rng(seed)
    slopes, needed, at_max = np.full(n_boot, np.nan), np.full(n_boot, np.nan), np.full(n_boot, np.nan)
    for b, idx in enumerate(patient_resamples([str(p) for p in ref["patient_ids"]], n_boot, seed)):
        pick = [k for n in groups for k in rng.choice(groups[n], size=len(groups[n]), replace=True)]
        a = np.array([resampled_mean_auc(targets, preds[k]["logits"], valid, idx) for k in pick])
        i, s = fit_log2(sizes_arr[pick], a)
        slopes[b], at_max[b] = s, i + s * np.log2(n_max)
        needed[b] = images_for(target, i, s)
    s_lo, s_hi = _interval(slopes, level)
    q = (1 - level) / 2  # "never" (inf) sorts last; an order-statistic quantile keeps it (no inf - inf)
    need_lo, need_hi = (float(np.quantile(needed, p, method="inverted_cdf")) for p in (q, 1 - q))
    per_size = [{"train_images": round(float(sizes_arr[ks].mean())), "train_images_per_run": [sizes[k] for k in ks],
                 "n_folds": a, "runs": [str(runs[k]) for k in ks],
                 "mean_auc": [_f(aucs[k]) for k in ks], "mean_auc_avg": _f(aucs[ks].mean())}
                for a, ks in groups.items()]
    need = images_for(target, intercept, slope)
    return {"per_size": per_size, "slope_per_doubling": _f(slope), "slope_ci": [_f(s_lo), _f(s_hi)],
            "fitted_auc_at_largest": _f(intercept + slope * np.log2(n_max)),
            "fitted_auc_at_largest_ci": [_f(v) for v in _interval(at_max, level)],
            "target": target, "images_for_target": None if not np.isfinite(need) else round(need),
            "images_for_target_ci": [None if not np.isfinite(v) else round(v) for v in (need_lo, need_hi)],
            "p_slope_le_zero": _f(float(np.mean(slopes <= 0))),
            "n_images": int(targets.shape[0]), "n_patients": int(len(set(map(str, ref["patient_ids"])))),
            "n_boot": n_boot, "seed": seed, "level": level,
            "resampling": "evaluation patients (paired across runs) x runs within each training-set size",
            "model": "mean AUC = a + b log2(training images), least squares over runs"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.curve", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (models.train), several training-set sizes")
    parser.add_argument("--target", type=float, default=0.75, help="mean AUC whose training-set size is read off")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args(argv)
    try:
        res = learning_curve(args.runs, args.target, args.bootstrap, args.seed)
    except CxrEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in res["per_size"]:
        print(f"{row['train_images']:5d} training images (runs: {row['train_images_per_run']}): mean AUC "
              f"{row['mean_auc']} (avg {row['mean_auc_avg']})")
    lo, hi = res["slope_ci"]
    print(f"slope {res['slope_per_doubling']:+.4f} per doubling, 95% CI [{lo:+.4f}, {hi:+.4f}]; fitted at the largest "
          f"size {res['fitted_auc_at_largest']}; P(slope <= 0) = {res['p_slope_le_zero']}")
    n_lo, n_hi = res["images_for_target_ci"]
    print(f"mean AUC {res['target']} on the fitted line at {res['images_for_target']} training images "
          f"(95% CI {n_lo} to {n_hi if n_hi is not None else 'never'}; {res['n_patients']} evaluation patients, "
          f"{res['n_boot']} resamples)")
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
