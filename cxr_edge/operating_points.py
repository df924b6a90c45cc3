"""Per-label operating points, AUC and patient-bootstrap intervals, in numpy only (no sklearn/scipy).

One implementation serves the export toolchain (``export/thresholds.py`` delegates here) and the
device-side recalibration (``cxr-edge calibrate``), so a threshold refitted at a site follows
exactly the rules the bundle was exported with.

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

Numerics: the AUC is the rank-sum (Mann-Whitney U) statistic with tied scores given their average
rank (equal to ``sklearn.metrics.roc_auc_score``); the ROC points are those of
``sklearn.metrics.roc_curve(drop_intermediate=False)`` without its leading infinite threshold;
the bootstrap draws patients with replacement and takes all their images (the same random stream
as ``models.evaluate.patient_resamples`` for the same seed). Tests pin both equalities.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InvalidArgumentError


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits (float64; the tanh form cannot overflow): the one sigmoid of the runtime,
    the export gate and evaluation, so all three turn a logit into the same probability."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))

DEFAULT_THRESHOLD = 0.5
METHODS = ("breakeven", "f1", "youden", "specificity", "sensitivity", "fixed")
_EPS = 1e-4

__all__ = ["DEFAULT_THRESHOLD", "METHODS", "rankdata", "roc_auc", "auc_per_label", "roc_points",
           "patient_resamples", "bootstrap_auc", "pick_threshold", "operating_point", "choose_thresholds",
           "bootstrap_operating_point", "parse_rule"]


# ============================================================================ ranks and AUC
def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (``scipy.stats.rankdata`` 'average')."""
    a = np.asarray(a).ravel()
    n = a.size
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty(n, dtype=np.intp)
    inv[sorter] = np.arange(n, dtype=np.intp)
    s = a[sorter]
    obs = np.r_[True, s[1:] != s[:-1]]
    dense = np.cumsum(obs)[inv]
    count = np.r_[np.flatnonzero(obs), n]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def _rank_columns(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape, dtype=np.float64)
    for j in range(a.shape[1]):
        out[:, j] = rankdata(a[:, j])
    return out


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties averaged; NaN targets ignored; NaN when a class is absent."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    n_pos = int((y == 1).sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_per_label(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC per column of N x L targets (1/0/NaN) and scores; NaN where a label lacks a class."""
    targets = np.asarray(targets, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise InvalidArgumentError(f"targets {targets.shape} and scores {scores.shape} must both be N x L")
    out = np.full(targets.shape[1], np.nan)
    complete = ~np.isnan(targets).any(axis=0)
    if complete.any():
        y = targets[:, complete]
        ranks = _rank_columns(scores[:, complete])
        n_pos = y.sum(axis=0)
        n_neg = y.shape[0] - n_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = ((ranks * y).sum(axis=0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        auc[(n_pos == 0) | (n_neg == 0)] = np.nan
        out[complete] = auc
    for j in np.flatnonzero(~complete):
        out[j] = roc_auc(targets[:, j], scores[:, j])
    return out


def roc_points(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, thresholds high -> low (no infinite first point)."""
    t = np.asarray(t).ravel()
    p = np.asarray(p).ravel()
    order = np.argsort(p, kind="mergesort")[::-1]
    ps, ts = p[order], (t[order] == 1).astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(ps)), ps.size - 1]
    tps = np.cumsum(ts)[ends]
    fps = (ends + 1) - tps
    pos, neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / pos if pos > 0 else np.full(tps.shape, np.nan)
        fpr = fps / neg if neg > 0 else np.full(fps.shape, np.nan)
    return fpr, tpr, ps[ends]


# ============================================================================ bootstrap
def patient_resamples(patient_ids: Sequence[str], n: int, seed: int = 0) -> Iterable[np.ndarray]:
    """``n`` image-index arrays, each drawing patients with replacement and taking all their images."""
    _, inverse = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    n_pat = counts.size
    for _ in range(n):
        drawn = rng.integers(0, n_pat, size=n_pat)
        yield np.concatenate([order[starts[p]:starts[p] + counts[p]] for p in drawn])


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def _f(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def bootstrap_auc(targets: np.ndarray, scores: np.ndarray, patient_ids: Sequence[str],
                  label_names: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """Per-label AUC and mean AUC with percentile CIs from a patient-level bootstrap.

    The same result as ``models.evaluate.bootstrap_auc`` (which needs scipy): the mean is over labels
    with both classes among the evaluated images (the others are in ``skipped_labels``); inside a
    resample a label that lost a class is left out of that resample's mean.
    """
    targets = np.asarray(targets, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    n_labels = targets.shape[1]
    names = list(label_names) if label_names is not None else [f"label_{j}" for j in range(n_labels)]
    if len(names) != n_labels or len(patient_ids) != targets.shape[0]:
        raise InvalidArgumentError("one label name per column and one patient id per row are required")
    point = auc_per_label(targets, scores)
    valid = np.isfinite(point)
    boot = np.full((n_boot, n_labels), np.nan)
    for b, idx in enumerate(patient_resamples(patient_ids, n_boot, seed)):
        boot[b] = auc_per_label(targets[idx], scores[idx])
    boot[:, ~valid] = np.nan
    with np.errstate(invalid="ignore"):
        if valid.any():
            masked = np.where(valid, boot, np.nan)
            counts = np.isfinite(masked).sum(axis=1)
            sums = np.nansum(masked, axis=1)
            boot_mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        else:
            boot_mean = np.full(n_boot, np.nan)
    per_label = {}
    for j, name in enumerate(names):
        lo, hi = _interval(boot[:, j], level)
        pos = targets[:, j] == 1
        per_label[name] = {"auc": _f(point[j]), "ci_low": _f(lo), "ci_high": _f(hi), "n_pos": int(pos.sum()),
                           "n_known": int((~np.isnan(targets[:, j])).sum()),
                           "degenerate": int(np.isnan(boot[:, j]).sum()) if valid[j] else None}
    mean_point = float(point[valid].mean()) if valid.any() else float("nan")
    lo, hi = _interval(boot_mean, level)
    return {"mean_auc": _f(mean_point), "mean_ci_low": _f(lo), "mean_ci_high": _f(hi), "per_label": per_label,
            "skipped_labels": [n for n, v in zip(names, valid) if not v], "n_images": int(targets.shape[0]),
            "n_patients": int(len(set(patient_ids))), "n_boot": n_boot, "seed": seed, "level": level,
            "resampling": "patients"}


# ============================================================================ rules
def pick_threshold(method: str, t: np.ndarray, p: np.ndarray, target: float) -> float:
    """The threshold of ``method`` for 0/1 targets ``t`` and scores ``p`` (both classes present)."""
    if method in ("youden", "sensitivity", "specificity"):
        fpr, tpr, thr = roc_points(t, p)
        if method == "youden":
            return float(thr[int(np.argmax(tpr - fpr))])
        if method == "sensitivity":
            return float(thr[int(np.flatnonzero(tpr >= target)[0])])  # thresholds run high -> low
        ok = np.flatnonzero(1.0 - fpr >= target)
        if ok.size == 0:  # tied top scores: every finite threshold already flags too many negatives
            raise _NoOperatingPoint(f"no threshold reaches specificity {target}")
        return float(thr[int(ok[-1])])
    order = np.sort(np.unique(p))[::-1]  # candidate thresholds, high -> low
    # flag/TP counts at every candidate c (p >= c), from one sort instead of a pass per candidate
    ps = np.sort(p)
    flagged = (ps.size - np.searchsorted(ps, order, side="left")).astype(np.float64)
    pos_scores = np.sort(p[t == 1])
    tp = (pos_scores.size - np.searchsorted(pos_scores, order, side="left")).astype(np.float64)
    pos = float(t.sum())
    if method == "f1":
        f1 = 2 * tp / (flagged + pos)
        return float(order[int(np.argmax(f1))])
    # breakeven: the flag count closest to the number of positives (the lower threshold on a tie)
    k = int(np.argmin(np.abs(flagged - pos)))
    return float(order[k])


class _NoOperatingPoint(ValueError):
    """The rule cannot be met on these scores (the label is then undetermined)."""


# the old private name, kept for callers of export.thresholds._pick
_pick = pick_threshold


def operating_point(t: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and flag rate of ``p >= threshold`` against 0/1 targets."""
    flag = p >= threshold
    pos, neg = t == 1, t == 0
    tp, fp = int((flag & pos).sum()), int((flag & neg).sum())
    return {"sensitivity": tp / max(1, int(pos.sum())), "specificity": 1.0 - fp / max(1, int(neg.sum())),
            "ppv": tp / int(flag.sum()) if flag.any() else None, "flag_rate": float(flag.mean()),
            "prevalence": float(pos.mean())}


def bootstrap_operating_point(t: np.ndarray, p: np.ndarray, threshold: float, patient_ids: Sequence[str],
                              n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Sensitivity, specificity and PPV at a fixed ``threshold`` with patient-bootstrap percentile CIs.

    ``t`` holds only known (0/1) targets; resamples in which a quantity is undefined (no positives,
    no negatives, nothing flagged) are left out of that quantity's interval.
    """
    t = np.asarray(t, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    point = operating_point(t, p, threshold)
    flag = p >= threshold
    pos, neg = t == 1, t == 0
    sens = np.full(n_boot, np.nan)
    spec = np.full(n_boot, np.nan)
    ppv = np.full(n_boot, np.nan)
    for b, idx in enumerate(patient_resamples(list(patient_ids), n_boot, seed)):
        f, y1, y0 = flag[idx], pos[idx], neg[idx]
        n1, n0, nf = int(y1.sum()), int(y0.sum()), int(f.sum())
        tp = int((f & y1).sum())
        if n1:
            sens[b] = tp / n1
        if n0:
            spec[b] = 1.0 - int((f & y0).sum()) / n0
        if nf:
            ppv[b] = tp / nf
    out: dict[str, Any] = {"threshold": float(threshold), "n": int(t.size), "positives": int(pos.sum()),
                           "flagged": int(flag.sum())}
    for name, values in (("sensitivity", sens), ("specificity", spec), ("ppv", ppv)):
        lo, hi = _interval(values, level)
        value = point[name]
        if name == "sensitivity" and not pos.any():
            value = None
        if name == "specificity" and not neg.any():
            value = None
        out[name] = {"value": None if value is None else round(float(value), 6), "ci_low": _f(lo), "ci_high": _f(hi)}
    out["flag_rate"] = round(point["flag_rate"], 6)
    out["prevalence"] = round(point["prevalence"], 6)
    out["n_boot"], out["seed"], out["level"] = n_boot, seed, level
    return out


def parse_rule(text: str) -> tuple[str, float]:
    """``breakeven|f1|youden|fixed|specificity=0.9|sensitivity=0.9`` -> (method, target)."""
    raw = (text or "").strip().lower()
    method, _, value = raw.partition("=")
    method = method.strip()
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown rule {text!r}; choose breakeven, f1, youden, specificity=0.9 or "
                                   "sensitivity=0.9")
    if method in ("specificity", "sensitivity"):
        try:
            target = float(value) if value else 0.9
        except ValueError:
            raise InvalidArgumentError(f"the rule {text!r} needs a number after '=' (e.g. {method}=0.9)") from None
        if not 0.0 < target <= 1.0:
            raise InvalidArgumentError(f"the rule's target must lie in (0, 1], got {target}")
        return method, target
    if value:
        raise InvalidArgumentError(f"the rule {method!r} takes no '=value'")
    return method, 0.9


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
    probs = np.asarray(probs)
    targets = np.asarray(targets)
    if probs.shape != targets.shape or probs.ndim != 2 or probs.shape[1] != n_labels:
        raise InvalidArgumentError(f"probs {probs.shape} / targets {targets.shape} do not match {n_labels} labels")
    pids = np.asarray(list(patient_ids) if patient_ids is not None else [str(i) for i in range(len(targets))])
    if len(pids) != len(targets):
        raise InvalidArgumentError("one patient id per row is required")
    auc = None
    if require_auc_above_chance:
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
        if pos_patients < min_positive_patients or t.sum() == len(t) or t.sum() == 0:
            entry["undetermined"] = f"{pos_patients} positive patients < {min_positive_patients}" \
                if pos_patients < min_positive_patients else \
                ("no negative images" if t.sum() == len(t) else "no positive images")
            thr = None
        elif auc is not None and not (auc[label]["ci_low"] is not None and auc[label]["ci_low"] > 0.5):
            entry["undetermined"] = f"AUC 95% CI [{auc[label]['ci_low']}, {auc[label]['ci_high']}] includes 0.5"
            thr = None
        else:
            try:
                thr = float(np.clip(pick_threshold(method, t, p, target), _EPS, 1.0 - _EPS))
            except _NoOperatingPoint as exc:
                entry["undetermined"] = str(exc)
                thr = None
            else:
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
