"""Per-label temperature scaling (cxr_edge.temperature): the fit, the calibration error, and folding
the temperatures into a bundle's head without changing anything else."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_edge import temperature as temp
from cxr_edge.bundle import load_bundle, read_manifest, split_model
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.operating_points import auc_per_label, sigmoid


def _labelled(t_true: float, n: int = 20000, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    y = (rng.random(n) < sigmoid(z / t_true)).astype(np.float64)
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_scale_that_generated_the_labels(t_true):
    z, y = _labelled(t_true)
    assert temp.fit_temperature(z, y) == pytest.approx(t_true, rel=0.06)


def test_fit_temperature_clamps_separable_data_and_refuses_bad_shapes():
    z = np.array([-2.0, -1.0, 1.0, 2.0])
    assert temp.fit_temperature(z, (z > 0).astype(float)) == temp.T_MIN  # separable: sharper is always better
    assert temp.fit_temperature(z, (z < 0).astype(float)) == temp.T_MAX  # anti-correlated: flatten
    with pytest.raises(InvalidArgumentError):
        temp.fit_temperature(z, z[:3])


def test_ece_is_zero_when_calibrated_and_the_gap_when_not():
    p = np.array([0.1] * 10 + [0.9] * 10)
    y = np.array([1.0] + [0.0] * 9 + [1.0] * 9 + [0.0])
    assert temp.expected_calibration_error(p, y) == pytest.approx(0.0)
    assert temp.expected_calibration_error(np.full(10, 0.8), np.r_[np.ones(3), np.zeros(7)]) == pytest.approx(0.5)
    assert temp.expected_calibration_error(p, np.full(20, np.nan)) != temp.expected_calibration_error(p, y)


def test_fit_temperatures_lowers_ece_keeps_rare_labels_at_one():
    z1, y1 = _labelled(2.0, 4000, 1)
    z2, y2 = _labelled(1.0, 4000, 2)
    y3 = np.zeros(4000)
    y3[:3] = 1  # 3 positives < MIN_CLASS_COUNT
    temps, details = temp.fit_temperatures(np.c_[z1, z2, z1], np.c_[y1, y2, y3], ["a", "b", "c"])
    assert temps[0] == pytest.approx(2.0, rel=0.1) and temps[2] == 1.0
    a = details["per_label"]["a"]
    assert a["ece_after"] < a["ece_before"] and "note" in details["per_label"]["c"]


def _bundle_bytes(sample_bundle):
    data = open(sample_bundle, "rb").read()
    return data, read_manifest(data)


def test_apply_temperatures_divides_each_label_logit_and_changes_nothing_else(tiny_bundle, tmp_path):
    """Same file length, other weights untouched, logits / T per label (AUC-preserving), CAM weights
    consistent (the loader's head check passes), and the record composes with an earlier one."""
    from cxr_edge.calibrate import write_verified_bundle

    data, manifest = _bundle_bytes(tiny_bundle)
    temps = np.linspace(0.6, 1.8, len(manifest.labels))
    scaled, m2 = temp.apply_temperatures(data, manifest, temps, {"method": "temperature"})
    assert len(scaled) == len(data)
    diff = np.flatnonzero(np.frombuffer(split_model(scaled)[0], np.uint8) != np.frombuffer(split_model(data)[0], np.uint8))
    assert diff.size and diff.max() - diff.min() < 4 * (len(manifest.labels) * (manifest.cam.weights.shape[1] + 1)) + 64
    out = tmp_path / "t.onnx"
    b = write_verified_bundle(scaled, m2, out)
    a = load_bundle(tiny_bundle, threads=1)
    x = np.random.default_rng(0).random((3, 1, *manifest.preprocessing.input_size), dtype=np.float32)
    name = manifest.preprocessing.input_name
    la = a.session.run([manifest.logits_output], {name: x})[0]
    lb = b.session.run([manifest.logits_output], {name: x})[0]
    np.testing.assert_allclose(lb, la / temps, rtol=1e-4, atol=1e-5)
    assert temp.current_temperatures(b.manifest) == pytest.approx(list(temps), rel=1e-5)
    _, m3 = temp.apply_temperatures(scaled, b.manifest, [2.0] * len(temps), {})
    assert temp.current_temperatures(m3) == pytest.approx(list(temps * 2.0), rel=1e-5)


def test_temperature_leaves_auc_unchanged():
    z, y = _labelled(1.7, 3000, 4)
    a0 = auc_per_label(y[:, None], sigmoid(z)[:, None])
    a1 = auc_per_label(y[:, None], sigmoid(z / 1.7)[:, None])
    np.testing.assert_allclose(a0, a1)


def test_scale_head_refuses_a_graph_without_a_float_gemm_head(tiny_bundle):
    data, manifest = _bundle_bytes(tiny_bundle)
    with pytest.raises(InvalidArgumentError, match="no node writing"):
        temp.scale_head(data, "no_such_output", [1.0] * len(manifest.labels))
    with pytest.raises(InvalidArgumentError, match="Gemm"):
        temp.scale_head(data, manifest.cam.features_output, [1.0] * len(manifest.labels))  # a Relu writes it
    with pytest.raises(InvalidArgumentError, match="> 0"):
        temp.scale_head(data, manifest.logits_output, [0.0] * len(manifest.labels))


def test_card_section_reports_both_eces_and_each_temperature():
    from export.card import _calibration_section

    cal = {"bins": 10, "mean_ece": 0.05, "mean_ece_without_temperature": 0.09,
           "per_label": {"a": {"ece": 0.04, "ece_without_temperature": 0.1, "temperature": 1.6},
                         "b": {"ece": 0.06, "ece_without_temperature": 0.08, "temperature": 1.0}}}
    record = {"fit": {"set": "calibration split", "mean_ece_before": 0.12, "mean_ece_after": 0.03,
                      "per_label": {"b": {"note": "kept 1"}}}}
    lines: list[str] = []
    _calibration_section(lines.append, record, cal)
    text = "\n".join(lines)
    assert "0.090 -> 0.050" in text and "0.120 -> 0.030" in text
    assert "| a | 1.60 | 0.100 | 0.040 |" in text and "kept 1" in text
    lines.clear()
    _calibration_section(lines.append, None, {"bins": 10, "mean_ece": 0.07, "per_label": {}})
    assert "No temperature scaling" in lines[1] and "0.070" in lines[1]
