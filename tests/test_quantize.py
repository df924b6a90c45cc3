"""Static INT8 quantization (float CAM head) and the INT8-vs-fp32 verification gate."""
from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest

from conftest import NIH_LABELS, need_shared

from cxr_edge.bundle import load_bundle, read_manifest, write_bundle
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from cxr_edge.preprocess import preprocess
from export.calibration import ArrayCalibrationReader, select_calibration
from export.errors import QuantizationGateError
from export.manifest_build import HEAD_ATOL, build_manifest
from export.onnx_export import classifier_weights, export_onnx, run_onnx
from export.quantize import (PRESETS, debug_quantization, float_nodes, leading_float_region, prepare_for_quantization,
                             quantize_int8, runtime_requantized)
from export.toy import make_toy_model, synthetic_radiographs
from export.verify import GateCriteria, compare_models, enforce, gate, pearson

SPEC = PreprocessSpec(input_size=(112, 112), mean=(0.49465,), std=(0.25223,), min_side=32)
VERIFY_IMAGES = 160  # AUC drop is a noisy number on few images; 160 keeps the passing case far from 0.5


# ------------------------------------------------------------------ graph-level checks (no shared data)
@pytest.fixture(scope="module")
def synth():
    batch = preprocess(synthetic_radiographs(12, 160, seed=2), SPEC)
    model = make_toy_model(bn_batch=batch, seed=0)
    return model, export_onnx(model, SPEC), batch


def test_float_nodes_are_the_cam_head_and_first_conv(synth):
    _, fp32, _ = synth
    prepared = onnx.load_from_string(prepare_for_quantization(fp32))
    reasons = float_nodes(prepared, "features", "image")
    by_name = {n.name: n for n in prepared.graph.node}
    ops = sorted(by_name[n].op_type for n in reasons)
    assert ops == ["Conv", "Gemm", "ReduceMean", "Relu"]
    producer = next(n for n in prepared.graph.node if "features" in n.output)
    assert producer.name in reasons and "features" in reasons[producer.name]
    first_conv = next(n for n in reasons if by_name[n].op_type == "Conv")
    assert "image" in by_name[first_conv].input
    assert float_nodes(prepared, "features", "image", leading_convs=0).keys() == reasons.keys() - {first_conv}


def test_int8_keeps_head_float_and_head_identity(tmp_path, synth):
    model, fp32, batch = synth
    q = quantize_int8(fp32, ArrayCalibrationReader(batch, "image"), features_output="features", input_name="image",
                      preset="u8s8_rr")
    proto = onnx.load_from_string(q.model_bytes)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and q.quantized_nodes >= 8
    producers = {o: n for n in proto.graph.node for o in n.output}
    head = [n for n in proto.graph.node if n.name in q.nodes_to_exclude and n.op_type in ("Gemm", "ReduceMean")]
    assert head  # the float head exists, so the check below is not vacuous
    for node in head:
        assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers), node.name
    assert all("features" not in n.input for n in proto.graph.node if n.op_type == "QuantizeLinear")
    out_types = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
    assert out_types == {"logits": onnx.TensorProto.FLOAT, "features": onnx.TensorProto.FLOAT}
    w, b = classifier_weights(model)
    logits, feats = run_onnx(q.model_bytes, batch[:3], ["logits", "features"], "image")
    assert logits.shape == (3, 14)  # dynamic batch survives quantization
    assert np.abs(feats.mean(axis=(2, 3)) @ w.T + b - logits).max() < 1e-4
    manifest = build_manifest(model_id="toy-int8", labels=NIH_LABELS, thresholds=[0.5] * 14, spec=SPEC, weights=w,
                              bias=b, precision="int8")
    write_bundle(q.model_bytes, manifest, tmp_path / "int8.onnx")
    bundle = load_bundle(tmp_path / "int8.onnx", threads=1)
    assert bundle.manifest.cam.head_check_atol == HEAD_ATOL["int8"]
    assert len(q.model_bytes) < 0.7 * len(fp32)


def _runtime_qlinearconvs(model_bytes: bytes, tmp_path) -> int:
    """QLinearConv nodes in the graph onnxruntime actually runs (the device's session options)."""
    import onnxruntime as ort

    from cxr_edge.bundle import session_options

    opts = session_options(1)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "QLinearConv" for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_float_leading_convs_stay_float_in_the_graph_onnxruntime_runs(tmp_path, synth):
    """The knob keeps the first N convolutions float *at run time*: no Q/DQ on their inputs or weights, and
    onnxruntime runs N - 1 fewer QLinearConv than with the first conv alone float - it cannot re-quantize them."""
    _, fp32, batch = synth
    prepared = prepare_for_quantization(fp32)
    graph = onnx.load_from_string(prepared).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    n = 4  # the toy's first residual block ends after its 4th conv
    region = leading_float_region(graph, "image", n)
    assert [c for c in convs if c in region] == convs[:n]
    reader = ArrayCalibrationReader(batch, "image")
    q = quantize_int8(prepared, reader, features_output="features", input_name="image", prepared=True,
                      float_leading_convs=n)
    assert q.summary()["float_leading_convs"] == n and set(region) <= set(q.float_reasons)
    qproto = onnx.load_from_string(q.model_bytes)
    producers = {o: m for m in qproto.graph.node for o in m.output}
    for node in qproto.graph.node:
        if node.name in convs[:n]:
            assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers), node.name
    assert runtime_requantized(qproto, q.float_reasons) == []
    default = quantize_int8(prepared, reader, features_output="features", input_name="image", prepared=True)
    assert _runtime_qlinearconvs(default.model_bytes, tmp_path) - _runtime_qlinearconvs(q.model_bytes, tmp_path) \
        == n - 1
    with pytest.raises(InvalidArgumentError, match="residual.*valid values here: 0, 1, 4"):
        leading_float_region(graph, "image", 3)  # would split block 1's skip connection
    with pytest.raises(InvalidArgumentError):
        leading_float_region(graph, "image", len(convs))


def test_a_mid_graph_conv_cannot_stay_float_and_is_refused(tmp_path, synth):
    """Why :func:`runtime_requantized` exists: excluding a Conv whose input is dequantized leaves it float in the
    file, but onnxruntime's WeightBiasQuantization quantizes it at load (per-tensor weights). If onnxruntime stops
    doing that, this test fails and the refusal can be relaxed."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    _, fp32, batch = synth
    prepared = prepare_for_quantization(fp32)
    convs = [n.name for n in onnx.load_from_string(prepared).graph.node if n.op_type == "Conv"]
    mid = convs[len(convs) // 2]
    src = tmp_path / "prepared.onnx"
    src.write_bytes(prepared)
    counts = {}
    for name, exclude in (("first", [convs[0]]), ("mid", [convs[0], mid])):
        dst = tmp_path / f"{name}.onnx"
        quantize_static(str(src), str(dst), ArrayCalibrationReader(batch, "image"), quant_format=QuantFormat.QDQ,
                        per_channel=True, nodes_to_exclude=exclude)
        counts[name] = _runtime_qlinearconvs(dst.read_bytes(), tmp_path)
    assert runtime_requantized(onnx.load(str(tmp_path / "mid.onnx")), {convs[0], mid}) == [mid]
    assert counts["mid"] == counts["first"]  # "float" in the file, quantized when run
    with pytest.raises(InvalidArgumentError, match="WeightBiasQuantization"):
        quantize_int8(prepared, ArrayCalibrationReader(batch, "image"), features_output="features",
                      input_name="image", prepared=True, extra_exclude=[mid])


def test_quantize_refuses_bad_settings(synth):
    _, fp32, batch = synth
    reader = ArrayCalibrationReader(batch, "image")
    with pytest.raises(InvalidArgumentError):
        quantize_int8(fp32, reader, features_output="features", input_name="image", preset="dynamic")
    with pytest.raises(InvalidArgumentError):
        quantize_int8(fp32, reader, features_output="features", input_name="image", extra_exclude=["nope"])
    with pytest.raises(InvalidArgumentError):
        ArrayCalibrationReader(batch.astype(np.float64), "image")
    assert set(PRESETS) >= {"u8u8", "u8s8_rr"}


def test_calibration_selection_is_seeded_and_bounded():
    pool = [f"img_{i}.png" for i in range(100)]
    a, b = select_calibration(pool, 10, seed=1), select_calibration(pool, 10, seed=1)
    assert a == b and len(set(a)) == 10 and a != select_calibration(pool, 10, seed=2)
    assert select_calibration(pool, 500) == pool
    with pytest.raises(InvalidArgumentError):
        select_calibration(pool, 0)


def test_gate_logic_on_synthetic_outputs():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 2)) < 0.4).astype(np.float32)
    logits = (2.0 * targets + rng.normal(0, 1, targets.shape)).astype(np.float32)
    feats = rng.random((200, 8, 4, 4)).astype(np.float32)
    w = np.abs(rng.normal(0, 1, (2, 8))).astype(np.float32)
    same = compare_models((logits, feats), (logits, feats), targets, w, ["a", "b"])
    assert same["mean_auc_drop_points"] == 0.0 and same["cam_pearson_median"] == pytest.approx(1.0)
    assert gate(same)["passed"]
    noisy_logits = logits + rng.normal(0, 1.5, logits.shape).astype(np.float32)  # ranking destroyed, CAMs kept
    worse = compare_models((logits, feats), (noisy_logits, feats), targets, w, ["a", "b"])
    verdict = gate(worse)
    assert not verdict["passed"] and len(verdict["failures"]) == 1 and "AUC" in verdict["failures"][0]
    shuffled = feats[:, :, ::-1, ::-1].copy()  # CAMs moved, logits kept
    moved = compare_models((logits, feats), (logits, shuffled), targets, w, ["a", "b"])
    assert not gate(moved)["passed"] and "CAM" in gate(moved)["failures"][0]
    with pytest.raises(QuantizationGateError) as err:
        enforce(moved, GateCriteria())
    assert err.value.numbers["cam_pearson_median"] < 0.9
    assert pearson(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0 and pearson(np.zeros(4), np.arange(4.0)) == 0.0
    # maps empty in both models agree trivially: left out of the median, and a gate with nothing to
    # compare refuses instead of reading r = 1
    empty = compare_models((logits, -feats), (logits, -feats), targets, w, ["a", "b"])
    assert empty["cam_pearson_median"] is None and empty["cam_pairs_both_empty"] == 400
    assert any("cannot be measured" in f for f in gate(empty)["failures"])


# ------------------------------------------------------------------ the gate on real radiographs
@pytest.fixture(scope="module")
def real():
    from export.images import load_batch, read_labels, resolve_images
    from models.datasets import read_image_list

    sample = need_shared("data", "nih-cxr14-sample")
    teachers = need_shared("teachers")
    train = resolve_images(read_image_list(teachers / "teacher_train_images.csv"), sample / "images")
    val = resolve_images(read_image_list(teachers / "teacher_val_images.csv"), sample / "images")[:VERIFY_IMAGES]
    calib_paths = select_calibration(train, 48, seed=0)
    calib = load_batch(calib_paths, SPEC)
    model = make_toy_model(bn_batch=calib, seed=0)
    fp32 = export_onnx(model, SPEC)
    verify = load_batch(val, SPEC)
    targets = read_labels(sample / "labels.csv", [p.name for p in val], NIH_LABELS)
    ref = run_onnx(fp32, verify, ["logits", "features"], "image", threads=2)
    return dict(model=model, fp32=fp32, calib=calib, verify=verify, targets=targets, ref=ref, train=train, val=val,
                prepared=prepare_for_quantization(fp32))


def _gate_numbers(real, reader, preset="u8s8_rr"):
    q = quantize_int8(real["prepared"], reader, features_output="features", input_name="image", preset=preset,
                      prepared=True)
    new = run_onnx(q.model_bytes, real["verify"], ["logits", "features"], "image", threads=2)
    w, _ = classifier_weights(real["model"])
    return q, compare_models(real["ref"], new, real["targets"], w, NIH_LABELS)


def test_gate_passes_for_a_properly_calibrated_int8_model(real):
    q, numbers = _gate_numbers(real, ArrayCalibrationReader(real["calib"], "image"))
    verdict = gate(numbers)
    assert verdict["passed"], verdict["failures"]
    assert numbers["cam_pearson_median"] > 0.95 and abs(numbers["mean_auc_drop_points"]) < 0.5
    assert numbers["images"] == VERIFY_IMAGES and len(numbers["labels_with_auc"]) >= 10
    debug = debug_quantization(real["prepared"], q.model_bytes, ArrayCalibrationReader(real["verify"][:4], "image"))
    assert debug["activations_compared"] > 5 and all(w["db"] > 30 for w in debug["weights_worst"])


def test_gate_fails_for_int8_calibrated_on_one_constant_image(real):
    constant = np.full_like(real["calib"][:1], float(real["calib"].mean()))
    _, numbers = _gate_numbers(real, ArrayCalibrationReader(constant, "image"))
    verdict = gate(numbers)
    assert not verdict["passed"]
    assert numbers["cam_pearson_median"] < 0.5
    with pytest.raises(QuantizationGateError):
        enforce(numbers)


def _toy_source(real, tmp_path, crippled: bool):
    from export.source import ExportSource, ImageSet

    pool = real["train"]
    if crippled:  # the whole calibration pool is one flat gray PNG: every activation range collapses
        flat = tmp_path / "flat.png"
        cv2.imwrite(str(flat), np.full((160, 160), 120, np.uint8))
        pool = [flat]
    return ExportSource(model=real["model"], spec=SPEC, labels=NIH_LABELS, model_id="toy", architecture="toy",
                        calibration_pool=ImageSet("calibration", pool),
                        verification=ImageSet("verification", real["val"], real["targets"]),
                        threshold_set=None, provenance={"architecture": "toy (random init, unit test)"})


def test_export_bundle_refuses_a_failing_int8_and_writes_the_report(real, tmp_path):
    from export.build_bundle import export_bundle

    src = _toy_source(real, tmp_path, crippled=True)
    out, report = tmp_path / "refused.onnx", tmp_path / "refused.json"
    with pytest.raises(QuantizationGateError) as err:
        export_bundle(src, out, calib_images=1, report_path=report, measure_latency=False)
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["gate"]["passed"] is False and data["result"].startswith("refused")
    assert err.value.numbers["cam_pearson_median"] == data["gate"]["cam_pearson_median"]
    # --fallback-fp32: ship fp32 and say why in the provenance
    fb = export_bundle(src, out, calib_images=1, fallback_fp32=True, report_path=report, measure_latency=False)
    assert fb["bundle"]["precision"] == "fp32"
    manifest = read_manifest(out.read_bytes())
    assert manifest.provenance["precision"] == "fp32" and manifest.provenance["int8_rejected"]["failures"]
    load_bundle(out, threads=1)


def test_export_bundle_ships_a_passing_int8(real, tmp_path):
    from export.build_bundle import export_bundle

    src = _toy_source(real, tmp_path, crippled=False)
    out = tmp_path / "int8.onnx"
    report = export_bundle(src, out, calib_images=48, report_path=tmp_path / "r.json", measure_latency=False)
    assert report["bundle"]["precision"] == "int8" and report["gate"]["passed"]
    assert report["files"]["int8_onnx_bytes"] < report["files"]["fp32_onnx_bytes"]
    assert report["bundle"]["head_identity_max_abs_err_real_images"] < HEAD_ATOL["int8"]
    manifest = load_bundle(out, threads=1).manifest
    prov = manifest.provenance
    assert prov["quantization"]["nodes_to_exclude"] and prov["int8_verification"]["images"] == VERIFY_IMAGES
    assert manifest.thresholds == (0.5,) * 14 and "no calibration data" in prov["thresholds"]["note"]


def test_gate_is_two_sided_counts_flips_and_one_sided_empty_cams():
    rng = np.random.default_rng(1)
    targets = (rng.random((300, 2)) < 0.4).astype(np.float32)
    logits = (1.0 * targets + rng.normal(0, 1, targets.shape)).astype(np.float32)
    feats = rng.random((300, 8, 4, 4)).astype(np.float32)
    w = np.abs(rng.normal(0, 1, (2, 8))).astype(np.float32)
    better = (logits + 2.0 * targets).astype(np.float32)  # the candidate "improves" the AUC: not faithful
    up = compare_models((logits, feats), (better, feats), targets, w, ["a", "b"])
    assert up["mean_auc_drop_points"] < -0.5
    assert not gate(up)["passed"] and "|change|" in gate(up)["failures"][0]
    shifted = (logits + 0.3).astype(np.float32)  # ranking (AUC) unchanged, decisions move
    flips = compare_models((logits, feats), (shifted, feats), targets, w, ["a", "b"], thresholds=[0.5, None])
    assert flips["mean_auc_drop_points"] == pytest.approx(0.0, abs=1e-9)
    assert flips["decision_pairs"] == 300 and flips["decision_flip_rate"] > 0.02  # label b undetermined: not counted
    assert any("flip rate" in f for f in gate(flips)["failures"])
    half_empty = feats.copy()
    half_empty[:150] *= -1  # CAMs of the first 150 images empty in the candidate only
    one = compare_models((logits, feats), (logits, half_empty), targets, w, ["a", "b"])
    assert one["cam_pairs_one_empty"] == 300 and one["cam_pearson_median_all_pairs"] < 0.9
    assert not gate(one)["passed"]


def test_gate_ignores_auc_of_a_degenerate_reference_label(caplog):
    """Issue 12: a near-constant model (logits equal to ~1e-8) got a 9.55-point 'drop' for a 0.0005
    logit difference. The label is reported as degenerate and left out of the AUC change."""
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 2)) < 0.4).astype(np.float32)
    good = (2.0 * targets[:, 0] + rng.normal(0, 1, 200)).astype(np.float32)
    flat = (-3.0 + 1e-8 * rng.normal(0, 1, 200)).astype(np.float32)  # near-constant: ranking = float noise
    ref = np.stack([good, flat], 1)
    new = ref.copy()
    new[:, 1] = -3.0 + 5e-4 * rng.normal(0, 1, 200)  # a tiny change that reorders the flat label at random
    feats = rng.random((200, 8, 4, 4)).astype(np.float32)
    w = np.abs(rng.normal(0, 1, (2, 8))).astype(np.float32)
    with caplog.at_level("WARNING"):
        numbers = compare_models((ref, feats), (new, feats), targets, w, ["good", "flat"])
    assert "flat" in numbers["degenerate_labels"] and "good" not in numbers["degenerate_labels"]
    assert numbers["labels_with_auc"] == ["good"] and numbers["mean_auc_drop_points"] == 0.0
    assert "flat" not in numbers["auc_drop_points_per_label"]
    assert gate(numbers)["passed"]
    assert any("degenerate" in r.getMessage() for r in caplog.records)
    # every label degenerate: the gate cannot measure AUC and says why
    both = compare_models((np.stack([flat, flat], 1), feats), (new[:, [1, 1]], feats), targets, w, ["x", "y"])
    failures = gate(both)["failures"]
    assert any("degenerate" in f and "cannot be measured" in f for f in failures)
