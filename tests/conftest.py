"""Shared fixtures: tiny ONNX bundles built with onnx.helper (no torch) and the shared data paths."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_EDGE_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
TEACHERS = SHARED / "teachers"

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    """An image encoded by OpenCV (".png", ".jpg", ".tiff", ...), for reader tests."""
    import cv2

    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    """One PNG chunk (length, type, payload, CRC), for building damaged PNGs by hand."""
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def need_shared(*parts: str) -> Path:
    """Path under ../shared, or skip the test with the reason when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} is missing (set CXR_EDGE_SHARED or run beside ../shared)")
    return path


def build_tiny_onnx(n_labels: int = 3, channels: int = 8, input_size: int = 64, in_channels: int = 1,
                    seed: int = 0, input_name: str = "image") -> tuple[bytes, np.ndarray, np.ndarray]:
    """A real conv -> relu -> (features) -> GAP -> Gemm (logits) graph with random weights.

    Returns (model bytes, classifier weight W [labels x channels], bias b).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, (channels, in_channels, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (channels,)).astype(np.float32)
    fc_w = rng.normal(0, 0.5, (n_labels, channels)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, (n_labels,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [input_name, "conv_w", "conv_b"], ["conv"], strides=[8, 8], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", in_channels, input_size, input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_labels]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", channels, None, None])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(conv_b, "conv_b"),
         numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(fc_b, "fc_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(), fc_w, fc_b


def make_manifest(weights: np.ndarray, bias: np.ndarray, input_size: int = 64, in_channels: int = 1,
                  labels: tuple[str, ...] | None = None, **overrides):
    from cxr_edge.manifest import CamSpec, Manifest, PreprocessSpec

    n = weights.shape[0]
    labels = labels or tuple(f"label_{i}" for i in range(n))
    fields = dict(
        model_id="tiny-test", labels=labels, thresholds=tuple([0.5] * n),
        preprocessing=PreprocessSpec(input_size=(input_size, input_size), channels=in_channels,
                                     mean=(0.5,) * in_channels, std=(0.25,) * in_channels, min_side=32),
        cam=CamSpec(method="weights", features_output="features", weights=weights, bias=bias),
        model_sha256="0" * 64, provenance={"architecture": "tiny-conv", "note": "unit-test model, random weights"},
    )
    fields.update(overrides)
    return Manifest(**fields)


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    """Path of a valid tiny bundle (3 labels, 64 px input, 1 channel)."""
    from cxr_edge.bundle import write_bundle

    model_bytes, w, b = build_tiny_onnx()
    path = tmp_path / "tiny.onnx"
    write_bundle(model_bytes, make_manifest(w, b), path)
    return path


@pytest.fixture
def tiny_bundle_factory(tmp_path):
    """Factory: tiny_bundle_factory(n_labels=..., labels=..., **manifest_overrides) -> Path."""
    from cxr_edge.bundle import write_bundle

    counter = iter(range(10_000))

    def make(n_labels: int = 3, channels: int = 8, input_size: int = 64, in_channels: int = 1, seed: int = 0,
             **overrides) -> Path:
        model_bytes, w, b = build_tiny_onnx(n_labels, channels, input_size, in_channels, seed)
        path = tmp_path / f"tiny_{next(counter)}.onnx"
        write_bundle(model_bytes, make_manifest(w, b, input_size, in_channels, **overrides), path)
        return path

    return make


SAMPLE_CHEST = REPO / "cxr_edge" / "data" / "sample_chest_pa.png"


def sample_chest(side: int = 256) -> np.ndarray:
    """The repository's own sample PA chest radiograph, area-resized to ``side`` px high (passes every pixel rule)."""
    import cv2

    from cxr_edge.imaging import read_image

    px = read_image(SAMPLE_CHEST).pixels
    h, w = px.shape
    return cv2.resize(px, (max(32, round(w * side / h)), side), interpolation=cv2.INTER_AREA).astype(np.float32)


def build_scoped_bundle(path: Path, *, threshold: float | None = None, cam: bool = True, **overrides) -> Path:
    """A tiny bundle with a ``scope`` block fitted (export/scope_fit.py, numpy only) on noisy copies of the sample
    chest. ``threshold`` overrides the fitted one (default: 3 x the larger of the fitted threshold and the clean
    chest's own score, so the chest itself is in scope and only the pixel rules, or a gross feature shift, flag)."""
    from dataclasses import replace

    import onnxruntime as ort

    from cxr_edge.bundle import write_bundle
    from cxr_edge.manifest import CamSpec
    from cxr_edge.preprocess import preprocess
    from cxr_edge.scope import ScopeGate
    from export.scope_fit import fit_scope

    model_bytes, w, b = build_tiny_onnx()
    manifest = make_manifest(w, b, **overrides)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    chest = sample_chest(128)
    rng = np.random.default_rng(0)
    imgs = [np.clip(chest + rng.normal(0, 0.03, chest.shape), 0, 1).astype(np.float32) for _ in range(40)]
    (feats,) = sess.run(["features"], {"image": preprocess(imgs, manifest.preprocessing)})
    pooled = feats.mean(axis=(2, 3))
    spec = fit_scope(pooled[:30], pooled[30:], k=3)
    if threshold is None:
        (f1,) = sess.run(["features"], {"image": preprocess([chest], manifest.preprocessing)})
        own = ScopeGate(spec).score(f1[0])
        threshold = 3.0 * max(spec.threshold, own)
    spec = replace(spec, threshold=float(threshold))
    manifest = replace(manifest, scope=spec)
    if not cam:
        manifest = replace(manifest, cam=CamSpec(method="none"))
    write_bundle(model_bytes, manifest, path)
    return path


@pytest.fixture(scope="session")
def scoped_bundle(tmp_path_factory) -> Path:
    """A tiny bundle (3 labels, thresholds 0.5) whose manifest has a scope block."""
    return build_scoped_bundle(tmp_path_factory.mktemp("scoped") / "scoped.onnx")
