"""Static INT8 quantization (QDQ, per-channel weights) with a float CAM head.

Three separate steps, as onnxruntime.quantization intends:
  1. :func:`prepare_for_quantization` - ``quant_pre_process`` (shape inference + basic graph fusion);
  2. :func:`quantize_int8` - ``quantize_static`` fed by a calibration reader (``export.calibration``);
  3. :func:`debug_quantization` - ``qdq_loss_debug``: per-tensor SQNR, worst first, to see where it hurts.

What stays float (``nodes_to_exclude``), and why:
  * the node producing the ``features`` output and everything downstream of it (GAP, Flatten, Gemm):
    the CAM is computed from ``features`` with the fp32 classifier weights of the manifest, and the
    loader's head identity ``GAP(features) @ W.T + b == logits`` only holds when that head is float;
  * the first convolution: it sees the raw normalised pixels (1 input channel, cheap) and an 8-bit
    input grid costs accuracy for no speed.

Presets (this CPU: AVX2 *without* VNNI). MLAS' U8S8 kernel uses ``vpmaddubsw``, which adds two
u8 x s8 products into a saturating int16 (255 * 127 * 2 > 32767): full-range int8 weights can
saturate. The remedies are ``reduce_range`` (7-bit weights: 255 * 63 * 2 fits) or U8U8 (a
widening kernel that cannot saturate). Measured here with ``python -m export.quant_bench``
(batch 1, 1 thread, median of interleaved runs; 2-thread numbers were swamped by other jobs):

  ms (two runs)                   fp32         u8u8          u8s8_rr      u8s8
  MobileNetV2-style toy, 224 px   9.9 / 14.4   12.9 / 20.4   8.7 / 13.1   8.7 / 13.2
  DenseNet-121 teacher, 224 px    85.9         100.8         76.3         76.3
  teacher accuracy vs fp32 (64 NIH images): mean |logit diff| u8u8 0.025, u8s8_rr 0.033,
  u8s8 0.025; features SQNR 23.4 / 23.1 / 23.4 dB (no sign of U8S8 saturation on this model).
  teacher INT8 (u8s8_rr) gate on 195 held-out images: mean AUC 0.6764 -> 0.6762, CAM r 0.998.

U8U8 is *slower than fp32* on this CPU (its widening kernel), so it buys nothing; U8S8 with
``reduce_range`` is as fast as full-range U8S8 and cannot saturate, at a small accuracy cost
(7-bit weights) that the gate measures for every export. Hence DEFAULT_PRESET = "u8s8_rr".
Dynamic quantization is deliberately not offered (5-15x slower than static for CNNs here).
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from cxr_edge.errors import InvalidArgumentError

from .errors import ExportError
from .onnx_export import prune_opset_imports


@dataclass(frozen=True)
class QuantPreset:
    """One activation/weight type combination for ``quantize_static``."""

    name: str
    activation_type: str  # "QUInt8" | "QInt8"
    weight_type: str
    reduce_range: bool
    note: str

    def kwargs(self) -> dict[str, Any]:
        return dict(activation_type=getattr(QuantType, self.activation_type),
                    weight_type=getattr(QuantType, self.weight_type), reduce_range=self.reduce_range)


PRESETS: dict[str, QuantPreset] = {p.name: p for p in (
    QuantPreset("u8u8", "QUInt8", "QUInt8", False,
                "uint8 activations and weights: no vpmaddubsw saturation on AVX2 without VNNI"),
    QuantPreset("u8s8_rr", "QUInt8", "QInt8", True,
                "uint8 activations, 7-bit int8 weights (reduce_range): the saturation-free U8S8 variant"),
    QuantPreset("u8s8", "QUInt8", "QInt8", False,
                "full-range U8S8: may saturate on AVX2 without VNNI; for measurement only"),
    QuantPreset("s8s8", "QInt8", "QInt8", False,
                "onnxruntime's QDQ default; for measurement only"),
)}
#: Chosen from measurements on this AVX2-without-VNNI CPU: see the module docstring.
DEFAULT_PRESET = "u8s8_rr"
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}


@dataclass
class QuantResult:
    """The INT8 model and everything needed to report how it was made."""

    model_bytes: bytes
    preset: QuantPreset
    nodes_to_exclude: list[str]
    float_reasons: dict[str, str]
    calibration_images: int
    calibrate_method: str
    quantized_nodes: int = 0
    float_nodes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"preset": asdict(self.preset), "format": "QDQ", "per_channel": True,
                "calibrate_method": self.calibrate_method, "calibration_images": self.calibration_images,
                "nodes_to_exclude": self.nodes_to_exclude, "float_reasons": self.float_reasons,
                "quantized_compute_nodes": self.quantized_nodes, "float_compute_nodes": self.float_nodes,
                **self.settings}


def _load(model: bytes | onnx.ModelProto) -> onnx.ModelProto:
    return onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model


def prepare_for_quantization(model_bytes: bytes) -> bytes:
    """Step 1: ``quant_pre_process`` - symbolic shape inference and basic fusion, as recommended.

    Node names may change here, so nodes to exclude are computed on the *prepared* graph.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        src.write_bytes(model_bytes)
        try:
            quant_pre_process(str(src), str(dst), skip_optimization=False)
        except Exception as exc:  # shape inference raises untyped errors
            raise ExportError(f"quant_pre_process failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(str(dst))
    prune_opset_imports(proto)
    _name_unnamed_nodes(proto)
    return proto.SerializeToString()


def _name_unnamed_nodes(proto: onnx.ModelProto) -> None:
    """nodes_to_exclude matches node *names*; give every anonymous node a stable one."""
    seen = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def float_nodes(model: bytes | onnx.ModelProto, features_output: str, input_name: str,
                keep_first_conv: bool = True) -> dict[str, str]:
    """Names of the nodes to keep in float, each with the reason (see the module docstring)."""
    graph = _load(model).graph
    producers = {out: n for n in graph.node for out in n.output}
    if features_output not in producers:
        raise ExportError(f"no node produces the features output {features_output!r}")
    reasons: dict[str, str] = {producers[features_output].name: "produces the CAM features output"}
    frontier, seen_tensors = [features_output], {features_output}
    while frontier:  # every node downstream of features: the GAP + linear head
        tensor = frontier.pop()
        for node in graph.node:
            if tensor in node.input and node.name not in reasons:
                reasons[node.name] = "downstream of the features output (CAM head must stay float)"
                for out in node.output:
                    if out not in seen_tensors:
                        seen_tensors.add(out)
                        frontier.append(out)
    if keep_first_conv:
        first = _first_conv(graph, input_name)
        if first is not None and first.name not in reasons:
            reasons[first.name] = "first convolution (raw normalised pixels)"
    return reasons


def _first_conv(graph: onnx.GraphProto, input_name: str) -> onnx.NodeProto | None:
    """The Conv nearest to the graph input (breadth-first over consumers)."""
    frontier, seen = [input_name], {input_name}
    while frontier:
        nxt = []
        for tensor in frontier:
            for node in graph.node:
                if tensor in node.input:
                    if node.op_type == "Conv":
                        return node
                    for out in node.output:
                        if out not in seen:
                            seen.add(out)
                            nxt.append(out)
        frontier = nxt
    return None


def quantize_int8(model_bytes: bytes, reader: CalibrationDataReader, *, features_output: str, input_name: str,
                  preset: str = DEFAULT_PRESET, calibrate_method: str = "minmax", keep_first_conv: bool = True,
                  extra_exclude: Iterable[str] = (), prepared: bool = False) -> QuantResult:
    """Step 2: static QDQ quantization with per-channel weights; the CAM head stays float.

    ``reader`` yields real preprocessed images (``export.calibration``). ``prepared`` says that
    ``model_bytes`` already went through :func:`prepare_for_quantization`.
    """
    if preset not in PRESETS:
        raise InvalidArgumentError(f"quantization preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise InvalidArgumentError(f"calibrate_method must be one of {sorted(CALIBRATION_METHODS)}")
    prepared_bytes = model_bytes if prepared else prepare_for_quantization(model_bytes)
    proto = onnx.load_from_string(prepared_bytes)
    reasons = float_nodes(proto, features_output, input_name, keep_first_conv)
    names = {n.name for n in proto.graph.node}
    for name in extra_exclude:
        if name not in names:
            raise InvalidArgumentError(f"node {name!r} to exclude is not in the graph")
        reasons.setdefault(name, "excluded on request")
    exclude = sorted(reasons)
    p = PRESETS[preset]
    n_images = len(reader) if hasattr(reader, "__len__") else -1
    if hasattr(reader, "rewind"):
        reader.rewind()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(prepared_bytes)
        try:
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            nodes_to_exclude=exclude, calibrate_method=CALIBRATION_METHODS[calibrate_method],
                            **p.kwargs())
        except Exception as exc:
            raise ExportError(f"quantize_static failed: {type(exc).__name__}: {exc}") from exc
        qproto = onnx.load(str(dst))
    qproto.producer_name = "cxr-edge-export"
    prune_opset_imports(qproto)
    _check_head_float(qproto, features_output)
    compute = {"Conv", "Gemm", "MatMul"}
    quantized = sum(1 for n in qproto.graph.node if n.op_type in compute and n.name not in reasons)
    kept = sum(1 for n in qproto.graph.node if n.op_type in compute and n.name in reasons)
    return QuantResult(qproto.SerializeToString(), p, exclude, reasons, n_images, calibrate_method,
                       quantized_nodes=quantized, float_nodes=kept)


def _check_head_float(qproto: onnx.ModelProto, features_output: str) -> None:
    """The quantizer must not have put Q/DQ between ``features`` and the logits (head identity)."""
    graph = qproto.graph
    consumers = [n for n in graph.node if features_output in n.input]
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in consumers):
        raise ExportError("the quantizer inserted Q/DQ on the features output; the CAM head would not be float")
    out_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    if out_types.get(features_output) != onnx.TensorProto.FLOAT:
        raise ExportError("the INT8 model's features output is not a float tensor")


def debug_quantization(float_prepared: bytes, int8_bytes: bytes, reader: CalibrationDataReader,
                       worst: int = 10) -> dict[str, Any]:
    """Step 3: ``qdq_loss_debug`` - SQNR (dB, higher is better) of every quantized activation and weight.

    ``float_prepared`` must be the prepared fp32 graph that was quantized (tensor names match).
    Returns the ``worst`` activations and weights, lowest SQNR first.
    """
    from onnxruntime.quantization import qdq_loss_debug as qdbg

    with tempfile.TemporaryDirectory() as tmp:
        fp, qp = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        fa, qa = Path(tmp) / "fp32_aug.onnx", Path(tmp) / "int8_aug.onnx"
        fp.write_bytes(float_prepared)
        qp.write_bytes(int8_bytes)
        qdbg.modify_model_output_intermediate_tensors(str(fp), str(fa))
        qdbg.modify_model_output_intermediate_tensors(str(qp), str(qa))
        _rewind(reader)
        float_acts = qdbg.collect_activations(str(fa), reader)
        _rewind(reader)
        qdq_acts = qdbg.collect_activations(str(qa), reader)
        act_err = qdbg.compute_activation_error(qdbg.create_activation_matching(qdq_acts, float_acts))
        w_match = qdbg.create_weight_matching(str(fp), str(qp))
    # (near-)zero tensors (e.g. a folded bias that is 0 up to float rounding) have no signal: an SQNR of
    # 0 dB there means nothing, so they are left out of the ranking
    w_match = {k: v for k, v in w_match.items() if float(np.abs(v["float"]).max()) > 1e-6}
    w_err = qdbg.compute_weight_error(w_match)

    def finite(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    acts = sorted(((name, e.get("xmodel_err", np.inf), e.get("qdq_err", np.inf)) for name, e in act_err.items()),
                  key=lambda t: t[1])
    weights = sorted(w_err.items(), key=lambda t: t[1])
    return {
        "metric": "SQNR dB (signal power / quantization-noise power, 10 log10); higher is better",
        "note": ("vs_float_model_db: the INT8 graph's activation vs the fp32 graph's (accumulated error); "
                 "qdq_only_db: one Q/DQ round trip. Where the quantizer folded a ReLU into the Q range the "
                 "latter compares pre-ReLU with post-ReLU values (~3 dB) and means nothing."),
        "activations_worst": [{"tensor": n, "vs_float_model_db": finite(x), "qdq_only_db": finite(q)}
                              for n, x, q in acts[:worst]],
        "weights_worst": [{"tensor": n, "db": finite(v)} for n, v in weights[:worst]],
        "activations_compared": len(acts), "weights_compared": len(weights),
    }


def _rewind(reader: CalibrationDataReader) -> None:
    if hasattr(reader, "rewind"):
        reader.rewind()
    else:
        raise InvalidArgumentError("debug_quantization needs a reader with rewind() (ArrayCalibrationReader)")
