"""Evaluation: per-label ROC AUC with patient-level bootstrap CIs, paired KD-gain bootstrap, and
the pointing game of class activation maps on radiologist boxes.

Why patients: images of one patient are correlated, so confidence intervals resample patients
(all of a patient's images together), not images. Why one code path for every model: the teacher
(ONNX), a student (PyTorch run directory) and an exported bundle are all :class:`models.distill.Predictor`
objects and are scored identically; CAMs use :func:`cxr_edge.cam.class_activation_map`, the
runtime's own function.

CLI::

    python -m models.evaluate score runs/kd_s0 --pointing-game
    python -m models.evaluate score /work/shared/teachers/densenet121-nih1071.onnx --pointing-game
    python -m models.evaluate compare --a runs/plain_s0 runs/plain_s1 --b runs/kd_s0 runs/kd_s1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr_edge.cam import class_activation_map
from cxr_edge.errors import CxrEdgeError, InvalidArgumentError
from models.datasets import read_image_list

#: bbox.csv finding -> model label, where the spellings differ (the NIH list says "Infiltrate").
FINDING_TO_LABEL = {"Infiltrate": "Infiltration"}

log = logging.getLogger(__name__)


# ============================================================================ AUC
# AUC, patient bootstrap and intervals: one implementation, the runtime's (numpy only; also used by
# export thresholds and `cxr-edge calibrate`), re-exported here for the toolchain.
from cxr_edge.operating_points import (_interval, auc_per_label, bootstrap_auc, patient_resamples,  # noqa: E402,F401
                                       roc_auc, sigmoid)


# ============================================================================ degenerate predictions
#: A label's scores are degenerate when they span less than this (logits; probabilities for a score
#: given as probabilities) over the images: then float rounding, not the model, orders the images.
DEGENERATE_SPREAD = 1e-3
#: ... or when more than this share of the images has one identical score (a tie-dominated label).
DEGENERATE_TIED = 0.5


def degenerate_predictions(scores: np.ndarray, label_names: Sequence[str], targets: np.ndarray | None = None,
                           spread_tol: float = DEGENERATE_SPREAD, tied_tol: float = DEGENERATE_TIED) -> dict:
    """Labels whose scores carry no ranking, ``{label: {"spread", "tied_fraction", "reason"}}``.

    Why: a near-constant model (logits equal to 1e-8) still gets an AUC, from whichever way the
    last bits fall; it differs between two correct implementations (ONNX vs PyTorch, channels-last
    vs contiguous kernels, INT8) by points and means nothing. Only images with a known target for
    the label count (those the AUC uses) when ``targets`` is given.
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = {}
    for j, name in enumerate(label_names):
        col = scores[:, j]
        keep = np.isfinite(col) if targets is None else np.isfinite(col) & ~np.isnan(np.asarray(targets)[:, j])
        col = col[keep]
        if col.size < 2:
            continue
        spread = float(col.max() - col.min())
        tied = float(np.unique(col, return_counts=True)[1].max() / col.size)
        reasons = []
        if spread < spread_tol:
            reasons.append(f"scores span {spread:.2g} (< {spread_tol:g})")
        if tied > tied_tol:
            reasons.append(f"{tied:.0%} of the images share one score")
        if reasons:
            out[str(name)] = {"spread": spread, "tied_fraction": round(tied, 6), "reason": "; ".join(reasons)}
    return out


def warn_degenerate(found: dict, context: str) -> None:
    """One logged warning naming the degenerate labels (from :func:`degenerate_predictions`)."""
    if found:
        detail = "; ".join(f"{k}: {v['reason']}" for k, v in sorted(found.items()))
        log.warning("degenerate predictions in %s for %d label(s): their AUC comes from rounding and "
                    "tie-breaking, not from the model (%s)", context, len(found), detail)


def scorable_labels(targets: np.ndarray) -> np.ndarray:
    """Labels with both a positive and a negative image on the full split: the labels every resample
    averages over (a resample that loses a label's positives scores it NaN and drops it alone)."""
    return np.nansum(targets == 1, axis=0).astype(bool) & np.nansum(targets == 0, axis=0).astype(bool)


def resampled_mean_auc(targets: np.ndarray, scores: np.ndarray, valid: np.ndarray, idx: np.ndarray | None) -> float:
    """Mean AUC over the ``valid`` labels of the images ``idx`` (a patient resample; None: all images)."""
    t = targets if idx is None else targets[idx]
    s = np.asarray(scores, np.float64)
    auc = np.where(valid, auc_per_label(t, s if idx is None else s[idx]), np.nan)
    return float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")


def paired_bootstrap(targets: np.ndarray, scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray],
                     patient_ids: Sequence[str], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean-AUC difference B - A on the same images, averaged over the runs (seeds) of each arm.

    Every resample of patients is applied to all runs at once (paired), so the CI reflects the
    evaluation set's sampling; per-seed differences are reported alongside. ``p_le_zero`` is the
    fraction of resamples where the gain is <= 0 (a one-sided bootstrap p-value).
    """
    targets = np.asarray(targets, dtype=np.float64)
    if not scores_a or not scores_b:
        raise InvalidArgumentError("paired_bootstrap needs at least one run in each arm")
    for s in (*scores_a, *scores_b):
        if np.shape(s) != targets.shape:
            raise InvalidArgumentError(f"scores {np.shape(s)} do not match targets {targets.shape}")
    valid = scorable_labels(targets)

    def mean_aucs(idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([resampled_mean_auc(targets, s, valid, idx) for s in scores_a]),
                np.array([resampled_mean_auc(targets, s, valid, idx) for s in scores_b]))

    a0, b0 = mean_aucs(None)
    deltas = np.full(n_boot, np.nan)
    seed_deltas = np.full((n_boot, min(len(a0), len(b0))), np.nan)
    for k, idx in enumerate(patient_resamples(patient_ids, n_boot, seed)):
        a, b = mean_aucs(idx)
        deltas[k] = b.mean() - a.mean()
        if len(a) == len(b):
            seed_deltas[k] = b - a
    lo, hi = _interval(deltas, level)
    out = {"delta_mean_auc": _f(b0.mean() - a0.mean()), "ci_low": _f(lo), "ci_high": _f(hi),
           "p_le_zero": _f(float(np.mean(deltas[np.isfinite(deltas)] <= 0))) if np.isfinite(deltas).any() else None,
           "mean_auc_a": [_f(v) for v in a0], "mean_auc_b": [_f(v) for v in b0],
           "mean_auc_a_avg": _f(a0.mean()), "mean_auc_b_avg": _f(b0.mean()),
           "seed_std_a": _f(a0.std(ddof=1)) if len(a0) > 1 else None,
           "seed_std_b": _f(b0.std(ddof=1)) if len(b0) > 1 else None,
           "n_images": int(targets.shape[0]), "n_patients": int(len(set(patient_ids))), "n_boot": n_boot,
           "seed": seed, "level": level, "resampling": "patients (paired across all runs)"}
    if len(a0) == len(b0):
        out["per_seed"] = [{"delta": _f(b0[k] - a0[k]), "ci_low": _f(_interval(seed_deltas[:, k], level)[0]),
                            "ci_high": _f(_interval(seed_deltas[:, k], level)[1])} for k in range(len(a0))]
    return out


# ============================================================================ pointing game
def argmax_point(cam: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the CAM's maximum; with a plateau, the plateau pixel nearest its centroid.
    None for a map with no positive evidence (all zero): counted as a miss."""
    peak = float(cam.max())
    if not np.isfinite(peak) or peak <= 0:
        return None
    ys, xs = np.nonzero(cam >= peak)
    if ys.size == 1:
        return int(ys[0]), int(xs[0])
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[k]), int(xs[k])


def point_in_box(point: tuple[int, int] | None, box: tuple[float, float, float, float], tolerance: float = 0.0) -> bool:
    """Pixel (row, col) -- its centre (col + 0.5, row + 0.5) -- inside box (x, y, w, h) grown by ``tolerance`` px."""
    if point is None:
        return False
    r, c = point
    x, y, w, h = box
    cx, cy = c + 0.5, r + 0.5
    return (x - tolerance <= cx <= x + w + tolerance) and (y - tolerance <= cy <= y + h + tolerance)


def random_point_rate(box: tuple[float, float, float, float], image_hw: tuple[int, int],
                      tolerance: float = 0.0) -> float:
    """Hit probability of a uniformly random point: (box grown by tolerance, clipped) area / image area."""
    x, y, w, h = box
    hh, ww = image_hw
    x0, x1 = max(0.0, x - tolerance), min(float(ww), x + w + tolerance)
    y0, y1 = max(0.0, y - tolerance), min(float(hh), y + h + tolerance)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / float(hh * ww)


def cell_centres(image_hw: tuple[int, int], grid: int) -> list[tuple[int, int]]:
    """(row, col) pixel of each cell centre of a grid x grid partition of the image."""
    h, w = image_hw
    return [(int((r + 0.5) * h / grid), int((c + 0.5) * w / grid)) for r in range(grid) for c in range(grid)]


def best_fixed_cell(train_boxes: Sequence[tuple[str, tuple[float, float, float, float]]], image_hw: tuple[int, int],
                    grid: int, tolerance: float = 0.0) -> dict[str, tuple[int, int]]:
    """Per finding, the grid cell whose centre hits the most *training* boxes of that finding
    (and ``"*"``: the best cell over all findings, for findings without training boxes)."""
    cells = cell_centres(image_hw, grid)
    by: dict[str, list] = defaultdict(list)
    for finding, box in train_boxes:
        by[finding].append(box)
        by["*"].append(box)
    out = {}
    for finding, bxs in by.items():
        counts = [sum(point_in_box(c, b, tolerance) for b in bxs) for c in cells]
        out[finding] = cells[int(np.argmax(counts))]
    if "*" not in out:
        out["*"] = (image_hw[0] // 2, image_hw[1] // 2)
    return out


def fixed_point_hits(boxes: Sequence[tuple[float, float, float, float]], findings: Sequence[str],
                     image_hw: Sequence[tuple[int, int]], points: dict[str, tuple[int, int]] | None = None,
                     tolerance: float = 0.0) -> np.ndarray:
    """Hits of a fixed point per box: the image centre (``points`` None) or each finding's chosen cell."""
    out = []
    for b, f, hw in zip(boxes, findings, image_hw):
        pt = (hw[0] // 2, hw[1] // 2) if points is None else points.get(f, points["*"])
        out.append(point_in_box(pt, b, tolerance))
    return np.array(out, dtype=np.float64)


def pointing_game(cams: Sequence[np.ndarray], boxes: Sequence[tuple[float, float, float, float]],
                  findings: Sequence[str], groups: Sequence[str] | None = None, tolerance: float = 0.0,
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                  baselines: dict[str, np.ndarray] | None = None) -> dict:
    """Hit rate of CAM maxima in boxes (one CAM per (image, finding) box), the random-point baseline,
    and bootstrap CIs resampling ``groups`` (patients; default: each box its own group).

    ``baselines``: name -> per-box hits of a fixed strategy (centre point, best fixed cell); each
    gets its hit rate with a CI and the model's paired gain over it with a CI, overall and per finding.
    """
    if not (len(cams) == len(boxes) == len(findings)):
        raise InvalidArgumentError("pointing_game: one CAM and one finding per box")
    baselines = {k: np.asarray(v, np.float64) for k, v in (baselines or {}).items()}
    hits = np.array([point_in_box(argmax_point(c), b, tolerance) for c, b in zip(cams, boxes)], dtype=np.float64)
    base = np.array([random_point_rate(b, c.shape, tolerance) for c, b in zip(cams, boxes)], dtype=np.float64)
    is_flat = np.array([argmax_point(c) is None for c in cams], dtype=bool)
    flat = int(is_flat.sum())
    groups = list(groups) if groups is not None else [str(i) for i in range(len(boxes))]

    def summary(sel: np.ndarray) -> dict:
        h, r, g = hits[sel], base[sel], [groups[i] for i in np.flatnonzero(sel)]
        if h.size == 0:
            return {"n": 0}
        bh, br = [], []
        bb: dict[str, list] = {k: [] for k in baselines}
        for idx in patient_resamples(g, n_boot, seed):
            bh.append(h[idx].mean())
            br.append(r[idx].mean())
            for k, v in baselines.items():
                bb[k].append(v[sel][idx].mean())
        bh, br = np.array(bh), np.array(br)
        extra = {}
        for k, v in baselines.items():
            arr = np.array(bb[k])
            extra[k] = {"hit_rate": _f(v[sel].mean()), "ci_low": _f(_interval(arr, level)[0]),
                        "ci_high": _f(_interval(arr, level)[1]),
                        "model_gain_ci": [_f(x) for x in _interval(bh - arr, level)]}
        return {"n": int(h.size), "flat": int(is_flat[sel].sum()), "hit_rate": _f(h.mean()), "baselines": extra,
                "ci_low": _f(_interval(bh, level)[0]),
                "ci_high": _f(_interval(bh, level)[1]), "random_baseline": _f(r.mean()),
                "baseline_ci_low": _f(_interval(br, level)[0]), "baseline_ci_high": _f(_interval(br, level)[1]),
                "gain_over_random_ci": [_f(v) for v in _interval(bh - br, level)]}

    names = np.asarray(findings)
    out = {"overall": summary(np.ones(len(boxes), dtype=bool)), "tolerance_px": tolerance, "flat_cams": flat,
           "per_finding": {f: summary(names == f) for f in sorted(set(findings))}, "n_boot": n_boot, "seed": seed}
    out["hits"] = hits.astype(int).tolist()
    return out


# ============================================================================ scoring models
def _f(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def predict(predictor, images, cache_indices: Sequence[int], batch_size: int = 64,
            with_features: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Logits (N x L) of clean images, and per-image features (C x h x w) when asked."""
    from models.data import preprocess_batch

    logits, feats = [], [] if with_features else None
    idx = list(cache_indices)
    for b in range(0, len(idx), batch_size):
        lo, fe = predictor.run(preprocess_batch(images, idx[b:b + batch_size], predictor.spec))
        logits.append(np.asarray(lo, np.float32))
        if with_features:
            if fe is None:
                raise InvalidArgumentError(f"{predictor.name} has no features output: no CAM possible")
            feats.extend(np.asarray(fe, np.float32))
    return np.concatenate(logits) if logits else np.zeros((0, 0), np.float32), feats


def calibration_errors(targets: np.ndarray, logits: np.ndarray, label_names: Sequence[str],
                       temperatures: Sequence[float] | None = None) -> dict:
    """Expected calibration error (10 equal-width bins) per label of the model's probabilities; for a
    bundle with temperature scaling also of its untempered probabilities (logits x T), so the card can
    show what the temperatures did on images they were not fitted on."""
    from cxr_edge.temperature import ECE_BINS, expected_calibration_error

    z = np.asarray(logits, np.float64)
    t = np.asarray(targets, np.float64)
    out: dict = {"bins": ECE_BINS, "per_label": {}}
    raw = z * np.asarray(temperatures, np.float64) if temperatures is not None else None
    for j, name in enumerate(label_names):
        entry = {"ece": round(expected_calibration_error(sigmoid(z[:, j]), t[:, j]), 4)}
        if raw is not None:
            entry["ece_without_temperature"] = round(expected_calibration_error(sigmoid(raw[:, j]), t[:, j]), 4)
            entry["temperature"] = float(temperatures[j])
        out["per_label"][name] = entry
    out["mean_ece"] = round(float(np.nanmean([e["ece"] for e in out["per_label"].values()])), 4)
    if raw is not None:
        out["mean_ece_without_temperature"] = round(float(np.nanmean(
            [e["ece_without_temperature"] for e in out["per_label"].values()])), 4)
    return out


def operating_points(targets: np.ndarray, probs: np.ndarray, thresholds: Sequence[float | None],
                     patient_ids: Sequence[str], label_names: Sequence[str], n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Per decided label: sensitivity, specificity, PPV and flag rate at its threshold, with
    patient-bootstrap CIs; and mean flags per image vs mean true labels per image (decided labels,
    and all labels), the over-flagging check."""
    t = np.asarray(targets, np.float64)
    p = np.asarray(probs, np.float64)
    decided = [j for j, v in enumerate(thresholds) if v is not None]
    thr = np.array([thresholds[j] for j in decided], dtype=np.float64)
    flags = p[:, decided] >= thr

    def stats(idx: np.ndarray) -> np.ndarray:  # labels x (sens, spec, ppv, flag rate)
        f, y = flags[idx], t[idx][:, decided]
        pos, neg = y == 1, y == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = (f & pos).sum(0) / pos.sum(0)
            spec = 1.0 - (f & neg).sum(0) / neg.sum(0)
            ppv = (f & pos).sum(0) / f.sum(0)
        return np.stack([sens, spec, ppv, f.mean(0)], axis=1)

    point = stats(np.arange(len(t)))
    boot = np.stack([stats(idx) for idx in patient_resamples(list(patient_ids), n_boot, seed)])
    per_label = {}
    for k, j in enumerate(decided):
        entry = {"threshold": _f(thr[k]), "positives": int(np.nansum(t[:, j])), "prevalence": _f(np.nanmean(t[:, j]))}
        for m, name in enumerate(("sensitivity", "specificity", "ppv", "flag_rate")):
            lo, hi = _interval(boot[:, k, m][np.isfinite(boot[:, k, m])], level) if np.isfinite(
                boot[:, k, m]).any() else (np.nan, np.nan)
            entry[name] = {"value": _f(point[k, m]), "ci_low": _f(lo), "ci_high": _f(hi)}
        per_label[label_names[j]] = entry
    fpi = flags.sum(axis=1)
    return {"per_label": per_label, "undetermined": [label_names[j] for j, v in enumerate(thresholds) if v is None],
            "flags_per_image": _f(fpi.mean()),
            "true_labels_per_image_decided": _f(np.nansum(t[:, decided], axis=1).mean()),
            "true_labels_per_image_all": _f(np.nansum(t, axis=1).mean()),
            "flag_ratio_decided": _f(fpi.mean() / max(1e-12, np.nansum(t[:, decided], axis=1).mean())),
            "flag_ratio_all": _f(fpi.mean() / max(1e-12, np.nansum(t, axis=1).mean())),
            "n_images": int(len(t)), "n_patients": int(len(set(patient_ids)))}


def box_cams(predictor, images, table, boxes, label_names: Sequence[str], batch_size: int = 32):
    """CAMs (image grid) for every box whose image is in ``table`` and whose finding is a label."""
    head = predictor.head()
    if head is None:
        raise InvalidArgumentError(f"{predictor.name}: classifier weights unknown, cannot build CAMs")
    weights = head[0]
    column = {n: j for j, n in enumerate(label_names)}
    row = {img: k for k, img in enumerate(table.image_ids)}
    wanted = [b for b in boxes if b.image in row and FINDING_TO_LABEL.get(b.finding, b.finding) in column]
    unmapped = sorted({b.finding for b in boxes if FINDING_TO_LABEL.get(b.finding, b.finding) not in column})
    by_image: dict[str, list] = defaultdict(list)
    for b in wanted:
        by_image[b.image].append(b)
    order = sorted(by_image)
    cams, out_boxes, findings, groups = [], [], [], []
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        ci = [images.index(img) for img in chunk]
        _, feats = predict(predictor, images, ci, batch_size=batch_size, with_features=True)
        for img, c, f in zip(chunk, ci, feats):
            hw = images.raw(c).shape
            for b in by_image[img]:
                label = FINDING_TO_LABEL.get(b.finding, b.finding)
                cams.append(class_activation_map(f, weights[column[label]], out_hw=hw))
                out_boxes.append((b.x, b.y, b.w, b.h))
                findings.append(label)
                groups.append(table.patient_ids[row[img]])
    return cams, out_boxes, findings, groups, unmapped


def evaluate_logits(targets: np.ndarray, logits: np.ndarray, patient_ids: Sequence[str], label_names: Sequence[str],
                    n_boot: int = 1000, seed: int = 0, context: str = "evaluation") -> dict:
    """The metrics.json body for one model's logits on one image set: per-label AUC with patient
    bootstrap CIs (``cxr_edge.operating_points``, the one implementation), and the degenerate labels
    (``degenerate_labels``, ``per_label[...]["degenerate_predictions"]``; a logged warning)."""
    metrics = bootstrap_auc(targets, logits, patient_ids, label_names, n_boot=n_boot, seed=seed)
    found = degenerate_predictions(logits, label_names, targets)
    for name, entry in metrics["per_label"].items():
        entry["degenerate_predictions"] = name in found
    metrics["degenerate_labels"] = sorted(found)
    metrics["degenerate_predictions"] = found
    metrics["degenerate_rule"] = {"spread_below": DEGENERATE_SPREAD, "tied_fraction_above": DEGENERATE_TIED}
    warn_degenerate(found, context)
    return metrics


def format_table(metrics: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'label':<20}{'AUC':>7}  {'95% CI':<17}{'pos':>5}")
    for name, m in metrics["per_label"].items():
        auc = "   n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        ci = "" if m["ci_low"] is None else f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        lines.append(f"{name:<20}{auc:>7}  {ci:<17}{m['n_pos']:>5}")
    mean, lo, hi = metrics["mean_auc"], metrics["mean_ci_low"], metrics["mean_ci_high"]
    lines.append(f"{'mean AUC':<20}" + ("    n/a" if mean is None else f"{mean:>7.3f}")
                 + ("" if lo is None else f"  [{lo:.3f}, {hi:.3f}]")
                 + f"  ({metrics['n_images']} images, {metrics['n_patients']} patients"
                 + (f"; skipped {metrics['skipped_labels']}" if metrics["skipped_labels"] else "") + ")")
    if metrics.get("degenerate_labels"):
        lines.append(f"WARNING degenerate predictions (AUC from rounding/ties, not the model): "
                     f"{', '.join(metrics['degenerate_labels'])}")
    pg = metrics.get("pointing_game")
    if pg:
        o = pg["overall"]
        lines.append(f"pointing game: {o['hit_rate']:.3f} [{o['ci_low']:.3f}, {o['ci_high']:.3f}] on {o['n']} boxes; "
                     f"random point {o['random_baseline']:.3f}; flat CAMs {pg['flat_cams']}")
        for name, b in o.get("baselines", {}).items():
            lines.append(f"  baseline {name:<22}{b['hit_rate']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]  "
                         f"model gain CI [{b['model_gain_ci'][0]:+.3f}, {b['model_gain_ci'][1]:+.3f}]")
        for f, s in pg["per_finding"].items():
            if s["n"]:
                base = "  ".join(f"{k.replace('best_fixed_cell_', 'cell')} {v['hit_rate']:.2f}"
                                 for k, v in s.get("baselines", {}).items())
                lines.append(f"  {f:<18}{s['hit_rate']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] n={s['n']:<4}"
                             f"random {s['random_baseline']:.3f}  flat {s['flat']}  {base}")
    op = metrics.get("operating_points")
    if op:
        lines.append(f"operating points ({op['n_images']} images): flags/image {op['flags_per_image']:.2f} vs true "
                     f"labels/image {op['true_labels_per_image_all']:.2f} (decided labels "
                     f"{op['true_labels_per_image_decided']:.2f}); undetermined {op['undetermined']}")
        for name, e in op["per_label"].items():
            def v(k):
                x = e[k]
                return "  n/a" if x["value"] is None else f"{x['value']:.2f}"
            lines.append(f"  {name:<18} thr {e['threshold']:.3f}  sens {v('sensitivity')}  spec {v('specificity')}"
                         f"  ppv {v('ppv')}  flag rate {v('flag_rate')} (prevalence {e['prevalence']:.2f})")
    return "\n".join(lines)


def load_predictions(run_or_file: str | os.PathLike) -> dict:
    path = Path(run_or_file)
    path = path / "predictions.npz" if path.is_dir() else path
    if not path.is_file():
        raise InvalidArgumentError(f"no predictions at {path}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ============================================================================ CLI
def write_json(path: str | os.PathLike, result: dict) -> None:
    """A result file as every subcommand writes it (strict JSON: a NaN is a bug, not a value), and says so."""
    Path(path).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")


def _score(args: argparse.Namespace) -> int:
    from models.config import TrainConfig
    from models.data import ImageCache
    from models.datasets import read_bboxes
    from models.distill import load_predictor
    from models.runs import image_paths, load_table, split_indices

    source = Path(args.source)
    is_run = source.is_dir()
    config = Path(args.config) if args.config else (source / "config.json" if is_run else None)
    cfg = TrainConfig.load(config) if config else TrainConfig()
    if args.data_root:
        cfg.data_root = args.data_root
    if args.shared_dir:
        cfg.shared_dir = args.shared_dir
    import torch

    # the run's threads and eval batch size by default: the same kernels as training's evaluation
    torch.set_num_threads(args.threads or cfg.threads or min(2, os.cpu_count() or 1))
    batch_size = args.batch_size or cfg.eval_batch_size
    args.bootstrap = args.bootstrap or (cfg.bootstrap if config else 1000)
    table = load_table(cfg)
    if args.images:
        wanted = set(read_image_list(args.images))
        eval_idx = np.array([k for k, i in enumerate(table.image_ids) if i in wanted], dtype=np.int64)
    else:
        eval_idx = split_indices(cfg, table)[2]
    sub = table.subset(eval_idx)
    images = ImageCache(image_paths(sub), sub.image_ids, cfg.cache_dtype)
    pred = load_predictor(str(source), spec=cfg.teacher_spec(), num_classes=len(table.label_names),
                          threads=args.threads or None, checkpoint=args.checkpoint)
    if pred.labels is not None and tuple(pred.labels) != tuple(table.label_names):
        raise InvalidArgumentError(f"{pred.name}: its labels {pred.labels} are not the table's {table.label_names}")
    logits, _ = predict(pred, images, range(len(images)), batch_size=batch_size)
    metrics = evaluate_logits(sub.targets, logits, sub.patient_ids, table.label_names, args.bootstrap, args.seed,
                              context=f"{pred.name} on {len(images)} images")
    metrics["dataset"] = cfg.dataset
    metrics["model"] = {"source": str(source), "name": pred.name, "checksum": pred.checksum,
                        "input_size": list(pred.spec.input_size)}
    if args.pointing_game:
        boxes = read_bboxes(args.bbox or cfg.data_path() / "bbox.csv")
        cams, bxs, findings, groups, unmapped = box_cams(pred, images, sub, boxes, table.label_names)
        hw = [c.shape for c in cams]
        eval_ids = set(sub.image_ids)
        train_boxes = [(FINDING_TO_LABEL.get(b.finding, b.finding), (b.x, b.y, b.w, b.h)) for b in boxes
                       if b.image not in eval_ids]
        base = {"centre_point": fixed_point_hits(bxs, findings, hw, None, args.tolerance)}
        chosen = {}
        size = hw[0] if hw else (320, 320)
        for grid in sorted({4, *args.fixed_grid}):
            pts = best_fixed_cell(train_boxes, size, grid, args.tolerance)
            chosen[f"best_fixed_cell_{grid}x{grid}"] = {k: list(v) for k, v in pts.items()}
            base[f"best_fixed_cell_{grid}x{grid}"] = fixed_point_hits(bxs, findings, hw, pts, args.tolerance)
        pg = pointing_game(cams, bxs, findings, groups, tolerance=args.tolerance, n_boot=args.bootstrap,
                           seed=args.seed, baselines=base)
        pg["unmapped_findings"] = unmapped
        pg["baseline_cells_chosen_on"] = f"{len(train_boxes)} boxes of images outside the evaluation set"
        pg["baseline_cells"] = chosen
        metrics["pointing_game"] = pg
    metrics["calibration"] = calibration_errors(sub.targets, logits, table.label_names,
                                                getattr(pred, "temperatures", None))
    thresholds = getattr(pred, "thresholds", None)
    if thresholds is not None:
        metrics["operating_points"] = operating_points(sub.targets, sigmoid(logits), thresholds,
                                                       sub.patient_ids, table.label_names, args.bootstrap, args.seed)
    print(format_table(metrics, title=f"{pred.name}: {len(images)} evaluation images"))
    out = Path(args.out) if args.out else (source / "eval.json" if is_run else Path(f"eval-{pred.name}.json"))
    out.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    if args.save_predictions:
        np.savez(args.save_predictions, image_ids=np.array(sub.image_ids), logits=logits, targets=sub.targets,
                 patient_ids=np.array(sub.patient_ids), label_names=np.array(table.label_names))
    print(f"wrote {out}")
    return 0


def calibration_auc(run: str | os.PathLike) -> float:
    """The calibration-split mean AUC of the checkpoint a run shipped ('best on validation': the highest
    epoch's; a run without validation has none and cannot be selected this way; a soup: its soup.json)."""
    import torch

    soup = Path(run) / "soup.json"
    if soup.is_file():  # a weight average (models.soup) records the calibration AUC of what it wrote
        return float(json.loads(soup.read_text())["calibration_mean_auc"])
    metrics = Path(run) / "metrics.json"  # runs since session 18 (and an EMA run's raw/ twin) record it there
    recorded = json.loads(metrics.read_text()).get("calibration_mean_auc") if metrics.is_file() else None
    if recorded is not None:
        return float(recorded)
    path, key = Path(run) / "last.pt", "val_mean_auc"
    if not path.is_file() and Path(run).name == "raw" and (Path(run).parent / "last.pt").is_file():
        path, key = Path(run).parent / "last.pt", "raw_val_mean_auc"  # an EMA run's twin, in its parent's history
    if not path.is_file():
        raise InvalidArgumentError(f"{run}: no last.pt (not a finished models.train run)")
    history = torch.load(path, map_location="cpu", weights_only=False).get("history") or []
    values = [h[key] for h in history if h.get(key) is not None]
    if not values:
        raise InvalidArgumentError(f"{run}: no calibration-split AUC in its history (trained without --val-fraction?)")
    return float(max(values))


def _select(args: argparse.Namespace) -> int:
    """Pre-registered rule: ship the run with the highest calibration-split mean AUC (ties: the first named)."""
    parts = [Path(r).resolve().parts for r in args.runs]
    for k in range(1, max(map(len, parts)) + 1):  # the shortest path tails that tell the runs apart
        names = ["/".join(q[-k:]) for q in parts]  # (several EMA runs' raw/ twins: by their parents)
        if len(set(names)) == len(names):
            break
    scores = {n: round(calibration_auc(r), 5) for n, r in zip(names, args.runs)}
    chosen = max(scores, key=lambda k: scores[k])
    out = {"rule": "highest calibration-split mean AUC of the chosen checkpoint (the evaluation split is not read)",
           "calibration_mean_auc": scores, "chosen": chosen, "runs": dict(zip(names, map(str, args.runs)))}
    if args.incumbent:  # the shipped bundle stays unless the choice beats it on the same split
        incumbent = round(bundle_calibration_auc(args.incumbent), 5)
        out["incumbent"] = {"bundle": Path(args.incumbent).name, "calibration_mean_auc": incumbent}
        out["ships"] = scores[chosen] > incumbent
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, v in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{name:<24} calibration mean AUC {v:.4f}{'   <- chosen' if name == chosen else ''}")
    if args.incumbent:
        print(f"{'incumbent (shipped)':<24} calibration mean AUC {out['incumbent']['calibration_mean_auc']:.4f}"
              f"   -> {'the choice ships' if out['ships'] else 'nothing ships (the incumbent stays)'}")
    return 0


def bundle_calibration_auc(bundle: str | os.PathLike) -> float:
    """A shipped bundle's calibration-split mean AUC: export fits its thresholds on that split and records each
    label's AUC there, so the bundle itself says what a new candidate must beat."""
    from cxr_edge.bundle import read_manifest

    per_label = (read_manifest(Path(bundle).read_bytes()).provenance.get("thresholds") or {}).get("per_label") or {}
    aucs = [v["auc"]["auc"] for v in per_label.values() if (v.get("auc") or {}).get("auc") is not None]
    if not aucs:
        raise InvalidArgumentError(f"{bundle}: its manifest records no calibration-split AUCs (exported without a "
                                   "labelled calibration split)")
    return float(np.mean(aucs))


def _teacher(args: argparse.Namespace) -> int:
    """AUC of a teacher on the evaluation images it covers: the mean probability of several runs'
    predictions (a cross-fitted ensemble) and/or a CSV of cached probabilities (rows it has)."""
    from models.distill import CsvTeacher

    ref = load_predictions(args.reference)
    ids = [str(i) for i in ref["image_ids"]]
    labels = [str(v) for v in ref["label_names"]]
    probs = []
    for run in args.runs or []:
        p = load_predictions(run)
        if [str(i) for i in p["image_ids"]] != ids:
            raise InvalidArgumentError(f"{run}: evaluated on other images than {args.reference}")
        probs.append(sigmoid(p["logits"]))
    for path in args.csv or []:
        lo = CsvTeacher(path, labels).logits(ids).astype(np.float64)
        probs.append(sigmoid(lo))
    if not probs:
        raise InvalidArgumentError("give --runs and/or --csv")
    mean = np.mean(np.stack(probs), axis=0)
    keep = np.isfinite(mean).all(axis=1)
    targets, pids = ref["targets"][keep], [str(v) for v in ref["patient_ids"][keep]]
    metrics = evaluate_logits(targets, mean[keep], pids, labels, args.bootstrap, args.seed)
    metrics["teacher"] = {"runs": list(args.runs or []), "csv": list(args.csv or []), "combine": "mean probability",
                          "images_covered": int(keep.sum()), "images_in_split": len(ids)}
    if args.student and keep.sum() < len(ids):
        st = load_predictions(args.student)
        if [str(i) for i in st["image_ids"]] != ids:
            raise InvalidArgumentError(f"{args.student}: evaluated on other images than {args.reference}")
        same = evaluate_logits(targets, st["logits"][keep], pids, labels, args.bootstrap, args.seed)
        metrics["student_on_same_images"] = {k: same[k] for k in ("mean_auc", "mean_ci_low", "mean_ci_high")}
    print(format_table(metrics, title=f"teacher on {int(keep.sum())} of {len(ids)} evaluation images"))
    write_json(args.out, metrics)
    return 0


def _compare(args: argparse.Namespace) -> int:
    runs_a = [load_predictions(p) for p in args.a]
    runs_b = [load_predictions(p) for p in args.b]
    ref = runs_a[0]
    for p, r in zip([*args.a, *args.b], [*runs_a, *runs_b]):
        if not np.array_equal(r["image_ids"], ref["image_ids"]) or not np.array_equal(r["label_names"],
                                                                                    ref["label_names"]):
            raise InvalidArgumentError(f"{p}: evaluated on other images or labels than {args.a[0]}; not paired")
    res = paired_bootstrap(ref["targets"], [r["logits"] for r in runs_a], [r["logits"] for r in runs_b],
                           [str(p) for p in ref["patient_ids"]], n_boot=args.bootstrap, seed=args.seed)
    res["a"], res["b"] = [str(p) for p in args.a], [str(p) for p in args.b]
    print(f"A: {', '.join(res['a'])}\nB: {', '.join(res['b'])}")
    print(f"mean AUC A per run {res['mean_auc_a']} (avg {res['mean_auc_a_avg']})")
    print(f"mean AUC B per run {res['mean_auc_b']} (avg {res['mean_auc_b_avg']})")
    for k, s in enumerate(res.get("per_seed", [])):
        print(f"  run pair {k}: B - A = {s['delta']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]")
    print(f"gain B - A (mean over runs) = {res['delta_mean_auc']:+.4f}, 95% CI [{res['ci_low']:+.4f}, "
          f"{res['ci_high']:+.4f}], P(gain <= 0) = {res['p_le_zero']} ({res['n_patients']} patients, "
          f"{res['n_boot']} paired resamples)")
    if args.out:
        write_json(args.out, res)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="AUC (+CIs) and optionally the pointing game of one model")
    s.add_argument("source", help="run directory, .onnx (teacher or bundle) or registry_name:weights.pt")
    s.add_argument("--images", help="CSV with an 'image' column (default: the run's / teacher split's eval set)")
    s.add_argument("--config", help="TrainConfig JSON giving the dataset and split (default: the run's own "
                                    "config.json; for a .onnx source: the NIH sample defaults)")
    s.add_argument("--data-root")
    s.add_argument("--shared-dir")
    s.add_argument("--checkpoint", default="final", choices=("final", "best", "last"))
    s.add_argument("--pointing-game", action="store_true")
    s.add_argument("--bbox", help="bbox.csv (default: <data-root>/bbox.csv)")
    s.add_argument("--tolerance", type=float, default=0.0, help="pointing-game box tolerance in image pixels")
    s.add_argument("--fixed-grid", type=int, nargs="*", default=[7],
                   help="grids of the best-fixed-cell baselines besides 4x4 (default: 7, the CAM grid)")
    s.add_argument("--bootstrap", type=int, default=0, help="patient resamples (default: the run's, else 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=0, help="default: the run's eval_batch_size (64)")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--out", help="JSON output (default: <run>/eval.json or eval-<name>.json)")
    s.add_argument("--save-predictions", help="also write an .npz of ids/logits/targets")
    c = sub.add_parser("compare", help="paired bootstrap of the mean-AUC gain B - A (e.g. KD vs plain)")
    c.add_argument("--a", nargs="+", required=True, help="run dirs or predictions.npz of arm A (baseline)")
    c.add_argument("--b", nargs="+", required=True, help="run dirs or predictions.npz of arm B")
    c.add_argument("--bootstrap", type=int, default=1000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out")
    t = sub.add_parser("teacher", help="AUC of a cross-fitted run ensemble and/or a CSV teacher on the eval images")
    t.add_argument("--reference", required=True, help="run dir / predictions.npz whose evaluation images and labels "
                                                      "are used")
    t.add_argument("--runs", nargs="*", help="run dirs averaged (mean probability)")
    t.add_argument("--csv", nargs="*", help="cached-probability CSV teachers (only the images they cover)")
    t.add_argument("--student", help="also score this run's predictions on the covered images")
    t.add_argument("--bootstrap", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    sel = sub.add_parser("select", help="choose the run to ship by its calibration-split AUC (never the evaluation's)")
    sel.add_argument("runs", nargs="+", help="run directories (each with last.pt from models.train)")
    sel.add_argument("--out", required=True, help="selection JSON (rule, every run's calibration AUC, the choice)")
    sel.add_argument("--incumbent", help="the shipped bundle: the choice ships only if its calibration AUC is higher")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "teacher":
            return _teacher(args)
        if args.cmd == "select":
            return _select(args)
        return _score(args) if args.cmd == "score" else _compare(args)
    except CxrEdgeError as exc:  # bad arguments, a bad label file (LabelFileError), an unreadable image
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
