import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import make_manifest
from cxr_edge.errors import ManifestError
from cxr_edge.manifest import FORMAT_VERSION, CamSpec, Manifest, PreprocessSpec, decode_array, encode_array


def _valid():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    return make_manifest(w, np.array([0.1, -0.2], np.float32), model_sha256="a" * 64)


def test_round_trip_keeps_every_field():
    m = _valid()
    back = Manifest.from_json(m.to_json())
    assert back.labels == m.labels and back.thresholds == m.thresholds
    assert back.preprocessing == m.preprocessing
    np.testing.assert_array_equal(back.cam.weights, m.cam.weights)
    np.testing.assert_array_equal(back.cam.bias, m.cam.bias)
    assert back.provenance == m.provenance and back.model_sha256 == m.model_sha256


def test_array_encoding_detects_tampering():
    enc = encode_array(np.ones((2, 2), np.float32))
    enc["base64"] = encode_array(np.zeros((2, 2), np.float32))["base64"]
    with pytest.raises(ManifestError, match="checksum"):
        decode_array(enc)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "format_version"),
    (lambda d: d.update(format="something-else"), "not a cxr-edge manifest"),
    (lambda d: d.update(thresholds=[0.5]), "one threshold per label"),
    (lambda d: d.update(thresholds=[0.5, 1.5]), r"thresholds must lie in \(0, 1\)"),
    (lambda d: d.update(labels=["a", "a"]), "unique"),
    (lambda d: d["preprocessing"].update(resize="nearest"), "resize"),
    (lambda d: d["preprocessing"].update(std=[0.0]), "std"),
    (lambda d: d["preprocessing"].update(channels=2), "channels"),
    (lambda d: d.pop("labels"), "missing"),
    (lambda d: d["cam"].update(method="gradcam"), "cam.method"),
])
def test_invalid_manifests_are_refused(mutate, match):
    d = json.loads(_valid().to_json())
    mutate(d)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_json(json.dumps(d))


def test_not_json_is_refused():
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{nope")


def test_cam_weights_must_match_label_count():
    m = _valid()
    bad = replace(m, cam=CamSpec(weights=np.ones((3, 3), np.float32)))
    with pytest.raises(ManifestError, match="one row per label"):
        bad.validate()


def test_summary_drops_bulky_arrays_but_keeps_checksums():
    s = _valid().summary()
    assert "base64" not in s["cam"]["weights"] and len(s["cam"]["weights"]["sha256"]) == 64
    json.dumps(s)


def test_preprocess_spec_from_dict_converts_lists():
    spec = PreprocessSpec.from_dict({"input_size": [128, 96], "mean": [0.4], "std": [0.2]})
    assert spec.input_size == (128, 96) and spec.mean == (0.4,)
    with pytest.raises(ManifestError, match="unknown key"):  # an unknown step is refused, never skipped
        PreprocessSpec.from_dict({"input_size": [128, 96], "mean": [0.4], "std": [0.2], "unknown_key": 1})
