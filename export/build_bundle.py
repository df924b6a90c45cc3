"""The whole export pipeline: PyTorch model -> checked ONNX -> (INT8 + gate) -> manifest -> bundle(s) + report.

Order matters and every step can refuse:
  1. export fp32 ONNX (checker full_check) and compare it with PyTorch on real images (ParityError);
  2. INT8 only: calibrate on real training images, quantize (float CAM head), then compare INT8
     with fp32 on held-out labelled images: AUC drop and CAM agreement (QuantizationGateError,
     or with ``fallback_fp32`` ship fp32 and record why in the provenance);
  3. choose thresholds on the shipped model's outputs (calibration split), fit the input scope gate on the shipped
     model's pooled features of the training images (``export.scope_fit``; on by default when there are training
     images), build the manifest, write the bundle and load it back with ``cxr_edge.bundle.load_bundle``
     (checksum, wiring, head identity);
  4. optional bytes-in variant (``export.ingraph``), compared with the Python path on real files.
The verification report JSON holds every number, also when the gate fails.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cxr_edge.bundle import load_bundle, read_manifest, write_bundle
from cxr_edge.errors import InvalidArgumentError

from .calibration import ArrayCalibrationReader, select_calibration
from .errors import QuantizationGateError
from .images import load_batch
from .ingraph import BYTES_INPUT, RESIZE_MODES, build_ingraph_model, ingraph_session, run_ingraph
from .manifest_build import HEAD_ATOL, build_manifest
from .onnx_export import DEFAULT_OPSET, check_parity, classifier_weights, export_onnx, optimize_offline, run_onnx
from .quantize import DEFAULT_PRESET, debug_quantization, prepare_for_quantization, quantize_int8
from .scope_fit import DEFAULT_K as SCOPE_K
from .scope_fit import DEFAULT_QUANTILE as SCOPE_QUANTILE
from .scope_fit import MIN_FIT_IMAGES as SCOPE_MIN_IMAGES
from .scope_fit import fit_scope, pooled_features
from .source import ExportSource
from .thresholds import choose_thresholds
from .verify import GateCriteria, cam_correlations, compare_models, gate, sigmoid

PARITY_IMAGES = 32
#: the scope gate is fitted by default only from this many training images on (a density of fewer is noise;
#: ``scope=True`` / ``--scope`` fits one from as few as ``export.scope_fit.MIN_FIT_IMAGES``)
SCOPE_AUTO_MIN_IMAGES = 100


def _write_report(report: dict[str, Any], path: str | os.PathLike | None) -> None:
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


def _fit_thresholds(model_bytes: bytes, source: ExportSource, spec, labels, names: dict, cache: dict, *,
                    method: str, target: float, min_positive_patients: int, seed: int):
    """Thresholds on ``model_bytes``'s outputs for the source's calibration (threshold) set."""
    tset = source.threshold_set
    probs = targets = pids = None
    if tset is not None and tset.targets is not None:
        if "batch" not in cache:
            cache["batch"] = load_batch(tset.paths, spec)
        probs = sigmoid(run_onnx(model_bytes, cache["batch"], [names["logits_output"]], spec.input_name,
                                 threads=2)[0])
        targets, pids = tset.targets, tset.patient_ids
    thresholds, details = choose_thresholds(probs, targets, labels, method=method, target=target,
                                            patient_ids=pids, min_positive_patients=min_positive_patients,
                                            seed=seed)
    if tset is not None:
        details["set"] = tset.name
        if tset is source.verification:
            details["caveat"] = ("chosen on the held-out evaluation images (the run has no calibration split): "
                                 "sensitivity/specificity at these thresholds are optimistic on this set")
    return thresholds, details


def _fit_scope_gate(model_bytes: bytes, source: ExportSource, spec, features_output: str, *, k: int,
                    quantile: float, seed: int):
    """Scope gate on ``model_bytes``'s pooled features: density on the training images (the calibration pool),
    threshold on the run's calibration split (never the held-out evaluation set; without a calibration split,
    out-of-fold training images). Returns (ScopeSpec, report dict)."""
    t = time.perf_counter()
    pool = source.calibration_pool
    train = pooled_features(model_bytes, pool.paths, spec, features_output)
    tset = source.threshold_set
    use_tset = tset is not None and tset is not source.verification and bool(tset.paths)
    if use_tset:
        overlap = {str(p) for p in tset.paths} & {str(p) for p in pool.paths}
        if overlap:
            raise InvalidArgumentError(f"{len(overlap)} threshold images are also training images; the scope "
                                       "threshold must come from images the density model did not see")
    held = pooled_features(model_bytes, tset.paths, spec, features_output) if use_tset else None
    scope = fit_scope(train, held, k=k, quantile=quantile, seed=seed, features_output=features_output,
                      fit_set=pool.name, threshold_set=tset.name if use_tset else None)
    nbytes = len(json.dumps(scope.to_dict(), allow_nan=False))
    report = {"threshold": scope.threshold, "threshold_rule": scope.threshold_rule, "k": scope.k,
              "transform": scope.transform, "manifest_bytes": nbytes, "statistics": scope.statistics,
              "seconds": round(time.perf_counter() - t, 1)}
    return scope, report


def export_bundle(source: ExportSource, out: str | os.PathLike, *, precision: str = "int8", calib_images: int = 200,
                  preset: str = DEFAULT_PRESET, calibrate_method: str = "minmax", fallback_fp32: bool = False,
                  ingraph_out: str | os.PathLike | None = None, ingraph_images: int = 50,
                  report_path: str | os.PathLike | None = None, threshold_method: str = "breakeven",
                  min_sensitivity: float = 0.9, min_positive_patients: int = 10, model_id: str | None = None, criteria: GateCriteria = GateCriteria(), opset: int = DEFAULT_OPSET,
                  exporter: str = "torchscript", optimize: bool = True, debug: bool = False,
                  logits_output: str = "logits", features_output: str = "features", seed: int = 0,
                  measure_latency: bool = True, scope: bool | None = None, scope_k: int = SCOPE_K,
                  scope_quantile: float = SCOPE_QUANTILE) -> dict[str, Any]:
    """Run the pipeline (module docstring); returns the report (also written to ``report_path``).

    ``scope``: fit the input scope gate into the manifest (``None``: when the source has at least
    ``SCOPE_AUTO_MIN_IMAGES`` training images).
    """
    if precision not in ("int8", "fp32"):
        raise InvalidArgumentError(f"precision must be int8 or fp32, got {precision!r}")
    spec, labels = source.spec, source.labels
    base_id = model_id or source.model_id
    report: dict[str, Any] = {"model_id": base_id, "requested_precision": precision, "files": {}}
    t0 = time.perf_counter()
    names = dict(logits_output=logits_output, features_output=features_output)

    # 1. fp32 ONNX + parity with PyTorch on real images
    fp32 = export_onnx(source.model, spec, opset=opset, exporter=exporter, **names)
    if optimize:
        fp32 = optimize_offline(fp32)
    parity_set = source.verification or source.calibration_pool
    if parity_set is None:
        raise InvalidArgumentError("no real images to verify the export with: give a run directory or image lists")
    parity_batch = load_batch(parity_set.paths[:PARITY_IMAGES], spec)
    report["parity_fp32_vs_torch"] = {"set": parity_set.name, **check_parity(source.model, fp32, parity_batch, spec,
                                                                              **names)}
    report["files"]["fp32_onnx_bytes"] = len(fp32)
    weights, bias = classifier_weights(source.model)
    shipped, shipped_precision = fp32, "fp32"
    provenance = dict(source.provenance)
    provenance["export"] = {"opset": opset, "exporter": exporter, "offline_optimization": "basic" if optimize else None,
                            "parity_fp32_vs_torch": {k: report["parity_fp32_vs_torch"][k] for k in (
                                "images", "logits_max_abs_diff", "features_max_abs_diff")},
                            "calibration_pool": source.calibration_pool.describe() if source.calibration_pool else None,
                            "verification_set": source.verification.describe() if source.verification else None}

    # 2. INT8 + gate (decision flips at the thresholds the INT8 candidate would ship with)
    ver_batch = ver_logits = None
    tcache: dict = {}
    tkw = dict(method=threshold_method, target=min_sensitivity, min_positive_patients=min_positive_patients,
               seed=seed)
    if precision == "int8":
        if source.verification is None or source.verification.targets is None:
            raise InvalidArgumentError("INT8 export needs a labelled held-out verification set for the gate")
        if source.calibration_pool is None:
            raise InvalidArgumentError("INT8 export needs calibration images")
        calib_paths = select_calibration(source.calibration_pool.paths, calib_images, seed)
        reader = ArrayCalibrationReader(load_batch(calib_paths, spec), spec.input_name)
        prepared = prepare_for_quantization(fp32)
        q = quantize_int8(prepared, reader, features_output=features_output, input_name=spec.input_name,
                          preset=preset, calibrate_method=calibrate_method, prepared=True)
        report["quantization"] = {**q.summary(), "calibration_pool": source.calibration_pool.name}
        report["files"]["int8_onnx_bytes"] = len(q.model_bytes)
        ver_batch = load_batch(source.verification.paths, spec)
        ref = run_onnx(fp32, ver_batch, [logits_output, features_output], spec.input_name, threads=2)
        new = run_onnx(q.model_bytes, ver_batch, [logits_output, features_output], spec.input_name, threads=2)
        ver_logits = ref[0]
        thresholds, tdetails = _fit_thresholds(q.model_bytes, source, spec, labels, names, tcache, **tkw)
        numbers = compare_models(ref, new, source.verification.targets, weights, labels, thresholds)
        verdict = gate(numbers, criteria)
        report["gate"] = {"set": source.verification.name, **numbers, **verdict}
        if debug:
            report["quantization_debug"] = debug_quantization(
                prepared, q.model_bytes, ArrayCalibrationReader(ver_batch[:16], spec.input_name))
        if measure_latency:
            report["latency_ms_batch1_1thread"] = {"fp32": latency_ms(fp32, ver_batch, spec.input_name),
                                                   "int8": latency_ms(q.model_bytes, ver_batch, spec.input_name)}
        if verdict["passed"]:
            shipped, shipped_precision = q.model_bytes, "int8"
            provenance["quantization"] = {k: v for k, v in report["quantization"].items() if k != "float_reasons"}
            provenance["int8_verification"] = {k: numbers.get(k) for k in (
                "images", "mean_auc_ref", "mean_auc_new", "mean_auc_drop_points", "decision_flip_rate",
                "decision_flips", "decision_pairs", "cam_pearson_median", "cam_pearson_median_all_pairs",
                "cam_pairs_one_empty", "logit_max_abs_diff", "logit_mean_abs_diff")}
            provenance["int8_verification"]["criteria"] = verdict["criteria"]
        elif fallback_fp32:
            provenance["int8_rejected"] = {"failures": verdict["failures"], "mean_auc_drop_points":
                                           numbers["mean_auc_drop_points"],
                                           "cam_pearson_median": numbers["cam_pearson_median"],
                                           "action": "shipped fp32 (--fallback-fp32)"}
        else:
            report["result"] = "refused: INT8 gate failed"
            _write_report(report, report_path)
            raise QuantizationGateError("INT8 verification gate failed: " + "; ".join(verdict["failures"]),
                                        report["gate"])

    # 3. thresholds (fitted with the gate's candidate above when INT8 shipped), manifest, bundle, load-back
    if shipped_precision != "int8":
        thresholds, tdetails = _fit_thresholds(shipped, source, spec, labels, names, tcache, **tkw)
    provenance["thresholds"] = tdetails
    report["thresholds"] = tdetails
    scope_spec = None
    n_pool = len(source.calibration_pool.paths) if source.calibration_pool is not None else 0
    if scope is None:  # default: on when there are enough training images to fit it
        scope = n_pool >= SCOPE_AUTO_MIN_IMAGES
        if not scope:
            report["scope"] = {"skipped": f"{n_pool} training images (< {SCOPE_AUTO_MIN_IMAGES}): no scope gate "
                                          "fitted (--scope forces one)"}
    if scope:
        if n_pool < SCOPE_MIN_IMAGES:
            raise InvalidArgumentError(f"the scope gate needs at least {SCOPE_MIN_IMAGES} training images (the "
                                       f"calibration pool has {n_pool}); pass --no-scope")
        scope_spec, report["scope"] = _fit_scope_gate(shipped, source, spec, features_output, k=scope_k,
                                                      quantile=scope_quantile, seed=seed)
    elif "scope" not in report:
        report["scope"] = None
    manifest = build_manifest(model_id=f"{base_id}-{shipped_precision}", labels=labels, thresholds=thresholds,
                              spec=spec, weights=weights, bias=bias, precision=shipped_precision,
                              provenance=provenance, **names)
    if scope_spec is not None:
        manifest = replace(manifest, scope=scope_spec)
        manifest.validate()
    out = Path(out)
    sha = write_bundle(shipped, manifest, out)
    bundle = load_bundle(out, threads=1)  # checksum, wiring, head identity: the device's own checks
    probe = (ver_batch if ver_batch is not None else parity_batch)[:4]
    bl, bf = bundle.session.run([logits_output, features_output], {spec.input_name: probe})
    head_err = float(np.abs(bf.mean(axis=(2, 3)) @ weights.T + bias - bl).max())
    report["bundle"] = {"path": str(out), "precision": shipped_precision, "model_sha256": sha,
                        "size_bytes": out.stat().st_size, "head_identity_max_abs_err_real_images": head_err,
                        "head_check_atol": HEAD_ATOL[shipped_precision], "loads_with_load_bundle": True}
    report["files"]["bundle_bytes"] = out.stat().st_size

    # 4. optional bytes-in variant
    if ingraph_out:
        ig_bytes = build_ingraph_model(shipped, spec)
        ig_spec = replace(spec, input_name=BYTES_INPUT)
        ig_prov = dict(provenance)
        cmp_paths = (source.verification or parity_set).paths[:ingraph_images]
        agreement = compare_ingraph(ig_bytes, shipped, cmp_paths, spec, weights=weights, **names)
        ig_prov["ingraph"] = {
            "input": f"{BYTES_INPUT}: the encoded PNG/JPEG file as a 1-D uint8 tensor (batch of one)",
            "decoder": "onnxruntime-extensions DecodeImage (register its custom-op library)",
            "resize_onnx": RESIZE_MODES.get(spec.resize), "python_resize": spec.resize,
            "preprocessing_spec_note": "preprocessing happens inside the graph; the spec records what it emulates",
            "refuses": ["non-PNG/JPEG bytes", "truncated/corrupt files", "grayscale JPEG (decoder bug)",
                        "12-bit JPEG"],
            "agreement_with_python_path": agreement,
            "base_bundle_sha256": sha,
        }
        ig_manifest = build_manifest(model_id=f"{base_id}-{shipped_precision}-ingraph", labels=labels,
                                     thresholds=thresholds, spec=ig_spec, weights=weights, bias=bias,
                                     precision=shipped_precision, provenance=ig_prov, **names)
        if scope_spec is not None:
            ig_manifest = replace(ig_manifest, scope=scope_spec)
        ig_sha = write_bundle(ig_bytes, ig_manifest, ingraph_out)
        read_manifest(Path(ingraph_out).read_bytes())  # checksum + manifest round trip
        report["ingraph"] = {"path": str(ingraph_out), "model_sha256": ig_sha,
                             "size_bytes": Path(ingraph_out).stat().st_size, "agreement": agreement,
                             "note": "load_bundle refuses it by design (its input is bytes, not N x C x H x W); "
                                     "open it with export.ingraph.ingraph_session / run_ingraph"}
        report["files"]["ingraph_bundle_bytes"] = Path(ingraph_out).stat().st_size
    report["result"] = f"wrote {shipped_precision} bundle"
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _write_report(report, report_path)
    return report
