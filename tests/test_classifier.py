import sys

import cv2
import numpy as np
import pytest

from conftest import DATA, need_shared
from cxr_edge import Classifier
from cxr_edge.errors import (CxrEdgeError, InferenceError, InvalidArgumentError, NoDefaultModelError,
                             UnsupportedFormatError)
from cxr_edge.preprocess import preprocess


def _image(h=200, w=180, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 5)
    return (img - img.min()) / (img.max() - img.min())


def test_import_never_pulls_torch():
    import subprocess

    code = "import cxr_edge, cxr_edge.cli, cxr_edge.classifier, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_predict_matches_a_manual_onnxruntime_run(tiny_bundle):
    clf = Classifier(tiny_bundle, threads=1)
    img = _image()
    res = clf.predict(img)
    x = preprocess(img, clf.manifest.preprocessing)
    logits = clf.bundle.session.run(["logits"], {"image": x})[0][0]
    expected = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose([res.probabilities[n] for n in clf.labels], expected, rtol=1e-5)
    assert res.decisions == {n: res.probabilities[n] >= 0.5 for n in clf.labels}
    assert res.model_id == "tiny-test" and res.image_shape == img.shape
    assert set(res.timings_ms) >= {"decode", "preprocess", "inference", "total"}


def test_thresholds_come_from_the_manifest(tiny_bundle_factory):
    low = Classifier(tiny_bundle_factory(thresholds=(0.01, 0.01, 0.01)), threads=1).predict(_image())
    high = Classifier(tiny_bundle_factory(thresholds=(0.99, 0.99, 0.99)), threads=1).predict(_image())
    assert all(low.decisions.values()) and not any(high.decisions.values())


def test_batch_equals_single_predictions(tiny_bundle):
    clf = Classifier(tiny_bundle, threads=1)
    imgs = [_image(seed=s) for s in range(5)]
    batch = clf.predict_batch(imgs, batch_size=2)
    for img, res in zip(imgs, batch):
        single = clf.predict(img)
        for n in clf.labels:
            assert res.probabilities[n] == pytest.approx(single.probabilities[n], abs=1e-5)


def test_batch_collects_errors_and_goes_on(tiny_bundle):
    clf = Classifier(tiny_bundle, threads=1)
    out = clf.predict_batch([_image(), b"garbage bytes", _image(seed=3)], errors="collect")
    assert isinstance(out[1], UnsupportedFormatError)
    assert out[0].probabilities and out[2].probabilities
    with pytest.raises(UnsupportedFormatError):
        clf.predict_batch([_image(), b"garbage bytes"])


def test_deterministic_for_fixed_threads(tiny_bundle):
    img = _image(seed=7)
    a = Classifier(tiny_bundle, threads=2).predict(img)
    b = Classifier(tiny_bundle, threads=2).predict(img)
    assert a.probabilities == b.probabilities


def test_cam_on_input_grid_and_is_exact_weighted_sum(tiny_bundle):
    """Prediction.cam(c) == ReLU(W_c . f) upsampled bilinearly to the image grid and divided by its maximum,
    recomputed here from the graph's own feature output and the manifest's classifier weights."""
    clf = Classifier(tiny_bundle, threads=1)
    img = _image(300, 240)
    res = clf.predict(img)
    x = preprocess(img, clf.manifest.preprocessing)
    logits, feats = clf.bundle.session.run(["logits", "features"], {"image": x})
    feats = feats[0].astype(np.float64)
    w, b = clf.manifest.cam.weights.astype(np.float64), clf.manifest.cam.bias.astype(np.float64)
    # the weights belong to these features: GAP(f) @ W.T + b is the graph's logit vector
    np.testing.assert_allclose(feats.mean(axis=(1, 2)) @ w.T + b, logits[0], atol=1e-4)
    for c, label in enumerate(clf.labels):
        raw = np.maximum(np.tensordot(w[c], feats, axes=1), 0.0)
        heat = res.cam(label)
        assert heat.shape == (300, 240) and heat.dtype == np.float32
        np.testing.assert_allclose(res.cam_raw(label), raw, rtol=1e-5, atol=1e-6)
        if label == "label_1":
            assert raw.max() > 0.1  # fixed bundle and image: this label's map is not empty (the exact case)
        if raw.max() > 0:
            up = cv2.resize(raw.astype(np.float32), (240, 300), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(heat, up / up.max(), atol=1e-5)
        else:  # no positive evidence: an all-zero map, not rescaled noise
            assert not heat.any()
    np.testing.assert_allclose(clf.explain(img, 1), res.cam("label_1"), atol=1e-6)


def test_unknown_label_is_an_argument_error(tiny_bundle):
    clf = Classifier(tiny_bundle, threads=1)
    with pytest.raises(InvalidArgumentError, match="label_0"):
        clf.explain(_image(), "Pneumothorax")


def test_overlay_png_written(tiny_bundle, tmp_path):
    res = Classifier(tiny_bundle, threads=1).predict(_image())
    out = tmp_path / "overlay.png"
    res.write_overlay(out, "label_0")
    rgb = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    # the 200 x 180 image keeps its own grid at the top left; the legend panel (canvas >= 640 wide) below
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] > 200 and rgb.shape[1] == 640


def test_nan_logits_are_refused(tiny_bundle, monkeypatch):
    clf = Classifier(tiny_bundle, threads=1)
    real_run = clf.bundle.session.run

    class Fake:
        def run(self, names, feeds):
            outs = real_run(names, feeds)
            outs[0][:] = np.nan
            return outs

    monkeypatch.setattr(clf.bundle, "session", Fake())
    with pytest.raises(InferenceError):
        clf.predict(_image())


def test_bad_inputs_are_typed_errors(tiny_bundle):
    clf = Classifier(tiny_bundle, threads=1)
    for bad in (b"", b"\x00" * 100, np.full((200, 200), np.nan, np.float32), np.zeros((1, 1), np.uint8)):
        with pytest.raises(CxrEdgeError):
            clf.predict(bad)


def test_default_model_or_clear_error():
    try:
        clf = Classifier()
    except NoDefaultModelError as exc:
        assert "no default model" in str(exc)
    else:
        assert len(clf.labels) == 14


def test_png_and_dicom_of_same_pixels_give_same_probabilities(tiny_bundle, tmp_path):
    path = need_shared("data", "dicom", "test1.dcm")
    import pydicom

    ds = pydicom.dcmread(path)
    png = tmp_path / "same.png"
    cv2.imwrite(str(png), ds.pixel_array.astype(np.uint8))
    clf = Classifier(tiny_bundle, threads=1)
    a, b = clf.predict(path), clf.predict(png)
    for n in clf.labels:
        assert a.probabilities[n] == pytest.approx(b.probabilities[n], abs=1e-6)


def test_real_png_round_trip(tiny_bundle):
    path = need_shared("data", "nih-cxr14-sample", "fullres")
    files = sorted(path.glob("*.png"))[:2]
    clf = Classifier(tiny_bundle, threads=1)
    for f in files:
        res = clf.predict(f)
        assert res.image_shape == (1024, 1024) and res.cam(0).shape == (1024, 1024)


def test_embedded_default_model_on_the_sample():
    from importlib import resources

    sample = resources.files("cxr_edge") / "data" / "sample_chest_pa.png"
    try:
        clf = Classifier(threads=1)
    except NoDefaultModelError:
        pytest.skip("this checkout ships no default model")
    res = clf.predict(str(sample))
    assert len(res.probabilities) == 14 and all(0.0 < p < 1.0 for p in res.probabilities.values())
    assert "not a medical device" in clf.manifest.notice
    assert res.cam(res.positive_labels[0] if res.positive_labels else 0).shape == res.image_shape


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    import cxr_edge.bundle as bundle_mod

    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE", "does-not-exist.onnx")
    with pytest.raises(NoDefaultModelError, match="no default model"):
        Classifier()


def test_undetermined_labels_get_no_decision(tiny_bundle_factory):
    import json

    from cxr_edge.bundle import load_bundle

    path = tiny_bundle_factory(thresholds=(0.5, None, 1e-3))
    m = load_bundle(path).manifest
    assert m.thresholds == (0.5, None, 1e-3) and m.decided_labels == ("label_0", "label_2")
    assert json.loads(m.to_json())["thresholds"][1] is None
    res = Classifier(path, threads=1).predict(_image())
    assert res.decisions["label_1"] is None and res.undetermined_labels == ["label_1"]
    assert res.decisions["label_2"] is True  # p >= 1e-3 for any input
    assert "label_1" not in res.positive_labels
    d = res.to_dict()
    assert d["decisions"]["label_1"] == "undetermined" and d["thresholds"]["label_1"] is None
    assert d["undetermined"] == ["label_1"]
    probs = [res.probabilities[n] for n in res.positive_labels]
    assert probs == sorted(probs, reverse=True)  # positives sorted by probability


def test_a_threshold_outside_the_open_interval_is_still_refused(tiny_bundle_factory):
    from cxr_edge.errors import ManifestError

    with pytest.raises(ManifestError):
        tiny_bundle_factory(thresholds=(0.5, 1.0, 0.5))


# --------------------------------------------------------------------------- labels, TIFF, schema 1 fields

def test_label_names_ignore_case_spaces_hyphens_underscores():
    from cxr_edge.classifier import label_index

    labels = ("Atelectasis", "Pleural_Thickening", "Effusion")
    for spelling in ("Pleural_Thickening", "pleural thickening", "PLEURAL-THICKENING", " pleural  thickening "):
        assert label_index(labels, spelling) == 1
    with pytest.raises(InvalidArgumentError, match="did you mean 'Effusion'"):
        label_index(labels, "efusion")
    with pytest.raises(InvalidArgumentError, match="this model's labels are"):
        label_index(labels, "Zzzz")


def _tiff_bytes(arr, **kw):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF", **kw)
    return buf.getvalue()


def make_tiff(arr, photometric=1, big_endian=False, declared_hw=None):
    """A minimal uncompressed single-strip grayscale TIFF written by hand (any byte order / photometric)."""
    import struct

    e = ">" if big_endian else "<"
    h, w = declared_hw or arr.shape
    bits = arr.dtype.itemsize * 8
    data = arr.astype(e + ("u1" if bits == 8 else "u2")).tobytes()
    tags = sorted([(256, 4, w), (257, 4, h), (258, 3, bits), (259, 3, 1), (262, 3, photometric), (273, 4, 0),
                   (277, 3, 1), (278, 4, h), (279, 4, len(data))])
    offset = 8 + 2 + 12 * len(tags) + 4
    out = bytearray((b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(tags)))
    for tag, typ, value in tags:
        value = offset if tag == 273 else value
        out += struct.pack(e + ("HHIH2x" if typ == 3 else "HHII"), tag, typ, 1, value)
    return bytes(out + struct.pack(e + "I", 0) + data)


def test_tiff_8_and_16_bit_equal_png_of_the_same_pixels(tiny_bundle, tmp_path):
    rng = np.random.default_rng(3)
    a8 = cv2.GaussianBlur((rng.random((220, 200)) * 255).astype(np.uint8), (0, 0), 3)
    a16 = (a8.astype(np.uint16) * 257 + rng.integers(0, 200, a8.shape).astype(np.uint16))
    clf = Classifier(tiny_bundle, threads=1)
    for arr in (a8, a16):
        png = clf.predict(cv2.imencode(".png", arr)[1].tobytes())
        for data in (_tiff_bytes(arr), _tiff_bytes(arr, compression="tiff_lzw"), make_tiff(arr),
                     make_tiff(arr, big_endian=True)):
            path = tmp_path / "x.tif"
            path.write_bytes(data)
            for source in (path, data):
                res = clf.predict(source)
                assert res.image_info["format"] == "tiff" and res.bit_depth == arr.dtype.itemsize * 8
                assert res.bit_depth_source == "container"
                assert res.probabilities == png.probabilities
    # MinIsWhite is inverted to 0 = black (Pillow inverts 8-bit itself, 16-bit is inverted here)
    for arr, maxval in ((a8, 255), (a16, 65535)):
        white = clf.read(make_tiff(arr, photometric=0))
        np.testing.assert_allclose(white.pixels, 1.0 - arr / maxval, atol=1e-6)
        assert white.info["photometric"] == "MINISWHITE"


def test_bad_tiffs_are_typed_refusals(tiny_bundle):
    from cxr_edge.errors import CorruptImageError, InvalidImageError

    clf = Classifier(tiny_bundle, threads=1)
    a8 = (np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8)
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(a8).save(buf, format="TIFF", save_all=True, append_images=[Image.fromarray(a8)])
    with pytest.raises(InvalidImageError, match="pages"):
        clf.predict(buf.getvalue())
    with pytest.raises(UnsupportedFormatError, match="grayscale"):
        clf.predict(_tiff_bytes(np.stack([a8] * 3, axis=-1)))
    data = make_tiff(a8)
    with pytest.raises(CorruptImageError):
        clf.predict(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="max_pixels"):  # a header-only bomb: refused before decoding
        clf.predict(make_tiff(a8, declared_hw=(100_000, 100_000)))
    with pytest.raises(InvalidImageError, match="too small"):
        clf.predict(make_tiff(a8[:20, :20]))
    with pytest.raises(CxrEdgeError):
        clf.predict(b"II*\x00" + b"\x00" * 20)


def test_tiff_tags_never_reach_the_output(tiny_bundle):
    a8 = (np.random.default_rng(1).random((200, 200)) * 255).astype(np.uint8)
    data = _tiff_bytes(a8, tiffinfo={270: "PATIENT Doe^Sentinel", 315: "Dr Sentinel"})
    d = Classifier(tiny_bundle, threads=1).predict(data).to_dict()
    assert "Sentinel" not in str(d)


def test_to_dict_schema_1_fields(tiny_bundle_factory):
    res = Classifier(tiny_bundle_factory(thresholds=(0.5, None, 0.2)), threads=1).predict(_image())
    d = res.to_dict()
    assert d["schema_version"] == 2 and d["margins"]["label_1"] is None
    assert d["margins"]["label_0"] == pytest.approx(res.probabilities["label_0"] - 0.5, abs=1e-6)
    assert d["image"]["bit_depth"] == 32 and d["image"]["bit_depth_source"] == "container"  # a float32 array
    assert d["override_used"] is False and d["out_of_scope"] is False
    assert d["in_scope"] is None and d["scope"] is None and res.in_scope is None  # no scope block: no gate


def test_overlay_uses_one_scale_per_image_and_flags_empty_maps(tiny_bundle, tmp_path):
    res = Classifier(tiny_bundle, threads=1).predict(_image(256, 256))
    scale = res.cam_scale()
    assert scale == pytest.approx(max(float(res.cam_raw(n).max()) for n in res.labels))
    for n in res.labels:
        empty = res.write_overlay(tmp_path / f"{n}.png", n)
        assert empty == (float(res.cam_raw(n).max()) <= 0) == res.cam_is_empty(n)


# --------------------------------------------------------------------------- input scope gate

def _constant(h=200, w=180):
    return np.full((h, w), 0.5, np.float32)


def test_in_scope_image_gets_decisions_and_a_scope_verdict(scoped_bundle):
    from conftest import sample_chest

    clf = Classifier(scoped_bundle, threads=1)
    assert clf.scope_gate is not None and clf.scope_gate.has_features
    res = clf.predict(sample_chest())
    assert res.in_scope is True and res.scope["reasons"] == [] and res.scope["in_scope"] is True
    assert res.scope["score"] is not None and res.scope["score"] <= res.scope["threshold"]
    assert all(v is not None for v in res.decisions.values())
    assert res.timings_ms["scope"] >= 0 and "scope" in res.timings_ms
    d = res.to_dict()
    assert d["in_scope"] is True and d["scope"]["reasons"] == []


@pytest.mark.parametrize("kind", ["constant", "noise"])
def test_out_of_scope_image_is_flagged_with_no_decisions(scoped_bundle, kind):
    img = _constant() if kind == "constant" else np.random.default_rng(0).random((200, 180)).astype(np.float32)
    res = Classifier(scoped_bundle, threads=1).predict(img)
    assert res.in_scope is False
    assert all(v is None for v in res.decisions.values())
    assert res.positive_labels == [] and res.undetermined_labels == list(res.labels)
    assert all(0.0 <= p <= 1.0 for p in res.probabilities.values())  # still reported
    assert all(t == 0.5 for t in res.thresholds.values())  # thresholds unchanged
    word = "near-constant" if kind == "constant" else "no frontal chest layout"
    assert any(word in r for r in res.scope["reasons"])
    assert res.out_of_scope is False  # the DICOM-override field keeps its meaning
    d = res.to_dict()
    assert d["in_scope"] is False and set(d["decisions"].values()) == {"undetermined"} and d["positive"] == []
    legend = res.overlay_legend("label_0")
    assert legend.out_of_scope and word in legend.scope_reason


def test_feature_score_alone_can_flag(tmp_path):
    from conftest import build_scoped_bundle, sample_chest

    bundle = build_scoped_bundle(tmp_path / "strict.onnx", threshold=1e-9)
    res = Classifier(bundle, threads=1).predict(sample_chest())
    assert res.in_scope is False and len(res.scope["reasons"]) == 1
    assert res.scope["reasons"][0].startswith("unlike the training radiographs: feature score")
    assert res.scope["score"] > res.scope["threshold"]


def test_refuse_mode_raises_and_collects_out_of_scope_errors(scoped_bundle):
    from conftest import sample_chest
    from cxr_edge.errors import ImageError, OutOfScopeError

    clf = Classifier(scoped_bundle, threads=1, scope="refuse")
    with pytest.raises(OutOfScopeError) as info:
        clf.predict(_constant())
    assert isinstance(info.value, ImageError) and info.value.code == "out_of_scope"
    assert "near-constant" in str(info.value) and info.value.scope.in_scope is False
    out = clf.predict_batch([sample_chest(), _constant(), np.random.default_rng(1).random((200, 200))],
                            batch_size=3, errors="collect")
    assert out[0].in_scope is True and all(v is not None for v in out[0].decisions.values())
    assert isinstance(out[1], OutOfScopeError) and isinstance(out[2], OutOfScopeError)
    with pytest.raises(OutOfScopeError):
        clf.predict_batch([sample_chest(), _constant()], batch_size=2, errors="raise")


def test_scope_off_gives_decisions_and_null_scope(scoped_bundle):
    res = Classifier(scoped_bundle, threads=1, scope="off").predict(_constant())
    assert res.in_scope is None and res.scope is None and "scope" not in res.timings_ms
    assert all(v is not None for v in res.decisions.values())
    with pytest.raises(InvalidArgumentError):
        Classifier(scoped_bundle, threads=1, scope="maybe")


def test_bundle_without_scope_block_reports_in_scope_null(tiny_bundle):
    clf = Classifier(tiny_bundle, threads=1)
    assert clf.scope_gate is None
    res = clf.predict(_constant())
    assert res.in_scope is None and res.scope is None and res.to_dict()["in_scope"] is None
    assert all(v is not None for v in res.decisions.values())


def test_scope_gate_without_cam_still_reads_the_features(tmp_path):
    from conftest import build_scoped_bundle, sample_chest

    clf = Classifier(build_scoped_bundle(tmp_path / "nocam.onnx", cam=False), threads=1)
    res = clf.predict(sample_chest())
    assert res.in_scope is True and res.scope["score"] is not None and res._features is None


def test_colour_photo_is_flagged_by_the_colour_rule(scoped_bundle, tmp_path):
    from conftest import sample_chest

    gray = (sample_chest() * 255).astype(np.uint8)
    bgr = np.dstack([gray, gray, np.clip(gray.astype(np.int16) + 60, 0, 255).astype(np.uint8)])  # reddish tint
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    res = Classifier(scoped_bundle, threads=1).predict(tmp_path / "c.png")
    assert res.image_info["colour_fraction"] > 0.5
    assert res.in_scope is False and any(r.startswith("colour image") for r in res.scope["reasons"])
    cv2.imwrite(str(tmp_path / "g.png"), np.dstack([gray] * 3))  # gray stored as RGB: no colour fraction
    res = Classifier(scoped_bundle, threads=1).predict(tmp_path / "g.png")
    assert "colour_fraction" not in res.image_info and res.in_scope is True


def test_overlay_of_a_flagged_image_says_out_of_scope(scoped_bundle, tmp_path):
    from cxr_edge.cam import _decision_text

    res = Classifier(scoped_bundle, threads=1).predict(_constant())
    title, detail, _ = _decision_text(res.overlay_legend("label_0"))
    assert "OUT OF SCOPE" in title and "near-constant" in detail
    res.write_overlay(tmp_path / "o.png", "label_0")
    assert cv2.imread(str(tmp_path / "o.png")) is not None
