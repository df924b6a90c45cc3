"""cxr-edge calibrate end to end (tiny bundle, synthetic images, a labels.csv made here) and the numpy-only
operating-point code it shares with the export toolchain."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from cxr_edge import operating_points as op
from cxr_edge.bundle import load_bundle
from cxr_edge.cli import main


# --------------------------------------------------------------------------- one implementation, sklearn-exact

def test_export_thresholds_delegates_to_the_runtime():
    pytest.importorskip("export.thresholds")
    import export.thresholds as et

    assert et.choose_thresholds is op.choose_thresholds and et.operating_point is op.operating_point


def test_rank_auc_and_roc_points_equal_scipy_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(20, 200))
        p = np.round(rng.random(n), int(rng.integers(1, 4))).astype(np.float32)  # many ties
        t = (rng.random(n) < 0.3).astype(np.float32)
        if t.sum() in (0, n):
            continue
        np.testing.assert_allclose(op.rankdata(p), stats.rankdata(p))
        assert op.roc_auc(t, p) == pytest.approx(sklearn_metrics.roc_auc_score(t, p), abs=1e-12)
        fpr, tpr, thr = sklearn_metrics.roc_curve(t, p, drop_intermediate=False)
        keep = np.isfinite(thr)
        a, b, c = op.roc_points(t, p)
        assert np.array_equal(fpr[keep], a) and np.array_equal(tpr[keep], b) and np.array_equal(thr[keep], c)


def test_bootstrap_auc_equals_the_toolchain_version():
    evaluate = pytest.importorskip("models.evaluate")
    rng = np.random.default_rng(1)
    targets = (rng.random((150, 3)) < 0.3).astype(np.float64)
    targets[rng.random((150, 3)) < 0.1] = np.nan
    scores = np.clip(0.3 * np.nan_to_num(targets) + rng.random((150, 3)), 0, 1)
    pids = [f"p{i // 2}" for i in range(150)]
    assert op.bootstrap_auc(targets, scores, pids, list("abc"), n_boot=100, seed=4) == \
        evaluate.bootstrap_auc(targets, scores, pids, list("abc"), n_boot=100, seed=4)


def test_parse_rule():
    assert op.parse_rule("breakeven") == ("breakeven", 0.9)
    assert op.parse_rule("Specificity=0.95") == ("specificity", 0.95)
    assert op.parse_rule("sensitivity") == ("sensitivity", 0.9)
    for bad in ("magic", "specificity=abc", "specificity=1.5", "f1=0.3"):
        with pytest.raises(op.InvalidArgumentError):
            op.parse_rule(bad)


def test_bootstrap_operating_point_brackets_the_point():
    rng = np.random.default_rng(2)
    t = (rng.random(300) < 0.3).astype(float)
    p = np.clip(0.3 + 0.4 * t + rng.normal(0, 0.15, 300), 0, 1)
    r = op.bootstrap_operating_point(t, p, 0.5, [str(i) for i in range(300)], n_boot=200)
    point = op.operating_point(t, p, 0.5)
    for key in ("sensitivity", "specificity", "ppv"):
        assert r[key]["ci_low"] <= point[key] <= r[key]["ci_high"]
        assert r[key]["value"] == pytest.approx(point[key], abs=1e-6)


def test_a_rule_that_cannot_be_met_is_undetermined_not_a_crash():
    p = np.array([[0.9]] * 20 + [[0.1]] * 20, np.float32)  # the top score is shared by every positive
    t = np.array([[1.0]] * 12 + [[0.0]] * 8 + [[0.0]] * 20, np.float32)  # ... and by 8 negatives
    thr, details = op.choose_thresholds(p, t, ["x"], method="specificity", target=0.9, min_positive_patients=1,
                                        require_auc_above_chance=False)
    assert thr == (None,) and "no threshold reaches specificity" in details["per_label"]["x"]["undetermined"]


# --------------------------------------------------------------------------- the command, end to end

def _images(folder, n=60):
    folder.mkdir()
    paths = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        img = cv2.GaussianBlur((rng.random((160, 160)) * 255).astype(np.uint8), (0, 0), 2 + i % 5)
        path = folder / f"im{i:03d}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


@pytest.fixture
def site(tiny_bundle, tmp_path):
    """60 images of 30 patients: label_0 follows the model (separable), label_1 is noise, label_2 rare."""
    from cxr_edge import Classifier

    paths = _images(tmp_path / "site")
    clf = Classifier(tiny_bundle, threads=1)
    probs = np.array([[clf.predict(p).probabilities[n] for n in clf.labels] for p in paths])
    rng = np.random.default_rng(5)
    labels_csv = tmp_path / "labels.csv"
    median = np.median(probs[:, 0])
    rows = []
    for i, path in enumerate(paths):
        rows.append({"image": path.name, "patient_id": f"P{i // 2:03d}",
                     "Label 0": int(probs[i, 0] >= median),             # spelled differently on purpose
                     "label_1": int(rng.random() < 0.4),
                     "label_2": "1" if i in (0, 1, 2) else ("" if i % 7 == 0 else "0"),  # blank = unknown
                     "age": 50})
    with open(labels_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"bundle": tiny_bundle, "folder": tmp_path / "site", "csv": labels_csv, "probs": probs, "paths": paths,
            "tmp": tmp_path}


def test_calibrate_writes_a_bundle_with_refitted_thresholds(site, capsys):
    out = site["tmp"] / "site.onnx"
    code = main(["calibrate", str(site["folder"]), "--labels", str(site["csv"]), "--out", str(out),
                 "--model", str(site["bundle"]), "--n-boot", "200", "--threads", "1", "--json"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(stdout)
    assert "age" in stderr  # the unknown column is named, then ignored
    new = load_bundle(out, threads=1)  # checksum, manifest, graph, head check: it loads
    old = load_bundle(site["bundle"], threads=1)
    assert new.manifest.model_sha256 == old.manifest.model_sha256  # same graph and weights
    t0, t1, t2 = new.manifest.thresholds
    assert t0 is not None and t1 is None and t2 is None  # noise -> AUC CI includes 0.5; rare -> too few patients
    per = report["per_label"]
    assert "includes 0.5" in per["label_1"]["undetermined"] and "positive patients" in per["label_2"]["undetermined"]
    assert per["label_2"]["positives"] == 3 and per["label_2"]["negatives"] == 60 - 3 - 8  # 8 blanks are unknown
    # the same rule and numbers as calling the shared implementation directly
    targets = (site["probs"][:, 0] >= np.median(site["probs"][:, 0])).astype(np.float32)[:, None]
    expected, _ = op.choose_thresholds(site["probs"][:, :1].astype(np.float32), targets, ["label_0"],
                                       patient_ids=[f"P{i // 2:03d}" for i in range(60)], n_boot=200)
    assert t0 == pytest.approx(expected[0], abs=1e-6)
    at = per["label_0"]["at_new_threshold"]
    assert at["sensitivity"]["ci_low"] <= at["sensitivity"]["value"] <= at["sensitivity"]["ci_high"]
    assert at["ppv"]["value"] is not None
    rec = new.manifest.provenance["recalibration"]
    assert rec["rule"] == "breakeven" and rec["images"] == 60 and rec["patients"] == 30
    assert rec["previous_thresholds"] == [0.5, 0.5, 0.5]
    blob = json.dumps(rec)
    assert "im000" not in blob and "P000" not in blob  # no file names, no patient ids in the bundle
    assert new.manifest.provenance["architecture"] == "tiny-conv"  # the rest of the provenance is kept


def test_calibrate_temperature_refits_the_scale_and_thresholds_on_the_new_probabilities(site, capsys):
    """--temperature: the new bundle's probabilities are sigmoid(logit / T) of the old ones per label (label_0
    gets its own T), its thresholds are the rule applied to those, and the
    manifest records the temperatures; label_2 (3 positives) keeps T = 1."""
    from cxr_edge import Classifier
    from cxr_edge.temperature import current_temperatures

    out = site["tmp"] / "hot.onnx"
    code = main(["calibrate", str(site["folder"]), "--labels", str(site["csv"]), "--out", str(out),
                 "--model", str(site["bundle"]), "--n-boot", "200", "--threads", "1", "--json", "--temperature"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(stdout)
    new = Classifier(out, threads=1)
    temps = current_temperatures(new.manifest)
    assert abs(temps[0] - 1.0) > 0.05 and temps[2] == 1.0
    assert report["temperature"]["mean_ece_after"] <= report["temperature"]["mean_ece_before"]
    p_old, p_new = site["probs"], np.array([[new.predict(p).probabilities[n] for n in new.labels] for p in site["paths"]])
    logit = np.log(p_old) - np.log1p(-p_old)
    np.testing.assert_allclose(p_new, 1 / (1 + np.exp(-logit / np.array(temps))), atol=2e-5)
    targets = (p_old[:, 0] >= np.median(p_old[:, 0])).astype(np.float32)[:, None]
    expected, _ = op.choose_thresholds(p_new[:, :1].astype(np.float32), targets, ["label_0"],
                                       patient_ids=[f"P{i // 2:03d}" for i in range(60)], n_boot=200)
    assert new.manifest.thresholds[0] == pytest.approx(expected[0], abs=1e-5)
    assert new.manifest.provenance["recalibration"]["temperature"]["per_label"]["label_0"]["temperature"] == \
        pytest.approx(temps[0], abs=1e-3)


def test_calibrate_human_table_and_rules(site, capsys):
    out = site["tmp"] / "spec.onnx"
    code = main(["calibrate", *map(str, site["paths"]), "--labels", str(site["csv"]), "--out", str(out),
                 "--model", str(site["bundle"]), "--n-boot", "200", "--rule", "specificity=0.9",
                 "--min-positive-patients", "3"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "sensitivity" in stdout and "specificity" in stdout and "PPV" in stdout and "undetermined" in stdout
    assert "optimistic" in stdout
    m = load_bundle(out, threads=1).manifest
    assert m.provenance["recalibration"]["method"] == "specificity" and m.provenance["recalibration"]["target"] == 0.9


def test_calibrate_refusals(site, capsys):
    base = ["--model", str(site["bundle"]), "--n-boot", "200"]
    bad = site["tmp"] / "bad.csv"
    bad.write_text("file,label_0\nim000.png,1\n")
    assert main(["calibrate", str(site["folder"]), "--labels", str(bad), "--out", str(site["tmp"] / "x.onnx"), *base]) == 2
    assert "'image' column" in capsys.readouterr().err
    bad.write_text("image,label_0\nim000.png,2\n")
    assert main(["calibrate", str(site["folder"]), "--labels", str(bad), "--out", str(site["tmp"] / "x.onnx"), *base]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "label_0" in err and "Traceback" not in err
    assert main(["calibrate", str(site["folder"]), "--labels", str(site["csv"]), "--out", str(site["tmp"] / "x.txt"),
                 *base]) == 2
    existing = site["tmp"] / "exists.onnx"
    existing.write_bytes(b"keep me")
    assert main(["calibrate", str(site["folder"]), "--labels", str(site["csv"]), "--out", str(existing), *base]) == 2
    assert existing.read_bytes() == b"keep me"
    assert main(["calibrate", str(site["folder"]), "--labels", str(site["csv"]), "--out", str(site["tmp"] / "x.onnx"),
                 "--rule", "magic", *base]) == 2
    capsys.readouterr()


def test_runtime_modules_import_no_torch_sklearn_or_scipy():
    import subprocess
    import sys

    code = ("import sys\nfor m in ('torch', 'sklearn', 'scipy', 'onnx'): sys.modules[m] = None\n"
            "import cxr_edge, cxr_edge.cli, cxr_edge.engine, cxr_edge.serve, cxr_edge.calibrate, "
            "cxr_edge.operating_points, cxr_edge.tiff, cxr_edge.cam, cxr_edge.bench.graphstats, "
            "cxr_edge.bench.variants\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
