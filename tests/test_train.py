"""Training: config <-> CLI, image cache, augmentation, short real runs, exact resume, online teachers."""
from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import NIH_LABELS, need_shared
from cxr_edge.errors import InvalidArgumentError
from models.config import TrainConfig, parse_config
from models.data import AugmentParams, CxrDataset, ImageCache, augment_image, grid_affine, image_path, sample_rng
from models.layers import CamNet
from models.registry import ModelConfig, list_models, register_model

TINY = "tiny_cam_test"


class TinyNet(CamNet):
    """Two strided convs, then the registry's GAP -> dropout -> classifier head (CAM contract)."""

    def __init__(self, num_classes: int = 14, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.body = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.num_features = 16
        self.classifier = nn.Linear(16, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


if TINY not in list_models():
    @register_model(ModelConfig(TINY, "student", 32, 16, "unit-test CAM net", "tests/test_train.py"))
    def tiny_cam_test(num_classes: int = 14, in_chans: int = 1, **kw) -> TinyNet:
        return TinyNet(num_classes, in_chans, **kw)


def make_fake_sample(root: Path, n_images: int = 24, n_patients: int = 12, size: int = 128, seed: int = 0) -> Path:
    """A synthetic folder in the NIH sample's layout (labels.csv, images/, bbox.csv); label 0 adds a blob."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    header = ["image", "patient_id", "follow_up", "age", "sex", "view", "original_width", "original_height",
              *NIH_LABELS, "no_finding"]
    rows, boxes = [], []
    for i in range(n_images):
        pid = i % n_patients
        name = f"{pid:08d}_{i // n_patients:03d}.png"
        labels = (rng.random(len(NIH_LABELS)) < 0.3).astype(int)
        labels[0] = i % 2
        img = rng.integers(40, 90, (size, size)).astype(np.uint8)
        if labels[0]:
            cv2.circle(img, (size // 3, size // 2), size // 8, 230, -1)
            boxes.append([name, "Atelectasis", size // 3 - size // 8, size // 2 - size // 8, size // 4, size // 4])
        cv2.imwrite(str(root / "images" / name), img)
        rows.append([name, pid, i // n_patients, 50, "M", "PA", 1024, 1024, *labels, int(labels.sum() == 0)])
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    with open(root / "bbox.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "finding", "x", "y", "w", "h"], *boxes])
    return root


def tiny_config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    base = dict(model=TINY, data_root=str(data), split="patient", eval_fraction=0.25, input_size=32,
                epochs=2, batch_size=4, lr=1e-2, bootstrap=50, out_dir=str(tmp_path / "run"), threads=1,
                teacher_cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg: TrainConfig):
    from models.train import train

    return train(cfg)


# ------------------------------------------------------------------ config
def test_every_field_is_a_flag_and_config_file_is_overridden(tmp_path):
    cfg = TrainConfig(epochs=3, teachers=["a.onnx"], kd_alpha=0.5, model_kwargs={"drop_path_rate": 0.1})
    path = tmp_path / "c.json"
    cfg.save(path)
    assert TrainConfig.load(path) == cfg
    again = parse_config(["--config", str(path), "--epochs", "7", "--no-augment", "--teachers", "x.onnx", "y.onnx"])
    assert (again.epochs, again.augment, again.teachers, again.kd_alpha) == (7, False, ["x.onnx", "y.onnx"], 0.5)
    assert again.model_kwargs == {"drop_path_rate": 0.1}
    from models.config import add_config_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in fields(TrainConfig)} <= flags


@pytest.mark.parametrize("bad", [{"kd_alpha": 1.5}, {"kd_alpha": 0.5}, {"split": "random"}, {"epochs": 0},
                                 {"device": "tpu"}, {"input_size": 8}])
def test_config_refuses_bad_values(bad):
    with pytest.raises(InvalidArgumentError):
        TrainConfig(**bad).validate()


def test_unknown_config_field_is_refused(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 2, "learning_rate": 1.0}))
    with pytest.raises(InvalidArgumentError, match="learning_rate"):
        TrainConfig.load(tmp_path / "c.json")


# ------------------------------------------------------------------ image cache and augmentation
def test_image_cache_is_exact_for_8_bit_and_digest_tracks_pixels(tmp_path):
    from cxr_edge.imaging import read_image

    data = make_fake_sample(tmp_path / "d", n_images=4, n_patients=2)
    paths = sorted((data / "images").glob("*.png"))
    cache = ImageCache(paths, [p.name for p in paths])
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(cache.get(k), read_image(str(p)).pixels)
        assert cache.raw(k).dtype == np.uint8
    assert len({cache.digest(k) for k in range(4)}) == 4
    half = ImageCache(paths[:1], ["a"], dtype="float16")
    assert half.raw(0).dtype == np.float16 and np.abs(half.get(0) - cache.get(0)).max() < 1e-3


def test_augmentation_is_seeded_per_epoch_and_image(tmp_path):
    img = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    p = AugmentParams()
    a1, m1 = augment_image(img, sample_rng(0, 3, 5), p)
    a2, m2 = augment_image(img, sample_rng(0, 3, 5), p)
    b, _ = augment_image(img, sample_rng(0, 4, 5), p)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, b)
    assert a1.dtype == np.float32 and a1.shape == img.shape and 0 <= a1.min() and a1.max() <= 1
    assert np.linalg.det(m1[:, :2]) > 0  # no flip by default
    ident, m = augment_image(img, sample_rng(0, 0, 0), AugmentParams(0, 0, 0, 0, 0))
    np.testing.assert_allclose(ident, img / 255.0, atol=1e-6)


def test_hflip_flag_flips_and_teacher_map_follows_the_image():
    rng = np.random.default_rng(1)
    flips = [np.linalg.det(augment_image(np.zeros((32, 32), np.uint8), rng, AugmentParams(hflip=True))[1][:, :2]) < 0
             for _ in range(20)]
    assert any(flips) and not all(flips)
    # a point transformed on the image grid lands where the map-grid transform puts it
    m = np.array([[0.9, -0.1, 12.0], [0.1, 0.9, -5.0]])
    g = grid_affine(m, (320, 320), (10, 10))
    u = np.array([3.0, 6.0, 1.0])                       # map pixel (x=3, y=6)
    x = (u[:2] + 0.5) * 32 - 0.5                        # the same point on the image grid
    x2 = m @ np.append(x, 1.0)
    np.testing.assert_allclose(g @ u, (x2 + 0.5) / 32 - 0.5, atol=1e-9)


def test_dataset_items_and_resolution_aware_teacher_images(tmp_path):
    from cxr_edge.manifest import PreprocessSpec

    data = make_fake_sample(tmp_path / "d", n_images=4, n_patients=2)
    paths = sorted((data / "images").glob("*.png"))
    cache = ImageCache(paths, [p.name for p in paths])
    targets = np.full((4, 14), np.nan, np.float32)
    s_spec = PreprocessSpec(input_size=(32, 32), min_side=32)
    t_spec = PreprocessSpec(input_size=(64, 64))
    ds = CxrDataset(cache, range(4), targets, s_spec, AugmentParams(), seed=1,
                    teacher_logits=np.zeros((4, 1, 14)), teacher_maps=[np.ones((4, 7, 7))], teacher_specs=[t_spec])
    item = ds[2]
    assert item["image"].shape == (1, 32, 32) and item["teacher_images"][0].shape == (1, 64, 64)
    assert torch.isnan(item["target"]).all() and item["teacher_logits"].shape == (1, 14)
    assert item["teacher_maps"][0].shape == (7, 7)
    # both resolutions come from the same augmented radiograph
    small = torch.nn.functional.avg_pool2d(item["teacher_images"][0][None], 2)[0]
    assert torch.corrcoef(torch.stack([small.flatten(), item["image"].flatten()]))[0, 1] > 0.9


# ------------------------------------------------------------------ runs
def test_two_step_run_on_real_images_with_student_and_cached_onnx_teacher(tmp_path):
    root = need_shared("data", "nih-cxr14-sample", "labels.csv").parent
    teacher = need_shared("teachers", "densenet121-nih1071.onnx")
    cfg = TrainConfig(model="eeea_c2", data_root=str(root), input_size=64, epochs=1, batch_size=8, limit_train=16,
                      limit_eval=16, bootstrap=50, teachers=[str(teacher)], kd_alpha=0.5, kd_temperature=2.0,
                      at_beta=1.0, out_dir=str(tmp_path / "run"), teacher_cache_dir=str(tmp_path / "cache"))
    res = _train(cfg)
    run = res.run_dir
    assert res.finished and len(res.history) == 1
    h = res.history[0]
    assert all(np.isfinite(h[k]) for k in ("loss", "bce", "kd", "at"))
    assert {"config.json", "last.pt", "model_final.pt", "metrics.json", "predictions.npz"} <= {
        p.name for p in run.iterdir()}
    assert TrainConfig.load(run / "config.json") == cfg
    pred = np.load(run / "predictions.npz")
    assert pred["logits"].shape == (16, 14) and len(set(pred["image_ids"])) == 16
    val = {r["image"] for r in csv.DictReader(open(cfg.split_lists()[1]))}
    assert set(pred["image_ids"]) <= val  # evaluated on images the teacher never trained on
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teachers"][0]["checksum"].startswith("576047137ce1")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = make_fake_sample(tmp_path / "d")
    full = _train(tiny_config(tmp_path / "a", data, epochs=3))
    part = _train(tiny_config(tmp_path / "b", data, epochs=3, stop_after_epochs=1))
    assert not part.finished and torch.load(part.run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert not (part.run_dir / "model_final.pt").exists()
    with pytest.raises(InvalidArgumentError, match="already holds a checkpoint"):
        _train(tiny_config(tmp_path / "b", data, epochs=3))
    with pytest.raises(InvalidArgumentError, match="different config"):
        _train(tiny_config(tmp_path / "b", data, epochs=3, lr=0.5, resume=True))
    resumed = _train(tiny_config(tmp_path / "b", data, epochs=3, resume=True))
    assert resumed.finished and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a = torch.load(full.run_dir / "model_final.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "model_final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(np.load(full.run_dir / "predictions.npz")["logits"],
                                  np.load(resumed.run_dir / "predictions.npz")["logits"])
    assert full.history[-1]["loss"] == resumed.history[-1]["loss"]


def test_online_torch_teacher_at_its_own_resolution_and_val_fraction(tmp_path):
    data = make_fake_sample(tmp_path / "d")
    weights = tmp_path / "teacher.pt"
    torch.save(TinyNet().state_dict(), weights)
    cfg = tiny_config(tmp_path, data, epochs=1, teachers=[f"{TINY}:{weights}", f"{TINY}:{weights}"],
                      teacher_mode="online", teacher_combine="probs", teacher_input_size=64, kd_alpha=0.7,
                      at_beta=0.5, val_fraction=0.3)
    res = _train(cfg)
    assert res.finished and "kd" in res.history[0] and "at" in res.history[0]
    assert res.history[0]["val_mean_auc"] is None or 0 <= res.history[0]["val_mean_auc"] <= 1
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["teachers"][0]["input_size"] == [64, 64] and metrics["input_size"] == 32
    assert (res.run_dir / "model_best.pt").exists() and metrics["checkpoint"].startswith("best")


def test_split_teacher_lists_are_used_and_patient_split_is_disjoint(tmp_path):
    from models.datasets import read_nih_sample
    from models.train import split_indices

    data = make_fake_sample(tmp_path / "d")
    table = read_nih_sample(data)
    cfg = TrainConfig(data_root=str(data), split="patient", eval_fraction=0.25, val_fraction=0.25)
    tr, va, ev = split_indices(cfg, table)
    pid = np.asarray(table.patient_ids)
    assert not (set(pid[tr]) & set(pid[ev])) and not (set(pid[tr]) & set(pid[va])) and len(va)
    assert len(tr) + len(va) + len(ev) == len(table)
    lists = tmp_path / "lists"
    lists.mkdir()
    first = [k for k, p in enumerate(table.patient_ids) if int(p) < 8]
    rest = [k for k in range(len(table)) if k not in first]
    (lists / "tr.csv").write_text("image\n" + "\n".join(table.image_ids[k] for k in first) + "\n")
    (lists / "ev.csv").write_text("image\n" + "\n".join(table.image_ids[k] for k in rest) + "\n")
    cfg = TrainConfig(data_root=str(data), train_list=str(lists / "tr.csv"), eval_list=str(lists / "ev.csv"))
    tr, va, ev = split_indices(cfg, table)
    assert list(tr) == first and list(ev) == rest and not len(va)
    (lists / "ev.csv").write_text("image\n" + "\n".join(table.image_ids) + "\n")
    with pytest.raises(InvalidArgumentError, match="share patients"):
        split_indices(cfg, table)


def test_image_path_adds_png():
    assert image_path("/r", "a_000") == Path("/r/images/a_000.png")
    assert image_path("/r", "a_000.png") == Path("/r/images/a_000.png")


# ------------------------------------------------------------------ cross-fitting, cached teachers, boxes
def test_cross_fitted_folds_partition_the_training_images_and_give_an_oof_teacher(tmp_path):
    from models.distill import CsvTeacher
    from models.distill import main as distill_main

    data = make_fake_sample(tmp_path / "d", n_images=32, n_patients=16)
    runs = []
    for fold in (0, 1):
        res = _train(tiny_config(tmp_path / f"f{fold}", data, epochs=1, n_folds=2, fold=fold))
        runs.append(res.run_dir)
    oof = [np.load(r / "oof_predictions.npz") for r in runs]
    ids0, ids1 = set(oof[0]["image_ids"]), set(oof[1]["image_ids"])
    assert ids0 and ids1 and not ids0 & ids1
    from models.datasets import read_nih_sample
    from models.train import split_indices

    table = read_nih_sample(data)
    train_rows = split_indices(tiny_config(tmp_path, data), table)[0]
    assert ids0 | ids1 == {table.image_ids[r] for r in train_rows}  # every training image exactly once
    pid = dict(zip(table.image_ids, table.patient_ids))
    assert not {pid[i] for i in ids0} & {pid[i] for i in ids1}  # folds are patient-wise
    out = tmp_path / "oof.csv"
    assert distill_main(["oof-csv", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    teacher = CsvTeacher(out, NIH_LABELS)
    assert len(teacher) == len(ids0 | ids1)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        distill_main(["oof-csv", str(runs[0]), str(runs[0]), "--out", str(tmp_path / "x.csv")])


def test_training_with_a_csv_teacher_that_covers_half_the_images(tmp_path):
    from models.datasets import read_nih_sample
    from models.distill import write_teacher_csv

    data = make_fake_sample(tmp_path / "d")
    table = read_nih_sample(data)
    half = list(table.image_ids[::2])
    csv_path = tmp_path / "teacher.csv"
    write_teacher_csv(csv_path, half, np.full((len(half), 14), 0.3), NIH_LABELS)
    res = _train(tiny_config(tmp_path, data, epochs=1, teachers=[str(csv_path)], kd_alpha=0.5))
    assert res.finished and np.isfinite(res.history[0]["kd"])
    info = json.loads((res.run_dir / "metrics.json").read_text())["teachers"][0]
    assert info["kind"].startswith("cached") and 0 < info["train_images_covered"] < info["train_images"]


def test_box_masks_follow_the_augmentation_and_only_training_boxes_are_used(tmp_path):
    from models.data import box_masks

    masks, has = box_masks([(2, 0.0, 0.0, 64.0, 64.0)], (128, 128), None, (4, 4), 14)
    assert has[2] and not has[0] and masks[2, :2, :2].min() == 1.0 and masks[2, 2:, 2:].max() == 0.0
    shift = np.array([[1.0, 0.0, 64.0], [0.0, 1.0, 64.0]])  # move the image by half its side
    moved, has2 = box_masks([(2, 0.0, 0.0, 64.0, 64.0)], (128, 128), shift, (4, 4), 14)
    assert has2[2] and moved[2, 2:, 2:].min() > 0.99 and moved[2, :2, :2].max() == 0.0
    gone, has3 = box_masks([(2, 0.0, 0.0, 20.0, 20.0)], (128, 128), shift * [[1, 1, 3], [1, 1, 3]], (4, 4), 14)
    assert not has3[2]  # moved out of view: no supervision
    data = make_fake_sample(tmp_path / "d")
    cfg = tiny_config(tmp_path, data, epochs=1, box_beta=0.5)
    from models.datasets import read_nih_sample
    from models.train import _training_boxes, split_indices

    table = read_nih_sample(data)
    train_rows, _, eval_rows = split_indices(cfg, table)
    boxes, grid, n = _training_boxes(cfg, table, train_rows, list(table.label_names))
    assert grid == (4, 4) and len(boxes) == len(train_rows)  # 32 px input, stride 8
    with open(data / "bbox.csv") as fh:
        boxed = {r["image"] for r in csv.DictReader(fh)}
    eval_boxed = boxed & {table.image_ids[r] for r in eval_rows}
    assert n == len(boxed & {table.image_ids[r] for r in train_rows}) and eval_boxed  # eval boxes stay out
    res = _train(cfg)
    assert res.finished and "box" in res.history[0]


def test_ema_weights_are_the_average_shipped_and_resume_exactly(tmp_path):
    """--ema-decay: model_final.pt holds the moving average (not the raw weights of last.pt), it is a
    real average (different from the raw weights, and from the start), and a resumed run ends on the
    same average as an uninterrupted one."""
    data = make_fake_sample(tmp_path / "d")
    full = _train(tiny_config(tmp_path / "a", data, epochs=2, ema_decay=0.9))
    last = torch.load(full.run_dir / "last.pt", weights_only=True)
    final = torch.load(full.run_dir / "model_final.pt", weights_only=True)
    assert "EMA" in final["checkpoint"] and "ema" in last
    ema = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    assert ema.keys() == final["model"].keys()
    assert all(torch.equal(ema[k], final["model"][k]) for k in ema)
    w = "classifier.weight"
    assert not torch.allclose(final["model"][w], last["model"][w])  # the average, not the last step
    plain = _train(tiny_config(tmp_path / "p", data, epochs=2))
    assert not np.array_equal(np.load(full.run_dir / "predictions.npz")["logits"],
                              np.load(plain.run_dir / "predictions.npz")["logits"])
    _train(tiny_config(tmp_path / "b", data, epochs=2, ema_decay=0.9, stop_after_epochs=1))
    resumed = _train(tiny_config(tmp_path / "b", data, epochs=2, ema_decay=0.9, resume=True))
    b = torch.load(resumed.run_dir / "model_final.pt", weights_only=True)["model"]
    assert all(torch.equal(final["model"][k], b[k]) for k in b)


def test_ema_run_writes_its_raw_twin_identical_to_a_plain_run(tmp_path):
    """An EMA run's raw/ folder is the plain run of the same seed (EMA never touches the trajectory), with
    its own best validation epoch: a paired no-EMA control from one training run."""
    data = make_fake_sample(tmp_path / "d", n_images=40, n_patients=20)
    kw = dict(epochs=3, val_fraction=0.25)
    ema = _train(tiny_config(tmp_path / "e", data, ema_decay=0.5, **kw))
    plain = _train(tiny_config(tmp_path / "p", data, **kw))
    twin = ema.run_dir / "raw"
    a, b = np.load(twin / "predictions.npz"), np.load(plain.run_dir / "predictions.npz")
    assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["image_ids"], b["image_ids"])
    assert not np.array_equal(np.load(ema.run_dir / "predictions.npz")["logits"], a["logits"])
    cfg = TrainConfig.load(twin / "config.json")
    assert cfg.ema_decay == 0 and cfg.math_diff(TrainConfig.load(plain.run_dir / "config.json")) == ["out_dir"]
    m = json.loads((twin / "metrics.json").read_text())
    assert "raw weights" in m["checkpoint"]
    from models.evaluate import calibration_auc
    history = torch.load(ema.run_dir / "last.pt", weights_only=False)["history"]
    assert calibration_auc(twin) == m["calibration_mean_auc"] == max(h["raw_val_mean_auc"] for h in history)
    assert calibration_auc(plain.run_dir) == m["calibration_mean_auc"]  # the same trajectory, the same epoch
    assert calibration_auc(ema.run_dir) == max(h["val_mean_auc"] for h in history)
    m.pop("calibration_mean_auc")  # a twin written before the field existed: read from its parent's history
    (twin / "metrics.json").write_text(json.dumps(m))
    assert calibration_auc(twin) == max(h["raw_val_mean_auc"] for h in history)
    from models.evaluate import main as evaluate_main
    other = _train(tiny_config(tmp_path / "e1", data, ema_decay=0.5, seed=1, **kw)).run_dir / "raw"
    assert evaluate_main(["select", str(twin), str(other), "--out", str(tmp_path / "sel.json")]) == 0
    sel = json.loads((tmp_path / "sel.json").read_text())  # two folders named raw: named by their parents
    assert sorted(sel["calibration_mean_auc"]) == ["e/run/raw", "e1/run/raw"] and sel["chosen"] in ("e/run/raw",
                                                                                                     "e1/run/raw")
    assert m["checkpoint"].split(",")[0] == json.loads((plain.run_dir / "metrics.json").read_text())["checkpoint"]


def test_init_seed_shares_the_initial_weights_and_nothing_else(tmp_path):
    """--init-seed: two runs with other seeds but one init seed start from the same weights (seen after
    a step of a negligible learning rate), while plain seeds start apart; the data order still follows
    --seed (their losses differ)."""
    data = make_fake_sample(tmp_path / "d")

    def head(name: str, **kw):
        r = _train(tiny_config(tmp_path / name, data, epochs=1, lr=1e-12, **kw))
        return torch.load(r.run_dir / "model_final.pt", weights_only=True)["model"]["classifier.weight"], r

    a, ra = head("a", seed=1, init_seed=0)
    b, rb = head("b", seed=2, init_seed=0)
    c, _ = head("c", seed=2)
    assert torch.allclose(a, b, atol=1e-9) and not torch.allclose(b, c, atol=1e-3)
    assert ra.history[0]["loss"] != rb.history[0]["loss"]


def test_layer_decay_scales_each_stage_and_leaves_the_plain_optimizer_unchanged():
    """--layer-decay d: the head conv learns at lr, each stage below it d x slower (the stem d**8 on
    EfficientNet-Lite0), the classifier at head_lr_mult x lr, every parameter in exactly one group; d = 1
    gives the groups of a run without the option (same order, same members), and a model without
    lr_stages() is refused rather than trained at one rate."""
    from models.registry import create_model
    from models.train import build_optimizer

    model = create_model("efficientnet_lite0", num_classes=3)
    cfg = TrainConfig(model="efficientnet_lite0", lr=1e-3, head_lr_mult=5.0, weight_decay=0.05)
    plain = build_optimizer(cfg, model)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain.param_groups] == [
        (1e-3, 0.05, sum(p.ndim > 1 for p in model.parameters()) - 1), (1e-3, 0.0, sum(
            p.ndim <= 1 for p in model.parameters()) - 1), (5e-3, 0.05, 1), (5e-3, 0.0, 1)]
    cfg.layer_decay = 0.5
    opt = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(lr_of) == len(list(model.parameters()))
    assert lr_of[id(model._conv_head.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model._blocks[-1].parameters().__next__())] == pytest.approx(5e-4)  # the last stage
    assert lr_of[id(model._conv_stem.weight)] == pytest.approx(1e-3 * 0.5 ** 8)  # 7 stages between
    assert lr_of[id(model._bn0.weight)] == lr_of[id(model._conv_stem.weight)]
    assert lr_of[id(model.classifier.weight)] == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="lr_stages"):
        build_optimizer(TrainConfig(model="eeea_c2", layer_decay=0.5), create_model("eeea_c2", num_classes=3))
    with pytest.raises(ValueError, match="layer_decay"):
        TrainConfig(layer_decay=0.0).validate()


# ------------------------------------------------------------------ mixup
def test_mixup_draw_is_seeded_and_off_by_default():
    from models.train import mixup_draw

    assert mixup_draw(np.random.default_rng(0), 0.0, 8) == (1.0, None)
    assert mixup_draw(np.random.default_rng(0), 0.4, 1) == (1.0, None)  # nothing to mix with
    lam, perm = mixup_draw(np.random.default_rng(5), 0.4, 8)
    lam2, perm2 = mixup_draw(np.random.default_rng(5), 0.4, 8)
    assert 0.0 < lam < 1.0 and lam == lam2 and torch.equal(perm, perm2)
    assert sorted(perm.tolist()) == list(range(8))


def test_mixed_losses_blend_each_term_with_its_own_mask():
    """lam x loss(own targets) + (1 - lam) x loss(partner's): a label unknown (NaN) for the partner only
    drops out of the partner's term, and with no partner it is the plain loss."""
    from models.distill import masked_bce
    from models.train import mixed_losses

    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    y = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
    perm = torch.tensor([1, 0])

    def losses(idx):
        t = y if idx is None else y[idx]
        loss = masked_bce(logits, t)
        return loss, {"bce": float(loss)}

    plain, parts = mixed_losses(losses, 1.0, None)
    assert torch.equal(plain, masked_bce(logits, y)) and parts == {"bce": float(plain)}
    mixed, parts = mixed_losses(losses, 0.3, perm)
    expected = 0.3 * masked_bce(logits, y) + 0.7 * masked_bce(logits, y[perm])
    assert torch.allclose(mixed, expected) and parts["bce"] == pytest.approx(float(expected))
    assert torch.isfinite(mixed)


def test_mixup_run_trains_differently_and_reproducibly(tmp_path):
    """--mixup-alpha changes the trajectory (it is not silently ignored) and two runs with the same seed
    agree exactly; with boxes on (box guidance), the partner's boxes enter the partner's term."""
    data = make_fake_sample(tmp_path / "d")
    plain = _train(tiny_config(tmp_path / "p", data, box_beta=0.1))
    a = _train(tiny_config(tmp_path / "a", data, box_beta=0.1, mixup_alpha=0.4))
    b = _train(tiny_config(tmp_path / "b", data, box_beta=0.1, mixup_alpha=0.4))
    la, lb = (np.load(r.run_dir / "predictions.npz")["logits"] for r in (a, b))
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(la, np.load(plain.run_dir / "predictions.npz")["logits"])
    assert all(np.isfinite(h["box"]) for h in a.history)
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrainConfig(mixup_alpha=-0.1).validate()
