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

Pixel-rule limits (:func:`fit_pixel_limits`): the same split-conformal rule on each data-set limit of
:data:`cxr_edge.scope.PIXEL_RULES`, from in-scope radiographs (the rules do not depend on the model, so
any in-scope images that are not evaluation images may set them); the numbers are then written into
``cxr_edge/scope.py`` by hand and a test checks they match (``docs/scope.md``, "Budget").

Refit without a training run (``python -m export.scope_fit refit``): pooled features computed with
onnxruntime from the bundle's own graph, a new scope block, the same graph bytes; the bundle is written
by :func:`cxr_edge.calibrate.write_verified_bundle` (the code ``cxr-edge calibrate`` uses).

    python -m export.scope_fit refit --bundle IN.onnx --images FIT.csv --threshold-images CAL.csv --out OUT.onnx
    python -m export.scope_fit refit --bundle IN.onnx --split-config docs/results/kd-session13/kd-s0.config.json --out OUT.onnx
    python -m export.scope_fit pixel-limits --split-config docs/results/kd-session13/kd-s0.config.json

Exit codes: 0 ok; 2 bad arguments or images; 4 the bundle could not be read or written; 1 other errors.

numpy only for fitting (no sklearn, no torch; ``--split-config`` alone imports the training toolchain to
redraw a run's split), so ``scripts/scope_eval.py`` and the tests can use it too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr_edge.errors import BundleError, CxrEdgeError, InvalidArgumentError
from cxr_edge.manifest import ScopeSpec
from cxr_edge.scope import PIXEL_RULES, ScopeGate, inversion_score, layout_scores, summarize

DEFAULT_K = 64
DEFAULT_SHRINKAGE = 0.1
DEFAULT_TRANSFORM = "sqrt"
DEFAULT_QUANTILE = 0.99
DEFAULT_FOLDS = 5
MIN_FIT_IMAGES = 20
#: per data-set pixel limit: false-flag budget on in-scope images (docs/scope.md, "Budget")
DEFAULT_PIXEL_ALPHA = 0.001


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


def conformal_bound(n: int, quantile: float) -> float:
    """P(an exchangeable in-scope image scores above the split-conformal threshold) <= this: 1 - rank / (n + 1)."""
    rank = min(math.ceil((n + 1) * quantile), n)
    return 1.0 - rank / (n + 1)


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
    stats["alpha"] = round(1.0 - quantile, 6)
    stats["false_flag_bound"] = round(conformal_bound(len(t_scores), quantile), 6)
    rule = (f"split conformal: the ceil((n+1) x {quantile:g})-th smallest score of the {source} (n = {len(t_scores)}; "
            + (f"P(in-scope image flagged) <= {conformal_bound(len(t_scores), quantile):.2g} for images like them)"
               if guaranteed else
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


# --------------------------------------------------------------------------- pixel-rule limits

#: the PIXEL_RULES limits set from data, each with the score it thresholds (higher = less like a radiograph)
PIXEL_LIMITS_FROM_DATA = {
    "inversion_margin": "minus the inversion score (check_inverted fires when it exceeds the margin)",
    "orientation_margin": "the best flip/rotation's template correlation minus the image's own (check_orientation)",
    "min_layout": "minus the correlation with the chest template (check_layout fires below min_layout)",
}
#: PIXEL_RULES limits set a priori (far from any radiograph); the fit reports whether every image is inside them
PIXEL_LIMITS_A_PRIORI = ("min_std", "min_range", "max_aspect", "colour_fraction", "colour_chroma")


def pixel_rule_scores(pixels: np.ndarray) -> dict[str, float]:
    """The numbers the pixel rules compare with their limits, for one [0, 1] gray image."""
    s = summarize(pixels)
    c0, best, _ = layout_scores(s)
    return {"std": s.std, "range": s.p99 - s.p1, "aspect": max(s.height, s.width) / min(s.height, s.width),
            "inversion": inversion_score(s), "layout": c0, "orientation": best - c0}


def fit_pixel_limits(scores: Sequence[dict[str, float]], alpha: float = DEFAULT_PIXEL_ALPHA) -> dict[str, Any]:
    """Split-conformal limits of the data-set pixel rules from in-scope images' :func:`pixel_rule_scores`.

    Each limit is the ceil((n + 1)(1 - alpha))-th smallest of its rule's score, rounded outwards to 3
    decimals (never stricter), so P(the rule flags a new in-scope image like them) <= 1 - rank / (n + 1).
    The a-priori limits are not refitted; ``a_priori`` says how far inside them the images lie.
    """
    n = len(scores)
    if n < MIN_FIT_IMAGES:
        raise InvalidArgumentError(f"pixel limits need at least {MIN_FIT_IMAGES} in-scope images, got {n}")
    if not 0.0 < alpha < 0.5:
        raise InvalidArgumentError(f"alpha must be in (0, 0.5), got {alpha}")
    col = {k: np.array([s[k] for s in scores], np.float64) for k in scores[0]}
    q = 1.0 - alpha
    inv, ok1 = conformal_threshold(-col["inversion"], q)
    ori, ok2 = conformal_threshold(col["orientation"], q)
    lay, ok3 = conformal_threshold(-col["layout"], q)
    limits = {"inversion_margin": math.ceil(inv * 1000) / 1000, "orientation_margin": math.ceil(ori * 1000) / 1000,
              "min_layout": math.floor(-lay * 1000) / 1000}
    a_priori = {"min_std": {"limit": PIXEL_RULES["min_std"], "images_min": float(col["std"].min())},
                "min_range": {"limit": PIXEL_RULES["min_range"], "images_min": float(col["range"].min())},
                "max_aspect": {"limit": PIXEL_RULES["max_aspect"], "images_max": float(col["aspect"].max())}}
    inside = (col["std"].min() >= PIXEL_RULES["min_std"] and col["range"].min() >= PIXEL_RULES["min_range"]
              and col["aspect"].max() <= PIXEL_RULES["max_aspect"])
    bound = conformal_bound(n, q)
    rules = len(limits) + 2  # + the constant and aspect rules (inside their limits: the same bound each)
    return {"limits": limits, "images": n, "alpha_per_rule": alpha, "rank": min(math.ceil((n + 1) * q), n),
            "false_flag_bound_per_rule": bound, "conformal_guarantee": bool(ok1 and ok2 and ok3),
            "a_priori": a_priori, "a_priori_inside": bool(inside),
            "false_flag_bound_all_rules": rules * bound if inside else None,
            "beyond_current_limits": int(sum(
                1 for s in scores if (s["inversion"] < -PIXEL_RULES["inversion_margin"]
                                      or s["orientation"] > PIXEL_RULES["orientation_margin"]
                                      or s["layout"] < PIXEL_RULES["min_layout"]))),
            "scores": {k: PIXEL_LIMITS_FROM_DATA[k] for k in limits}}


# --------------------------------------------------------------------------- image lists, split, refit

def _nih_images() -> Path:
    from .images import nih_sample_dir

    return nih_sample_dir() / "images"


def collect_images(sources: Sequence[str], image_root: str | os.PathLike | None = None,
                   exclude: Sequence[str] = ()) -> list[Path]:
    """Image files from folders (every image in it) and lists (CSV with an ``image`` column, or one name a line,
    resolved under ``image_root``; default the NIH sample's images); ``exclude``: file names or lists of them."""
    from models.datasets import read_image_list

    from .images import list_image_dir, resolve_images

    root = Path(image_root) if image_root else _nih_images()
    paths: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            paths += list_image_dir(p)
        elif p.is_file():
            paths += resolve_images(read_image_list(p), root)
        else:
            raise InvalidArgumentError(f"{src}: neither an image folder nor an image list")
    drop = _excluded_names(exclude)
    kept, seen = [], set()
    for p in paths:
        key = str(p.resolve())
        if p.name not in drop and key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def split_from_config(config_path: str | os.PathLike) -> tuple[list[Path], list[Path], str]:
    """(training-split paths, calibration-split paths, description) of a run, redrawn from its config.json
    with the training toolchain's own split code (``models.runs.split_indices``): no run folder needed."""
    try:
        from models.config import TrainConfig
        from models.data import image_path
        from models.datasets import read_nih_sample
        from models.runs import split_indices
    except ImportError as exc:
        raise InvalidArgumentError(f"--split-config needs the training toolchain (models/, torch): {exc}") from None
    cfg = TrainConfig.load(config_path)
    table = read_nih_sample(cfg.data_path())
    train, val, _ = split_indices(cfg, table)
    if not len(val):
        raise InvalidArgumentError(f"{config_path}: the run has no calibration split (val_fraction 0)")
    ids = list(table.image_ids)
    desc = (f"split={cfg.split}, val_fraction {cfg.val_fraction:g}, split_seed {cfg.split_seed}, "
            f"redrawn from {Path(config_path).name}")
    return ([Path(image_path(cfg.data_path(), ids[i])) for i in train],
            [Path(image_path(cfg.data_path(), ids[i])) for i in val], desc)


def refit_bundle(bundle: str | os.PathLike, out: str | os.PathLike, fit_paths: Sequence[Path],
                 threshold_paths: Sequence[Path] | None, *, fit_set: str, threshold_set: str | None = None,
                 k: int = DEFAULT_K, shrinkage: float = DEFAULT_SHRINKAGE, transform: str = DEFAULT_TRANSFORM,
                 quantile: float = DEFAULT_QUANTILE, threads: int = 2, excluded: int = 0, exclude_note: str = "",
                 force: bool = False) -> dict[str, Any]:
    """Refit a bundle's scope block on images (features from the bundle's own graph) and write ``out``:
    the same graph bytes, a manifest that differs only in ``scope`` (and the digests the writer fills in)."""
    from cxr_edge.bundle import read_manifest, split_model
    from cxr_edge.calibrate import write_verified_bundle

    src, dst = Path(bundle), Path(out)
    if dst.suffix.lower() != ".onnx":
        raise InvalidArgumentError("--out must name a .onnx file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidArgumentError("--out must not be the bundle being refitted (write a new file, then move it)")
    if dst.exists() and not force:
        raise InvalidArgumentError(f"--out {str(dst)!r} exists; pass --force to overwrite it")
    try:
        model_bytes = src.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {str(src)!r}: {exc.strerror or exc}") from None
    manifest = read_manifest(model_bytes)
    old = manifest.scope
    features_output = old.features_output if old is not None else manifest.cam.features_output
    t0 = time.perf_counter()
    train = pooled_features(model_bytes, list(fit_paths), manifest.preprocessing, features_output, threads=threads)
    held = (pooled_features(model_bytes, list(threshold_paths), manifest.preprocessing, features_output,
                            threads=threads) if threshold_paths else None)
    if threshold_paths and {p.resolve() for p in fit_paths} & {p.resolve() for p in threshold_paths}:
        raise InvalidArgumentError("threshold images overlap the fit images; the threshold must come from images "
                                   "the density model did not see")
    spec = fit_scope(train, held, k=k, shrinkage=shrinkage, transform=transform, quantile=quantile,
                     features_output=features_output, fit_set=fit_set, threshold_set=threshold_set)
    spec.statistics["refit"] = {
        "tool": "python -m export.scope_fit refit", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "features": "onnxruntime CPU, the bundle's own graph, the runtime's read/preprocess path",
        "excluded_images": int(excluded), **({"excluded_why": exclude_note} if exclude_note else {}),
        "previous_threshold": None if old is None else float(old.threshold)}
    new_manifest = replace(manifest, scope=spec)
    write_verified_bundle(model_bytes, new_manifest, dst)
    if split_model(dst.read_bytes())[0] != split_model(model_bytes)[0]:  # the writer only replaces the manifest
        raise BundleError("internal: the refitted bundle's graph bytes differ from the input's")
    return {"ok": True, "op": "scope-refit", "out": str(dst), "model_id": manifest.model_id,
            "previous_threshold": None if old is None else float(old.threshold), "threshold": spec.threshold,
            "threshold_rule": spec.threshold_rule, "fit_images": len(fit_paths),
            "threshold_images": len(threshold_paths or ()), "k": spec.k,
            "seconds": round(time.perf_counter() - t0, 1)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.scope_fit", description="Refit a bundle's input scope gate "
                                "without a training run, or recompute the pixel-rule limits (docs/scope.md).")
    sub = p.add_subparsers(dest="cmd", required=True)

    def sources(q: argparse.ArgumentParser, what: str) -> None:
        q.add_argument("--images", nargs="+", metavar="CSV_OR_DIR", help=f"{what}: image folders or lists (CSV "
                       "with an 'image' column, or one name a line)")
        q.add_argument("--split-config", metavar="CONFIG_JSON", help="a run's config.json (e.g. docs/results/kd/"
                       "kd-s0.config.json): redraw its split with models.runs (needs torch, not the run folder)")
        q.add_argument("--image-root", help="folder that list names are relative to (default: the NIH sample's "
                       "images under ../shared)")
        q.add_argument("--exclude", nargs="+", default=[], metavar="NAME_OR_LIST",
                       help="image file names (or lists of them) that are not in scope and must not calibrate")
        q.add_argument("--exclude-note", default="", help="why they are excluded (recorded, without the names)")
        q.add_argument("--json", action="store_true", help="print the result as JSON")

    r = sub.add_parser("refit", help="new scope block for a bundle: density on --images, threshold on "
                       "--threshold-images (split conformal), same graph")
    r.add_argument("--bundle", required=True)
    r.add_argument("--out", required=True)
    sources(r, "images the density is fitted on (the model's training images)")
    r.add_argument("--threshold-images", nargs="+", metavar="CSV_OR_DIR",
                   help="in-scope images neither the model nor the density saw (without: out-of-fold fit images, "
                        "recorded as a caveat)")
    r.add_argument("--k", type=int, default=DEFAULT_K)
    r.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE)
    r.add_argument("--transform", default=DEFAULT_TRANSFORM, choices=("sqrt", "none"))
    r.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="1 - the feature stage's budget alpha")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--force", action="store_true", help="overwrite --out")
    q = sub.add_parser("pixel-limits", help="split-conformal limits of the data-set pixel rules on in-scope images")
    sources(q, "in-scope radiographs that are not evaluation images")
    q.add_argument("--alpha", type=float, default=DEFAULT_PIXEL_ALPHA, help="false-flag budget per rule")
    return p


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.images) == bool(args.split_config):
        raise InvalidArgumentError("give exactly one of --images and --split-config")
    threshold_paths: list[Path] | None = None
    threshold_set = None
    if args.split_config:
        fit, cal, desc = split_from_config(args.split_config)
        drop = _excluded_names(args.exclude)
        n0 = len(fit) + len(cal)
        fit, cal = [p for p in fit if p.name not in drop], [p for p in cal if p.name not in drop]
        excluded = n0 - len(fit) - len(cal)
        fit_set, threshold_set = f"run train split ({desc})", f"run calibration split ({desc})"
        if args.cmd == "refit":
            threshold_paths = cal
        else:
            fit = fit + cal
            fit_set = f"run train + calibration splits ({desc})"
    else:
        fit = collect_images(args.images, args.image_root, args.exclude)
        excluded = len(collect_images(args.images, args.image_root)) - len(fit) if args.exclude else 0
        fit_set = f"{len(fit)} images from {', '.join(Path(s).name for s in args.images)}"
        if args.cmd == "refit" and args.threshold_images:
            threshold_paths = collect_images(args.threshold_images, args.image_root, args.exclude)
            threshold_set = f"{len(threshold_paths)} images from {', '.join(Path(s).name for s in args.threshold_images)}"
    if not fit:
        raise InvalidArgumentError("no images to fit on")
    if args.cmd == "refit":
        return refit_bundle(args.bundle, args.out, fit, threshold_paths, fit_set=fit_set, threshold_set=threshold_set,
                            k=args.k, shrinkage=args.shrinkage, transform=args.transform, quantile=args.quantile,
                            threads=args.threads, excluded=excluded, exclude_note=args.exclude_note,
                            force=args.force)
    from cxr_edge.imaging import read_image

    result = fit_pixel_limits([pixel_rule_scores(read_image(p).pixels) for p in fit], alpha=args.alpha)
    result.update(op="pixel-limits", image_set=fit_set, excluded_images=excluded, excluded_why=args.exclude_note,
                  current_limits={k: PIXEL_RULES[k] for k in result["limits"]})
    return result


def _excluded_names(exclude: Sequence[str]) -> set[str]:
    from models.datasets import read_image_list

    out: set[str] = set()
    for e in exclude:
        out |= {Path(n).name for n in read_image_list(e)} if Path(e).is_file() else {Path(e).name}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except CxrEdgeError as exc:
        code = 2 if isinstance(exc, InvalidArgumentError) else 4 if isinstance(exc, BundleError) else 1
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.cmd == "refit":
        prev = result["previous_threshold"]
        print(f"wrote {result['out']} ({result['model_id']}): scope threshold "
              f"{'none' if prev is None else f'{prev:.4f}'} -> {result['threshold']:.4f} "
              f"(density on {result['fit_images']} images, threshold on {result['threshold_images'] or 'out-of-fold'}; "
              f"{result['threshold_rule']}); graph bytes unchanged")
    else:
        print(json.dumps({k: result[k] for k in ("limits", "current_limits", "images", "excluded_images",
                                                   "alpha_per_rule", "rank", "false_flag_bound_per_rule",
                                                   "false_flag_bound_all_rules", "beyond_current_limits",
                                                   "a_priori")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
