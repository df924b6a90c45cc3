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
    input grid costs accuracy for no speed;
  * optionally the first N convolutions (``float_leading_convs``, default 1 = the rule above) and every node
    before them. Only such a *prefix* stays float at run time: onnxruntime's ``WeightBiasQuantization``
    (ORT 1.32, at session load) gives any Conv/Gemm whose input is dequantized per-tensor int8 weights, so
    excluding a mid-graph node (e.g. "keep the depthwise convs float") makes it *worse* than per-channel
    INT8; :func:`quantize_int8` refuses such requests (:func:`runtime_requantized`).

EfficientNet-Lite0 (runs/stride/plain-s32, 224 px, fp32 mean AUC 0.693; 195 held-out images)::

    python -m export --run runs/stride/plain-s32 --format int8 --calib-images 200 --out q.int8.onnx \
        --debug-quant --fallback-fp32 [--preset P] [--float-leading-convs N]

  preset, N     AUC change  flip rate  mean|dlogit|  CAM r  gate   INT8/fp32 latency (1 thread)
  u8s8_rr, 1    +0.57       8.4%       0.43          0.944  fail   0.50-0.55
  u8s8_rr, 6    +0.38       2.9%       0.14          0.989  fail   0.61-0.63
  u8s8, 1       +1.00       5.1%       0.25          0.975  fail   0.53
  u8s8, 6       +0.39       1.8%       0.079         0.997  pass   0.61-0.64
  s8s8, 6 / u8u8, 6: pass too (1.98% / 1.83% flips) but run at 0.95x / 4.0x fp32 time here.
  Per-node sensitivity (one node quantized, the rest float) puts block 0's depthwise conv first by 2x
  (mean |dlogit| 0.34 alone): BN folding gives its filters weights up to 28, which amplify the 8-bit grid
  of the stem's output; blocks 0-1 follow. The 6 leading convs are the stem and blocks 0-1 (valid cuts:
  up to 12: 1-6, 9-12; the others split a residual). Calibration did not help (percentile +0.68 / 8.0%;
  entropy equals minmax in ORT 1.32, whose quantize_static fixes 128 histogram bins = 128 quantized bins;
  CalibMovingAverage 8.9%), nor did keeping the 4 worst nodes by debug SQNR float (late project convs:
  they only accumulate upstream error). The AUC change is the noisy criterion: u8s8, 6 with 400
  calibration images has the same flips (1.8%) and |dlogit| (0.079) but +0.51 points, a fail.
  Why u8s8, 6 is not the default: full-range U8S8 needs VNNI (this machine: AVX-512 VNNI) or ARM. An
  emulation of AVX2's vpmaddubsw (assuming it pairs adjacent input channels) on this model's real
  activations (64 held-out images) finds 1.9e-4 of the pointwise convs' u8 x s8 pairs beyond int16, in 28
  of the 29, so on AVX2 without VNNI it would saturate and this gate result would not carry over. Export
  with ``--preset u8s8 --float-leading-convs 6`` only for VNNI/ARM devices.

Presets (measured on an AVX2 CPU *without* VNNI). MLAS' U8S8 kernel uses ``vpmaddubsw``, which adds two
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

U8U8 is *slower than fp32* on that CPU (its widening kernel), so it buys nothing; U8S8 with
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
#: Chosen from measurements on an AVX2-without-VNNI CPU: see the module docstring.
DEFAULT_PRESET = "u8s8_rr"
#: Convolutions kept float from the input on (with everything before them); 1 = the first conv only.
#: EfficientNet-Lite0 needs 6 (with full-range weights) to pass the gate: see the module docstring.
DEFAULT_FLOAT_LEADING_CONVS = 1
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
                leading_convs: int = DEFAULT_FLOAT_LEADING_CONVS) -> dict[str, str]:
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
    for name, why in leading_float_region(graph, input_name, leading_convs).items():
        reasons.setdefault(name, why)
    return reasons


def leading_float_region(model: bytes | onnx.ModelProto | onnx.GraphProto, input_name: str,
                         convs: int) -> dict[str, str]:
    """The first ``convs`` Conv nodes and every node before them in topological order, each with the reason.

    Why a *prefix*: a topological prefix consumes only the graph input and its own outputs, so its nodes see
    float tensors only and onnxruntime cannot re-quantize them at load (:func:`runtime_requantized`) - provided
    the cut does not split a residual connection (refused, with the values that work). The first convolution
    sees the raw normalised pixels; on EfficientNet-Lite0 the next ones (block 0's depthwise, BN-folded
    filter weights up to 28) amplify 8-bit input noise most (module docstring).
    """
    if not isinstance(convs, int) or isinstance(convs, bool) or convs < 0:
        raise InvalidArgumentError(f"float_leading_convs must be an integer >= 0, got {convs!r}")
    graph = model if isinstance(model, onnx.GraphProto) else _load(model).graph
    if convs == 0:
        return {}
    if convs == 1:  # the historical rule, by graph distance from the input (independent of node order)
        first = _first_conv(graph, input_name)
        return {first.name: "first convolution (raw normalised pixels)"} if first is not None else {}
    out = _prefix(graph, convs)
    if out is None:
        raise InvalidArgumentError(f"float_leading_convs={convs}: the graph has fewer convolutions than that "
                                   "before its end; nothing would be quantized")
    if not _clean_cut(graph, out):
        valid = [k for k in range(2, convs + 8) if (r := _prefix(graph, k)) is not None and _clean_cut(graph, r)]
        raise InvalidArgumentError(
            f"float_leading_convs={convs} cuts through a residual connection: a float tensor inside the region "
            "also feeds a quantized node, so it gets Q/DQ and the float convolutions after it would be "
            f"re-quantized by onnxruntime at load; valid values here: 0, 1, {', '.join(map(str, valid))}, ...")
    why = (f"leading float region (float_leading_convs={convs}; only float inputs, so onnxruntime cannot "
           "re-quantize it at load)")
    first = next(n for n in graph.node if n.name in out and n.op_type == "Conv")
    return {name: "first convolution (raw normalised pixels)" if name == first.name else why for name in out}


def _prefix(graph: onnx.GraphProto, convs: int) -> list[str] | None:
    """Names of the nodes before the (convs+1)-th Conv in topological order; None if that leaves nothing."""
    out, seen = [], 0
    for node in graph.node:  # ONNX graphs are topologically sorted (the checker enforces it)
        if node.op_type == "Conv":
            if seen == convs:
                return out
            seen += 1
        out.append(node.name)
    return None


def _clean_cut(graph: onnx.GraphProto, region: Iterable[str]) -> bool:
    """No tensor made inside ``region`` feeds both a node inside it and one outside (the outside consumer
    would quantize it, and the Q/DQ pair is shared with the inside consumer)."""
    inside = set(region)
    made = {o for n in graph.node if n.name in inside for o in n.output}
    consumers: dict[str, set[bool]] = {}
    for node in graph.node:
        for t in node.input:
            if t in made:
                consumers.setdefault(t, set()).add(node.name in inside)
    return all(len(where) == 1 for where in consumers.values())


def runtime_requantized(qproto: onnx.ModelProto, float_names: Iterable[str]) -> list[str]:
    """Nodes meant to stay float that onnxruntime's ``WeightBiasQuantization`` optimizer quantizes anyway.

    At session load (graph optimisation level >= basic) it gives every Conv/ConvTranspose/Gemm whose input 0
    comes from a per-tensor DequantizeLinear and whose weight is a float initializer *per-tensor* int8
    weights - worse than the per-channel weights ``quantize_static`` would have used (measured: keeping the
    depthwise convolutions "float" this way raised the decision flip rate, module docstring).
    """
    graph = qproto.graph
    producers = {out: n for n in graph.node for out in n.output}
    inits = {i.name: i for i in graph.initializer}
    scalar = {name for name, i in inits.items() if len(i.dims) == 0 or (len(i.dims) == 1 and i.dims[0] == 1)}
    hit = []
    for node in graph.node:
        if node.name not in float_names or node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        src = producers.get(node.input[0])
        weight = inits.get(node.input[1])
        if (src is not None and src.op_type == "DequantizeLinear" and src.input[1] in scalar and weight is not None
                and weight.data_type == onnx.TensorProto.FLOAT):
            hit.append(node.name)
    return hit


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
                  preset: str = DEFAULT_PRESET, calibrate_method: str = "minmax",
                  float_leading_convs: int = DEFAULT_FLOAT_LEADING_CONVS, extra_exclude: Iterable[str] = (),
                  prepared: bool = False) -> QuantResult:
    """Step 2: static QDQ quantization with per-channel weights; the CAM head stays float.

    ``reader`` yields real preprocessed images (``export.calibration``). ``prepared`` says that
    ``model_bytes`` already went through :func:`prepare_for_quantization`. ``float_leading_convs``: the first
    N convolutions and everything before them stay float (:func:`leading_float_region`; 0: none).
    ``extra_exclude`` nodes that onnxruntime would re-quantize at load (:func:`runtime_requantized`) are refused.
    """
    if preset not in PRESETS:
        raise InvalidArgumentError(f"quantization preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise InvalidArgumentError(f"calibrate_method must be one of {sorted(CALIBRATION_METHODS)}")
    prepared_bytes = model_bytes if prepared else prepare_for_quantization(model_bytes)
    proto = onnx.load_from_string(prepared_bytes)
    reasons = float_nodes(proto, features_output, input_name, float_leading_convs)
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
    requantized = runtime_requantized(qproto, reasons)
    if requantized:
        raise InvalidArgumentError(
            f"node(s) {requantized} cannot stay float: their input is dequantized, so onnxruntime's "
            "WeightBiasQuantization gives them per-tensor int8 weights at load (worse than per-channel); keep "
            "their producers float too (float_leading_convs) or let them be quantized")
    compute = {"Conv", "Gemm", "MatMul"}
    quantized = sum(1 for n in qproto.graph.node if n.op_type in compute and n.name not in reasons)
    kept = sum(1 for n in qproto.graph.node if n.op_type in compute and n.name in reasons)
    return QuantResult(qproto.SerializeToString(), p, exclude, reasons, n_images, calibrate_method,
                       quantized_nodes=quantized, float_nodes=kept,
                       settings={"float_leading_convs": float_leading_convs})


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
