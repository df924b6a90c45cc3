import numpy as np
import pytest

from conftest import build_tiny_onnx, make_manifest
from cxr_edge.bundle import embed_manifest, load_bundle, model_sha256, read_manifest, split_model, write_bundle
from cxr_edge.errors import BundleError, ChecksumMismatchError, InvalidArgumentError, ManifestError, NoDefaultModelError


def test_tiny_bundle_loads_and_runs(tiny_bundle):
    b = load_bundle(tiny_bundle, threads=1)
    assert b.manifest.labels == ("label_0", "label_1", "label_2")
    x = np.zeros((2, 1, 64, 64), np.float32)
    logits, feats = b.session.run(["logits", "features"], {"image": x})
    assert logits.shape == (2, 3) and feats.shape[:2] == (2, 8)


def test_checksum_covers_weights_not_metadata(tmp_path):
    model_bytes, w, b = build_tiny_onnx()
    data = embed_manifest(model_bytes, make_manifest(w, b))
    assert model_sha256(data) == model_sha256(model_bytes)
    assert read_manifest(data).model_sha256 == model_sha256(model_bytes)


def test_reserialised_by_onnx_still_verifies(tiny_bundle):
    onnx = pytest.importorskip("onnx")
    data = onnx.load(str(tiny_bundle)).SerializeToString()
    assert read_manifest(data).model_id == "tiny-test"


def test_tampered_weight_is_refused(tiny_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(tiny_bundle))
    for init in model.graph.initializer:
        if init.name == "fc_w":
            arr = numpy_helper.to_array(init).copy()
            arr[0, 0] += 1e-3
            init.CopyFrom(numpy_helper.from_array(arr, "fc_w"))
    bad = tmp_path / "tampered.onnx"
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        load_bundle(bad)


def test_flipped_byte_is_refused(tiny_bundle, tmp_path):
    data = bytearray(tiny_bundle.read_bytes())
    body, _ = split_model(bytes(data))
    pos = data.find(body[-40:])  # a byte inside the graph's weights
    data[pos + 5] ^= 0x01
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        load_bundle(bad)


def test_onnx_without_manifest_is_refused(tmp_path):
    model_bytes, _, _ = build_tiny_onnx()
    p = tmp_path / "plain.onnx"
    p.write_bytes(model_bytes)
    with pytest.raises(ManifestError, match="no cxr-edge manifest"):
        load_bundle(p)


@pytest.mark.parametrize("payload", [b"", b"not an onnx file at all \xff\xff\xff", b"\x08"])
def test_garbage_file_is_refused(tmp_path, payload):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(payload)
    with pytest.raises(BundleError):
        load_bundle(p)


def test_missing_file_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="cannot read model file"):
        load_bundle(tmp_path / "nope.onnx")


def test_wrong_cam_weights_fail_the_head_check(tmp_path):
    model_bytes, w, b = build_tiny_onnx()
    p = tmp_path / "wrong_w.onnx"
    write_bundle(model_bytes, make_manifest(w * 1.5, b), p)
    with pytest.raises(ManifestError, match="do not reproduce"):
        load_bundle(p)


def test_manifest_graph_mismatches_are_refused(tmp_path):
    model_bytes, w, b = build_tiny_onnx(n_labels=3)
    cases = {
        "labels": make_manifest(np.vstack([w, w[:1]]), np.append(b, 0.0)),  # 4 labels, graph has 3
        "input": make_manifest(w, b, input_size=96),
        "features": make_manifest(w, b, cam=None),
    }
    from cxr_edge.manifest import CamSpec

    cases["features"] = make_manifest(w, b, cam=CamSpec(features_output="nope", weights=w, bias=b))
    for name, manifest in cases.items():
        p = tmp_path / f"{name}.onnx"
        write_bundle(model_bytes, manifest, p)
        with pytest.raises(ManifestError):
            load_bundle(p)


def test_unavailable_provider_is_a_clear_error(tiny_bundle):
    with pytest.raises(InvalidArgumentError, match="not available"):
        load_bundle(tiny_bundle, providers=["NoSuchExecutionProvider"])


def test_bad_thread_count(tiny_bundle):
    with pytest.raises(InvalidArgumentError):
        load_bundle(tiny_bundle, threads=0)


def test_default_bundle_absent_or_loadable(monkeypatch):
    from cxr_edge import bundle as bundle_mod

    try:
        path = bundle_mod.default_bundle_path()
    except NoDefaultModelError as exc:
        assert "no default model" in str(exc)
    else:
        assert load_bundle(path).manifest.labels
