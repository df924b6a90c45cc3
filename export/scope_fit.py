"""Fit the input scope gate (:class:`cxr_edge.manifest.ScopeSpec`) on pooled features of real images.

Density model (``docs/scope.md``): the pooled features ``x`` (the mean over h, w of the bundle's
``features`` output: the classifier's own input) of the *training* images, optionally transformed
(``sqrt``: sign(x) sqrt|x|, which makes ReLU features closer to Gaussian), centred on their mean,
PCA to ``k`` components; per-component variances shrunk towards their mean
(``v_j = (1 - s) lambda_j + s mean(lambda)``), and the mean residual energy outside the subspace.

Threshold rule (split conformal): the density model never sees the threshold images, so for an
in-scope image exchangeable with them, P(score > threshold) <= 1 - quantile when the threshold is
the ceil((n + 1) * quantile)-th smallest of their n scores. Threshold images are, in order of
preference, the run's calibration split (validation patients: neither trained on nor reported
on) or, without one, out-of-fold scores of the training images (K-fold: fit on K-1 folds, score
the rest) - optimistic, because the network itself was trained on them (recorded as a caveat).

numpy only (no sklearn, no torch), so ``scripts/scope_eval.py`` and the tests can use it too.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import ScopeSpec
from cxr_edge.scope import ScopeGate

DEFAULT_K = 64
DEFAULT_SHRINKAGE = 0.1
DEFAULT_TRANSFORM = "sqrt"
DEFAULT_QUANTILE = 0.99
DEFAULT_FOLDS = 5
MIN_FIT_IMAGES = 20


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sqrt":
        return np.sign(x) * np.sqrt(np.abs(x))
    if kind == "none":
        return x
    raise InvalidArgumentError(f"unknown scope transform {kind!r}")


def fit_density(pooled: np.ndarray, *, k: int = DEFAULT_K, shrinkage: float = DEFAULT_SHRINKAGE,
                transform: str = DEFAULT_TRANSFORM, threshold: float = 1.0, features_output: str = "features",
                threshold_rule: str = "", statistics: dict[str, Any] | None = None) -> ScopeSpec:
    """The density part of a ScopeSpec from N x C pooled features (threshold given, default 1)."""
    x = np.asarray(pooled, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InvalidArgumentError(f"pooled features must be a finite N x C array, got shape {x.shape}")
    n, c = x.shape
    if n < MIN_FIT_IMAGES:
        raise InvalidArgumentError(f"the scope gate needs at least {MIN_FIT_IMAGES} images to fit, got {n}")
    if not 0.0 <= shrinkage < 1.0:
        raise InvalidArgumentError(f"shrinkage must be in [0, 1), got {shrinkage}")
    f = _transform(x, transform)
    mean = f.mean(axis=0)
    d = f - mean
    k = int(max(1, min(k, n - 2, c // 2)))  # at most half the channels: the residual term must mean something
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    lam = s ** 2 / (n - 1)
    top = lam[:k]
    variances = (1.0 - shrinkage) * top + shrinkage * top.mean()
    comps = vt[:k]
    z = d @ comps.T
    residual = np.maximum((d * d).sum(axis=1) - (z * z).sum(axis=1), 0.0)
    rho = float(residual.mean())
    total = float(lam.sum())
    stats = {"fit_images": int(n), "channels": int(c), "k": int(k), "shrinkage": float(shrinkage),
             "explained_variance": round(float(top.sum() / total), 4) if total > 0 else None,
             "residual_scale_per_channel": rho / max(c - k, 1)}
    stats.update(statistics or {})
    if rho <= 0:
        raise InvalidArgumentError("the training features have no energy outside the PCA subspace (too few images "
                                   "or constant features); lower k")
    return ScopeSpec(mean=mean.astype(np.float32), components=comps.astype(np.float32),
                     variances=variances.astype(np.float32), residual_scale=rho, threshold=float(threshold),
                     features_output=features_output, transform=transform, threshold_rule=threshold_rule,
                     statistics=stats)


def conformal_threshold(scores: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> tuple[float, bool]:
    """(threshold, guaranteed): the ceil((n+1) q)-th smallest score; the max when n is too small (not guaranteed)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0 or not np.isfinite(s).all():
        raise InvalidArgumentError("threshold scores must be a non-empty finite array")
    rank = math.ceil((s.size + 1) * quantile)
    if rank <= s.size:
        return float(s[rank - 1]), True
    return float(s[-1]), False


def out_of_fold_scores(pooled: np.ndarray, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                       **fit_kw: Any) -> np.ndarray:
    """Each training image scored by a density fitted without its fold."""
    x = np.asarray(pooled, dtype=np.float64)
    n = len(x)
    if n <= MIN_FIT_IMAGES:
        raise InvalidArgumentError(f"out-of-fold scores need more than {MIN_FIT_IMAGES} images, got {n}")
    folds = min(n, max(folds, math.ceil(n / (n - MIN_FIT_IMAGES))))  # every fit keeps >= MIN_FIT_IMAGES
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % folds
    out = np.empty(len(x), dtype=np.float64)
    for f in range(folds):
        held = fold == f
        gate = ScopeGate(fit_density(x[~held], **fit_kw))
        out[held] = gate.scores(x[held])
    return out


def _quantiles(scores: np.ndarray) -> dict[str, float]:
    q = np.percentile(scores, [50, 90, 95, 99, 100])
    return {name: round(float(v), 4) for name, v in zip(("p50", "p90", "p95", "p99", "max"), q)}


def fit_scope(train_pooled: np.ndarray, threshold_pooled: np.ndarray | None = None, *, k: int = DEFAULT_K,
              shrinkage: float = DEFAULT_SHRINKAGE, transform: str = DEFAULT_TRANSFORM,
              quantile: float = DEFAULT_QUANTILE, folds: int = DEFAULT_FOLDS, seed: int = 0,
              features_output: str = "features", fit_set: str = "training images",
              threshold_set: str | None = None) -> ScopeSpec:
    """Density on ``train_pooled``, threshold by split conformal on ``threshold_pooled`` (module docstring)."""
    if not 0.5 <= quantile < 1.0:
        raise InvalidArgumentError(f"quantile must be in [0.5, 1), got {quantile}")
    fit_kw = dict(k=k, shrinkage=shrinkage, transform=transform, features_output=features_output)
    spec = fit_density(train_pooled, **fit_kw)
    gate = ScopeGate(spec)
    train_scores = gate.scores(np.asarray(train_pooled, np.float32))
    stats: dict[str, Any] = {"fit_set": fit_set, "quantile": quantile, "fit_scores": _quantiles(train_scores)}
    if threshold_pooled is not None and len(threshold_pooled):
        t_scores = gate.scores(np.asarray(threshold_pooled, np.float32))
        source = threshold_set or "threshold images"
        stats["threshold_set"] = source
        stats["threshold_images"] = int(len(t_scores))
    else:
        t_scores = out_of_fold_scores(train_pooled, folds=folds, seed=seed, **fit_kw)
        source = f"out-of-fold scores of the {fit_set} ({folds}-fold)"
        stats["threshold_set"] = source
        stats["threshold_images"] = int(len(t_scores))
        stats["caveat"] = ("no calibration split: the threshold comes from out-of-fold training images, which the "
                           "network was trained on, so new in-scope images may be flagged more often than 1 - quantile")
    threshold, guaranteed = conformal_threshold(t_scores, quantile)
    stats["threshold_scores"] = _quantiles(t_scores)
    stats["conformal_guarantee"] = guaranteed
    rule = (f"split conformal: the ceil((n+1) x {quantile:g})-th smallest score of the {source} (n = {len(t_scores)}; "
            + (f"P(in-scope image flagged) <= {1 - quantile:.2g} for images like them)" if guaranteed else
               "too few images for the guarantee: their maximum)"))
    spec.statistics.update(stats)
    return ScopeSpec(mean=spec.mean, components=spec.components, variances=spec.variances,
                     residual_scale=spec.residual_scale, threshold=threshold, method=spec.method,
                     features_output=spec.features_output, transform=spec.transform, threshold_rule=rule,
                     statistics=spec.statistics)


def pooled_features(model_bytes: bytes, paths: Sequence, spec, features_output: str = "features", *,
                    chunk: int = 32, threads: int = 2) -> np.ndarray:
    """N x C pooled features of real images through the runtime's read/preprocess path, in chunks."""
    import onnxruntime as ort

    from cxr_edge.bundle import session_options

    from .images import load_batch

    sess = ort.InferenceSession(model_bytes, session_options(threads), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(paths), chunk):
        batch = load_batch(paths[i:i + chunk], spec)
        (feats,) = sess.run([features_output], {spec.input_name: batch})
        out.append(np.asarray(feats, np.float32).mean(axis=(2, 3)))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
