"""Bytes-in variant: decode + preprocessing inside the graph, and the input guard in front of it.

Never feed the in-graph decoder anything unchecked in this process: onnxruntime-extensions' JPEG
decoder calls exit() on non-JPEG bytes and hangs on truncated JPEGs, which would kill pytest.
"""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from conftest import need_shared

from cxr_edge.bundle import read_manifest, write_bundle
from cxr_edge.errors import CorruptImageError, InvalidArgumentError, UnsupportedFormatError
from cxr_edge.imaging import read_image
from cxr_edge.manifest import PreprocessSpec
from cxr_edge.preprocess import preprocess
from export.ingraph import (BYTES_INPUT, PROB_TOLERANCE, build_ingraph_model, build_preprocess_graph,
                            ingraph_session, run_ingraph)
from export.manifest_build import build_manifest
from export.onnx_export import classifier_weights, export_onnx, run_onnx
from export.toy import make_toy_model, synthetic_radiographs
from export.verify import sigmoid

SPEC = PreprocessSpec(input_size=(112, 112), mean=(0.49465,), std=(0.25223,), min_side=32)


def _png(pixels: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", pixels)
    assert ok
    return enc.tobytes()


def _prep_session(spec: PreprocessSpec):
    return ingraph_session(build_preprocess_graph(spec, 18, 9).SerializeToString())


@pytest.fixture(scope="module")
def toy():
    batch = preprocess(synthetic_radiographs(8, 160, seed=4), SPEC)
    model = make_toy_model(bn_batch=batch, seed=1)
    fp32 = export_onnx(model, SPEC)
    return model, fp32, ingraph_session(build_ingraph_model(fp32, SPEC))


@pytest.fixture(scope="module")
def gray_u8() -> np.ndarray:
    return (np.clip(synthetic_radiographs(1, 200, seed=5)[0], 0, 1) * 255).round().astype(np.uint8)


def test_gray_and_colour_conversion_is_exact_without_resize(gray_u8):
    """With input size == image size the resize is the identity: decode, gray, /255, normalise must be exact."""
    spec = PreprocessSpec(input_size=(200, 200), mean=(0.49465,), std=(0.25223,), min_side=32)
    sess = _prep_session(spec)
    rng = np.random.default_rng(0)
    colour = np.clip(gray_u8[..., None].astype(int) + rng.integers(-40, 40, (200, 200, 3)), 0, 255).astype(np.uint8)
    for pixels in (gray_u8, colour):
        data = _png(pixels)
        got = sess.run(None, {BYTES_INPUT: np.frombuffer(data, np.uint8)})[0]
        ref = preprocess(read_image(data, min_side=32).pixels, spec)
        assert got.shape == ref.shape == (1, 1, 200, 200)
        assert np.abs(got - ref).max() < 1e-5


def test_three_channel_models_get_the_gray_image_repeated(gray_u8):
    spec = PreprocessSpec(input_size=(96, 96), channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), min_side=32)
    got = _prep_session(spec).run(None, {BYTES_INPUT: np.frombuffer(_png(gray_u8), np.uint8)})[0]
    ref = preprocess(read_image(_png(gray_u8), min_side=32).pixels, spec)
    assert got.shape == (1, 3, 96, 96)
    assert np.abs(got - ref).max() < 1e-5  # area resize is exact (pixel-area matrices), not approximated


def test_enlarging_falls_back_to_linear_like_python(gray_u8):
    spec = PreprocessSpec(input_size=(256, 256), mean=(0.5,), std=(0.25,), min_side=32)
    data = _png(gray_u8)  # 200 px -> 256 px: preprocess uses INTER_LINEAR, so must the graph
    got = _prep_session(spec).run(None, {BYTES_INPUT: np.frombuffer(data, np.uint8)})[0]
    ref = preprocess(read_image(data, min_side=32).pixels, spec)
    assert np.abs(got - ref).max() < 1e-4


def test_sixteen_bit_png_is_decoded_to_eight_bits(gray_u8):
    """Documented limit: DecodeImage keeps the high byte; Python keeps 16 bits (error <= 1/255)."""
    spec = PreprocessSpec(input_size=(200, 200), mean=(0.0,), std=(1.0,), min_side=32)
    sixteen = gray_u8.astype(np.uint16) * 257 + 128
    got = _prep_session(spec).run(None, {BYTES_INPUT: np.frombuffer(_png(sixteen), np.uint8)})[0]
    ref = preprocess(read_image(_png(sixteen), min_side=32).pixels, spec)
    assert 0 < np.abs(got - ref).max() <= 1.0 / 255 + 1e-6


def test_ingraph_model_agrees_with_python_path_on_real_pngs(toy):
    model, fp32, sess = toy
    images = need_shared("data", "nih-cxr14-sample", "images")
    paths = sorted(images.iterdir())[300:308]
    w, _ = classifier_weights(model)
    for p in paths:
        data = p.read_bytes()
        logits, feats = run_ingraph(sess, data, min_side=32)
        ref_l, ref_f = run_onnx(fp32, preprocess(read_image(data).pixels, SPEC), ["logits", "features"], "image")
        assert logits.shape == ref_l.shape == (1, 14) and feats.shape == ref_f.shape
        assert np.abs(sigmoid(logits) - sigmoid(ref_l)).max() < PROB_TOLERANCE
        assert np.abs(logits - ref_l).max() < 1e-3
        np.testing.assert_allclose(feats, ref_f, atol=1e-3)


@pytest.mark.parametrize("data, error", [
    (b"", UnsupportedFormatError),
    (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), UnsupportedFormatError),
    (b"GIF89a" + bytes(200), UnsupportedFormatError),
    (b"\xff\xd8\xff" + bytes(300), CorruptImageError),  # JPEG magic, garbage body: decoder would exit()
    (b"\x89PNG\r\n\x1a\n" + bytes(100), CorruptImageError),
])
def test_run_ingraph_refuses_bad_bytes_without_crashing(toy, data, error):
    _, _, sess = toy
    with pytest.raises(error):
        run_ingraph(sess, data, min_side=32)


def test_run_ingraph_refuses_truncated_and_grayscale_jpeg_and_dicom(toy, gray_u8):
    _, _, sess = toy
    png = _png(gray_u8)
    with pytest.raises(CorruptImageError):
        run_ingraph(sess, png[: len(png) // 2], min_side=32)
    jpeg = cv2.imencode(".jpg", gray_u8)[1].tobytes()
    with pytest.raises(CorruptImageError):  # a cut JPEG would hang the decoder
        run_ingraph(sess, jpeg[: len(jpeg) // 2], min_side=32)
    with pytest.raises(UnsupportedFormatError, match="grayscale JPEG"):
        run_ingraph(sess, jpeg, min_side=32)
    dicom = bytes(128) + b"DICM" + bytes(200)
    with pytest.raises(UnsupportedFormatError):
        run_ingraph(sess, dicom, min_side=32)
    with pytest.raises(InvalidArgumentError):
        run_ingraph(sess, "not bytes", min_side=32)  # type: ignore[arg-type]
    logits, _ = run_ingraph(sess, png, min_side=32)  # the session still works after all refusals
    assert np.isfinite(logits).all()


def test_ingraph_bundle_carries_a_manifest_and_refuses_lanczos(tmp_path, toy):
    model, fp32, _ = toy
    w, b = classifier_weights(model)
    data = build_ingraph_model(fp32, SPEC)
    manifest = build_manifest(model_id="toy-ingraph", labels=tuple(f"l{i}" for i in range(14)),
                              thresholds=[0.5] * 14, spec=replace(SPEC, input_name=BYTES_INPUT),
                              weights=w, bias=b, precision="fp32", provenance={"ingraph": {"resize": "cubic-aa"}})
    write_bundle(data, manifest, tmp_path / "ig.onnx")
    loaded = read_manifest((tmp_path / "ig.onnx").read_bytes())
    assert loaded.preprocessing.input_name == BYTES_INPUT and loaded.provenance["ingraph"]
    sess = ingraph_session((tmp_path / "ig.onnx").read_bytes())
    assert [i.name for i in sess.get_inputs()] == [BYTES_INPUT]
    from cxr_edge.bundle import load_bundle
    from cxr_edge.errors import BundleError

    with pytest.raises(BundleError, match="in-graph preprocessing bundle"):  # not onnxruntime's raw op error
        load_bundle(tmp_path / "ig.onnx", threads=1)
    with pytest.raises(InvalidArgumentError):
        build_ingraph_model(fp32, PreprocessSpec(input_size=(112, 112), resize="lanczos", mean=(0.5,), std=(0.25,)))


def test_ingraph_converts_an_opset17_model(toy):
    model, _, _ = toy
    fp32_17 = export_onnx(model, SPEC, opset=17)
    sess = ingraph_session(build_ingraph_model(fp32_17, SPEC))
    data = _png((synthetic_radiographs(1, 150, seed=9)[0] * 255).astype(np.uint8))
    logits, _ = run_ingraph(sess, data, min_side=32)
    ref = run_onnx(fp32_17, preprocess(read_image(data, min_side=32).pixels, SPEC), ["logits"], "image")[0]
    assert np.abs(sigmoid(logits) - sigmoid(ref)).max() < PROB_TOLERANCE


# --------------------------------------------------------------------------- every PreprocessSpec field
# The rule (docs/refactor.md, "Changing preprocessing"): a PreprocessSpec field is either implemented by the
# in-graph path exactly as cxr_edge.preprocess does it (SPEC_HANDLED), or the in-graph export refuses the values
# it cannot express (SPEC_RESTRICTED). Adding a field without touching export/ingraph.py fails here.

from dataclasses import dataclass, fields  # noqa: E402

from cxr_edge.errors import InvalidImageError  # noqa: E402
from cxr_edge.manifest import RESIZE_METHODS  # noqa: E402
from export.errors import ExportError  # noqa: E402
from export.ingraph import SPEC_HANDLED, SPEC_RESTRICTED, check_ingraph_input  # noqa: E402

#: one changed value per handled pixel field: the graph must follow it exactly like the Python path
PIXEL_VARIANTS = {
    "input_size": {"input_size": (96, 80)},
    "channels": {"channels": 3, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3)},
    "mean": {"mean": (0.3,)},
    "std": {"std": (0.1,)},
}
#: handled fields that do not change pixels, and the check that proves the in-graph path uses them
WIRING_FIELDS = ("input_name", "min_side", "max_pixels")


def _graph_and_python(spec: PreprocessSpec, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    got = _prep_session(spec).run(None, {BYTES_INPUT: np.frombuffer(data, np.uint8)})[0]
    return got, preprocess(read_image(data, min_side=spec.min_side, max_pixels=spec.max_pixels).pixels, spec)


def test_every_spec_field_is_handled_or_refused_by_the_ingraph_path():
    names = [f.name for f in fields(PreprocessSpec)]
    assert not set(SPEC_HANDLED) & set(SPEC_RESTRICTED)
    missing = set(names) - set(SPEC_HANDLED) - set(SPEC_RESTRICTED)
    assert not missing, f"PreprocessSpec field(s) {missing}: implement them in export/ingraph.py or refuse them"
    assert set(SPEC_HANDLED) | set(SPEC_RESTRICTED) == set(names)  # no stale declarations either
    assert set(PIXEL_VARIANTS) | set(WIRING_FIELDS) == set(SPEC_HANDLED), "each handled field needs a check below"

    @dataclass(frozen=True)
    class FutureSpec(PreprocessSpec):  # a field added to the spec but not to the in-graph path
        unsharp_mask: float = 0.5

    with pytest.raises(InvalidArgumentError, match="unsharp_mask"):
        build_preprocess_graph(FutureSpec(input_size=(112, 112), min_side=32), 18, 9)


@pytest.mark.parametrize("name", sorted(PIXEL_VARIANTS))
def test_each_handled_pixel_field_changes_the_graph_like_python(name, gray_u8):
    data = _png(gray_u8)
    varied = replace(SPEC, **PIXEL_VARIANTS[name])
    got, ref = _graph_and_python(varied, data)
    base, _ = _graph_and_python(SPEC, data)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5
    assert got.shape != base.shape or np.abs(got - base).max() > 0.05  # the variant really changed the input


def test_each_handled_wiring_field_is_used(toy, gray_u8):
    _, fp32, _ = toy
    with pytest.raises(ExportError, match="do not match"):
        build_ingraph_model(fp32, replace(SPEC, input_name="pixels"))  # input_name: the wiring is checked
    data = _png(gray_u8)  # 200 x 200
    check_ingraph_input(data, SPEC.min_side, SPEC.max_pixels)
    with pytest.raises(InvalidImageError):
        check_ingraph_input(data, 201, SPEC.max_pixels)  # min_side
    with pytest.raises(InvalidImageError):
        check_ingraph_input(data, SPEC.min_side, 200 * 200 - 1)  # max_pixels


@pytest.mark.parametrize("name", sorted(SPEC_RESTRICTED))
def test_each_restricted_field_is_exact_for_its_values_and_refuses_others(name, gray_u8):
    data = _png(gray_u8)
    for value in SPEC_RESTRICTED[name]:
        got, ref = _graph_and_python(replace(SPEC, **{name: value}), data)
        assert np.abs(got - ref).max() < 1e-5, (name, value)
    others = [v for v in RESIZE_METHODS if v not in SPEC_RESTRICTED[name]] if name == "resize" else []
    for value in others + ["a-future-value"]:
        with pytest.raises(InvalidArgumentError, match=name):
            build_preprocess_graph(replace(SPEC, **{name: value}), 18, 9)
