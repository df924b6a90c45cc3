"""KD losses (hand-computed), attention transfer, teacher predictors and the teacher-output cache."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_onnx, make_manifest, need_shared
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from models.distill import (OnnxPredictor, Predictor, TeacherCache, attention_map, attention_transfer,
                            distillation_loss, kd_bce, kd_logit_mse, load_predictor, platt_recalibrate, masked_bce, teacher_probs)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(p: float, q: float) -> float:
    """BCE of prediction probability p against (soft) target q."""
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


# ------------------------------------------------------------------ losses
def test_kd_loss_equals_hand_computed_value():
    s = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    t = torch.tensor([[2.0, 0.0], [-1.0, 0.3]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha, T = 0.3, 2.0
    hard = np.mean([_bce(_sig(s[i, j].item()), y[i, j].item()) for i in range(2) for j in range(2)])
    soft = np.mean([_bce(_sig(s[i, j].item() / T), _sig(t[i, j].item() / T)) for i in range(2) for j in range(2)])
    total, parts = distillation_loss(s, y, t, alpha=alpha, temperature=T)
    assert total.item() == pytest.approx((1 - alpha) * hard + alpha * T * T * soft, rel=1e-6)
    assert parts["bce"] == pytest.approx(hard, rel=1e-6) and parts["kd"] == pytest.approx(T * T * soft, rel=1e-6)


def test_alpha_zero_is_plain_bce_and_nan_labels_are_masked():
    s = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.3, -0.2]])
    y = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    total, parts = distillation_loss(s, y, torch.zeros_like(s), alpha=0.0)
    known = ~torch.isnan(y)
    expected = F.binary_cross_entropy_with_logits(s[known], y[known])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6) and set(parts) == {"bce"}
    assert masked_bce(s, y).item() == pytest.approx(expected.item(), rel=1e-6)
    s.requires_grad_(True)
    masked_bce(s, y).backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~known] == 0).all()
    all_nan = torch.full_like(y, float("nan"))
    assert masked_bce(s.detach(), all_nan).item() == 0.0


def test_temperature_squared_scaling_of_the_gradient():
    s = torch.tensor([[0.7, -2.0, 1.5]], requires_grad=True)
    t = torch.tensor([[-0.3, 1.0, 1.5]])
    for T in (1.0, 2.0, 4.0):
        s.grad = None
        p = teacher_probs(t, T)
        loss = kd_bce(s, p, T)
        assert loss.item() == pytest.approx(T * T * F.binary_cross_entropy_with_logits(s / T, p).item(), rel=1e-6)
        loss.backward()
        # d/ds T^2 * BCE(sigmoid(s/T), q) = T * (sigmoid(s/T) - q) / n: grows with T, unlike without T^2
        expected = T * (torch.sigmoid(s.detach() / T) - p) / s.numel()
        torch.testing.assert_close(s.grad, expected)
    assert s.grad[0, 2] == 0  # student equals teacher on that cell: no KD gradient


def test_logit_matching_pulls_on_confident_negatives_and_masks_missing_teachers():
    """kd_loss=mse: the gradient is the logit difference (s/T - logit p) / (T n), so a student at
    logit -2 vs a teacher at logit -6 (both 'unlikely') is still pulled, where soft BCE barely moves;
    cells without a teacher (NaN) get no gradient and do not count in the mean."""
    t = torch.tensor([[-6.0, 1.0, float("nan")]])
    p = teacher_probs(t, 1.0)
    s = torch.tensor([[-2.0, 1.0, 3.0]], requires_grad=True)
    kd_logit_mse(s, p, 1.0).backward()
    torch.testing.assert_close(s.grad, torch.tensor([[4.0 / 2, 0.0, 0.0]]), atol=1e-4, rtol=1e-4)
    s2 = s.detach().clone().requires_grad_(True)
    kd_bce(s2, p, 1.0).backward()
    assert abs(float(s2.grad[0, 0])) < 0.07 < float(s.grad[0, 0])
    total, parts = distillation_loss(s.detach(), torch.zeros(1, 3), t, alpha=0.5, temperature=1.0, kd_loss="mse")
    assert parts["kd"] == pytest.approx(0.5 * 16.0 / 2, rel=1e-4)
    with pytest.raises(InvalidArgumentError, match="kd_loss"):
        distillation_loss(s.detach(), torch.zeros(1, 3), t, alpha=0.5, kd_loss="kl")


def test_multi_teacher_combination_modes():
    t = torch.tensor([[[2.0, -1.0]], [[0.0, 3.0]]]).permute(1, 0, 2)  # N=1, K=2, L=2
    T = 2.0
    by_logits = teacher_probs(t, T, "logits")
    by_probs = teacher_probs(t, T, "probs")
    assert by_logits[0, 0].item() == pytest.approx(_sig(1.0 / T))
    assert by_probs[0, 0].item() == pytest.approx((_sig(2.0 / T) + _sig(0.0)) / 2)
    assert by_logits[0, 1].item() != pytest.approx(by_probs[0, 1].item())
    torch.testing.assert_close(teacher_probs(t[:, :1], T, "probs"), teacher_probs(t[:, 0], T))
    with pytest.raises(InvalidArgumentError):
        teacher_probs(t, T, "median")


def test_attention_transfer_zero_for_identical_features_and_positive_otherwise():
    torch.manual_seed(0)
    f = torch.randn(3, 8, 4, 4)
    assert attention_transfer(f, [attention_map(f)]).item() == pytest.approx(0.0, abs=1e-7)
    # scale of the activations does not matter (maps are normalised), other maps do
    assert attention_transfer(f * 5, [attention_map(f)]).item() == pytest.approx(0.0, abs=1e-6)
    g = torch.randn(3, 8, 4, 4)
    assert attention_transfer(f, [attention_map(g)]).item() > 1e-3
    # resolution-aware: a student map on a 2 x 2 grid against a 7 x 7 teacher map
    s = torch.randn(3, 8, 2, 2, requires_grad=True)
    loss = attention_transfer(s, [attention_map(torch.randn(3, 16, 7, 7))])
    loss.backward()
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0
    total, parts = distillation_loss(torch.zeros(3, 2), torch.ones(3, 2), student_features=f,
                                     teacher_maps=[attention_map(f)], beta=2.0)
    assert parts["at"] == pytest.approx(0.0, abs=1e-7) and total.item() == pytest.approx(math.log(2), rel=1e-5)


def test_loss_refuses_missing_teacher():
    with pytest.raises(InvalidArgumentError):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, alpha=0.5)
    with pytest.raises(InvalidArgumentError):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), beta=0.5)


# ------------------------------------------------------------------ teacher cache
class CountingTeacher(Predictor):
    def __init__(self, checksum: str = "c" * 64, size: int = 16) -> None:
        self.name, self.checksum, self.calls = "fake-teacher", checksum, 0
        self.spec = PreprocessSpec(input_size=(size, size), min_side=16)

    def run(self, batch):
        self.calls += len(batch)
        m = batch.mean(axis=(1, 2, 3))
        return np.stack([m, -m], axis=1), np.repeat(batch[:, :, ::4, ::4], 2, axis=1)


def test_teacher_cache_hit_miss_and_invalidation(tmp_path):
    rng = np.random.default_rng(0)
    batches = {i: rng.random((1, 16, 16)).astype(np.float32) for i in range(5)}
    ids = [f"img{i}.png" for i in range(5)]
    digests = [f"d{i}" for i in range(5)]

    def load(pos):
        return np.stack([batches[p] for p in pos])

    t = CountingTeacher()
    cache = TeacherCache(tmp_path, t)
    logits, maps = cache.get(ids, digests, load, batch_size=2)
    assert (cache.hits, cache.misses, t.calls) == (0, 5, 5) and logits.shape == (5, 2) and maps.shape == (5, 4, 4)
    np.testing.assert_allclose(logits[:, 0], [batches[i].mean() for i in range(5)], rtol=1e-6)
    again, _ = TeacherCache(tmp_path, t).get(ids[::-1], digests[::-1], load)
    assert t.calls == 5
    np.testing.assert_array_equal(again, logits[::-1])
    # a changed image (same id, other pixel digest) is recomputed, the others are hits
    c2 = TeacherCache(tmp_path, t)
    c2.get(ids, digests[:4] + ["changed"], load)
    assert (c2.hits, c2.misses, t.calls) == (4, 1, 6)
    # another teacher checksum or another preprocessing -> another file, all misses
    other = CountingTeacher(checksum="d" * 64)
    c3 = TeacherCache(tmp_path, other)
    c3.get(ids, digests, load)
    assert c3.misses == 5 and c3.path != cache.path
    t2 = CountingTeacher(size=32)
    assert TeacherCache(tmp_path, t2).path != cache.path
    # a file whose stored metadata disagrees with its name is ignored
    c3.path.replace(cache.path)
    c4 = TeacherCache(tmp_path, t)
    c4.get(ids, digests, load)
    assert c4.misses == 5


# ------------------------------------------------------------------ predictors
def test_onnx_predictor_bare_and_bundle_expose_head_and_features(tmp_path):
    from cxr_edge.bundle import write_bundle

    model_bytes, w, b = build_tiny_onnx(n_labels=3, channels=8, input_size=64)
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(model_bytes)
    spec = PreprocessSpec(input_size=(64, 64), min_side=32)
    with pytest.raises(InvalidArgumentError, match="no cxr-edge manifest"):
        OnnxPredictor(bare)
    p = load_predictor(str(bare), spec=spec)
    hw, hb = p.head()
    np.testing.assert_allclose(hw, w)
    np.testing.assert_allclose(hb, b)
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    logits, feats = p.run(x)
    np.testing.assert_allclose(feats.mean(axis=(2, 3)) @ hw.T + hb, logits, atol=1e-4)
    bundle = tmp_path / "bundle.onnx"
    write_bundle(model_bytes, make_manifest(w, b), bundle)
    q = load_predictor(str(bundle))
    assert q.spec.input_size == (64, 64) and q.labels == ("label_0", "label_1", "label_2")
    np.testing.assert_allclose(q.run(x)[0], logits, atol=1e-5)
    assert OnnxPredictor(bundle, spec=PreprocessSpec(input_size=(32, 32))).spec.input_size == (64, 64)


def test_load_predictor_refuses_unknown_sources(tmp_path):
    with pytest.raises(InvalidArgumentError):
        load_predictor(str(tmp_path / "missing.onnx"))
    with pytest.raises(InvalidArgumentError):
        load_predictor("not-a-model")


def test_shared_onnx_teacher_cached_on_real_images(tmp_path):
    from models.config import TrainConfig
    from models.data import ImageCache, image_path
    from models.distill import cached_teacher_outputs

    onnx_path = need_shared("teachers", "densenet121-nih1071.onnx")
    root = need_shared("data", "nih-cxr14-sample", "images").parent
    ids = ["00000001_000.png", "00000003_000.png", "00000032_037.png"]
    images = ImageCache([image_path(root, i) for i in ids], ids)
    teacher = load_predictor(str(onnx_path), spec=TrainConfig().teacher_spec())
    assert teacher.checksum.startswith("576047137ce1") and teacher.head()[0].shape == (14, 1024)
    logits, maps, cache = cached_teacher_outputs(teacher, tmp_path, images, range(3))
    assert logits.shape == (3, 14) and maps.shape == (3, 7, 7) and np.isfinite(logits).all()
    again, _, c2 = cached_teacher_outputs(teacher, tmp_path, images, [2, 0])
    assert c2.hits == 2 and c2.misses == 0
    np.testing.assert_array_equal(again, logits[[2, 0]])


# ---------------------------------------------------------------- cached-prediction teachers, availability
def test_csv_teacher_rows_and_missing_images(tmp_path):
    from models.distill import CsvTeacher, write_teacher_csv

    path = tmp_path / "t.csv"
    write_teacher_csv(path, ["a.png", "b.png"], np.array([[0.9, 0.1], [0.5, 0.0]]), ["x", "y"])
    t = CsvTeacher(path, ["x", "y"])
    lo = t.logits(["b.png", "zz.png", "a.png"])
    assert np.allclose(lo[0, 0], 0.0, atol=1e-6) and np.isfinite(lo[0, 1])  # p = 0 clipped, not -inf
    assert np.isnan(lo[1]).all()  # no row: no soft label
    assert np.allclose(1 / (1 + np.exp(-lo[2])), [0.9, 0.1], atol=1e-5)
    assert t.coverage(["a.png", "q.png"]) == 1
    with pytest.raises(InvalidArgumentError, match="missing column"):
        CsvTeacher(path, ["x", "z"])
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x,y\na.png,1.5,0.1\n")
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\]"):
        CsvTeacher(bad, ["x", "y"])


def test_teacher_averaging_respects_per_image_availability():
    nan = float("nan")
    t = torch.tensor([[[2.0, 0.0], [nan, nan]],      # image 0: only teacher 0
                      [[2.0, 0.0], [-2.0, 4.0]],     # image 1: both
                      [[nan, nan], [nan, nan]]])     # image 2: none
    p = teacher_probs(t, temperature=1.0, combine="logits", weights=[3, 1])
    assert torch.allclose(p[0], torch.sigmoid(torch.tensor([2.0, 0.0])))  # not dragged towards 0.5 by the gap
    assert torch.allclose(p[1], torch.sigmoid(torch.tensor([(3 * 2 - 2) / 4, 4 / 4])))
    assert torch.isnan(p[2]).all()
    probs_mode = teacher_probs(t, 1.0, "probs")
    assert torch.allclose(probs_mode[1], (torch.sigmoid(t[1, 0]) + torch.sigmoid(t[1, 1])) / 2)


def test_kd_term_skips_images_without_soft_labels():
    s = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    soft = torch.tensor([[0.8, 0.1], [float("nan"), float("nan")]])
    only_first = kd_bce(s[:1], soft[:1], 2.0)
    assert torch.allclose(kd_bce(s, soft, 2.0), only_first)
    assert torch.isfinite(kd_bce(s, soft, 2.0))


def test_box_cam_loss_rewards_mass_inside_the_box():
    from models.distill import box_cam_loss

    feats = torch.zeros(1, 2, 4, 4)
    feats[0, 0, 0, 0] = 5.0  # channel 0 fires top-left
    feats[0, 1, 3, 3] = 5.0  # channel 1 fires bottom-right
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # label 0 <- channel 0, label 1 <- channel 1
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 0, :2, :2] = 1.0  # label 0's box: top-left
    has = torch.tensor([[True, False]])
    inside = box_cam_loss(feats, w, mask, has)
    mask_wrong = torch.zeros(1, 2, 4, 4)
    mask_wrong[0, 0, 2:, 2:] = 1.0
    outside = box_cam_loss(feats, w, mask_wrong, has)
    assert inside < outside
    assert box_cam_loss(feats, w, mask, torch.zeros(1, 2, dtype=torch.bool)) == 0


def test_platt_recalibration_undoes_a_prior_shift_and_keeps_ranking_and_gaps():
    """A teacher whose logits are the truth minus 2 (trained where the finding is rarer) is moved
    back (b ~ +2, a ~ 1); rows without a teacher stay NaN; a label without positives is left alone."""
    rng = np.random.default_rng(0)
    n = 4000
    true = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true))).astype(np.float32)
    t = np.stack([true - 2.0, true], axis=1)[:, None, :].astype(np.float32)  # N x 1 teacher x 2 labels
    t[:50, 0, :] = np.nan
    targets = np.stack([y, np.zeros(n, np.float32)], axis=1)
    out, report = platt_recalibrate(t, targets)
    assert report[0][0]["b"] == pytest.approx(2.0, abs=0.25) and report[0][0]["a"] == pytest.approx(1.0, abs=0.1)
    assert np.isnan(out[:50]).all() and np.isfinite(out[50:]).all()
    assert "skipped" in report[0][1] and np.array_equal(out[50:, 0, 1], t[50:, 0, 1])
    order = np.argsort(t[50:, 0, 0])
    assert np.all(np.diff(out[50:, 0, 0][order]) >= 0)  # ranking kept
    assert abs(np.nanmean(1 / (1 + np.exp(-out[:, 0, 0]))) - y[50:].mean()) < 0.02  # prevalence matched
