"""Bytes-in variant: PNG/JPEG decoding and preprocessing inside the ONNX graph.

For firmware that runs ONNX from C/C++/Java without Python: the graph takes the encoded file as a
1-D uint8 tensor and does, in order, what ``read_image`` + ``preprocess`` do in Python:

  DecodeImage (onnxruntime-extensions, BGR uint8 H x W x C)
  -> gray: OpenCV's exact fixed-point luminance ``(3735 B + 19235 G + 9798 R + 2^14) >> 15``
     (bit-identical to cv2.COLOR_BGR2GRAY, and the identity on gray images)
  -> / 255 -> resize to the manifest's size -> clip [0, 1] -> (x - mean) * (1 / std) -> 1 x C x H x W
  -> the model (logits, features).

Resize: ONNX Resize has no INTER_AREA, so ``area`` is built as two matrix products with OpenCV's
pixel-area weights (:func:`_area_resize_nodes`): equal to INTER_AREA to ~2e-7; when the image is
smaller than the input size, linear Resize is picked, as ``preprocess_one`` does. Measured on the
DenseNet-121 teacher (fp32), 50 NIH PNGs: max |logit diff| 1.4e-6, max |prob diff| 1.5e-7 against
read_image + preprocess. The closest *ONNX Resize* filters were much farther off (mean |diff| of
the resized [0, 1] image; max ~0.1-0.15 at burnt-in text for all of them):
    320->224: cubic-aa(-0.5) 0.0013, linear-aa 0.0010, plain linear 0.0014
    1024->224: cubic-aa 0.0010, linear-aa 0.0014, plain linear 0.0042
    320->128: cubic-aa 0.0017, linear-aa 0.0023, plain linear 0.0036
and cubic-aa moved the teacher's probabilities by up to 0.065 (mean 0.0045) on the same 50 PNGs.
``linear``/``cubic`` map to the same ONNX Resize modes (cv2 does not antialias them; borders may
differ slightly); ``lanczos`` has no ONNX equivalent and is refused.

What still differs from the Python path:
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

from dataclasses import fields
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from cxr_edge.bundle import session_options
from cxr_edge.errors import CorruptImageError, InvalidArgumentError, UnsupportedFormatError
from cxr_edge.manifest import PreprocessSpec

from .errors import ExportError
from .onnx_export import prune_opset_imports

EXT_DOMAIN = "com.microsoft.extensions"
BYTES_INPUT = "image_bytes"
MIN_OPSET = 18  # Resize antialias for callers who pick an ONNX Resize filter (``resize=``)
#: manifest resize method -> in-graph resize (``area_matrix`` = exact INTER_AREA; others: ONNX Resize attributes)
RESIZE_MODES: dict[str, dict[str, Any]] = {
    "area": {"mode": "area_matrix"},
    "linear": {"mode": "linear", "antialias": 0},
    "cubic": {"mode": "cubic", "antialias": 0, "cubic_coeff_a": -0.75},
}
#: Every PreprocessSpec field, and how this module implements it. A field that changes the pixels or the
#: tensor must be in the graph (or in the input guard) exactly as ``cxr_edge.preprocess`` does it
#: (docs/refactor.md, "Changing preprocessing"); tests/test_ingraph.py fails for a PreprocessSpec field that is
#: in neither dict, and checks each handled field by changing it.
SPEC_HANDLED: dict[str, str] = {
    "input_name": "the model input the preprocessing graph feeds (build_ingraph_model checks the wiring)",
    "input_size": "the resize target (pixel-area matrices, or ONNX Resize sizes)",
    "channels": "the gray image broadcast over C by the per-channel mean/std",
    "mean": "Sub per channel",
    "std": "Mul by 1/std per channel",
    "min_side": "check_ingraph_input/run_ingraph refuse smaller images before the graph runs",
    "max_pixels": "check_ingraph_input/run_ingraph refuse larger images before the graph runs",
}
#: PreprocessSpec fields the graph can express only for these values; any other value is refused
#: (:func:`check_spec_supported`), never approximated
SPEC_RESTRICTED: dict[str, tuple[Any, ...]] = {
    "resize": tuple(RESIZE_MODES),
    "aspect": ("stretch",),
    "layout": ("NCHW",),
    "dtype": ("float32",),
}


def check_spec_supported(spec: PreprocessSpec, *, resize_override: bool = False) -> None:
    """Refuse a spec the graph cannot reproduce: a field this module does not know, or a value it cannot express
    (``resize_override``: the caller picked an ONNX Resize filter itself, so ``resize`` is not checked)."""
    unknown = [f.name for f in fields(spec) if f.name not in SPEC_HANDLED and f.name not in SPEC_RESTRICTED]
    if unknown:
        raise InvalidArgumentError(f"preprocessing field(s) {unknown} are not implemented by in-graph "
                                   "preprocessing (export/ingraph.py); use the Python runtime")
    for name, allowed in SPEC_RESTRICTED.items():
        if name == "resize" and resize_override:
            continue
        if getattr(spec, name) not in allowed:
            what = "has no ONNX Resize equivalent" if name == "resize" else "cannot be expressed in-graph"
            raise InvalidArgumentError(f"{name} {getattr(spec, name)!r} {what}; in-graph preprocessing supports "
                                       f"{sorted(allowed)}")


#: in-graph vs Python path tolerance on real 8-bit PNGs, probability units (``area`` resize; the
#: measured maximum is far below, see the export report).
PROB_TOLERANCE = 1e-3


def build_preprocess_graph(spec: PreprocessSpec, opset: int, ir_version: int, out_name: str = "preprocessed",
                           resize: dict[str, Any] | None = None) -> onnx.ModelProto:
    """The decode + preprocessing graph alone: uint8 bytes -> 1 x C x H x W float32."""
    check_spec_supported(spec, resize_override=resize is not None)
    if resize is None:
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
    ]
    if resize.get("mode") == "area_matrix":
        nodes += _area_resize_nodes("pp_unit_gray", resized, (h, w), inits)
    else:
        nodes.append(helper.make_node("Resize", ["pp_nchw", "", "", "pp_sizes"], [resized], name="pp_resize",
                                      coordinate_transformation_mode="half_pixel", **resize))
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


def _area_resize_nodes(gray: str, out: str, size_hw: tuple[int, int], inits: list) -> list[onnx.NodeProto]:
    """cv2.INTER_AREA (downscaling) as two matrix products: ``out = Ry @ img @ Rx.T``.

    Pixel-area resampling is linear and separable; ``R[i, j]`` is the overlap of output pixel
    ``i`` (covering ``[i s, (i + 1) s)`` in source pixels, ``s = src / dst``) with source pixel
    ``j``, divided by ``s`` - exactly the weights OpenCV tabulates, so the result matches
    INTER_AREA to float rounding (~2e-7 measured). The weights depend on the runtime image size,
    so they are built in the graph (in float64, then cast). Cost: ``dst x H x W`` multiply-adds
    (0.2 GFLOP for 1024 x 1024 -> 224).
    """
    nodes: list[onnx.NodeProto] = []
    inits += [numpy_helper.from_array(np.array(0.0, np.float64), "pp_a_zero"),
              numpy_helper.from_array(np.array(1.0, np.float64), "pp_a_one"),
              numpy_helper.from_array(np.array([0], np.int64), "pp_a_axis0"),
              numpy_helper.from_array(np.array([1, 0], np.int64), "pp_a_perm")]
    mats = []
    for axis, dst in enumerate(size_hw):
        t = f"pp_a{axis}"
        i = np.arange(dst, dtype=np.float64)[:, None]
        inits += [numpy_helper.from_array(np.array(float(dst)), f"{t}_dst"),
                  numpy_helper.from_array(i, f"{t}_i"), numpy_helper.from_array(i + 1.0, f"{t}_i1"),
                  numpy_helper.from_array(np.array([axis], np.int64), f"{t}_idx")]
        nodes += [
            helper.make_node("Shape", [gray], [f"{t}_shape"], name=f"{t}_shape"),
            helper.make_node("Gather", [f"{t}_shape", f"{t}_idx"], [f"{t}_src_i"], axis=0, name=f"{t}_src_i"),
            helper.make_node("Cast", [f"{t}_src_i"], [f"{t}_src_v"], to=TensorProto.DOUBLE, name=f"{t}_src_v"),
            helper.make_node("Squeeze", [f"{t}_src_v", "pp_a_axis0"], [f"{t}_src"], name=f"{t}_src"),
            helper.make_node("Div", [f"{t}_src", f"{t}_dst"], [f"{t}_s"], name=f"{t}_scale"),
            helper.make_node("Range", ["pp_a_zero", f"{t}_src", "pp_a_one"], [f"{t}_j"], name=f"{t}_j"),
            helper.make_node("Unsqueeze", [f"{t}_j", "pp_a_axis0"], [f"{t}_jrow"], name=f"{t}_jrow"),
            helper.make_node("Add", [f"{t}_jrow", "pp_a_one"], [f"{t}_j1"], name=f"{t}_j1"),
            helper.make_node("Mul", [f"{t}_i", f"{t}_s"], [f"{t}_lo"], name=f"{t}_lo"),
            helper.make_node("Mul", [f"{t}_i1", f"{t}_s"], [f"{t}_hi"], name=f"{t}_hi"),
            helper.make_node("Min", [f"{t}_hi", f"{t}_j1"], [f"{t}_end"], name=f"{t}_end"),
            helper.make_node("Max", [f"{t}_lo", f"{t}_jrow"], [f"{t}_start"], name=f"{t}_start"),
            helper.make_node("Sub", [f"{t}_end", f"{t}_start"], [f"{t}_len"], name=f"{t}_len"),
            helper.make_node("Relu", [f"{t}_len"], [f"{t}_overlap"], name=f"{t}_overlap"),
            helper.make_node("Div", [f"{t}_overlap", f"{t}_s"], [f"{t}_w64"], name=f"{t}_w64"),
            helper.make_node("Cast", [f"{t}_w64"], [f"{t}_w"], to=TensorProto.FLOAT, name=f"{t}_w"),
        ]
        mats.append(f"{t}_w")
    nodes += [
        helper.make_node("MatMul", [mats[0], gray], ["pp_a_rows"], name="pp_area_rows"),
        helper.make_node("Transpose", [mats[1]], ["pp_a_rxt"], perm=[1, 0], name="pp_area_rxt"),
        helper.make_node("MatMul", ["pp_a_rows", "pp_a_rxt"], ["pp_a_2d"], name="pp_area_cols"),
        helper.make_node("Unsqueeze", ["pp_a_2d", "pp_nc_axes"], [out], name="pp_area_nchw"),
    ]
    return nodes


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
    prune_opset_imports(model)
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

    opts = session_options(threads)
    opts.register_custom_ops_library(get_library_path())
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
