"""The INT8-vs-fp32 verification gate: no quantized bundle ships unless it keeps accuracy and CAMs.

Criteria (defaults from the issue), measured on a held-out set of real, labelled images:
  * mean ROC AUC change (fp32 - int8, in AUC points = 100 x AUC) at most ``max_auc_drop`` (0.5)
    in absolute value, over the labels that have both classes in the set (two-sided: INT8 noise
    that happens to raise the AUC is no evidence of a faithful model);
  * decisions flipped at the manifest thresholds: at most ``max_flip_rate`` (2%) of the
    (image, decided label) pairs;
  * CAM agreement: Pearson correlation of the fp32 and int8 class activation maps of every
    (image, label) pair, median at least ``min_cam_median`` (0.9). Maps come from
    :func:`cxr_edge.cam.class_activation_map` on the feature grid itself (h x w, the ReLU'd and
    peak-normalised ``W[c] . features``), so upsampling cannot inflate the agreement. Pairs where
    *both* maps are empty (no positive evidence anywhere, common for a trained model's absent
    findings) agree trivially: they are counted but left out of the median, which would otherwise
    read 1.0 while the maps that matter disagree. One empty and one non-empty map counts as r = 0.
Also reported: max / mean |logit| and |probability| differences and the files' sizes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from cxr_edge.cam import class_activation_map
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.operating_points import sigmoid
from models.evaluate import auc_per_label, degenerate_predictions, warn_degenerate

from .errors import QuantizationGateError


@dataclass(frozen=True)
class GateCriteria:
    max_auc_drop: float = 0.5     # |AUC change| in points (0-100 scale): two-sided, a rise is noise too
    min_cam_median: float = 0.9   # Pearson r, median over all (image, label) pairs and over non-empty ones
    max_flip_rate: float = 0.02   # decisions changed at the manifest thresholds, share of (image, label) pairs


def per_label_auc(scores: np.ndarray, targets: np.ndarray) -> list[float | None]:
    """ROC AUC per label; None where the set holds only one class for that label (AUC undefined).

    NaN targets (unknown labels) are left out of that label's AUC.
    """
    if scores.shape != targets.shape:
        raise InvalidArgumentError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    return [None if np.isnan(a) else float(a) for a in auc_per_label(targets, scores)]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two maps; two flat maps agree (1.0) only if equal, a flat and a varying one do not (0.0).

    A flat CAM is all zeros (no positive evidence anywhere): both models saying so is agreement.
    """
    a = a.ravel().astype(np.float64)
    b = b.ravel().astype(np.float64)
    sa, sb = a.std(), b.std()
    if sa == 0.0 or sb == 0.0:
        return 1.0 if sa == sb and np.allclose(a, b) else 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def cam_correlations(feats_ref: np.ndarray, feats_new: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """N x L Pearson correlations of CAMs from two models' features (N x C x h x w); NaN where both are empty."""
    if feats_ref.shape != feats_new.shape or feats_ref.ndim != 4:
        raise InvalidArgumentError(f"feature tensors must be N x C x h x w and equal, got "
                                   f"{feats_ref.shape} and {feats_new.shape}")
    n, _, h, w = feats_ref.shape
    out = np.empty((n, weights.shape[0]), dtype=np.float64)
    for i in range(n):
        for c in range(weights.shape[0]):
            a = class_activation_map(feats_ref[i], weights[c], (h, w))
            b = class_activation_map(feats_new[i], weights[c], (h, w))
            out[i, c] = np.nan if not a.any() and not b.any() else pearson(a, b)
    return out


def compare_models(ref: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], targets: np.ndarray,
                   weights: np.ndarray, labels: Sequence[str],
                   thresholds: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Numbers comparing a candidate (``new``: logits, features) with the reference fp32 model.

    With ``thresholds`` (the manifest's; None = undetermined label), decision flips are counted
    over the decided labels. CAM agreement is reported over *all* pairs (both maps empty = 1, one
    empty and the other not = 0: a disagreement) and over the pairs where both maps are non-empty.
    """
    (l_ref, f_ref), (l_new, f_new) = ref, new
    if l_ref.shape != l_new.shape or l_ref.shape != targets.shape:
        raise InvalidArgumentError(f"logits {l_ref.shape}/{l_new.shape} and targets {targets.shape} must match")
    auc_ref, auc_new = per_label_auc(l_ref, targets), per_label_auc(l_new, targets)
    # a label whose reference logits carry no ranking (near-constant or mostly tied) gets an AUC from
    # tie-breaking noise: a 0.0005 logit difference then reads as a drop of points. Such labels are
    # reported and left out of the AUC change, never counted as a loss or a gain.
    degenerate = degenerate_predictions(l_ref, labels, targets)
    warn_degenerate(degenerate, "INT8 gate (fp32 reference)")
    valid = [j for j, a in enumerate(auc_ref) if a is not None and labels[j] not in degenerate]
    drops = {labels[j]: 100.0 * (auc_ref[j] - auc_new[j]) for j in valid}
    corr_all = cam_correlations(f_ref, f_new, weights)
    corr = corr_all[np.isfinite(corr_all)]
    every = np.where(np.isfinite(corr_all), corr_all, 1.0)
    flips: dict[str, Any] = {}
    if thresholds is not None:
        decided = [j for j, t in enumerate(thresholds) if t is not None]
        flips = {"decision_flip_rate": 0.0, "decision_flips": 0, "decision_pairs": 0}  # nothing decided
        if decided:
            thr = np.array([thresholds[j] for j in decided], dtype=np.float64)
            d_ref = sigmoid(l_ref[:, decided]) >= thr
            d_new = sigmoid(l_new[:, decided]) >= thr
            changed = d_ref != d_new
            flips = {"decision_flip_rate": float(changed.mean()), "decision_flips": int(changed.sum()),
                     "decision_pairs": int(changed.size),
                     "decision_flips_per_label": {labels[j]: int(changed[:, k].sum()) for k, j in enumerate(decided)}}
    dl = np.abs(l_ref - l_new)
    dp = np.abs(sigmoid(l_ref) - sigmoid(l_new))
    return {
        "images": int(len(targets)),
        "labels_with_auc": [labels[j] for j in valid],
        "degenerate_labels": degenerate,
        "mean_auc_ref": float(np.mean([auc_ref[j] for j in valid])) if valid else None,
        "mean_auc_new": float(np.mean([auc_new[j] for j in valid])) if valid else None,
        "mean_auc_drop_points": float(np.mean(list(drops.values()))) if valid else None,
        **flips,
        "cam_pearson_median_all_pairs": float(np.median(every)) if every.size else None,
        "cam_pairs_one_empty": int(np.sum(np.isfinite(corr_all) & (corr_all == 0.0))),
        "auc_drop_points_per_label": drops,
        "cam_pearson_median": float(np.median(corr)) if corr.size else None,
        "cam_pearson_p10": float(np.percentile(corr, 10)) if corr.size else None,
        "cam_pearson_mean": float(np.mean(corr)) if corr.size else None,
        "cam_pairs": int(corr.size), "cam_pairs_both_empty": int(corr_all.size - corr.size),
        "logit_max_abs_diff": float(dl.max()), "logit_mean_abs_diff": float(dl.mean()),
        "prob_max_abs_diff": float(dp.max()), "prob_mean_abs_diff": float(dp.mean()),
    }


def gate(numbers: dict[str, Any], criteria: GateCriteria = GateCriteria()) -> dict[str, Any]:
    """Apply the criteria; returns ``{passed, failures, criteria}``. Never raises (see :func:`enforce`)."""
    failures = []
    drop = numbers.get("mean_auc_drop_points")
    if drop is None:
        failures.append("no label has both classes and a non-degenerate fp32 ranking in the verification set: "
                        "AUC cannot be measured" + (f" (degenerate: {', '.join(numbers['degenerate_labels'])})"
                                                    if numbers.get("degenerate_labels") else ""))
    elif not abs(drop) <= criteria.max_auc_drop:
        failures.append(f"mean AUC change {-drop:+.3f} points: |change| > {criteria.max_auc_drop}")
    flip = numbers.get("decision_flip_rate")
    if flip is not None and not flip <= criteria.max_flip_rate:
        failures.append(f"decision flip rate {flip:.4f} > {criteria.max_flip_rate}")
    med_all = numbers.get("cam_pearson_median_all_pairs")
    if med_all is not None and not med_all >= criteria.min_cam_median:
        failures.append(f"median CAM agreement over all pairs {med_all:.3f} < {criteria.min_cam_median}")
    med = numbers.get("cam_pearson_median")
    if med is None:
        failures.append("every CAM is empty in both models: CAM agreement cannot be measured")
    elif not med >= criteria.min_cam_median:
        failures.append(f"median CAM Pearson r {med:.3f} < {criteria.min_cam_median}")
    return {"passed": not failures, "failures": failures, "criteria": asdict(criteria)}


def enforce(numbers: dict[str, Any], criteria: GateCriteria = GateCriteria()) -> dict[str, Any]:
    """Like :func:`gate` but raises :class:`QuantizationGateError` (with the numbers) on failure."""
    verdict = gate(numbers, criteria)
    if not verdict["passed"]:
        raise QuantizationGateError("INT8 verification gate failed: " + "; ".join(verdict["failures"]),
                                    {**numbers, **verdict})
    return verdict
