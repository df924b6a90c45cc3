"""Refitting a bundle's scope gate without a training run, and the split-conformal pixel-rule limits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import build_scoped_bundle, need_shared, sample_chest
from cxr_edge.bundle import load_bundle, read_manifest, split_model
from cxr_edge.errors import ChecksumMismatchError, InvalidArgumentError
from cxr_edge.scope import PIXEL_RULES, ScopeGate
from export.scope_fit import (collect_images, conformal_bound, conformal_threshold, fit_pixel_limits, main,
                              pixel_rule_scores)

REPO = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, n: int, seed: int) -> Path:
    """``n`` noisy copies of the sample chest as 8-bit PNGs (in scope for the tiny bundle's gate)."""
    folder.mkdir(parents=True, exist_ok=True)
    chest = sample_chest(128)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(chest + rng.normal(0, 0.04, chest.shape), 0, 1)
        cv2.imwrite(str(folder / f"img{seed}_{i:02d}.png"), (img * 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def refit_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refit")
    src = build_scoped_bundle(tmp / "in.onnx")
    fit, cal = _write_images(tmp / "fit", 24, seed=1), _write_images(tmp / "cal", 10, seed=2)
    return tmp, src, fit, cal


def test_refit_keeps_the_graph_and_changes_only_the_scope_block(refit_case, capsys):
    tmp, src, fit, cal = refit_case
    out = tmp / "out.onnx"
    rc = main(["refit", "--bundle", str(src), "--images", str(fit), "--threshold-images", str(cal),
               "--out", str(out), "--threads", "1", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fit_images"] == 24 and summary["threshold_images"] == 10
    before, after = src.read_bytes(), out.read_bytes()
    assert split_model(after)[0] == split_model(before)[0]  # graph and weights byte-identical
    old, new = read_manifest(before), read_manifest(after)  # the digests verify
    assert new.model_sha256 == old.model_sha256 and new.bundle_sha256 != old.bundle_sha256
    d_old, d_new = json.loads(old.to_json()), json.loads(new.to_json())
    assert {k for k in d_old.keys() | d_new.keys() if d_old.get(k) != d_new.get(k)} == {"scope", "bundle_sha256"}
    assert new.scope.threshold != old.scope.threshold and summary["threshold"] == pytest.approx(new.scope.threshold)
    assert not np.array_equal(new.scope.mean, old.scope.mean)
    st = new.scope.statistics
    assert st["fit_images"] == 24 and st["threshold_images"] == 10 and st["refit"]["excluded_images"] == 0
    assert st["false_flag_bound"] == pytest.approx(1 / 11)  # n = 10 at quantile 0.99: the maximum
    assert st["refit"]["previous_threshold"] == pytest.approx(old.scope.threshold)
    bundle = load_bundle(out, threads=1)
    assert bundle.manifest.scope.threshold == new.scope.threshold
    # the threshold is the calibration images' maximum score under the new density
    gate = ScopeGate(new.scope)
    from export.images import list_image_dir, load_batch
    (maps,) = bundle.session.run([gate.features_output],
                                 {new.preprocessing.input_name: load_batch(list_image_dir(cal), new.preprocessing)})
    assert gate.scores(maps.mean(axis=(2, 3))).max() == pytest.approx(new.scope.threshold, rel=1e-5)
    # the scope block is covered by the bundle digest: an edited threshold is refused
    value = json.dumps(new.scope.threshold)
    edited = value[:-1] + ("1" if value[-1] != "1" else "2")  # same length: the file framing stays valid
    stored = f'"threshold": {value}'.encode()
    assert after.count(stored) == 1
    tampered = after.replace(stored, f'"threshold": {edited}'.encode())
    assert len(tampered) == len(after)
    with pytest.raises(ChecksumMismatchError):
        read_manifest(tampered)


def test_refit_excludes_named_images_and_records_only_the_count(refit_case, capsys):
    tmp, src, fit, cal = refit_case
    out = tmp / "excl.onnx"
    names = sorted(p.name for p in fit.iterdir())[:3]
    rc = main(["refit", "--bundle", str(src), "--images", str(fit), "--threshold-images", str(cal),
               "--exclude", *names, "--exclude-note", "not in scope", "--out", str(out), "--threads", "1"])
    assert rc == 0 and "graph bytes unchanged" in capsys.readouterr().out
    st = read_manifest(out.read_bytes()).scope.statistics
    assert st["fit_images"] == 21 and st["refit"]["excluded_images"] == 3
    assert st["refit"]["excluded_why"] == "not in scope" and not any(n in json.dumps(st) for n in names)


def test_refit_without_threshold_images_falls_back_to_out_of_fold_with_a_caveat(refit_case, capsys):
    tmp, src, fit, _ = refit_case
    out = tmp / "oof.onnx"
    assert main(["refit", "--bundle", str(src), "--images", str(fit), "--out", str(out), "--threads", "1"]) == 0
    st = read_manifest(out.read_bytes()).scope.statistics
    assert "caveat" in st and "out-of-fold" in st["threshold_set"]


def test_refit_refusals_have_exit_codes(refit_case, tmp_path, capsys):
    tmp, src, fit, cal = refit_case
    base = ["refit", "--bundle", str(src), "--images", str(fit), "--threads", "1"]
    assert main(base + ["--out", str(src)]) == 2  # never in place
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"x")
    assert main(base + ["--out", str(taken)]) == 2 and taken.read_bytes() == b"x"  # exists, no --force
    assert main(base + ["--threshold-images", str(fit), "--out", str(tmp_path / "o.onnx")]) == 2  # overlap
    assert main(base + ["--out", str(tmp_path / "o.txt")]) == 2
    assert main(["refit", "--bundle", str(src), "--images", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "o.onnx")]) == 2
    assert main(["refit", "--bundle", str(src), "--out", str(tmp_path / "o.onnx")]) == 2  # no image source
    few = _write_images(tmp_path / "few", 5, seed=3)
    assert main(["refit", "--bundle", str(src), "--images", str(few), "--out", str(tmp_path / "o.onnx")]) == 2
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["refit", "--bundle", str(bad), "--images", str(fit), "--out", str(tmp_path / "o.onnx")]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: InvalidArgumentError" in err and "error: " in err
    assert not (tmp_path / "o.onnx").exists()


def test_collect_images_reads_lists_and_folders(tmp_path):
    folder = _write_images(tmp_path / "imgs", 4, seed=0)
    names = sorted(p.name for p in folder.iterdir())
    csv = tmp_path / "list.csv"
    csv.write_text("image,patient_id\n" + "".join(f"{n},p{i}\n" for i, n in enumerate(names[:3])))
    txt = tmp_path / "drop.txt"
    txt.write_text(names[0] + "\n")
    assert [p.name for p in collect_images([str(csv)], folder)] == names[:3]
    assert [p.name for p in collect_images([str(csv), str(folder)], folder, [str(txt)])] == names[1:]
    with pytest.raises(InvalidArgumentError):
        collect_images([str(tmp_path / "nope.csv")], folder)


# --------------------------------------------------------------------------- pixel-rule limits

def test_conformal_bound_is_one_minus_rank_over_n_plus_one():
    assert conformal_bound(153, 0.99) == pytest.approx(1 / 154)
    assert conformal_bound(1070, 0.999) == pytest.approx(1 / 1071)
    assert conformal_bound(1000, 0.9) == pytest.approx(1 - math.ceil(1001 * 0.9) / 1001)


def test_pixel_limits_are_the_conformal_extremes_rounded_outwards():
    rng = np.random.default_rng(0)
    n = 200
    scores = [{"std": 0.2, "range": 0.6, "aspect": 1.1, "inversion": float(v), "layout": float(c),
               "orientation": float(o)} for v, c, o in zip(rng.uniform(-0.05, 0.4, n), rng.uniform(0.3, 0.9, n),
                                                          rng.uniform(-0.5, 0.15, n))]
    fit = fit_pixel_limits(scores, alpha=0.001)
    lim = fit["limits"]
    worst_inv = -min(s["inversion"] for s in scores)
    worst_ori = max(s["orientation"] for s in scores)
    worst_lay = min(s["layout"] for s in scores)
    assert worst_inv <= lim["inversion_margin"] < worst_inv + 1e-3  # rank n of n: the extreme, never stricter
    assert worst_ori <= lim["orientation_margin"] < worst_ori + 1e-3
    assert worst_lay - 1e-3 < lim["min_layout"] <= worst_lay
    assert fit["rank"] == n and fit["false_flag_bound_per_rule"] == pytest.approx(1 / (n + 1))
    assert fit["a_priori_inside"] and fit["false_flag_bound_all_rules"] == pytest.approx(5 / (n + 1))
    loose = fit_pixel_limits(scores, alpha=0.1)["limits"]  # a larger budget: a lower quantile, stricter limits
    t, _ = conformal_threshold(np.array([-s["inversion"] for s in scores]), 0.9)
    assert loose["inversion_margin"] == pytest.approx(math.ceil(t * 1000) / 1000)
    assert loose["orientation_margin"] <= lim["orientation_margin"]
    with pytest.raises(InvalidArgumentError):
        fit_pixel_limits(scores[:5])


def test_pixel_rule_scores_of_the_sample_are_inside_the_limits():
    s = pixel_rule_scores(sample_chest(512))
    assert s["inversion"] > -PIXEL_RULES["inversion_margin"] and s["layout"] >= PIXEL_RULES["min_layout"]
    assert s["orientation"] <= PIXEL_RULES["orientation_margin"] and s["aspect"] < PIXEL_RULES["max_aspect"]


def test_shipped_pixel_limits_are_what_the_budget_gives_on_the_non_evaluation_images(capsys):
    """cxr_edge.scope.PIXEL_RULES must be the output of the documented command, not typed numbers."""
    need_shared("data", "nih-cxr14-sample", "images")
    need_shared("teachers", "teacher_train_images.csv")
    pytest.importorskip("torch", reason="--split-config redraws the run's split with models.runs (torch)")
    rc = main(["pixel-limits", "--split-config", str(REPO / "docs" / "results" / "kd-session13" / "kd-s0.config.json"),
               "--exclude", "00017625_000.png", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 1070 and result["excluded_images"] == 1
    for key, value in result["limits"].items():
        assert PIXEL_RULES[key] == value, key
    assert result["beyond_current_limits"] == 0 and result["a_priori_inside"]


def test_default_bundle_scope_block_and_the_sample_is_in_scope():
    bundle = load_bundle(REPO / "cxr_edge" / "data" / "default.onnx", threads=1)
    sc = bundle.manifest.scope
    assert sc is not None and sc.statistics["conformal_guarantee"] is True
    assert sc.statistics["threshold_images"] == 153 and sc.statistics["false_flag_bound"] == pytest.approx(1 / 154,
                                                                                                           abs=1e-6)
    from cxr_edge import Classifier

    pred = Classifier(REPO / "cxr_edge" / "data" / "default.onnx", threads=1).predict(
        REPO / "cxr_edge" / "data" / "sample_chest_pa.png")
    assert pred.in_scope is True and pred.scope["score"] < pred.scope["threshold"] == pytest.approx(sc.threshold,
                                                                                                  abs=1e-4)
