"""Input scope gate: pixel rules, the manifest's scope block, the feature score, fitting, export."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_onnx, make_manifest, need_shared
from cxr_edge import scope as sc
from cxr_edge.errors import InvalidArgumentError, ManifestError
from cxr_edge.imaging import read_image
from cxr_edge.manifest import Manifest, ScopeSpec, encode_array
from cxr_edge.scope import ScopeGate, ScopeResult
from export.scope_fit import conformal_threshold, fit_density, fit_scope, out_of_fold_scores

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cxr_edge" / "data" / "sample_chest_pa.png"


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    """The repository's own sample radiograph (NEMA WG04 RG1, PA chest): a real-looking in-scope image."""
    return read_image(SAMPLE).pixels


@pytest.fixture(scope="module")
def nih() -> list[np.ndarray]:
    images = need_shared("data", "nih-cxr14-sample", "images")
    names = need_shared("teachers", "teacher_val_images.csv").read_text().split()[1:13]
    return [read_image(images / n).pixels for n in names]


# --------------------------------------------------------------------------- pixel rules

def test_real_radiographs_pass_every_pixel_rule(chest):
    assert sc.check_pixels(chest) == []
    rgb = np.repeat((chest[..., None] * 255).astype(np.uint8), 3, axis=2)
    assert sc.check_pixels(chest, rgb) == []


def test_nih_radiographs_pass_and_their_inverses_and_flips_do_not(nih):
    silent = [not sc.check_pixels(px) for px in nih]
    assert sum(silent) >= len(nih) - 1, "at most one of 12 evaluation radiographs may trip a pixel rule"
    # the gate is the union of the rules: an inverse the inversion margin lets through fails the layout rule
    assert all(sc.check_pixels(1.0 - px) for px, ok in zip(nih, silent) if ok)
    assert all(sc.check_pixels(np.ascontiguousarray(px[::-1])) for px, ok in zip(nih, silent) if ok)


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
def test_constant_images_are_flagged_and_nothing_else_is_claimed(level):
    img = np.full((256, 256), level, np.float32)
    assert "near-constant" in sc.check_constant(img)
    assert len(sc.check_pixels(img)) == 1


def test_constant_rule_is_silent_on_a_radiograph(chest):
    assert sc.check_constant(chest) is None


def test_extreme_aspect_ratio(chest):
    assert "aspect ratio" in sc.check_aspect(np.zeros((128, 400), np.float32))
    assert sc.check_aspect(np.zeros((400, 128), np.float32))
    assert sc.check_aspect(np.zeros((300, 590), np.float32)) is None  # 1.97:1
    assert sc.check_aspect(chest) is None


def test_inverted_radiograph_is_flagged(chest):
    assert sc.inversion_score(chest) > 0.1
    assert sc.inversion_score(1.0 - chest) == pytest.approx(-sc.inversion_score(chest), abs=1e-4)
    reasons = sc.check_pixels(1.0 - chest)
    assert len(reasons) == 1 and "inverted" in reasons[0]
    assert sc.check_inverted(chest) is None


@pytest.mark.parametrize("transform, word", [
    (lambda p: p[::-1], "upside down"), (lambda p: p[::-1, ::-1], "upside down"),
    (lambda p: np.rot90(p, 1), "counter-clockwise"), (lambda p: np.rot90(p, 3), "clockwise"),
])
def test_flipped_and_rotated_radiographs_are_flagged(chest, transform, word):
    reason = sc.check_orientation(np.ascontiguousarray(transform(chest)))
    assert reason and word in reason
    assert sc.check_orientation(chest) is None


def test_layout_scores_are_the_correlations_of_the_flipped_and_rotated_copies(chest):
    """The one-matrix scoring (_orientation_templates) equals building each view and correlating it."""
    rng = np.random.default_rng(3)
    for thumb in [rng.random((64, 64)), sc.summarize(chest).thumb, np.rot90(sc.summarize(chest).thumb)]:
        t = sc._block_mean(thumb, 16)
        t = (t - t.mean()) / t.std()
        views = [t] + [f(t) for _, f in sc._ORIENTATIONS]
        corr = [float((v * sc.CHEST_TEMPLATE.astype(np.float64)).mean()) for v in views]
        k = int(np.argmax(corr[1:]))
        c0, best, how = sc._layout(thumb)
        assert c0 == pytest.approx(corr[0], abs=1e-12) and best == pytest.approx(corr[1 + k], abs=1e-12)
        assert how == sc._ORIENTATIONS[k][0]


def test_noise_has_no_chest_layout(chest):
    noise = np.random.default_rng(0).random((320, 320)).astype(np.float32)
    assert "no frontal chest layout" in sc.check_layout(noise)
    assert sc.check_layout(chest) is None


def test_colour_photograph_needs_the_rgb_array(chest):
    rng = np.random.default_rng(0)
    photo = (rng.random((200, 300, 3)) * 255).astype(np.uint8)
    assert "colour image" in sc.check_colour(photo)
    assert sc.check_colour(photo.astype(np.float32) / 255) and sc.check_colour(photo.astype(np.uint16) * 257)
    gray_rgb = np.repeat((chest[..., None] * 255).astype(np.uint8), 3, axis=2)
    assert sc.check_colour(gray_rgb) is None
    annotated = gray_rgb.copy()
    annotated[10:60, 10:60] = (255, 0, 0)  # a small red annotation: well under 5% of the pixels
    assert sc.check_colour(annotated) is None
    assert any("colour" in r for r in sc.check_pixels(chest, photo[:chest.shape[0], :chest.shape[1]]))
    assert sc.check_colour(sc.colour_fraction(photo)) and sc.check_colour(0.01) is None  # a measured fraction
    with pytest.raises(InvalidArgumentError):
        sc.check_colour(chest)


def test_pixel_rules_refuse_non_images():
    with pytest.raises(InvalidArgumentError):
        sc.check_pixels(np.zeros((4, 4, 3), np.float32))


def test_large_images_are_summarised_from_a_strided_copy(chest):
    import cv2

    big = cv2.resize(chest, (chest.shape[1] * 3, chest.shape[0] * 3), interpolation=cv2.INTER_LINEAR)
    assert sc.inversion_score(big) == pytest.approx(sc.inversion_score(chest), abs=0.02)
    assert sc.layout_scores(big)[0] == pytest.approx(sc.layout_scores(chest)[0], abs=0.02)


# --------------------------------------------------------------------------- density model and score

def _gaussian(n: int, c: int = 16, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(c, c)))[0]
    scales = np.geomspace(3.0, 0.05, c)
    z = rng.normal(size=(n, c)) * scales
    z[:, -1] += shift  # along the least varying direction
    return (z @ basis.T + 5.0).astype(np.float32), basis


def test_score_formula_matches_a_plain_computation():
    x, _ = _gaussian(500)
    spec = fit_density(x, k=4, shrinkage=0.2, transform="none")
    y, _ = _gaussian(7, seed=5)
    d = y.astype(np.float64) - spec.mean
    z = d @ spec.components.T.astype(np.float64)
    expected = 0.5 * ((z ** 2 / spec.variances).sum(1) / 4 + ((d ** 2).sum(1) - (z ** 2).sum(1)) / spec.residual_scale)
    gate = ScopeGate(spec)
    np.testing.assert_allclose(gate.scores(y), expected, rtol=1e-4)
    assert gate.score(y[0]) == pytest.approx(expected[0], rel=1e-4)
    maps = np.repeat(y[0][:, None, None], 9, axis=1).reshape(16, 3, 3)
    assert gate.score(maps) == pytest.approx(expected[0], rel=1e-4)  # C x h x w -> pooled first
    assert np.median(gate.scores(x)) == pytest.approx(1.0, abs=0.15)  # ~1 on the fit set by construction


def test_in_distribution_scores_low_and_shifted_scores_high():
    train, _ = _gaussian(2000, seed=1)
    calib, _ = _gaussian(300, seed=2)
    spec = fit_scope(train, calib, k=6, transform="none")
    gate = ScopeGate(spec)
    fresh, _ = _gaussian(1000, seed=3)
    shifted, _ = _gaussian(200, seed=4, shift=3.0)  # outside the PCA subspace, ~4x the residual's typical norm
    far_inside, _ = _gaussian(200, seed=4)  # 10 sigma along the first principal component
    far_inside = far_inside + 30.0 * np.linalg.svd(train - train.mean(0), full_matrices=False)[2][0]
    assert np.mean(gate.scores(fresh) > spec.threshold) < 0.03
    assert np.all(gate.scores(shifted) > spec.threshold)
    assert np.all(gate.scores(far_inside) > spec.threshold)


def test_fit_scope_records_its_rule_and_falls_back_to_out_of_fold_scores():
    train, _ = _gaussian(300, seed=1)
    with_cal = fit_scope(train, _gaussian(150, seed=2)[0], k=4, threshold_set="calibration split")
    assert "split conformal" in with_cal.threshold_rule and with_cal.statistics["threshold_images"] == 150
    assert with_cal.statistics["conformal_guarantee"] and "caveat" not in with_cal.statistics
    oof = fit_scope(train, None, k=4)
    assert "out-of-fold" in oof.statistics["threshold_set"] and "caveat" in oof.statistics
    scores = out_of_fold_scores(train, k=4)
    assert scores.shape == (300,) and np.isfinite(scores).all()
    assert np.isfinite(out_of_fold_scores(train[:24], k=4)).all()  # more folds so that each fit has >= 20


def test_conformal_threshold_rank():
    s = np.arange(1, 100, dtype=np.float64)  # n = 99
    assert conformal_threshold(s, 0.99) == (99.0, True)  # ceil(100 * 0.99) = 99th smallest
    assert conformal_threshold(s, 0.9) == (90.0, True)
    assert conformal_threshold(s[:50], 0.99) == (50.0, False)  # too few: the max, no guarantee


def test_fitting_refuses_bad_input():
    with pytest.raises(InvalidArgumentError, match="at least"):
        fit_density(np.ones((5, 8)))
    bad = np.ones((50, 8))
    bad[0, 0] = np.nan
    with pytest.raises(InvalidArgumentError, match="finite"):
        fit_density(bad)
    with pytest.raises(InvalidArgumentError, match="quantile"):
        fit_scope(_gaussian(100)[0], quantile=1.0)


def test_k_is_capped_at_half_the_channels():
    spec = fit_density(_gaussian(200)[0], k=64)
    assert spec.k == 8 and spec.residual_scale > 0


# --------------------------------------------------------------------------- manifest block

def _manifest_with_scope(c: int = 16) -> Manifest:
    x, _ = _gaussian(200, c=c)
    spec = fit_scope(x, _gaussian(100, c=c, seed=7)[0], k=4)
    rng = np.random.default_rng(0)
    return make_manifest(rng.normal(size=(3, c)).astype(np.float32), np.zeros(3, np.float32),
                         model_sha256="a" * 64, scope=spec)


def test_scope_block_round_trips_with_checksums():
    m = _manifest_with_scope()
    text = m.to_json()
    back = Manifest.from_json(text)
    for key in ("mean", "components", "variances"):
        np.testing.assert_array_equal(getattr(back.scope, key), getattr(m.scope, key))
    assert back.scope.threshold == m.scope.threshold and back.scope.residual_scale == m.scope.residual_scale
    assert back.scope.statistics == m.scope.statistics and back.scope.threshold_rule == m.scope.threshold_rule
    d = json.loads(text)["scope"]
    assert d["method"] == "pca-mahalanobis" and d["pooling"] == "mean" and len(d["components"]["sha256"]) == 64
    summary = m.summary()
    assert "base64" not in summary["scope"]["components"] and summary["scope"]["threshold"] == m.scope.threshold


def test_manifest_without_scope_is_unchanged():
    m = make_manifest(np.ones((2, 3), np.float32), np.zeros(2, np.float32), model_sha256="a" * 64)
    assert "scope" not in json.loads(m.to_json())
    assert Manifest.from_json(m.to_json()).scope is None
    gate = ScopeGate.from_manifest(m)
    assert not gate.has_features and gate.threshold is None


def _orthonormality_broken(d):
    d["components"] = encode_array(np.ones((4, 16), np.float32))


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(method="knn"), "scope.method"),
    (lambda d: d.update(transform="log"), "scope.transform"),
    (lambda d: d.update(pooling="max"), "scope.pooling"),
    (lambda d: d.pop("threshold"), "scope.threshold"),
    (lambda d: d.update(threshold=-1.0), "scope.threshold"),
    (lambda d: d.update(residual_scale=0.0), "residual_scale"),
    (lambda d: d.update(variances=encode_array(-np.ones(4, np.float32))), "variances"),
    (lambda d: d.update(variances=encode_array(np.ones(3, np.float32))), "one value per component"),
    (lambda d: d.update(mean=encode_array(np.ones(15, np.float32))), "components must be"),
    (_orthonormality_broken, "orthonormal"),
    (lambda d: d["components"].update(sha256="0" * 64), "checksum"),
    (lambda d: d.update(features_output=""), "features_output"),
    (lambda d: d.update(statistics=[1, 2]), "statistics"),
])
def test_malformed_scope_blocks_are_refused(mutate, match):
    d = json.loads(_manifest_with_scope().to_json())
    mutate(d["scope"])
    with pytest.raises(ManifestError, match=match):
        Manifest.from_json(json.dumps(d))


def test_scope_channels_must_match_the_features():
    m = _manifest_with_scope(c=16)
    other = make_manifest(np.ones((3, 8), np.float32), np.zeros(3, np.float32), model_sha256="a" * 64)
    with pytest.raises(ManifestError, match="channels"):
        replace(other, scope=m.scope).validate()


# --------------------------------------------------------------------------- runtime API

def test_assess_combines_pixel_rules_and_the_feature_score(chest):
    m = _manifest_with_scope()
    gate = ScopeGate.from_manifest(m)
    inside = _gaussian(1, seed=11)[0][0]
    ok = gate.assess(chest, inside)
    assert isinstance(ok, ScopeResult) and ok.in_scope and ok.reasons == [] and ok.score < ok.threshold
    far = gate.assess(chest, inside + 50.0)
    assert not far.in_scope and "feature score" in far.reasons[0] and far.score > far.threshold
    both = gate.assess(1.0 - chest, inside + 50.0)
    assert len(both.reasons) == 2
    nan = gate.assess(None, np.full(16, np.nan, np.float32))
    assert not nan.in_scope and "not finite" in nan.reasons[0] and nan.score is None
    d = far.to_dict()
    assert set(d) == {"in_scope", "score", "threshold", "reasons"} and d["in_scope"] is False
    json.dumps(d)


def test_gate_without_scope_block_judges_pixels_only(chest):
    gate = ScopeGate(None)
    res = gate.assess(chest, np.ones(16, np.float32))
    assert res.in_scope and res.score is None and res.threshold is None
    assert not gate.assess(np.zeros((200, 200), np.float32)).in_scope
    with pytest.raises(InvalidArgumentError, match="no scope block"):
        gate.score(np.ones(16, np.float32))


def test_score_refuses_wrong_shapes():
    gate = ScopeGate.from_manifest(_manifest_with_scope())
    with pytest.raises(InvalidArgumentError):
        gate.score(np.ones(15, np.float32))
    with pytest.raises(InvalidArgumentError):
        gate.score(np.ones((2, 16), np.float32))


def test_scope_block_survives_a_bundle_and_scores_its_features(tmp_path, chest):
    from cxr_edge.bundle import load_bundle, write_bundle
    from cxr_edge.preprocess import preprocess

    model_bytes, w, b = build_tiny_onnx(channels=8)
    manifest = make_manifest(w, b)
    bundle0 = tmp_path / "plain.onnx"
    write_bundle(model_bytes, manifest, bundle0)
    session = load_bundle(bundle0, threads=1).session
    rng = np.random.default_rng(0)
    imgs = [np.clip(chest[::2, ::2] + rng.normal(0, 0.02, chest[::2, ::2].shape), 0, 1).astype(np.float32)
            for _ in range(40)]
    (feats,) = session.run(["features"], {"image": preprocess(imgs, manifest.preprocessing)})
    pooled = feats.mean(axis=(2, 3))
    spec = fit_scope(pooled[:30], pooled[30:], k=3)
    path = tmp_path / "scoped.onnx"
    write_bundle(model_bytes, replace(manifest, scope=spec), path)
    loaded = load_bundle(path, threads=1)
    gate = ScopeGate.from_manifest(loaded.manifest)
    assert gate.has_features and gate.threshold == pytest.approx(spec.threshold)
    (f1,) = loaded.session.run(["features"], {"image": preprocess([chest], manifest.preprocessing)})
    res = gate.assess(chest, f1[0])
    assert res.score is not None and np.isfinite(res.score)


# --------------------------------------------------------------------------- export integration

def test_export_fits_the_scope_gate_on_the_training_images(tmp_path):
    """A toy torch model and synthetic images through export_bundle (fp32): the manifest gets a scope block."""
    import cv2

    pytest.importorskip("torch")
    from cxr_edge.bundle import load_bundle
    from cxr_edge.manifest import PreprocessSpec
    from cxr_edge.preprocess import preprocess
    from export.build_bundle import export_bundle
    from export.source import ExportSource, ImageSet
    from export.toy import make_toy_model, synthetic_radiographs

    spec = PreprocessSpec(input_size=(64, 64), mean=(0.5,), std=(0.25,), min_side=32)
    imgs = synthetic_radiographs(60, 96, seed=2)
    paths = []
    for i, img in enumerate(imgs):
        p = tmp_path / f"img{i:02d}.png"
        cv2.imwrite(str(p), (img * 255).astype(np.uint8))
        paths.append(p)
    model = make_toy_model(num_classes=3, bn_batch=preprocess(imgs[:16], spec), seed=0)
    targets = (np.random.default_rng(0).random((10, 3)) < 0.5).astype(np.float32)
    src = ExportSource(model=model, spec=spec, labels=("a", "b", "c"), model_id="toy", architecture="toy",
                       calibration_pool=ImageSet("train", paths[:40]),
                       verification=ImageSet("eval", paths[50:], targets),
                       threshold_set=ImageSet("calibration split", paths[40:50], targets),
                       provenance={"architecture": "toy"})
    out = tmp_path / "toy.onnx"
    auto = export_bundle(src, tmp_path / "auto.onnx", precision="fp32", measure_latency=False)
    assert "skipped" in auto["scope"]  # 40 training images: under the default's minimum of 100
    report = export_bundle(src, out, precision="fp32", report_path=None, measure_latency=False, scope=True)
    m = load_bundle(out, threads=1).manifest
    assert m.scope is not None and report["scope"]["threshold"] == pytest.approx(m.scope.threshold)
    assert m.scope.statistics["fit_images"] == 40 and m.scope.statistics["threshold_images"] == 10
    assert m.scope.statistics["threshold_set"] == "calibration split"
    off = export_bundle(src, tmp_path / "off.onnx", precision="fp32", measure_latency=False, scope=False)
    assert off["scope"] is None and load_bundle(tmp_path / "off.onnx").manifest.scope is None
    oof = export_bundle(replace(src, threshold_set=None), tmp_path / "oof.onnx", precision="fp32",
                        measure_latency=False, scope=True)
    assert "out-of-fold" in oof["scope"]["statistics"]["threshold_set"]  # never the evaluation images
    few = replace(src, calibration_pool=ImageSet("train", paths[:5]))
    with pytest.raises(InvalidArgumentError, match="at least"):
        export_bundle(few, tmp_path / "few2.onnx", precision="fp32", measure_latency=False, scope=True)
