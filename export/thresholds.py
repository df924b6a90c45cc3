"""Per-label decision thresholds chosen on a validation set.

Methods:
  * ``youden`` - the probability maximising Youden's J = sensitivity + specificity - 1 on the ROC
    curve: the operating point that weighs a missed finding and a false alarm equally.
  * ``sensitivity`` - the highest threshold whose sensitivity is at least ``min_sensitivity``
    (a screening operating point: few missed findings, more false alarms).
A label without both classes in the set cannot have an ROC curve: it keeps ``DEFAULT_THRESHOLD``
(0.5) and the reason is recorded. Thresholds are clipped into (0, 1) as the manifest requires.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import roc_curve

from cxr_edge.errors import InvalidArgumentError

DEFAULT_THRESHOLD = 0.5
METHODS = ("youden", "sensitivity", "fixed")
_EPS = 1e-4


def choose_thresholds(probs: np.ndarray | None, targets: np.ndarray | None, labels: Sequence[str], *,
                      method: str = "youden", min_sensitivity: float = 0.9,
                      min_positives: int = 3) -> tuple[tuple[float, ...], dict[str, Any]]:
    """Return (thresholds, details). ``probs``/``targets`` are N x L (sigmoid outputs, 0/1 labels).

    ``None`` data or method ``fixed`` gives 0.5 everywhere. A label with fewer than
    ``min_positives`` positives (or negatives) keeps 0.5: a threshold fitted on one or two cases
    would be noise.
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"threshold method must be one of {METHODS}, got {method!r}")
    if not 0.0 < min_sensitivity <= 1.0:
        raise InvalidArgumentError(f"min_sensitivity must lie in (0, 1], got {min_sensitivity}")
    n_labels = len(labels)
    details: dict[str, Any] = {"method": method, "default": DEFAULT_THRESHOLD, "per_label": {}}
    if method == "sensitivity":
        details["min_sensitivity"] = min_sensitivity
    if probs is None or targets is None or method == "fixed":
        details["note"] = "no validation data (or method 'fixed'): 0.5 for every label"
        return tuple([DEFAULT_THRESHOLD] * n_labels), details
    if probs.shape != targets.shape or probs.shape[1] != n_labels:
        raise InvalidArgumentError(f"probs {probs.shape} / targets {targets.shape} do not match {n_labels} labels")
    details["images"] = int(len(targets))
    out: list[float] = []
    for j, label in enumerate(labels):
        known = np.isfinite(targets[:, j])  # NaN = unknown label: not evidence either way
        t, p = targets[known, j], probs[known, j]
        pos, neg = int(t.sum()), int(len(t) - t.sum())
        entry: dict[str, Any] = {"positives": pos, "negatives": neg}
        if pos < min_positives or neg < min_positives:
            entry["reason"] = f"fewer than {min_positives} positives or negatives: default threshold"
            thr = DEFAULT_THRESHOLD
        else:
            fpr, tpr, thr_curve = roc_curve(t, p, drop_intermediate=False)
            finite = np.isfinite(thr_curve)
            fpr, tpr, thr_curve = fpr[finite], tpr[finite], thr_curve[finite]
            if method == "youden":
                k = int(np.argmax(tpr - fpr))
            else:
                ok = np.flatnonzero(tpr >= min_sensitivity)
                k = int(ok[0])  # roc_curve orders thresholds high -> low: first hit is the highest
            thr = float(np.clip(thr_curve[k], _EPS, 1.0 - _EPS))
            entry.update(sensitivity=float(tpr[k]), specificity=float(1.0 - fpr[k]))
        entry["threshold"] = thr
        details["per_label"][label] = entry
        out.append(thr)
    return tuple(out), details
