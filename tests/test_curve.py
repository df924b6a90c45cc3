"""models.curve: the learning-curve fit, its bootstrap and its CLI, on synthetic runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_edge.errors import InvalidArgumentError
from models.curve import fit_log2, images_for, learning_curve, main


def _run(tmp_path, name, n_train, signal, seed, n=150, n_labels=3, n_folds=None):
    """A run directory as models.train writes it: predictions.npz on shared images, metrics.json."""
    rng = np.random.default_rng(100)  # the same images and targets in every run
    y = (rng.random((n, n_labels)) < 0.3).astype(np.float64)
    noise = np.random.default_rng(seed).normal(size=y.shape)
    run = tmp_path / name
    run.mkdir()
    np.savez(run / "predictions.npz", image_ids=np.array([f"i{k}" for k in range(n)]), logits=y * signal + noise,
             targets=y, patient_ids=np.array([f"p{k // 2}" for k in range(n)]),
             label_names=np.array(["A", "B", "C"]))
    folds = {250: 4, 300: 2, 500: 2}.get(n_train, 0) if n_folds is None else n_folds
    (run / "metrics.json").write_text(json.dumps({"train_images": n_train, "n_folds": folds}))
    return str(run)


def test_fit_and_extrapolation_are_the_line_in_log2():
    n = np.array([100, 200, 400, 100, 200, 400])
    auc = 0.6 + 0.02 * np.log2(n / 100)
    a, b = fit_log2(n, auc)
    assert b == pytest.approx(0.02) and a + b * np.log2(100) == pytest.approx(0.6)
    assert images_for(0.66, a, b) == pytest.approx(800)  # three doublings of 100 at +2 points each
    assert images_for(0.9, a, -0.01) == float("inf")  # a flat or falling curve never gets there
    with pytest.raises(InvalidArgumentError):
        fit_log2(np.array([100, 100]), np.array([0.6, 0.7]))


def test_learning_curve_recovers_a_rising_curve_and_bounds_it(tmp_path):
    runs = [_run(tmp_path, f"n{n}-s{s}", n + s, signal, seed=10 * n + s, n_folds=k)  # folds differ by an image
            for n, signal, k in ((250, 0.4, 4), (500, 0.8, 2), (1000, 1.6, 0)) for s in range(2)]
    res = learning_curve(runs, target=0.99, n_boot=200)
    assert [row["train_images_per_run"] for row in res["per_size"]] == [[250, 251], [500, 501], [1000, 1001]]
    assert [row["n_folds"] for row in res["per_size"]] == [4, 2, 0]  # grouped by nominal size, largest last
    means = [row["mean_auc_avg"] for row in res["per_size"]]
    assert means[0] < means[1] < means[2]
    lo, hi = res["slope_ci"]
    assert 0 < lo <= res["slope_per_doubling"] <= hi
    assert res["p_slope_le_zero"] == 0.0
    assert res["images_for_target"] > 1000  # above every run's AUC: beyond the largest size


def test_flat_curve_says_never_and_cli_writes_json(tmp_path, capsys):
    runs = [_run(tmp_path, f"n{n}-s{s}", n, 1.0, seed=s) for n in (300, 600) for s in range(2)]
    out = tmp_path / "curve.json"
    assert main([*runs, "--target", "0.99", "--bootstrap", "100", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert abs(res["slope_per_doubling"]) < 1e-12  # same noise seeds at both sizes: no slope at all
    assert res["images_for_target"] is None and res["images_for_target_ci"][1] is None
    assert "never" in capsys.readouterr().out


def test_refuses_runs_without_a_training_size_or_on_other_images(tmp_path, capsys):
    a = _run(tmp_path, "a", 300, 1.0, 0)
    b = _run(tmp_path, "b", 600, 1.0, 1)
    (tmp_path / "b" / "metrics.json").write_text("{}")
    assert main([a, b]) == 2 and "train_images" in capsys.readouterr().err
    c = _run(tmp_path, "c", 600, 1.0, 1, n=140)
    with pytest.raises(InvalidArgumentError, match="other images"):
        learning_curve([a, c], target=0.8, n_boot=10)
