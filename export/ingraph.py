"""Bytes-in variant: PNG/JPEG decoding and preprocessing inside the ONNX graph.

For firmware that runs ONNX from C/C++/Java without Python: the graph takes the encoded file as a
1-D uint8 tensor and does, in order, what ``read_image`` + ``preprocess`` do in Python:

  DecodeImage (onnxruntime-extensions, BGR uint8 H x W x C)
  -> gray: OpenCV's exact fixed-point luminance ``(3735 B + 19235 G + 9798 R + 2^14) >> 15``
     (bit-identical to cv2.COLOR_BGR2GRAY, and the identity on gray images)
  -> / 255 -> Resize to the manifest's size -> clip [0, 1] -> (x - mean) * (1 / std) -> N=1 x C x H x W
  -> the model (logits, features).

What is not identical to the Python path, and why (measured numbers: see the export report):
  * resize: cv2.INTER_AREA has no ONNX equivalent; ``area`` maps to ``Resize(cubic, a=-0.5,
    antialias=1)``. Measured against INTER_AREA on NIH radiographs, mean |difference| of the
    [0, 1] image after resize (max is at burnt-in text/edges, ~0.1-0.15 for every filter):
        320->224: cubic-aa 0.0013, linear-aa 0.0010, plain linear 0.0014
        1024->224: cubic-aa 0.0010, linear-aa 0.0014, plain linear 0.0042
        320->128: cubic-aa 0.0017, linear-aa 0.0023, plain linear 0.0036
        1024->128: cubic-aa 0.0016, linear-aa 0.0024, plain linear 0.0056
    so antialiased cubic is the closest overall. ``linear``/``cubic`` map to the same ONNX modes
    without antialias (cv2 does not antialias them); ``lanczos`` has no ONNX mode and is refused.
  * 16-bit PNGs: DecodeImage returns 8 bits (the high byte); Python keeps 16 (error <= 1/255).
  * colour JPEGs: the extensions' JPEG decoder upsamples chroma differently from OpenCV's
    (pixel differences of tens of levels at colour edges); chest radiographs are gray.
Refused (``run_ingraph``) because onnxruntime-extensions 0.15 mishandles them:
  * grayscale (1-component) JPEGs: DecodeImage swaps every triplet of pixels (a BGR<->RGB swap
    applied to a 1-channel buffer): a scrambled image, not an error;
  * anything that is not a complete, decodable 8-bit PNG/JPEG: its JPEG decoder calls exit() on
    non-JPEG bytes and loops forever on a truncated JPEG. Firmware must validate bytes first.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from cxr_edge.errors import CorruptImageError, InvalidArgumentError, UnsupportedFormatError
from cxr_edge.manifest import PreprocessSpec

from .errors import ExportError

EXT_DOMAIN = "com.microsoft.extensions"
BYTES_INPUT = "image_bytes"
MIN_OPSET = 18  # Resize antialias
#: manifest resize method -> ONNX Resize attributes (chosen by measurement; see module docstring)
RESIZE_MODES: dict[str, dict[str, Any]] = {
    "area": {"mode": "cubic", "antialias": 1, "cubic_coeff_a": -0.5},
    "linear": {"mode": "linear", "antialias": 0},
    "cubic": {"mode": "cubic", "antialias": 0, "cubic_coeff_a": -0.75},
}
#: in-graph vs Python path tolerance on real 8-bit PNGs (probability units; measured max ~1e-2 on
#: the NIH sample, see the report). The test and ``compare_paths`` use it.
PROB_TOLERANCE = 0.02


def build_preprocess_graph(spec: PreprocessSpec, opset: int, ir_version: int, out_name: str = "preprocessed",
                           resize: dict[str, Any] | None = None) -> onnx.ModelProto:
    """The decode + preprocessing graph alone: uint8 bytes -> 1 x C x H x W float32."""
    if resize is None:
        if spec.resize not in RESIZE_MODES:
            raise InvalidArgumentError(f"resize {spec.resize!r} has no ONNX Resize equivalent; in-graph "
                                       f"preprocessing supports {sorted(RESIZE_MODES)}")
        resize = RESIZE_MODES[spec.resize]
    h, w = spec.input_size
    c = spec.channels
    mean = np.asarray(spec.mean, np.float32).reshape(1, c, 1, 1)
    inv_std = (1.0 / np.asarray(spec.std, np.float32)).reshape(1, c, 1, 1).astype(np.float32)
    # preprocess_one: "area" falls back to linear when the image is smaller than the input size
    enlarge_fallback = spec.resize == "area" and (resize.get("mode") != "linear" or bool(resize.get("antialias")))
    resized = "pp_resized_main" if enlarge_fallback else "pp_resized"
    inits = [
        numpy_helper.from_array(np.array([h, w], np.int64), "pp_target_hw"),
        numpy_helper.from_array(np.array([1, 1, 3], np.int64), "pp_expand3"),
        numpy_helper.from_array(np.array([3735, 19235, 9798], np.int32), "pp_bgr_coef"),
        numpy_helper.from_array(np.array([-1], np.int64), "pp_last_axis"),
        numpy_helper.from_array(np.array(1 << 14, np.int32), "pp_half"),
        numpy_helper.from_array(np.array(1 << 15, np.int32), "pp_one"),
        numpy_helper.from_array(np.array(255.0, np.float32), "pp_255"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "pp_nc_axes"),
        numpy_helper.from_array(np.array([1, 1, h, w], np.int64), "pp_sizes"),
        numpy_helper.from_array(np.array(0.0, np.float32), "pp_zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "pp_unit"),
        numpy_helper.from_array(mean, "pp_mean"),
        numpy_helper.from_array(inv_std, "pp_inv_std"),
    ]
    nodes = [
        helper.make_node("DecodeImage", [BYTES_INPUT], ["pp_bgr"], domain=EXT_DOMAIN, name="pp_decode"),
        helper.make_node("Cast", ["pp_bgr"], ["pp_bgr_i"], to=TensorProto.INT32, name="pp_cast_i"),
        helper.make_node("Expand", ["pp_bgr_i", "pp_expand3"], ["pp_bgr3"], name="pp_gray_to_3"),
        helper.make_node("Mul", ["pp_bgr3", "pp_bgr_coef"], ["pp_weighted"], name="pp_luma_mul"),
        helper.make_node("ReduceSum", ["pp_weighted", "pp_last_axis"], ["pp_sum"], keepdims=0, name="pp_luma_sum"),
        helper.make_node("Add", ["pp_sum", "pp_half"], ["pp_rounded"], name="pp_luma_round"),
        helper.make_node("Div", ["pp_rounded", "pp_one"], ["pp_gray_i"], name="pp_luma_shift"),
        helper.make_node("Cast", ["pp_gray_i"], ["pp_gray_f"], to=TensorProto.FLOAT, name="pp_cast_f"),
        helper.make_node("Div", ["pp_gray_f", "pp_255"], ["pp_unit_gray"], name="pp_to_unit"),
        helper.make_node("Unsqueeze", ["pp_unit_gray", "pp_nc_axes"], ["pp_nchw"], name="pp_nchw"),
        helper.make_node("Resize", ["pp_nchw", "", "", "pp_sizes"], [resized], name="pp_resize",
                         coordinate_transformation_mode="half_pixel", **resize),
    ]
    if enlarge_fallback:
        nodes += [
            helper.make_node("Resize", ["pp_nchw", "", "", "pp_sizes"], ["pp_resized_up"], name="pp_resize_up",
                             coordinate_transformation_mode="half_pixel", mode="linear"),
            helper.make_node("Shape", ["pp_nchw"], ["pp_src_hw"], start=2, name="pp_src_hw"),
            helper.make_node("Less", ["pp_src_hw", "pp_target_hw"], ["pp_smaller"], name="pp_smaller"),
            helper.make_node("Cast", ["pp_smaller"], ["pp_smaller_i"], to=TensorProto.INT64, name="pp_smaller_i"),
            helper.make_node("ReduceMax", ["pp_smaller_i"], ["pp_any_i"], keepdims=0, name="pp_any_smaller"),
            helper.make_node("Cast", ["pp_any_i"], ["pp_enlarging"], to=TensorProto.BOOL, name="pp_enlarging"),
            helper.make_node("Where", ["pp_enlarging", "pp_resized_up", resized], ["pp_resized"], name="pp_pick"),
        ]
    nodes += [
        helper.make_node("Clip", ["pp_resized", "pp_zero", "pp_unit"], ["pp_clipped"], name="pp_clip"),
        helper.make_node("Sub", ["pp_clipped", "pp_mean"], ["pp_centered"], name="pp_sub_mean"),
        helper.make_node("Mul", ["pp_centered", "pp_inv_std"], [out_name], name="pp_scale"),
    ]
    graph = helper.make_graph(
        nodes, "cxr_edge_ingraph_preprocess",
        [helper.make_tensor_value_info(BYTES_INPUT, TensorProto.UINT8, ["n_bytes"])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [1, c, h, w])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(EXT_DOMAIN, 1)])
    model.ir_version = ir_version
    return model


def build_ingraph_model(model_bytes: bytes, spec: PreprocessSpec, resize: dict[str, Any] | None = None) -> bytes:
    """Prepend decoding + preprocessing to an fp32 or INT8 model; returns the merged ONNX bytes."""
    model = onnx.load_from_string(model_bytes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ExportError(f"cannot convert the model from opset {opset} to {MIN_OPSET}: {exc}") from exc
        opset = MIN_OPSET
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if names != [spec.input_name]:
        raise ExportError(f"model inputs {names} do not match the manifest input {spec.input_name!r}")
    del model.metadata_props[:]
    prep = build_preprocess_graph(spec, opset, model.ir_version, resize=resize)
    merged = compose.merge_models(prep, model, io_map=[("preprocessed", spec.input_name)],
                                  producer_name="cxr-edge-export", doc_string="cxr-edge bundle with in-graph preprocessing")
    try:
        onnx.checker.check_model(merged, full_check=False)  # full_check cannot infer the custom op's shapes
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the in-graph model is invalid: {exc}") from None
    return merged.SerializeToString()


def ingraph_session(model_bytes: bytes, threads: int = 1):
    """An onnxruntime session with the onnxruntime-extensions custom ops registered."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def check_ingraph_input(data: bytes, min_side: int = 128, max_pixels: int = 64_000_000) -> str:
    """Refuse every input that could crash, hang or fool the in-graph decoder; returns the format.

    Magic bytes first (``sniff_format``), then the full structural check and test decode of
    ``read_image`` (truncation, size limits, decodability), then the cases DecodeImage gets wrong.
    """
    from cxr_edge.imaging import read_image, sniff_format

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"run_ingraph needs the encoded file as bytes, got {type(data).__name__}")
    data = bytes(data)
    fmt = sniff_format(data)  # UnsupportedFormatError for anything that is not PNG/JPEG/DICOM
    if fmt not in ("png", "jpeg"):
        raise UnsupportedFormatError(f"in-graph decoding handles PNG and JPEG only, not {fmt}; "
                                     "use the Python runtime (cxr_edge.Classifier) for DICOM")
    image = read_image(data, min_side=min_side, max_pixels=max_pixels)  # CorruptImageError / InvalidImageError
    if fmt == "jpeg" and image.info.get("channels_in") == 1:
        raise UnsupportedFormatError("grayscale JPEGs are decoded wrongly by onnxruntime-extensions' DecodeImage "
                                     "(pixels scrambled); use the Python runtime or a PNG")
    if fmt == "jpeg" and image.bit_depth != 8:
        raise UnsupportedFormatError(f"{image.bit_depth}-bit JPEGs are not supported by the in-graph decoder")
    return fmt


def run_ingraph(session, data: bytes, min_side: int = 128, max_pixels: int = 64_000_000,
                output_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Validate ``data`` (see :func:`check_ingraph_input`), then run the bytes-in model on it."""
    check_ingraph_input(data, min_side, max_pixels)
    feed = {session.get_inputs()[0].name: np.frombuffer(bytes(data), dtype=np.uint8)}
    try:
        return session.run(list(output_names) if output_names else None, feed)
    except Exception as exc:  # onnxruntime's own error types; the decoder reports damage this way
        raise CorruptImageError(f"the in-graph decoder could not decode the image: {exc}") from None
