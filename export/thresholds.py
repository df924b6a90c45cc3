"""Per-label operating points chosen on a calibration set (neither training nor reporting images).

Rules (``method``):
  * ``breakeven`` - the threshold where the flag rate equals the label's prevalence (precision =
    recall on the calibration set): the model flags about as many images as carry the finding,
    so flags per image track true labels per image. The default.
  * ``f1`` - the threshold maximising F1 (precision/recall harmonic mean).
  * ``youden`` - the threshold maximising sensitivity + specificity - 1 (weighs a miss and a false
    alarm equally; flags far more than the prevalence when a finding is rare).
  * ``specificity`` - the lowest threshold whose specificity is at least ``target`` (a fixed
    false-alarm budget); ``sensitivity`` - the highest threshold with sensitivity >= ``target``.
  * ``fixed`` - 0.5 everywhere (no data).

A label gets **no decision** (threshold None: "undetermined" in the manifest and the output) when
the calibration set holds fewer than ``min_positive_patients`` distinct positive patients, or when
the lower end of its AUC's 95% patient-bootstrap interval is not above 0.5: a threshold fitted on
a handful of patients, or on a score no better than chance, would be noise dressed as a decision.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import roc_curve

from cxr_edge.errors import InvalidArgumentError

DEFAULT_THRESHOLD = 0.5
METHODS = ("breakeven", "f1", "youden", "specificity", "sensitivity", "fixed")
_EPS = 1e-4


def _pick(method: str, t: np.ndarray, p: np.ndarray, target: float) -> float:
    """The threshold of ``method`` for 0/1 targets ``t`` and scores ``p`` (both classes present)."""
    if method in ("youden", "sensitivity", "specificity"):
        fpr, tpr, thr = roc_curve(t, p, drop_intermediate=False)
        finite = np.isfinite(thr)
        fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
        if method == "youden":
            return float(thr[int(np.argmax(tpr - fpr))])
        if method == "sensitivity":
            return float(thr[int(np.flatnonzero(tpr >= target)[0])])  # thresholds run high -> low
        ok = np.flatnonzero(1.0 - fpr >= target)
        return float(thr[int(ok[-1])])
    order = np.sort(np.unique(p))[::-1]  # candidate thresholds, high -> low
    flagged = np.array([(p >= c).sum() for c in order], dtype=np.float64)
    tp = np.array([((p >= c) & (t == 1)).sum() for c in order], dtype=np.float64)
    pos = float(t.sum())
    if method == "f1":
        f1 = 2 * tp / (flagged + pos)
        return float(order[int(np.argmax(f1))])
    # breakeven: the flag count closest to the number of positives (the lower threshold on a tie)
    k = int(np.argmin(np.abs(flagged - pos)))
    return float(order[k])


def operating_point(t: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and flag rate of ``p >= threshold`` against 0/1 targets."""
    flag = p >= threshold
    pos, neg = t == 1, t == 0
    tp, fp = int((flag & pos).sum()), int((flag & neg).sum())
    return {"sensitivity": tp / max(1, int(pos.sum())), "specificity": 1.0 - fp / max(1, int(neg.sum())),
            "ppv": tp / int(flag.sum()) if flag.any() else None, "flag_rate": float(flag.mean()),
            "prevalence": float(pos.mean())}


def choose_thresholds(probs: np.ndarray | None, targets: np.ndarray | None, labels: Sequence[str], *,
                      method: str = "breakeven", target: float = 0.9, patient_ids: Sequence[str] | None = None,
                      min_positive_patients: int = 10, require_auc_above_chance: bool = True,
                      n_boot: int = 1000, seed: int = 0,
                      min_sensitivity: float | None = None) -> tuple[tuple[float | None, ...], dict[str, Any]]:
    """Return (thresholds, details); a threshold is None for an undetermined label (module docstring).

    ``probs``/``targets`` are N x L (sigmoid outputs, 0/1 labels, NaN unknown); ``patient_ids``
    (one per row) count positives per patient and drive the AUC bootstrap (default: one patient
    per image). ``min_sensitivity`` is the old name of ``target`` for ``method="sensitivity"``.
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"threshold method must be one of {METHODS}, got {method!r}")
    if min_sensitivity is not None:
        target = min_sensitivity
    if not 0.0 < target <= 1.0:
        raise InvalidArgumentError(f"the rule's target must lie in (0, 1], got {target}")
    n_labels = len(labels)
    details: dict[str, Any] = {"method": method, "per_label": {},
                               "undetermined_rule": {"min_positive_patients": min_positive_patients,
                                                     "auc_ci_low_above_0.5": require_auc_above_chance}}
    if method in ("sensitivity", "specificity"):
        details["target"] = target
    if probs is None or targets is None or method == "fixed":
        details["note"] = "no calibration data (or method 'fixed'): 0.5 for every label"
        return tuple([DEFAULT_THRESHOLD] * n_labels), details
    if probs.shape != targets.shape or probs.shape[1] != n_labels:
        raise InvalidArgumentError(f"probs {probs.shape} / targets {targets.shape} do not match {n_labels} labels")
    pids = np.asarray(list(patient_ids) if patient_ids is not None else [str(i) for i in range(len(targets))])
    if len(pids) != len(targets):
        raise InvalidArgumentError("one patient id per row is required")
    auc = None
    if require_auc_above_chance:
        from models.evaluate import bootstrap_auc

        auc = bootstrap_auc(targets, probs, list(pids), list(labels), n_boot=n_boot, seed=seed)["per_label"]
    details.update(images=int(len(targets)), patients=int(len(set(pids))))
    out: list[float | None] = []
    for j, label in enumerate(labels):
        known = np.isfinite(targets[:, j])
        t, p = targets[known, j], probs[known, j]
        pos_patients = len(set(pids[known][t == 1]))
        entry: dict[str, Any] = {"positives": int(t.sum()), "negatives": int(len(t) - t.sum()),
                                 "positive_patients": pos_patients}
        if auc is not None:
            entry["auc"] = {k: auc[label][k] for k in ("auc", "ci_low", "ci_high")}
        thr: float | None
        if pos_patients < min_positive_patients or t.sum() == len(t):
            entry["undetermined"] = f"{pos_patients} positive patients < {min_positive_patients}"
            thr = None
        elif auc is not None and not (auc[label]["ci_low"] is not None and auc[label]["ci_low"] > 0.5):
            entry["undetermined"] = f"AUC 95% CI [{auc[label]['ci_low']}, {auc[label]['ci_high']}] includes 0.5"
            thr = None
        else:
            thr = float(np.clip(_pick(method, t, p, target), _EPS, 1.0 - _EPS))
            entry.update({k: v for k, v in operating_point(t, p, thr).items()})
        entry["threshold"] = thr
        details["per_label"][label] = entry
        out.append(thr)
    decided = [j for j, v in enumerate(out) if v is not None]
    if decided:
        known_all = np.isfinite(targets[:, decided]).all(axis=1)
        flags = np.stack([probs[:, j] >= out[j] for j in decided], axis=1)[known_all]
        details["flags_per_image"] = float(flags.sum(axis=1).mean())
        details["true_labels_per_image_decided"] = float(np.nansum(targets[known_all][:, decided], axis=1).mean())
    details["true_labels_per_image_all"] = float(np.nansum(targets, axis=1).mean())
    return tuple(out), details
