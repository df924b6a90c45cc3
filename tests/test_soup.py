"""Model soups: the weight mean, the recipe check, BatchNorm re-estimation, and a soup of two tiny runs
that export and select read like any run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cxr_edge.errors import InvalidArgumentError
from models.config import TrainConfig
from models.soup import average_states, make_soup, recompute_batchnorm, shared_recipe
from test_train import _train, make_fake_sample, tiny_config


def test_average_is_the_element_wise_mean_and_integer_buffers_come_from_the_first():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 7.0]), "n": torch.tensor(9)}
    out = average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 5.0])) and out["w"].dtype == torch.float32
    assert int(out["n"]) == 5
    with pytest.raises(InvalidArgumentError, match="other parameters"):
        average_states([a, {"w": b["w"]}])
    with pytest.raises(InvalidArgumentError, match="at least one"):
        average_states([])


def test_recipes_that_differ_beyond_seed_and_folder_are_refused():
    a = TrainConfig(seed=0, out_dir="runs/a")
    assert shared_recipe([a, TrainConfig(seed=1, out_dir="runs/b")]) is a
    with pytest.raises(InvalidArgumentError, match=r"fields \['lr'\]"):
        shared_recipe([a, TrainConfig(seed=1, lr=1e-3)])


def test_batchnorm_statistics_are_re_estimated_from_the_batches_alone():
    """After recompute the running mean is the images' mean (not a momentum blend with the old one),
    and dropout stays off (a deterministic forward)."""
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Dropout(0.9))
    model[0].running_mean.fill_(100.0)
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (4, 2, 5, 5)).astype(np.float32) for _ in range(3)]
    recompute_batchnorm(model, batches)
    want = np.concatenate(batches).mean(axis=(0, 2, 3))
    assert np.allclose(model[0].running_mean.numpy(), want, atol=1e-5)
    assert not model.training and model[0].momentum == 0.1


def test_a_soup_of_two_runs_is_their_weight_mean_and_reads_like_a_run(tmp_path):
    from export.source import source_from_run
    from models.evaluate import calibration_auc

    data = make_fake_sample(tmp_path / "d", n_images=32, n_patients=16)
    runs = [_train(tiny_config(tmp_path / f"r{s}", data, seed=s, val_fraction=0.3)).run_dir for s in (0, 1)]
    rec = make_soup(runs, tmp_path / "soup", recipe="uniform", bn="average", threads=1)
    soup = torch.load(tmp_path / "soup" / "model_final.pt", weights_only=True)
    ing = [torch.load(r / "model_final.pt", weights_only=True)["model"] for r in runs]
    for k, v in soup["model"].items():
        if v.is_floating_point():
            assert torch.allclose(v, (ing[0][k] + ing[1][k]) / 2, atol=1e-6), k
    assert not torch.allclose(ing[0]["classifier.weight"], ing[1]["classifier.weight"])  # a real average
    assert [i["in_soup"] for i in rec["ingredients"]] == [True, True]
    assert calibration_auc(tmp_path / "soup") == pytest.approx(rec["calibration_mean_auc"])
    metrics = json.loads((tmp_path / "soup" / "metrics.json").read_text())
    assert "uniform soup of 2 runs" in metrics["checkpoint"] and 0 <= metrics["mean_auc"] <= 1
    assert source_from_run(tmp_path / "soup").labels  # export reads it
    with pytest.raises(InvalidArgumentError, match="already holds"):
        make_soup(runs, tmp_path / "soup", threads=1)

    greedy = make_soup(runs, tmp_path / "greedy", recipe="greedy", bn="recompute", threads=1)
    assert greedy["steps"][0]["kept"] and len(greedy["steps"]) == 2
    kept = [s for s in greedy["steps"] if s["kept"]]
    assert greedy["calibration_mean_auc"] == kept[-1]["calibration_mean_auc"]  # never below a kept step
    assert all(s["calibration_mean_auc"] < kept[-1]["calibration_mean_auc"] or s["kept"] for s in greedy["steps"])

    other = _train(tiny_config(tmp_path / "r9", data, seed=2, val_fraction=0.3, lr=5e-3)).run_dir
    with pytest.raises(InvalidArgumentError, match="another recipe"):
        make_soup([runs[0], other], tmp_path / "bad", threads=1)


def test_a_one_run_soup_at_another_input_size_re_estimates_bn_there_and_says_so(tmp_path):
    """--input-size: the run's weights at another resolution (FixRes-style test-size change), BN statistics
    re-estimated at that size; the config, checkpoint text and soup.json carry the size, export sees it, and
    a size the network's stride does not divide, or keeping the trained BN statistics, is refused."""
    from export.source import source_from_run

    data = make_fake_sample(tmp_path / "d", n_images=32, n_patients=16)
    run = _train(tiny_config(tmp_path / "r", data, val_fraction=0.3)).run_dir
    same = make_soup([run], tmp_path / "same", threads=1)
    rec = make_soup([run], tmp_path / "big", threads=1, input_size=64)
    assert rec["input_size"] == 64 and rec["trained_input_size"] == 32 and same["input_size"] == 32
    cfg = TrainConfig.load(tmp_path / "big" / "config.json")
    assert cfg.input_size == 64 and not [f for f in cfg.math_diff(TrainConfig.load(run / "config.json"))
                                         if f not in ("input_size", "out_dir")]
    a = torch.load(tmp_path / "same" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "big" / "model_final.pt", weights_only=True)
    assert "run at 64 px (trained at 32 px)" in b["checkpoint"]
    bn_mean = [k for k in a["model"] if k.endswith("running_mean")]
    assert bn_mean and not all(torch.allclose(a["model"][k], b["model"][k]) for k in bn_mean)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if "running" not in k
               and "num_batches" not in k)  # weights untouched
    assert source_from_run(tmp_path / "big").spec.input_size[-1] == 64
    with pytest.raises(InvalidArgumentError, match="multiple of 32"):
        make_soup([run], tmp_path / "odd", threads=1, input_size=100)
    with pytest.raises(InvalidArgumentError, match="needs --bn recompute"):
        make_soup([run], tmp_path / "avg", threads=1, input_size=64, bn="average")
