"""AUC vs sklearn, patient bootstrap, paired KD-gain bootstrap, pointing game, evaluate CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import NIH_LABELS, build_tiny_onnx, make_manifest
from models.evaluate import (argmax_point, auc_per_label, bootstrap_auc, main, paired_bootstrap, patient_resamples,
                             point_in_box, pointing_game, random_point_rate, roc_auc)


def _data(n=120, n_labels=4, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.3).astype(np.float64)
    s = y * signal + rng.normal(size=y.shape)
    patients = [f"p{i // 3}" for i in range(n)]  # 3 images per patient
    return y, s, patients


def test_auc_matches_sklearn_with_ties_and_unknown_labels():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 5)) < 0.25).astype(np.float64)
    s = np.round(rng.normal(size=y.shape) + y, 1)  # rounding makes ties
    for j in range(5):
        assert roc_auc(y[:, j], s[:, j]) == pytest.approx(roc_auc_score(y[:, j], s[:, j]), abs=1e-12)
    y[rng.random(y.shape) < 0.2] = np.nan
    auc = auc_per_label(y, s)
    for j in range(5):
        known = ~np.isnan(y[:, j])
        assert auc[j] == pytest.approx(roc_auc_score(y[known, j], s[known, j]), abs=1e-12)
    y[:, 2] = 0
    assert np.isnan(auc_per_label(y, s)[2]) and np.isnan(roc_auc(np.ones(4), np.arange(4)))


def test_patient_resamples_keep_patients_whole_and_are_seeded():
    patients = ["a", "a", "b", "c", "c", "c", "d"]
    sizes = {"a": 2, "b": 1, "c": 3, "d": 1}
    draws = list(patient_resamples(patients, 50, seed=3))
    for idx in draws:
        picked = [patients[i] for i in idx]
        for p, n in sizes.items():
            assert picked.count(p) % n == 0  # each draw of a patient brings all its images
        assert len(set(picked)) < 4 or len(idx) == 7
    again = list(patient_resamples(patients, 50, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    assert any(len(d) != 7 for d in draws)  # patients differ in size, so resample sizes vary


def test_bootstrap_ci_contains_point_and_reports_skipped_labels():
    y, s, patients = _data()
    y[:, 3] = 0  # no positives: skipped
    res = bootstrap_auc(y, s, patients, ["A", "B", "C", "D"], n_boot=300, seed=0)
    assert res["skipped_labels"] == ["D"] and res["per_label"]["D"]["auc"] is None
    for name in "ABC":
        m = res["per_label"][name]
        assert m["ci_low"] <= m["auc"] <= m["ci_high"] and m["ci_high"] - m["ci_low"] > 0.01
    assert res["mean_ci_low"] <= res["mean_auc"] <= res["mean_ci_high"]
    assert res["mean_auc"] == pytest.approx(np.mean(auc_per_label(y, s)[:3]), abs=1e-6)
    assert res["n_patients"] == 40 and res["resampling"] == "patients"
    assert bootstrap_auc(y, s, patients, n_boot=300, seed=0)["mean_ci_low"] == res["mean_ci_low"]


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_clustered_data():
    rng = np.random.default_rng(0)
    n_pat = 60
    y_p = (rng.random((n_pat, 1)) < 0.4).astype(float)
    s_p = y_p + rng.normal(size=(n_pat, 1))
    y, s = np.repeat(y_p, 5, axis=0), np.repeat(s_p, 5, axis=0) + 0.01 * rng.normal(size=(n_pat * 5, 1))
    by_patient = bootstrap_auc(y, s, [str(i // 5) for i in range(n_pat * 5)], n_boot=400)
    by_image = bootstrap_auc(y, s, [str(i) for i in range(n_pat * 5)], n_boot=400)
    assert (by_patient["mean_ci_high"] - by_patient["mean_ci_low"]) > 1.5 * (by_image["mean_ci_high"]
                                                                              - by_image["mean_ci_low"])


def test_paired_bootstrap_detects_a_gain_and_not_a_null():
    y, s, patients = _data(n=150, signal=0.5)
    rng = np.random.default_rng(5)
    better = [s + 0.8 * y + 0.1 * rng.normal(size=s.shape) for _ in range(3)]
    res = paired_bootstrap(y, [s, s, s], better, patients, n_boot=300)
    assert res["delta_mean_auc"] > 0 and res["ci_low"] > 0 and res["p_le_zero"] == 0
    assert len(res["per_seed"]) == 3 and all(p["ci_low"] > 0 for p in res["per_seed"])
    null = paired_bootstrap(y, [s], [s.copy()], patients, n_boot=100)
    assert null["delta_mean_auc"] == 0 and null["ci_low"] == 0 == null["ci_high"]
    with pytest.raises(ValueError):
        paired_bootstrap(y, [s], [s[:10]], patients)


# ------------------------------------------------------------------ pointing game
def _peak(hw, r, c):
    cam = np.zeros(hw, np.float32)
    cam[r, c] = 1.0
    return cam


def test_pointing_game_hits_inside_misses_outside_with_tolerance():
    box = (100.0, 50.0, 40.0, 30.0)  # x, y, w, h
    inside, outside = _peak((320, 320), 60, 110), _peak((320, 320), 200, 10)
    assert point_in_box(argmax_point(inside), box) and not point_in_box(argmax_point(outside), box)
    near = _peak((320, 320), 60, 142)  # 2.5 px right of the box edge (pixel centre 142.5)
    assert not point_in_box(argmax_point(near), box) and point_in_box(argmax_point(near), box, tolerance=3)
    flat = np.zeros((320, 320), np.float32)
    assert argmax_point(flat) is None and not point_in_box(None, box)
    res = pointing_game([inside, outside, flat], [box] * 3, ["Mass"] * 3, groups=["p1", "p2", "p3"], n_boot=200)
    o = res["overall"]
    assert o["n"] == 3 and o["hit_rate"] == pytest.approx(1 / 3) and res["flat_cams"] == 1 and res["hits"] == [1, 0, 0]
    assert o["random_baseline"] == pytest.approx(40 * 30 / 320 ** 2, abs=1e-6)
    assert o["ci_low"] <= o["hit_rate"] <= o["ci_high"]


def test_plateau_argmax_and_random_rate_clip():
    cam = np.zeros((10, 10), np.float32)
    cam[2:5, 6:9] = 1.0
    assert argmax_point(cam) == (3, 7)
    assert random_point_rate((-10, -10, 20, 20), (100, 100)) == pytest.approx(100 / 10000)
    assert random_point_rate((0, 0, 10, 10), (100, 100), tolerance=5) == pytest.approx(15 * 15 / 10000)


# ------------------------------------------------------------------ CLI, end to end on a synthetic sample
def test_score_cli_with_onnx_bundle_and_compare_cli(tmp_path, capsys):
    from cxr_edge.bundle import write_bundle
    from test_train import make_fake_sample

    data = make_fake_sample(tmp_path / "d")
    model_bytes, w, b = build_tiny_onnx(n_labels=14, channels=8, input_size=64)
    bundle = tmp_path / "m.onnx"
    write_bundle(model_bytes, make_manifest(w, b, input_size=64, labels=NIH_LABELS), bundle)
    ids = sorted(p.name for p in (data / "images").glob("*.png"))
    (tmp_path / "eval.csv").write_text("image\n" + "\n".join(ids) + "\n")
    out = tmp_path / "score.json"
    preds = tmp_path / "p.npz"
    rc = main(["score", str(bundle), "--data-root", str(data), "--images", str(tmp_path / "eval.csv"),
               "--pointing-game", "--bootstrap", "50", "--out", str(out), "--save-predictions", str(preds)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 24 and res["per_label"]["Atelectasis"]["auc"] is not None
    pg = res["pointing_game"]
    assert pg["overall"]["n"] == 12 and 0 < pg["overall"]["random_baseline"] < 1
    assert "pointing game" in capsys.readouterr().out
    assert 0 <= res["calibration"]["mean_ece"] <= 1 and "mean_ece_without_temperature" not in res["calibration"]
    rc = main(["compare", "--a", str(preds), "--b", str(preds), "--bootstrap", "20", "--out", str(tmp_path / "c.json")])
    assert rc == 0 and json.loads((tmp_path / "c.json").read_text())["delta_mean_auc"] == 0


def test_fixed_point_baselines_centre_and_best_cell_from_training_boxes():
    from models.evaluate import best_fixed_cell, cell_centres, fixed_point_hits

    hw = (320, 320)
    assert cell_centres(hw, 4)[0] == (40, 40) and len(cell_centres(hw, 7)) == 49
    train = [("Cardiomegaly", (100.0, 150.0, 120.0, 100.0))] * 5 + [("Nodule", (10.0, 10.0, 60.0, 60.0))] * 3
    cells = best_fixed_cell(train, hw, 4)
    assert cells["Nodule"] == (40, 40)
    eval_boxes = [(0.0, 0.0, 80.0, 80.0), (140.0, 140.0, 40.0, 40.0)]
    hits = fixed_point_hits(eval_boxes, ["Nodule", "Mass"], [hw, hw], cells)
    assert hits[0] == 1.0  # Nodule's own cell
    centre = fixed_point_hits(eval_boxes, ["Nodule", "Mass"], [hw, hw], None)
    assert centre.tolist() == [0.0, 1.0]
    cams = [np.zeros(hw, np.float32), np.zeros(hw, np.float32)]
    cams[0][20, 20] = 1.0  # model hits box 0, misses box 1 (empty map)
    pg = pointing_game(cams, eval_boxes, ["Nodule", "Mass"], n_boot=50, baselines={"centre_point": centre})
    b = pg["overall"]["baselines"]["centre_point"]
    assert b["hit_rate"] == 0.5 and pg["overall"]["hit_rate"] == 0.5
    assert pg["per_finding"]["Mass"]["baselines"]["centre_point"]["hit_rate"] == 1.0


def test_operating_points_count_flags_against_true_labels():
    from models.evaluate import operating_points

    t = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=np.float64)
    p = np.array([[0.9, 0.2, 0.1], [0.8, 0.1, 0.9], [0.3, 0.9, 0.1], [0.1, 0.1, 0.1]])
    op = operating_points(t, p, [0.5, None, 0.5], ["a", "b", "c", "d"], ["x", "y", "z"], n_boot=50)
    x = op["per_label"]["x"]
    assert x["sensitivity"]["value"] == 0.5 and x["specificity"]["value"] == 0.5 and x["ppv"]["value"] == 0.5
    assert x["flag_rate"]["value"] == 0.5 and op["undetermined"] == ["y"] and "y" not in op["per_label"]
    assert op["flags_per_image"] == pytest.approx(0.75)  # x flags 2, z flags 1, over 4 images
    assert op["true_labels_per_image_all"] == pytest.approx(1.0)
    assert op["true_labels_per_image_decided"] == pytest.approx(0.75)


def test_calibration_errors_undo_the_bundles_temperature_for_the_comparison():
    from models.evaluate import calibration_errors

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 2))
    t = (rng.random((4000, 2)) < 1 / (1 + np.exp(-z))).astype(np.float64)  # z are calibrated logits
    cal = calibration_errors(t, z / np.array([1.0, 3.0]), ["a", "b"], temperatures=[1.0, 3.0])
    assert cal["per_label"]["b"]["ece_without_temperature"] < 0.03 < cal["per_label"]["b"]["ece"]
    assert cal["per_label"]["a"]["ece"] == cal["per_label"]["a"]["ece_without_temperature"]


def test_select_against_an_incumbent_bundle_ships_only_a_higher_calibration_auc(tmp_path, tiny_bundle_factory):
    """select --incumbent: the shipped bundle's calibration-split AUC (the mean of the per-label AUCs export
    recorded beside its thresholds) is the bar; a tie or a lower choice ships nothing, and a bundle without
    those AUCs is a typed refusal (exit 2), not a silent pass."""
    per_label = {"label_0": {"auc": {"auc": 0.70}}, "label_1": {"auc": {"auc": 0.80}}, "label_2": {"auc": None}}
    bundle = tiny_bundle_factory(provenance={"thresholds": {"per_label": per_label}})
    runs = []
    for name, auc in (("a", 0.74), ("b", 0.76)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"calibration_mean_auc": auc}))
        runs.append(str(tmp_path / name))
    out = tmp_path / "sel.json"
    assert main(["select", *runs, "--incumbent", str(bundle), "--out", str(out)]) == 0
    sel = json.loads(out.read_text())
    assert sel["chosen"] == "b" and sel["incumbent"]["calibration_mean_auc"] == 0.75 and sel["ships"] is True
    assert sel["runs"] == {"a": runs[0], "b": runs[1]}  # what a build script exports, as named
    assert main(["select", runs[0], "--incumbent", str(bundle), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ships"] is False  # 0.74 < 0.75: the incumbent stays
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"calibration_mean_auc": 0.75}))
    assert main(["select", runs[0], "--incumbent", str(bundle), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ships"] is False  # a tie is no improvement
    bare = tiny_bundle_factory()
    assert main(["select", runs[0], "--incumbent", str(bare), "--out", str(out)]) == 2
