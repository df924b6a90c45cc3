"""Bundle integrity: the digest covers the manifest, no external data, no duplicate metadata, strict
manifest types (the hostile-input issue's bundle cases)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_tiny_onnx, make_manifest
from cxr_edge.bundle import (METADATA_PROPS_FIELD, _len_field, load_bundle, read_manifest, split_model,
                             write_bundle)
from cxr_edge.errors import BundleError, ChecksumMismatchError, InvalidArgumentError, ManifestError
from cxr_edge.manifest import MANIFEST_KEY


def _bundle(tmp_path):
    model, w, b = build_tiny_onnx()
    path = tmp_path / "b.onnx"
    write_bundle(model, make_manifest(w, b), path)
    return path


def _rewrite_manifest(data: bytes, edit) -> bytes:
    """Replace the manifest entry by ``edit(dict)`` without updating any checksum (an attacker's edit)."""
    body, meta = split_model(data)
    d = json.loads(meta[MANIFEST_KEY])
    edit(d)
    meta[MANIFEST_KEY] = json.dumps(d, sort_keys=True)
    out = bytearray(body)
    for k, v in meta.items():
        out += _len_field(METADATA_PROPS_FIELD, _len_field(1, k.encode()) + _len_field(2, v.encode()))
    return bytes(out)


@pytest.mark.parametrize("edit", [
    lambda d: d.__setitem__("thresholds", [1e-4] * len(d["thresholds"])),
    lambda d: d.__setitem__("labels", list(reversed(d["labels"]))),
    lambda d: d["preprocessing"].__setitem__("mean", [0.4]),
    lambda d: d["preprocessing"].__setitem__("min_side", 64),
    lambda d: d["preprocessing"].__setitem__("max_pixels", 10 ** 9),
    lambda d: d.__setitem__("notice", "clinically validated"),
])
def test_any_manifest_edit_is_refused(tmp_path, edit):
    data = _bundle(tmp_path).read_bytes()
    assert read_manifest(data).bundle_sha256  # the untouched bundle verifies
    with pytest.raises(ChecksumMismatchError, match="manifest"):
        read_manifest(_rewrite_manifest(data, edit))


def test_manifest_without_digest_is_refused(tmp_path):
    data = _bundle(tmp_path).read_bytes()
    with pytest.raises(ChecksumMismatchError, match="bundle_sha256"):
        read_manifest(_rewrite_manifest(data, lambda d: d.pop("bundle_sha256")))


def test_duplicate_metadata_entries_are_refused(tmp_path):
    data = _bundle(tmp_path).read_bytes()
    _, meta = split_model(data)
    dup = data + _len_field(METADATA_PROPS_FIELD, _len_field(1, MANIFEST_KEY.encode())
                            + _len_field(2, meta[MANIFEST_KEY].encode()))
    with pytest.raises(BundleError, match="two metadata entries"):
        read_manifest(dup)


def test_external_data_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import convert_model_to_external_data

    model_bytes, w, b = build_tiny_onnx()
    model = onnx.load_from_string(model_bytes)
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="side.bin", size_threshold=0)
    with pytest.raises(BundleError, match="external file"):
        write_bundle(model.SerializeToString(), make_manifest(w, b), tmp_path / "x.onnx")


def test_constant_node_with_external_data_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    model_bytes, w, b = build_tiny_onnx()
    model = onnx.load_from_string(model_bytes)
    t = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused_c"], value=t))
    with pytest.raises(BundleError, match="external file"):
        write_bundle(model.SerializeToString(), make_manifest(w, b), tmp_path / "x.onnx")


def test_deeply_nested_and_badly_typed_manifests_are_manifest_errors(tmp_path):
    data = _bundle(tmp_path).read_bytes()
    body, _ = split_model(data)
    deep = "[" * 100_000 + "]" * 100_000
    bad = body + _len_field(METADATA_PROPS_FIELD, _len_field(1, MANIFEST_KEY.encode()) + _len_field(2, deep.encode()))
    with pytest.raises(ManifestError):
        read_manifest(bad)
    for edit, msg in [(lambda d: d["preprocessing"].__setitem__("min_side", 128.5), "integer"),
                      (lambda d: d["preprocessing"].__setitem__("gamma", 2.2), "unknown key"),
                      (lambda d: d.__setitem__("future_step", {}), "unknown top-level"),
                      (lambda d: d.__setitem__("preprocessing", []), "preprocessing")]:
        with pytest.raises(ManifestError, match=msg):
            read_manifest(_rewrite_manifest(data, edit), verify_checksum=False)


def test_thread_count_is_bounded(tmp_path):
    path = _bundle(tmp_path)
    with pytest.raises(InvalidArgumentError, match="threads"):
        load_bundle(path, threads=1000)
    assert load_bundle(path, threads=2).threads == 2
