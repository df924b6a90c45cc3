"""Model card helpers: recorded experiments in either layout, the soup section, re-rendering the scope section."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_edge.bundle import load_bundle
from export.card import _Recorded, _soup_section, main, rescope_card


def _metrics(auc: float) -> dict:
    return {"mean_auc": auc, "mean_ci_low": auc - 0.03, "mean_ci_high": auc + 0.03}


def test_recorded_runs_are_read_from_run_folders_and_from_flat_copies(tmp_path):
    (tmp_path / "nested" / "kd-s0").mkdir(parents=True)
    (tmp_path / "nested" / "kd-s0" / "metrics.json").write_text(json.dumps(_metrics(0.7)))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "kd-s1.metrics.json").write_text(json.dumps(_metrics(0.6)))
    (tmp_path / "flat" / "kd-s1.config.json").write_text(json.dumps({"seed": 1}))
    (tmp_path / "flat" / "plain-s1.metrics.json").write_text(json.dumps(_metrics(0.65)))
    nested, flat = _Recorded(tmp_path / "nested"), _Recorded(tmp_path / "flat")
    assert nested.names("kd-s*") == ["kd-s0"] and nested.metrics("kd-s0")["mean_auc"] == 0.7
    assert flat.names("kd-s*") == ["kd-s1"] and flat.config("kd-s1") == {"seed": 1}
    assert flat.metrics("kd-s0") is None and flat.names("plain-s[0-9]") == ["plain-s1"]


def test_soup_section_lists_every_candidate_and_the_paired_gain(tmp_path):
    runs = _Recorded(tmp_path)
    for name, auc in (("plain-s0", 0.70), ("soup-uniform", 0.74)):
        (tmp_path / f"{name}.metrics.json").write_text(json.dumps(_metrics(auc)))
    (tmp_path / "gain_soup-uniform.json").write_text(json.dumps(
        {"delta_mean_auc": 0.02, "ci_low": 0.005, "ci_high": 0.035, "p_le_zero": 0.01, "per_seed": [{}, {}]}))
    lines: list[str] = []
    soup = {"recipe": "uniform", "bn": "average",
            "ingredients": [{"run": "runs/x/plain-s0", "in_soup": True}, {"run": "runs/x/plain-s1", "in_soup": True}]}
    selection = {"chosen": "soup-uniform", "calibration_mean_auc": {"plain-s0": 0.73, "soup-uniform": 0.75}}
    _soup_section(lines.append, soup, runs, selection, {"out_dir": "runs/soup/soup-uniform"})
    text = "\n".join(lines)
    assert "| soup-uniform (shipped) | 0.750 | 0.740 [0.710, 0.770] |" in text
    assert "| plain-s0 | 0.730 | 0.700" in text
    assert "+2.00 points** [95% CI +0.50, +3.50]" in text and "2 pairs" in text
    assert "weight average of `plain-s0`, `plain-s1`, BatchNorm buffers averaged" in text
    lines.clear()
    soup = {"recipe": "greedy", "bn": "recompute",
            "ingredients": [{"run": "runs/x/plain-s0", "in_soup": False}, {"run": "runs/x/plain-s1", "in_soup": True}]}
    _soup_section(lines.append, soup, runs, selection, {})
    assert "kept one ingredient: `plain-s1`'s weights with its BatchNorm statistics re-estimated" in lines[1]
    lines.clear()
    _soup_section(lines.append, None, runs, selection, {})
    assert lines == []


def test_one_run_with_its_batchnorm_re_estimated_is_not_called_a_soup(tmp_path):
    """A one-ingredient soup (models.soup RUN --out DIR) is BN re-estimation: the card says so, names the run by
    its path under the runs folder (an EMA run's raw/ twin is ``ema-s2/raw``, not ``raw``), reads each candidate's
    evaluation AUC from the folder select recorded, and cites the experiment's paired BN gain."""
    (tmp_path / "ema-s2" / "raw").mkdir(parents=True)
    (tmp_path / "ema-s2" / "raw" / "metrics.json").write_text(json.dumps(_metrics(0.71)))
    (tmp_path / "bn-raw-s2").mkdir()
    (tmp_path / "bn-raw-s2" / "metrics.json").write_text(json.dumps(_metrics(0.72)))
    (tmp_path / "gain_bn_raw.json").write_text(json.dumps(
        {"delta_mean_auc": 0.005, "ci_low": -0.01, "ci_high": 0.018, "p_le_zero": 0.29, "per_seed": [{}, {}, {}]}))
    soup = {"recipe": "uniform", "bn": "recompute", "ingredients": [{"run": str(tmp_path / "ema-s2" / "raw"),
                                                                     "in_soup": True}]}
    selection = {"chosen": "ema/bn-raw-s2", "calibration_mean_auc": {"ema/bn-raw-s2": 0.778, "ema-s2/raw": 0.735},
                 "runs": {"ema/bn-raw-s2": str(tmp_path / "bn-raw-s2"), "ema-s2/raw": str(tmp_path / "ema-s2" / "raw")}}
    lines: list[str] = []
    _soup_section(lines.append, soup, _Recorded(tmp_path), selection, {"out_dir": str(tmp_path / "bn-raw-s2")})
    text = "\n".join(lines)
    assert "## BatchNorm re-estimation" in text and "model soup" not in text.lower().split("one-ingredient")[0]
    assert "`ema-s2/raw`" in text and "`raw`" not in text
    assert "| ema/bn-raw-s2 (shipped) | 0.778 | 0.720 [0.690, 0.750] |" in text
    assert "| ema-s2/raw | 0.735 | 0.710 [0.680, 0.740] |" in text
    assert "**+0.50 points** [95% CI -1.00, +1.80]" in text and "3 seeds" in text


def test_rescope_replaces_only_the_scope_section_and_says_so(tmp_path):
    bundle = Path(__file__).resolve().parents[1] / "cxr_edge" / "data" / "default.onnx"
    sc = load_bundle(bundle, threads=1).manifest.scope
    card = ("# card\n\n## Speed\n\nfast\n\n## Input scope gate\n\nold text, old limits\n\n## Limitations\n\nmany\n")
    se = {"pixel_rules": {"min_std": 0.02, "min_range": 0.08, "max_aspect": 2.0, "inversion_margin": 0.123,
                          "orientation_margin": 0.2, "min_layout": 0.25, "colour_fraction": 0.05},
          "rows": [{"kind": "nih-eval (positives)", "role": "positive", "n": 100, "flagged": 0.01,
                    "by_pixels": 0.01, "by_features": 0.0},
                   {"kind": "rot90", "role": "held-out", "n": 10, "flagged": 0.9, "by_pixels": 0.9,
                    "by_features": 0.5}]}
    new = rescope_card(card, sc, se, "x/scope_eval.json", "2026-12-03")
    assert new.startswith("# card\n\n## Speed\n\nfast\n\n## Input scope gate\n")
    assert new.endswith("\n## Limitations\n\nmany\n") and "old text" not in new
    assert "inverted (score < -0.123)" in new and "| rot90 | held-out | 10 | 90.0%" in new
    assert "re-rendered on 2026-12-03" in new and "`x/scope_eval.json`" in new
    with pytest.raises(ValueError, match="no '## Input scope gate' section"):
        rescope_card("# card\n", sc, se, "x", "d")
    path = tmp_path / "card.md"
    path.write_text(card)
    (tmp_path / "se.json").write_text(json.dumps(se))
    assert main(["rescope", "--card", str(path), "--bundle", str(bundle), "--scope-eval", str(tmp_path / "se.json")]) == 0
    assert "inverted (score < -0.123)" in path.read_text() and path.read_text().endswith("many\n")
