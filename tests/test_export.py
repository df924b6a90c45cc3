"""torch -> ONNX export, parity, dynamic batch, manifest/bundle, thresholds and the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import NIH_LABELS, need_shared

from cxr_edge.bundle import load_bundle, read_manifest, write_bundle
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from cxr_edge.preprocess import preprocess
from export.errors import ParityError
from export.manifest_build import HEAD_ATOL, build_manifest, tool_versions
from export.onnx_export import (check_onnx, check_parity, classifier_weights, export_onnx, optimize_offline,
                                run_onnx, torch_outputs)
from export.thresholds import choose_thresholds
from export.toy import make_toy_model, synthetic_radiographs

SPEC = PreprocessSpec(input_size=(112, 112), mean=(0.49465,), std=(0.25223,), min_side=32)


@pytest.fixture(scope="module")
def synth_batch() -> np.ndarray:
    return preprocess(synthetic_radiographs(6, 160, seed=1), SPEC)


@pytest.fixture(scope="module")
def toy(synth_batch):
    return make_toy_model(num_classes=5, bn_batch=synth_batch, seed=3)


@pytest.fixture(scope="module")
def toy_onnx(toy) -> bytes:
    return export_onnx(toy, SPEC)


def test_export_passes_full_checker_with_manifest_names(toy):
    spec = PreprocessSpec(input_name="pixels", input_size=(112, 112), mean=(0.5,), std=(0.25,), min_side=32)
    data = export_onnx(toy, spec, logits_output="scores", features_output="fmap", opset=17)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert [o.name for o in proto.graph.output] == ["scores", "fmap"]
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 112, 112]


def test_dynamic_batch_rows_match_single_images(toy_onnx, synth_batch):
    three = synth_batch[:3]
    logits3, feats3 = run_onnx(toy_onnx, three, ["logits", "features"], "image")
    assert logits3.shape == (3, 5) and feats3.shape[0] == 3 and feats3.shape[1] == 256
    for i in range(3):
        logits1, feats1 = run_onnx(toy_onnx, three[i:i + 1], ["logits", "features"], "image")
        assert logits1.shape == (1, 5)
        np.testing.assert_allclose(logits1[0], logits3[i], atol=1e-5)
        np.testing.assert_allclose(feats1[0], feats3[i], atol=1e-5)


def test_parity_with_torch_on_synthetic_and_detects_a_changed_model(toy, toy_onnx, synth_batch):
    numbers = check_parity(toy, toy_onnx, synth_batch, SPEC)
    assert numbers["logits_max_abs_diff"] < 1e-3 and numbers["images"] == len(synth_batch)
    changed = make_toy_model(num_classes=5, bn_batch=synth_batch, seed=3)
    with torch.no_grad():
        changed.classifier.bias += 0.05
    with pytest.raises(ParityError) as err:
        check_parity(changed, toy_onnx, synth_batch, SPEC)
    assert err.value.numbers["logits_max_abs_diff"] > 0.04


def test_parity_on_real_images(toy, toy_onnx):
    from export.images import list_image_dir, load_batch

    images = need_shared("data", "nih-cxr14-sample", "images")
    batch = load_batch(list_image_dir(images)[:8], SPEC)
    numbers = check_parity(toy, toy_onnx, batch, SPEC)
    assert numbers["logits_max_abs_diff"] <= 1e-4 + 1e-3 * 10


def test_head_identity_holds_in_the_exported_graph(toy, toy_onnx, synth_batch):
    w, b = classifier_weights(toy)
    logits, feats = run_onnx(toy_onnx, synth_batch, ["logits", "features"], "image")
    assert np.abs(feats.mean(axis=(2, 3)) @ w.T + b - logits).max() < 1e-4
    t_logits, _ = torch_outputs(toy, synth_batch)
    np.testing.assert_allclose(t_logits, logits, atol=1e-4)


def test_offline_optimization_keeps_outputs(toy_onnx, synth_batch):
    opt = optimize_offline(toy_onnx)
    check_onnx(opt)
    a = run_onnx(toy_onnx, synth_batch, ["logits"], "image")[0]
    b = run_onnx(opt, synth_batch, ["logits"], "image")[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_export_refuses_bad_arguments(toy):
    with pytest.raises(InvalidArgumentError):
        export_onnx(toy, SPEC, opset=16)
    with pytest.raises(InvalidArgumentError):
        export_onnx(toy, SPEC, logits_output="x", features_output="x")
    with pytest.raises(InvalidArgumentError):
        export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3)), SPEC)  # no features/head/classifier


def test_manifest_and_bundle_load_with_load_bundle(tmp_path, toy, toy_onnx):
    w, b = classifier_weights(toy)
    labels = tuple(f"finding_{i}" for i in range(5))
    manifest = build_manifest(model_id="toy", labels=labels, thresholds=[0.3, 0.4, 0.5, 0.6, 0.7], spec=SPEC,
                              weights=w, bias=b, precision="fp32", provenance={"architecture": "toy", "seed": 3})
    path = tmp_path / "toy.onnx"
    sha = write_bundle(toy_onnx, manifest, path)
    bundle = load_bundle(path, threads=1)
    m = bundle.manifest
    assert m.model_sha256 == sha and m.labels == labels and m.preprocessing == SPEC
    np.testing.assert_array_equal(m.cam.weights, w)
    assert m.cam.head_check_atol == HEAD_ATOL["fp32"]
    versions = m.provenance["tool_versions"]
    assert {"python", "torch", "onnx", "onnxruntime", "cxr-edge"} <= set(versions)
    assert m.provenance["precision"] == "fp32" and "export_date" in m.provenance
    # a manifest whose CAM weights do not belong to the graph must be refused at load
    bad = build_manifest(model_id="toy", labels=labels, thresholds=[0.5] * 5, spec=SPEC, weights=w * 1.1, bias=b,
                         precision="fp32")
    write_bundle(toy_onnx, bad, tmp_path / "bad.onnx")
    from cxr_edge.errors import ManifestError

    with pytest.raises(ManifestError):
        load_bundle(tmp_path / "bad.onnx", threads=1)


def test_tool_versions_are_real():
    versions = tool_versions()
    assert versions["torch"].startswith(torch.__version__.split("+")[0])
    assert versions["onnx"] == onnx.__version__


def _scores(n=400, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < 0.3).astype(np.float32)
    probs = np.clip(0.25 + 0.5 * targets + rng.normal(0, 0.12, targets.shape), 0, 1)
    return targets, probs


def test_thresholds_youden_sensitivity_and_defaults():
    targets, probs = _scores()
    targets[:, 2] = 0.0  # one class only: no ROC curve, no decision
    thr, details = choose_thresholds(probs, targets, ["a", "b", "c"], method="youden", n_boot=100)
    assert 0.3 < thr[0] < 0.7 and 0.3 < thr[1] < 0.7 and thr[2] is None
    assert "undetermined" in details["per_label"]["c"]
    thr_s, det_s = choose_thresholds(probs, targets, ["a", "b", "c"], method="sensitivity", target=0.95,
                                     n_boot=100)
    assert det_s["per_label"]["a"]["sensitivity"] >= 0.95
    pos = probs[targets[:, 0] == 1, 0]
    assert (pos >= thr_s[0]).mean() >= 0.95  # the operating point keeps its promise...
    assert (pos >= np.nextafter(thr_s[0], 1.0)).mean() < 0.95  # ...and is the highest such
    assert choose_thresholds(None, None, ["a", "b"])[0] == (0.5, 0.5)
    with pytest.raises(InvalidArgumentError):
        choose_thresholds(probs, targets, ["a", "b", "c"], method="magic")


def test_thresholds_breakeven_flags_as_many_images_as_carry_the_finding():
    targets, probs = _scores()
    thr, details = choose_thresholds(probs, targets, ["a", "b", "c"], method="breakeven", n_boot=100)
    for j in range(3):
        flagged, positives = int((probs[:, j] >= thr[j]).sum()), int(targets[:, j].sum())
        assert abs(flagged - positives) <= 2  # precision = recall on the calibration set
    assert abs(details["flags_per_image"] - details["true_labels_per_image_decided"]) < 0.02
    youden = choose_thresholds(probs, targets, ["a", "b", "c"], method="youden", n_boot=100)[1]
    assert youden["flags_per_image"] >= details["flags_per_image"] - 0.02  # Youden never flags less here


def test_thresholds_f1_and_specificity_rules():
    targets, probs = _scores(seed=1)
    thr_f1, _ = choose_thresholds(probs, targets, ["a", "b", "c"], method="f1", n_boot=100)
    for j in range(3):
        def f1(t):
            f, y = probs[:, j] >= t, targets[:, j] == 1
            return 2 * (f & y).sum() / (f.sum() + y.sum())
        grid = np.unique(probs[:, j])
        assert f1(thr_f1[j]) >= max(f1(t) for t in grid) - 1e-9
    thr_sp, _ = choose_thresholds(probs, targets, ["a", "b", "c"], method="specificity", target=0.95, n_boot=100)
    neg = probs[targets[:, 0] == 0, 0]
    assert (neg < thr_sp[0]).mean() >= 0.95
    lower = probs[:, 0][probs[:, 0] < thr_sp[0]].max()  # the next candidate threshold down
    assert (neg < lower).mean() < 0.95  # the lowest threshold that keeps the promise


def test_thresholds_undetermined_for_few_positive_patients_and_chance_auc():
    rng = np.random.default_rng(2)
    n = 300
    targets = np.zeros((n, 3), np.float32)
    targets[:60, 0] = 1          # a: 60 positive images...
    targets[:12, 1] = 1          # b: 12 positive images, but all from 3 patients
    targets[:80, 2] = 1          # c: common, but the score is noise
    probs = rng.random((n, 3)).astype(np.float32)
    probs[:60, 0] += 0.8
    probs = np.clip(probs, 0, 1)
    patients = [f"p{i}" for i in range(n)]
    for i in range(12):
        patients[i] = f"q{i % 3}"
    thr, details = choose_thresholds(probs, targets, ["a", "b", "c"], patient_ids=patients,
                                     min_positive_patients=10, n_boot=200)
    assert thr[0] is not None
    assert thr[1] is None and "positive patients" in details["per_label"]["b"]["undetermined"]
    assert details["per_label"]["b"]["positive_patients"] == 3
    assert thr[2] is None and "includes 0.5" in details["per_label"]["c"]["undetermined"]


def test_thresholds_ignore_unknown_labels():
    targets = np.array([[1.0], [0.0], [np.nan], [1.0], [0.0], [1.0], [0.0], [np.nan]], dtype=np.float32)
    probs = np.array([[0.9], [0.1], [0.99], [0.8], [0.2], [0.7], [0.3], [0.01]], dtype=np.float32)
    thr, details = choose_thresholds(probs, targets, ["x"], min_positive_patients=3, require_auc_above_chance=False)
    assert details["per_label"]["x"]["positives"] == 3 and details["per_label"]["x"]["negatives"] == 3
    assert 0.3 < thr[0] <= 0.7


def test_cli_fp32_from_checkpoint_flags(tmp_path):
    """The CLI end to end with a registry model (skipped while models/ is absent)."""
    registry = pytest.importorskip("models.registry")
    names = registry.list_models("student")
    if not names:
        pytest.skip("no student model registered")
    sample = need_shared("data", "nih-cxr14-sample")
    from export.__main__ import main

    arch = "mobilenetv3_small" if "mobilenetv3_small" in names else names[0]
    torch.manual_seed(0)
    model = registry.create_model(arch, num_classes=len(NIH_LABELS), in_chans=1)
    ckpt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), ckpt)
    verify = tmp_path / "verify.csv"
    verify.write_text("image\n" + "\n".join(sorted(p.name for p in (sample / "images").iterdir())[:12]) + "\n")
    calib = tmp_path / "calib.csv"
    calib.write_text("image\n" + "\n".join(sorted(p.name for p in (sample / "images").iterdir())[20:24]) + "\n")
    out = tmp_path / "cli.onnx"
    rc = main(["--checkpoint", str(ckpt), "--arch", arch, "--input-size", "64", "--mean", "0.49465",
               "--std", "0.25223", "--labels", ",".join(NIH_LABELS), "--out", str(out), "--format", "fp32",
               "--verify-images", str(verify), "--calib-list", str(calib)])
    assert rc == 0
    report = json.loads((tmp_path / "cli.report.json").read_text())
    assert report["bundle"]["precision"] == "fp32" and report["parity_fp32_vs_torch"]["images"] == 12
    manifest = read_manifest(out.read_bytes())
    assert manifest.provenance["architecture"] == arch and manifest.labels == NIH_LABELS
    load_bundle(out, threads=1)


def test_cli_argument_errors_exit_2(tmp_path, capsys):
    from export.__main__ import main

    assert main(["--out", str(tmp_path / "x.onnx")]) == 2
    assert "--run" in capsys.readouterr().err


def test_cli_run_directory_uses_the_runs_config_and_split(tmp_path):
    """A models.train run dir (config.json + model_final.pt) -> bundle; spec and split come from the run."""
    pytest.importorskip("models.train")
    need_shared("data", "nih-cxr14-sample")
    need_shared("teachers", "teacher_val_images.csv")
    from models.config import TrainConfig
    from models.registry import create_model, list_models

    from export.__main__ import main

    arch = "mobilenetv3_small" if "mobilenetv3_small" in list_models() else list_models("student")[0]
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(model=arch, input_size=64, limit_train=24, limit_eval=16, out_dir=str(run), seed=7)
    cfg.save(run / "config.json")
    torch.manual_seed(0)
    model = create_model(arch, num_classes=len(NIH_LABELS), in_chans=1, drop_rate=cfg.drop_rate)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "labels": list(NIH_LABELS), "epoch": 1,
                "checkpoint": "last"}, run / "model_final.pt")
    out = tmp_path / "run.onnx"
    assert main(["--run", str(run), "--out", str(out), "--format", "fp32"]) == 0
    manifest = load_bundle(out, threads=1).manifest
    assert manifest.preprocessing == cfg.student_spec()
    prov = manifest.provenance
    assert prov["architecture"] == arch and prov["seed"] == 7
    assert prov["training_data"]["train"]["images"] == 24 and prov["training_data"]["evaluation"]["images"] == 16
    assert prov["export"]["verification_set"]["images"] == 16
    assert "optimistic" in prov["thresholds"]["caveat"]  # no validation split: thresholds on the eval images


# --------------------------------------------------------------------------- ExportConfig (one frozen value)

#: ExportConfig fields no CLI flag sets (library/test knobs); every other field must be reachable from a flag
API_ONLY_FIELDS = {"measure_latency", "logits_output", "features_output"}


def _toy_source(tmp_path, n: int = 12):
    import cv2

    from export.source import ExportSource, ImageSet

    spec = PreprocessSpec(input_size=(64, 64), mean=(0.5,), std=(0.25,), min_side=32)
    imgs = synthetic_radiographs(n, 96, seed=5)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"img{i:02d}.png")
        cv2.imwrite(str(paths[-1]), (img * 255).astype(np.uint8))
    model = make_toy_model(num_classes=3, bn_batch=preprocess(imgs[:8], spec), seed=0)
    targets = (np.random.default_rng(0).random((n // 2, 3)) < 0.5).astype(np.float32)
    return ExportSource(model=model, spec=spec, labels=("a", "b", "c"), model_id="toy-run", architecture="toy",
                        calibration_pool=ImageSet("train", paths[: n // 2]),
                        verification=ImageSet("eval", paths[n // 2:], targets), provenance={"architecture": "toy"})


@pytest.mark.parametrize("bad", [{"precision": "int4"}, {"exporter": "onnxscript"}, {"calib_images": 0},
                                 {"threshold_method": "median"}, {"scope_quantile": 1.5}, {"preset": "nope"},
                                 {"calibrate_method": "kl"}, {"scope_k": 0}, {"float_leading_convs": -1},
                                 {"criteria": {"max_auc_drop": 1}}])
def test_export_config_refuses_bad_values(bad):
    from export.build_bundle import ExportConfig

    with pytest.raises(InvalidArgumentError):
        ExportConfig(**bad)


def test_every_cli_flag_reaches_the_config():
    """Non-default flags -> every ExportConfig field (but the API-only ones) differs from its default."""
    from dataclasses import fields

    from export.__main__ import build_parser, config_from_args
    from export.build_bundle import ExportConfig
    from export.quantize import DEFAULT_PRESET, PRESETS
    from export.verify import GateCriteria

    other_preset = next(p for p in sorted(PRESETS) if p != DEFAULT_PRESET)
    args = build_parser().parse_args([
        "--out", "x.onnx", "--format", "fp32", "--model-id", "m", "--overwrite", "--opset", "17",
        "--exporter", "dynamo", "--no-optimize", "--calib-images", "7", "--preset", other_preset,
        "--calibrate-method", "percentile", "--float-leading-convs", "3", "--max-auc-drop", "1.5",
        "--min-cam-median", "0.5",
        "--max-flip-rate", "0.1", "--fallback-fp32", "--debug-quant", "--thresholds", "youden",
        "--min-sensitivity", "0.8", "--min-positive-patients", "3", "--temperature", "--scope", "--scope-k", "5",
        "--scope-quantile", "0.9", "--ingraph-images", "3", "--seed", "4"])
    cfg, default = config_from_args(args), ExportConfig()
    unchanged = {f.name for f in fields(ExportConfig) if getattr(cfg, f.name) == getattr(default, f.name)}
    assert unchanged == API_ONLY_FIELDS
    assert cfg.criteria == GateCriteria(max_auc_drop=1.5, min_cam_median=0.5, max_flip_rate=0.1)
    assert (cfg.precision, cfg.model_id, cfg.preset, cfg.optimize, cfg.scope) == ("fp32", "m", other_preset, False,
                                                                                 True)
    assert config_from_args(build_parser().parse_args(["--out", "x", "--no-scope"])).scope is False
    assert config_from_args(build_parser().parse_args(["--out", "x"])) == default  # CLI defaults = API defaults


def test_export_bundle_records_its_config_names_by_precision_and_refuses_to_overwrite(tmp_path):
    from test_bundle_integrity import _rewrite_manifest

    from cxr_edge.errors import ChecksumMismatchError
    from export.build_bundle import ExportConfig, export_bundle
    from export.verify import GateCriteria

    src = _toy_source(tmp_path)
    config = ExportConfig(precision="fp32", model_id="my-model", scope=False, measure_latency=False, seed=3)
    asked = tmp_path / "toy.int8.onnx"
    report = export_bundle(src, asked, config)
    written = tmp_path / "toy.fp32.onnx"  # a file named int8 never holds fp32
    assert report["bundle"]["path"] == str(written) and written.exists() and not asked.exists()
    manifest = load_bundle(written, threads=1).manifest
    assert manifest.model_id == "my-model-fp32"
    recorded = manifest.provenance["export"]["config"]
    assert recorded == json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert ExportConfig(**{**recorded, "criteria": GateCriteria(**recorded["criteria"])}) == config
    # the bundle digest covers the recorded config: an edit is refused
    data = written.read_bytes()
    with pytest.raises(ChecksumMismatchError):
        read_manifest(_rewrite_manifest(data, lambda d: d["provenance"]["export"]["config"].update(seed=4)))
    # an existing bundle is never replaced without overwrite: neither the name asked for nor the corrected one
    before = written.read_bytes()
    with pytest.raises(InvalidArgumentError, match="exists"):
        export_bundle(src, written, config)
    with pytest.raises(InvalidArgumentError, match="exists"):
        export_bundle(src, asked, config)
    assert written.read_bytes() == before and not asked.exists()
    again = export_bundle(src, asked, config, overwrite=True, seed=5)  # keyword shorthand for config fields
    assert again["bundle"]["path"] == str(written)
    assert read_manifest(written.read_bytes()).provenance["export"]["config"]["seed"] == 5
    with pytest.raises(TypeError, match="unknown option"):
        export_bundle(src, written, config, precison="fp32")


def test_cli_refuses_an_existing_out_and_a_missing_sign_key_before_loading_anything(tmp_path, capsys):
    from export.__main__ import main

    out = tmp_path / "b.onnx"
    out.write_bytes(b"an earlier bundle")
    missing = ["--checkpoint", str(tmp_path / "missing.pt"), "--arch", "x", "--out", str(out)]
    assert main(missing) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"an earlier bundle"
    assert main(missing + ["--overwrite", "--sign-key", str(tmp_path / "nokey.pem")]) == 2
    assert "--sign-key" in capsys.readouterr().err and out.read_bytes() == b"an earlier bundle"
    assert main(missing + ["--overwrite", "--format", "fp32", "--calib-images", "0"]) == 2
    assert "calib_images" in capsys.readouterr().err


def test_cli_sign_key_signs_the_written_bundle(tmp_path, monkeypatch, capsys):
    """--sign-key: the key is checked before the export, the bundle is signed after it (export.sign)."""
    sign = pytest.importorskip("export.sign")
    pytest.importorskip("cryptography")
    import export.__main__ as cli
    import export.build_bundle as bb
    from conftest import build_tiny_onnx, make_manifest
    from cxr_edge.bundle import verify_bundle_bytes

    calls = []

    def fake_export(source, out, config, *, ingraph_out=None, report_path=None):  # the pipeline is tested above
        calls.append(config)
        model, w, b = build_tiny_onnx()
        write_bundle(model, make_manifest(w, b), out)
        report = {"result": "wrote fp32 bundle", "files": {}, "bundle": {"path": str(out), "precision": "fp32"}}
        bb.write_report(report, report_path)
        return report

    monkeypatch.setattr(bb, "export_bundle", fake_export)
    monkeypatch.setattr(cli, "_source", lambda args: "source")
    private, public, fingerprint = sign.keygen(tmp_path / "keys")
    out = tmp_path / "b.onnx"
    argv = ["--checkpoint", "c.pt", "--out", str(out), "--format", "fp32"]
    not_a_key = tmp_path / "nokey.pem"
    not_a_key.write_text("not a key")
    assert cli.main(argv + ["--sign-key", str(not_a_key)]) == 2
    assert "--sign-key" in capsys.readouterr().err and not calls and not out.exists()  # refused before exporting
    assert cli.main(argv + ["--sign-key", str(private)]) == 0
    _, status = verify_bundle_bytes(out.read_bytes(), public, require_signature=True)
    assert status.verified and status.key_fingerprint == fingerprint
    report = json.loads((tmp_path / "b.report.json").read_text())
    assert report["bundle"]["signature"]["key_fingerprint"] == fingerprint
    assert report["bundle"]["size_bytes"] == out.stat().st_size


def test_parity_tolerance_scales_with_the_tensors_range(monkeypatch):
    """A ReLU6 feature that is 0 in PyTorch and 1.2e-4 in onnxruntime (a 1e-5 relative rounding of a
    pre-activation of ~12 crossing zero) passes on a 0-6 tensor; a 1e-3 error there still fails, and
    on a tensor of range <= 1 the absolute tolerance stays 1e-4."""
    import export.onnx_export as ox

    logits = np.zeros((2, 3), np.float32)
    feats = np.zeros((2, 4, 2, 2), np.float32)
    feats[0, 0, 0, 0] = 6.0

    def run(off: float, scale: float = 1.0):
        f_ref = feats * scale
        f_got = f_ref.copy()
        f_got[1, 2, 1, 1] += off
        monkeypatch.setattr(ox, "torch_outputs", lambda model, batch: (logits, f_ref))
        monkeypatch.setattr(ox, "run_onnx", lambda *a, **k: (logits, f_got))
        return ox.check_parity(None, b"", np.zeros((2, 1, 8, 8), np.float32), SPEC)

    assert run(1.2e-4)["features_atol_scaled"] == pytest.approx(6e-4)
    with pytest.raises(ParityError):
        run(1e-3)
    with pytest.raises(ParityError):
        run(1.2e-4, scale=1 / 6)


def test_export_temperature_is_fitted_on_the_calibration_split_and_folded_into_the_head(tmp_path):
    """--temperature: the bundle's logits are the untempered graph's divided by the recorded T per label
    (so AUC is unchanged), the manifest's CAM weights still reproduce them (load_bundle's head check),
    thresholds are chosen on the tempered outputs, and without a calibration split it is refused."""
    from dataclasses import replace

    from export.build_bundle import ExportConfig, export_bundle
    from export.source import ImageSet

    src = _toy_source(tmp_path, n=24)
    rng = np.random.default_rng(1)
    targets = np.stack([rng.permutation([0.0, 1.0] * 6) for _ in range(3)], axis=1).astype(np.float32)
    calib = ImageSet("calibration", src.calibration_pool.paths[:12], targets, 12, [f"p{i}" for i in range(12)])
    src = replace(src, threshold_set=calib)
    config = ExportConfig(precision="fp32", scope=False, measure_latency=False, min_positive_patients=1)
    plain = export_bundle(src, tmp_path / "plain.fp32.onnx", config)
    hot = export_bundle(src, tmp_path / "hot.fp32.onnx", config, temperature=True)
    a = load_bundle(plain["bundle"]["path"], threads=1)
    b = load_bundle(hot["bundle"]["path"], threads=1)  # the head check passes: CAM weights scaled alike
    record = b.manifest.provenance["temperature"]
    temps = np.array([record["temperatures"][n] for n in src.labels])
    assert record["fit"]["set"] == "calibration" and set(record["fit"]["per_label"]) == set(src.labels)
    x = preprocess(synthetic_radiographs(4, 96, seed=9), src.spec)
    name = src.spec.input_name
    la = a.session.run(["logits"], {name: x})[0]
    lb = b.session.run(["logits"], {name: x})[0]
    assert not np.allclose(temps, 1.0)
    np.testing.assert_allclose(lb, la / temps, rtol=1e-4, atol=1e-5)
    assert "temperature" not in a.manifest.provenance
    with pytest.raises(InvalidArgumentError, match="calibration split"):
        export_bundle(replace(src, threshold_set=None), tmp_path / "x.fp32.onnx", config, temperature=True)
