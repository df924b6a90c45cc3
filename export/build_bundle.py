"""The whole export pipeline: PyTorch model -> checked ONNX -> (INT8 + gate) -> manifest -> bundle(s) + report.

Every choice is one frozen :class:`ExportConfig` (``python -m export`` builds it from its flags); it is
recorded in the manifest's provenance (``provenance["export"]["config"]``), which the bundle digest covers.
:func:`export_bundle` runs the steps below in order, and every step can refuse:
  1. :func:`export_graph`: fp32 ONNX (checker full_check), compared with PyTorch on real images (ParityError);
  2. :func:`quantise_and_gate` (INT8 only): calibrate on real training images, quantise (float CAM head), compare
     INT8 with fp32 on held-out labelled images: AUC drop, CAM agreement, decision flips (QuantizationGateError,
     or with ``fallback_fp32`` ship fp32 and record why in the provenance);
  2b. :func:`fit_temperatures_step` (``temperature``): per-label temperature scaling fitted on the calibration
     split, folded into the fp32 graph's head before quantisation (``cxr_edge.temperature``);
  3. :func:`fit_thresholds`: operating points on the shipped model's outputs (calibration split);
  4. :func:`fit_scope_gate`: the input scope gate on the shipped model's pooled features of the training images
     (``export.scope_fit``; on by default when there are enough training images);
  5. :func:`write_checked_bundle`: manifest, bundle, loaded back with ``cxr_edge.bundle.load_bundle`` (checksum,
     wiring, head identity), then the optional bytes-in variant (:func:`write_ingraph_bundle`) compared with the
     Python path on real files.
The verification report JSON holds every number, also when the gate fails.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxr_edge.bundle import load_bundle, read_manifest, write_bundle
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import ScopeSpec

from .calibration import ArrayCalibrationReader, select_calibration
from .errors import QuantizationGateError
from .images import load_batch
from .ingraph import BYTES_INPUT, RESIZE_MODES, build_ingraph_model, ingraph_session, run_ingraph
from .manifest_build import HEAD_ATOL, build_manifest
from .onnx_export import DEFAULT_OPSET, check_parity, classifier_weights, export_onnx, optimize_offline, run_onnx
from .quantize import (CALIBRATION_METHODS, DEFAULT_FLOAT_LEADING_CONVS, DEFAULT_PRESET, PRESETS, debug_quantization,
                       prepare_for_quantization, quantize_int8)
from .scope_fit import DEFAULT_K as SCOPE_K
from .scope_fit import DEFAULT_QUANTILE as SCOPE_QUANTILE
from .scope_fit import MIN_FIT_IMAGES as SCOPE_MIN_IMAGES
from .scope_fit import fit_scope, pooled_features
from .source import ExportSource, ImageSet
from .thresholds import METHODS as THRESHOLD_METHODS
from .thresholds import choose_thresholds
from cxr_edge.operating_points import sigmoid

from .verify import GateCriteria, cam_correlations, compare_models, gate

PARITY_IMAGES = 32
#: the scope gate is fitted by default only from this many training images on (a density of fewer is noise;
#: ``scope=True`` / ``--scope`` fits one from as few as ``export.scope_fit.MIN_FIT_IMAGES``)
SCOPE_AUTO_MIN_IMAGES = 100
EXPORTERS = ("torchscript", "dynamo")
PRECISIONS = ("int8", "fp32")


@dataclass(frozen=True)
class ExportConfig:
    """Every choice one export makes. Frozen, so the value the pipeline ran with is the value recorded in the
    manifest's provenance (:meth:`to_dict`); checked when built, so a bad value fails before any work."""

    precision: str = "int8"                 # what to try to ship: int8 (through the gate) or fp32
    model_id: str | None = None             # manifest model id without the precision suffix (None: the source's)
    overwrite: bool = False                 # replace an existing bundle file
    # graph
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"
    optimize: bool = True                   # onnxruntime's offline basic optimisation
    logits_output: str = "logits"
    features_output: str = "features"
    # INT8 calibration, quantisation and the gate
    calib_images: int = 200                 # seeded subset of the calibration pool (training images)
    preset: str = DEFAULT_PRESET
    calibrate_method: str = "minmax"
    float_leading_convs: int = DEFAULT_FLOAT_LEADING_CONVS  # first N convs (and all before them) stay float
    criteria: GateCriteria = field(default_factory=GateCriteria)
    fallback_fp32: bool = False             # ship fp32 (recorded why) when INT8 fails the gate
    debug: bool = False                     # qdq_loss_debug SQNR per tensor in the report
    measure_latency: bool = True            # fp32/INT8 latency in the report (a number, not a check)
    # thresholds (operating points) on the calibration split
    threshold_method: str = "breakeven"
    min_sensitivity: float = 0.9            # the target of the sensitivity / specificity rules
    min_positive_patients: int = 10         # fewer positive calibration patients: no decision for that label
    temperature: bool = False               # per-label temperature scaling on the calibration split (in the head)
    # input scope gate (docs/scope.md)
    scope: bool | None = None               # None: fit it from SCOPE_AUTO_MIN_IMAGES training images on
    scope_k: int = SCOPE_K
    scope_quantile: float = SCOPE_QUANTILE
    # bytes-in variant
    ingraph_images: int = 50                # real files the in-graph path is compared on
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"precision": PRECISIONS, "exporter": EXPORTERS, "preset": tuple(PRESETS),
                   "calibrate_method": tuple(CALIBRATION_METHODS), "threshold_method": THRESHOLD_METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InvalidArgumentError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        for name in ("calib_images", "ingraph_images", "scope_k", "min_positive_patients", "opset",
                     "float_leading_convs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (
                    0 if name in ("min_positive_patients", "float_leading_convs") else 1):
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < self.scope_quantile < 1.0:
            raise InvalidArgumentError(f"scope_quantile must be in (0, 1), got {self.scope_quantile!r}")
        if not isinstance(self.criteria, GateCriteria):
            raise InvalidArgumentError("criteria must be an export.verify.GateCriteria")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (the manifest stores it)."""
        return asdict(self)

    @property
    def output_names(self) -> dict[str, str]:
        return {"logits_output": self.logits_output, "features_output": self.features_output}


@dataclass
class ExportedGraph:
    """Step 1's result: the checked fp32 graph and what the later steps need from it."""

    fp32: bytes
    weights: np.ndarray        # classifier W (labels x C): the CAM head
    bias: np.ndarray
    parity_set: ImageSet
    probe: np.ndarray          # a few preprocessed real images for the load-back head check


@dataclass
class Candidate:
    """The model that will ship, at its precision, with the thresholds chosen on its own outputs."""

    model: bytes
    precision: str
    thresholds: Any
    threshold_details: dict[str, Any]


def write_report(report: dict[str, Any], path: str | os.PathLike | None) -> None:
    """The report as JSON at ``path`` (nothing when ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def latency_ms(model_bytes: bytes, batch: np.ndarray, input_name: str, threads: int = 1, runs: int = 20) -> float:
    """Median single-image latency (ms) with the runtime's session settings; a report number, not a test."""
    from cxr_edge.bundle import session_options
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, session_options(threads), providers=["CPUExecutionProvider"])
    x = batch[:1]
    for _ in range(3):
        sess.run(None, {input_name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {input_name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def compare_ingraph(ingraph_bytes: bytes, reference_bytes: bytes, paths: list[Path], spec, *, weights: np.ndarray,
                    logits_output: str, features_output: str) -> dict[str, Any]:
    """In-graph (bytes in) vs Python path (read_image + preprocess + the same model) on real files.

    Logit/probability differences per (image, label), and the CAM Pearson correlation between
    the two paths' maps (features differ locally where the two resizes differ: text, edges).
    """
    import onnxruntime as ort

    from cxr_edge.bundle import session_options
    from cxr_edge.imaging import read_image
    from cxr_edge.preprocess import preprocess

    ig = ingraph_session(ingraph_bytes)
    ref = ort.InferenceSession(reference_bytes, session_options(1), providers=["CPUExecutionProvider"])
    got_l, got_f, ref_l, ref_f, refused = [], [], [], [], []
    for p in paths:
        data = Path(p).read_bytes()
        try:
            lg, ft = run_ingraph(ig, data, spec.min_side, spec.max_pixels, [logits_output, features_output])
        except Exception as exc:  # typed refusals (e.g. grayscale JPEG) are counted, not hidden
            refused.append({"image": Path(p).name, "error": type(exc).__name__})
            continue
        x = preprocess(read_image(data, min_side=spec.min_side, max_pixels=spec.max_pixels).pixels, spec)
        rl, rf = ref.run([logits_output, features_output], {spec.input_name: x})
        got_l.append(lg), got_f.append(ft), ref_l.append(rl), ref_f.append(rf)
    if not got_l:
        return {"images": 0, "refused": refused}
    gl, rl_a = np.concatenate(got_l), np.concatenate(ref_l)
    gf, rf_a = np.concatenate(got_f), np.concatenate(ref_f)
    dl, dp = np.abs(gl - rl_a), np.abs(sigmoid(gl) - sigmoid(rl_a))
    corr_all = cam_correlations(rf_a, gf, weights)
    corr = corr_all[np.isfinite(corr_all)] if np.isfinite(corr_all).any() else np.ones(1)
    return {"images": len(got_l), "refused": refused,
            "logit_max_abs_diff": float(dl.max()), "logit_mean_abs_diff": float(dl.mean()),
            "logit_std_across_images": float(rl_a.std(axis=0).mean()),
            "prob_max_abs_diff": float(dp.max()), "prob_mean_abs_diff": float(dp.mean()),
            "features_mean_rel_diff": float(np.abs(gf - rf_a).mean() / max(float(np.abs(rf_a).mean()), 1e-12)),
            "cam_pearson_median": float(np.median(corr)), "cam_pearson_min": float(corr.min()),
            "cam_pairs_both_empty": int(corr_all.size - np.isfinite(corr_all).sum())}


def check_outputs(out: str | os.PathLike, ingraph_out: str | os.PathLike | None, *, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing bundle unless ``overwrite``."""
    for path in (out, ingraph_out):
        if path is not None and not overwrite and Path(path).exists():
            raise InvalidArgumentError(f"{path} exists; pass --overwrite to replace it")


def bundle_path(out: str | os.PathLike, precision: str) -> Path:
    """``out``, or its name with int8/fp32 corrected to the precision actually written (a file named int8
    never holds fp32)."""
    out = Path(out)
    other = {"int8": "fp32", "fp32": "int8"}[precision]
    return out.with_name(out.name.replace(other, precision)) if other in out.name else out


def export_graph(source: ExportSource, config: ExportConfig, report: dict[str, Any]) -> ExportedGraph:
    """Step 1: torch -> fp32 ONNX (+ offline optimisation), refused unless it matches PyTorch on real images."""
    spec, names = source.spec, config.output_names
    fp32 = export_onnx(source.model, spec, opset=config.opset, exporter=config.exporter, **names)
    if config.optimize:
        fp32 = optimize_offline(fp32)
    parity_set = source.verification or source.calibration_pool
    if parity_set is None:
        raise InvalidArgumentError("no real images to verify the export with: give a run directory or image lists")
    parity_batch = load_batch(parity_set.paths[:PARITY_IMAGES], spec)
    report["parity_fp32_vs_torch"] = {"set": parity_set.name,
                                      **check_parity(source.model, fp32, parity_batch, spec, **names)}
    report["files"]["fp32_onnx_bytes"] = len(fp32)
    weights, bias = classifier_weights(source.model)
    return ExportedGraph(fp32=fp32, weights=weights, bias=bias, parity_set=parity_set, probe=parity_batch[:4])


def _export_provenance(source: ExportSource, config: ExportConfig, report: dict[str, Any]) -> dict[str, Any]:
    parity = report["parity_fp32_vs_torch"]
    return {"opset": config.opset, "exporter": config.exporter,
            "offline_optimization": "basic" if config.optimize else None,
            "parity_fp32_vs_torch": {k: parity[k] for k in ("images", "logits_max_abs_diff", "features_max_abs_diff")},
            "calibration_pool": source.calibration_pool.describe() if source.calibration_pool else None,
            "verification_set": source.verification.describe() if source.verification else None,
            "config": config.to_dict()}


def fit_temperatures_step(source: ExportSource, config: ExportConfig, graph: ExportedGraph, report: dict[str, Any],
                          provenance: dict[str, Any], cache: dict) -> ExportedGraph:
    """Step 2b (``config.temperature``): one temperature per label by maximum likelihood on the calibration
    (threshold) split's fp32 logits, divided into the head's rows of the graph and of the CAM weights, so
    quantisation, thresholds and the runtime all see calibrated logits. Refused without a labelled
    calibration split that is not the evaluation set (a temperature fitted there would flatter its ECE)."""
    from cxr_edge.temperature import fit_temperatures, scale_head, scale_rows, temperature_record

    tset = source.threshold_set
    if tset is None or tset.targets is None or tset is source.verification:
        raise InvalidArgumentError("temperature scaling needs a labelled calibration split apart from the "
                                   "evaluation images (train with --val-fraction, or give --threshold-images)")
    if "batch" not in cache:
        cache["batch"] = load_batch(tset.paths, source.spec)
    logits = run_onnx(graph.fp32, cache["batch"], [config.logits_output], source.spec.input_name, threads=2)[0]
    temps, details = fit_temperatures(logits, tset.targets, source.labels)
    details["set"] = tset.name
    record = temperature_record(source.labels, [1.0] * len(temps), temps, details)
    provenance["temperature"] = report["temperature"] = record
    weights, bias = scale_rows(graph.weights, graph.bias, temps)
    return replace(graph, fp32=scale_head(graph.fp32, config.logits_output, temps), weights=weights, bias=bias)


def fit_thresholds(model_bytes: bytes, source: ExportSource, config: ExportConfig, cache: dict) -> tuple[Any, dict]:
    """Step 3: thresholds on ``model_bytes``'s outputs for the source's calibration (threshold) set.

    ``cache`` keeps the preprocessed threshold images between the INT8 candidate and an fp32 fallback."""
    spec, tset = source.spec, source.threshold_set
    probs = targets = pids = None
    if tset is not None and tset.targets is not None:
        if "batch" not in cache:
            cache["batch"] = load_batch(tset.paths, spec)
        probs = sigmoid(run_onnx(model_bytes, cache["batch"], [config.logits_output], spec.input_name,
                                 threads=2)[0])
        targets, pids = tset.targets, tset.patient_ids
    thresholds, details = choose_thresholds(probs, targets, source.labels, method=config.threshold_method,
                                            target=config.min_sensitivity, patient_ids=pids,
                                            min_positive_patients=config.min_positive_patients, seed=config.seed)
    if tset is not None:
        details["set"] = tset.name
        if tset is source.verification:
            details["caveat"] = ("chosen on the held-out evaluation images (the run has no calibration split): "
                                 "sensitivity/specificity at these thresholds are optimistic on this set")
    return thresholds, details


def quantise_and_gate(source: ExportSource, config: ExportConfig, graph: ExportedGraph, report: dict[str, Any],
                      provenance: dict[str, Any], cache: dict) -> Candidate | None:
    """Step 2: the INT8 candidate and its gate against fp32 on held-out labelled images.

    Returns the INT8 candidate when the gate passed; ``None`` when it failed and ``fallback_fp32`` ships fp32
    (the failure goes into the provenance); raises :class:`QuantizationGateError` otherwise. Decision flips are
    counted at the thresholds the INT8 candidate would ship with."""
    spec = source.spec
    if source.verification is None or source.verification.targets is None:
        raise InvalidArgumentError("INT8 export needs a labelled held-out verification set for the gate")
    if source.calibration_pool is None:
        raise InvalidArgumentError("INT8 export needs calibration images")
    calib_paths = select_calibration(source.calibration_pool.paths, config.calib_images, config.seed)
    reader = ArrayCalibrationReader(load_batch(calib_paths, spec), spec.input_name)
    prepared = prepare_for_quantization(graph.fp32)
    q = quantize_int8(prepared, reader, features_output=config.features_output, input_name=spec.input_name,
                      preset=config.preset, calibrate_method=config.calibrate_method,
                      float_leading_convs=config.float_leading_convs, prepared=True)
    report["quantization"] = {**q.summary(), "calibration_pool": source.calibration_pool.name}
    report["files"]["int8_onnx_bytes"] = len(q.model_bytes)
    ver_batch = load_batch(source.verification.paths, spec)
    outputs = [config.logits_output, config.features_output]
    ref = run_onnx(graph.fp32, ver_batch, outputs, spec.input_name, threads=2)
    new = run_onnx(q.model_bytes, ver_batch, outputs, spec.input_name, threads=2)
    thresholds, tdetails = fit_thresholds(q.model_bytes, source, config, cache)
    numbers = compare_models(ref, new, source.verification.targets, graph.weights, source.labels, thresholds)
    verdict = gate(numbers, config.criteria)
    report["gate"] = {"set": source.verification.name, **numbers, **verdict}
    if config.debug:
        report["quantization_debug"] = debug_quantization(
            prepared, q.model_bytes, ArrayCalibrationReader(ver_batch[:16], spec.input_name))
    if config.measure_latency:
        report["latency_ms_batch1_1thread"] = {"fp32": latency_ms(graph.fp32, ver_batch, spec.input_name),
                                               "int8": latency_ms(q.model_bytes, ver_batch, spec.input_name)}
    if verdict["passed"]:
        provenance["quantization"] = {k: v for k, v in report["quantization"].items() if k != "float_reasons"}
        provenance["int8_verification"] = {k: numbers.get(k) for k in (
            "images", "mean_auc_ref", "mean_auc_new", "mean_auc_drop_points", "decision_flip_rate",
            "decision_flips", "decision_pairs", "cam_pearson_median", "cam_pearson_median_all_pairs",
            "cam_pairs_one_empty", "logit_max_abs_diff", "logit_mean_abs_diff")}
        provenance["int8_verification"]["criteria"] = verdict["criteria"]
        return Candidate(q.model_bytes, "int8", thresholds, tdetails)
    if not config.fallback_fp32:
        raise QuantizationGateError("INT8 verification gate failed: " + "; ".join(verdict["failures"]),
                                    report["gate"])
    provenance["int8_rejected"] = {"failures": verdict["failures"],
                                   "mean_auc_drop_points": numbers["mean_auc_drop_points"],
                                   "cam_pearson_median": numbers["cam_pearson_median"],
                                   "action": "shipped fp32 (--fallback-fp32)"}
    return None


def fit_scope_gate(model_bytes: bytes, source: ExportSource, config: ExportConfig,
                   report: dict[str, Any]) -> ScopeSpec | None:
    """Step 4: the scope gate on ``model_bytes``'s pooled features (``config.scope``; None: on from
    ``SCOPE_AUTO_MIN_IMAGES`` training images). Density on the training images (the calibration pool), threshold
    on the run's calibration split (never the held-out evaluation set; without a calibration split, out-of-fold
    training images). Sets ``report["scope"]``."""
    pool = source.calibration_pool
    n_pool = len(pool.paths) if pool is not None else 0
    wanted = config.scope
    if wanted is None:  # default: on when there are enough training images to fit it
        wanted = n_pool >= SCOPE_AUTO_MIN_IMAGES
        if not wanted:
            report["scope"] = {"skipped": f"{n_pool} training images (< {SCOPE_AUTO_MIN_IMAGES}): no scope gate "
                                          "fitted (--scope forces one)"}
            return None
    if not wanted:
        report["scope"] = None
        return None
    if n_pool < SCOPE_MIN_IMAGES:
        raise InvalidArgumentError(f"the scope gate needs at least {SCOPE_MIN_IMAGES} training images (the "
                                   f"calibration pool has {n_pool}); pass --no-scope")
    t = time.perf_counter()
    spec, features_output = source.spec, config.features_output
    train = pooled_features(model_bytes, pool.paths, spec, features_output)
    tset = source.threshold_set
    use_tset = tset is not None and tset is not source.verification and bool(tset.paths)
    if use_tset:
        overlap = {str(p) for p in tset.paths} & {str(p) for p in pool.paths}
        if overlap:
            raise InvalidArgumentError(f"{len(overlap)} threshold images are also training images; the scope "
                                       "threshold must come from images the density model did not see")
    held = pooled_features(model_bytes, tset.paths, spec, features_output) if use_tset else None
    scope = fit_scope(train, held, k=config.scope_k, quantile=config.scope_quantile, seed=config.seed,
                      features_output=features_output, fit_set=pool.name,
                      threshold_set=tset.name if use_tset else None)
    nbytes = len(json.dumps(scope.to_dict(), allow_nan=False))
    report["scope"] = {"threshold": scope.threshold, "threshold_rule": scope.threshold_rule, "k": scope.k,
                       "transform": scope.transform, "manifest_bytes": nbytes, "statistics": scope.statistics,
                       "seconds": round(time.perf_counter() - t, 1)}
    return scope


def _manifest(source: ExportSource, config: ExportConfig, graph: ExportedGraph, candidate: Candidate,
              model_id: str, provenance: dict[str, Any], scope: ScopeSpec | None, spec=None):
    manifest = build_manifest(model_id=model_id, labels=source.labels, thresholds=candidate.thresholds,
                              spec=spec or source.spec, weights=graph.weights, bias=graph.bias,
                              precision=candidate.precision, provenance=provenance, **config.output_names)
    if scope is not None:
        manifest = replace(manifest, scope=scope)
        manifest.validate()
    return manifest


def write_checked_bundle(out: str | os.PathLike, source: ExportSource, config: ExportConfig, graph: ExportedGraph,
                         candidate: Candidate, base_id: str, provenance: dict[str, Any], scope: ScopeSpec | None,
                         report: dict[str, Any]) -> str:
    """Step 5: manifest + bundle at :func:`bundle_path`, loaded back with the device's own checks (checksum,
    wiring, head identity) and the head identity measured on real images. Returns the model SHA-256."""
    path = bundle_path(out, candidate.precision)
    if path != Path(out):
        check_outputs(path, None, overwrite=config.overwrite)
    manifest = _manifest(source, config, graph, candidate, f"{base_id}-{candidate.precision}", provenance, scope)
    sha = write_bundle(candidate.model, manifest, path)
    bundle = load_bundle(path, threads=1)
    bl, bf = bundle.session.run([config.logits_output, config.features_output],
                                {source.spec.input_name: graph.probe})
    head_err = float(np.abs(bf.mean(axis=(2, 3)) @ graph.weights.T + graph.bias - bl).max())
    report["bundle"] = {"path": str(path), "precision": candidate.precision, "model_sha256": sha,
                        "size_bytes": path.stat().st_size, "head_identity_max_abs_err_real_images": head_err,
                        "head_check_atol": HEAD_ATOL[candidate.precision], "loads_with_load_bundle": True}
    report["files"]["bundle_bytes"] = path.stat().st_size
    return sha


def write_ingraph_bundle(ingraph_out: str | os.PathLike, source: ExportSource, config: ExportConfig,
                         graph: ExportedGraph, candidate: Candidate, base_id: str, provenance: dict[str, Any],
                         scope: ScopeSpec | None, base_sha: str, report: dict[str, Any]) -> None:
    """Step 5b: the bytes-in variant of the shipped model, compared with the Python path on real files."""
    spec = source.spec
    ig_bytes = build_ingraph_model(candidate.model, spec)
    cmp_paths = (source.verification or graph.parity_set).paths[:config.ingraph_images]
    agreement = compare_ingraph(ig_bytes, candidate.model, cmp_paths, spec, weights=graph.weights,
                                **config.output_names)
    ig_prov = dict(provenance)
    ig_prov["ingraph"] = {
        "input": f"{BYTES_INPUT}: the encoded PNG/JPEG file as a 1-D uint8 tensor (batch of one)",
        "decoder": "onnxruntime-extensions DecodeImage (register its custom-op library)",
        "resize_onnx": RESIZE_MODES.get(spec.resize), "python_resize": spec.resize,
        "preprocessing_spec_note": "preprocessing happens inside the graph; the spec records what it emulates",
        "refuses": ["non-PNG/JPEG bytes", "truncated/corrupt files", "grayscale JPEG (decoder bug)", "12-bit JPEG"],
        "agreement_with_python_path": agreement,
        "base_bundle_sha256": base_sha,
    }
    manifest = _manifest(source, config, graph, candidate, f"{base_id}-{candidate.precision}-ingraph", ig_prov,
                         scope, spec=replace(spec, input_name=BYTES_INPUT))
    ig_sha = write_bundle(ig_bytes, manifest, ingraph_out)
    read_manifest(Path(ingraph_out).read_bytes())  # checksum + manifest round trip
    report["ingraph"] = {"path": str(ingraph_out), "model_sha256": ig_sha,
                         "size_bytes": Path(ingraph_out).stat().st_size, "agreement": agreement,
                         "note": "load_bundle refuses it by design (its input is bytes, not N x C x H x W); "
                                 "open it with export.ingraph.ingraph_session / run_ingraph"}
    report["files"]["ingraph_bundle_bytes"] = Path(ingraph_out).stat().st_size


def export_bundle(source: ExportSource, out: str | os.PathLike, config: ExportConfig | None = None, *,
                  ingraph_out: str | os.PathLike | None = None, report_path: str | os.PathLike | None = None,
                  **options: Any) -> dict[str, Any]:
    """Run the pipeline (module docstring) with ``config``; returns the report (also written to ``report_path``).

    ``options`` are :class:`ExportConfig` fields that override ``config``, a shorthand for scripts and tests:
    ``export_bundle(src, out, precision="fp32")`` is ``export_bundle(src, out, ExportConfig(precision="fp32"))``.
    The bundle lands at :func:`bundle_path` (``report["bundle"]["path"]``).
    """
    unknown = sorted(set(options) - {f.name for f in fields(ExportConfig)})
    if unknown:
        raise TypeError(f"export_bundle got unknown option(s) {unknown}; see export.build_bundle.ExportConfig")
    config = replace(config or ExportConfig(), **options)
    check_outputs(out, ingraph_out, overwrite=config.overwrite)
    base_id = config.model_id or source.model_id
    report: dict[str, Any] = {"model_id": base_id, "requested_precision": config.precision, "files": {}}
    t0 = time.perf_counter()
    graph = export_graph(source, config, report)
    provenance = dict(source.provenance)
    provenance["export"] = _export_provenance(source, config, report)
    cache: dict = {}
    if config.temperature:
        graph = fit_temperatures_step(source, config, graph, report, provenance, cache)
    candidate = None
    if config.precision == "int8":
        try:
            candidate = quantise_and_gate(source, config, graph, report, provenance, cache)
        except QuantizationGateError:
            report["result"] = "refused: INT8 gate failed"
            write_report(report, report_path)
            raise
    if candidate is None:  # fp32 asked for, or the INT8 fallback
        candidate = Candidate(graph.fp32, "fp32", *fit_thresholds(graph.fp32, source, config, cache))
    provenance["thresholds"] = report["thresholds"] = candidate.threshold_details
    scope = fit_scope_gate(candidate.model, source, config, report)
    sha = write_checked_bundle(out, source, config, graph, candidate, base_id, provenance, scope, report)
    if ingraph_out:
        write_ingraph_bundle(ingraph_out, source, config, graph, candidate, base_id, provenance, scope, sha, report)
    report["result"] = f"wrote {candidate.precision} bundle"
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(report, report_path)
    return report
