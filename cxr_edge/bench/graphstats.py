"""Parameters and MACs counted from an ONNX graph, the way a paper's table counts them, without ``onnx``.

Devices install only onnxruntime, so the graph is read with the protobuf walk of
:mod:`cxr_edge.bench.onnxwalk` (initializer dims, node attributes) and the concrete shape of every
tensor a counted op reads or writes is taken from onnxruntime itself: the model is run once at
batch 1 with those tensors added as graph outputs (graph optimisations off, so every node is
there). No shape inference is re-implemented, and the counts are the same with or without the
``onnx`` package. When the graph cannot be run here (a non-float input such as the in-graph
preprocessing variant's encoded bytes, a symbolic spatial size without a hint, a custom op), the
parameters are still counted and the MACs are reported as unavailable with the reason.

Counting rules (per image, i.e. batch dimension fixed to 1):

* MACs (multiply-accumulates); FLOPs = 2 x MACs. Counted ops: ``Conv`` (grouped and depthwise
  included: out_elements x in_channels/group x kernel), ``ConvTranspose`` (in_elements x
  out_channels/group x kernel), ``Gemm`` (M x N x K), ``MatMul`` (out_elements x K), and their
  quantized forms ``QLinearConv``, ``ConvInteger``, ``QLinearMatMul``, ``MatMulInteger``, ``QGemm``,
  ``FusedConv`` counted as the float-equivalent op. In a QDQ INT8 model the convs stay ``Conv`` nodes
  fed by ``DequantizeLinear`` and are counted the same way. Bias adds, normalisation, activations
  and pooling are not counted. Nodes whose shapes could not be resolved are listed in ``uncounted``
  (the MAC count is then a lower bound).
* Parameters: elements of initializers that are weights. An initializer counts when it is the
  weight or bias input of a compute op (Conv/ConvTranspose/Gemm/MatMul W and B, BatchNorm and
  Layer/InstanceNorm scale and bias, PRelu slope), directly or through a ``DequantizeLinear``
  (INT8 weights count once, as their int8 elements); any other floating-point initializer with
  at least 2 elements also counts. Never counted: BatchNorm running mean/variance (buffers, not
  parameters, as in PyTorch), quantization scales and zero points, integer shape/axes/index
  constants, and single-element float constants.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bundle import session_options
from .onnxwalk import Graph, Node, parse_model, with_outputs

# op type -> (input index of X, input index of W); out-of-graph conventions of the quantized forms
_CONV_OPS = {"Conv": (0, 1), "FusedConv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3),
             "NhwcConv": (0, 1)}
_CONVT_OPS = {"ConvTranspose": (0, 1)}
_GEMM_OPS = {"Gemm": (0, 1), "QGemm": (0, 3)}
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "FusedMatMul": (0, 1)}

# op type -> input positions that hold weights or biases (parameters)
_WEIGHT_ROLES = {
    "Conv": (1, 2), "FusedConv": (1, 2), "NhwcConv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2),
    "MatMul": (1,), "FusedMatMul": (1,), "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2), "PRelu": (1,),
    "QLinearConv": (3, 8), "ConvInteger": (1,), "QLinearMatMul": (3,), "MatMulInteger": (1,), "QGemm": (3, 6),
}
# op type -> input positions that are never parameters (buffers, quantization metadata)
_EXCLUDED_ROLES = {
    "BatchNormalization": (3, 4), "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7), "ConvInteger": (2, 3),
    "MatMulInteger": (2, 3), "QGemm": (1, 2, 4, 5, 7, 8),
}
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto enum values)

_NP_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}


@dataclass
class GraphStats:
    """What the graph costs per image; ``available`` is False when the file is not a readable ONNX graph."""

    available: bool
    params: int | None = None
    macs: int | None = None
    flops: int | None = None
    macs_by_op: dict[str, int] = field(default_factory=dict)
    depthwise_macs: int = 0
    quantized: bool = False
    uncounted: list[dict[str, str]] = field(default_factory=list)
    reason: str = ""
    rule: str = ("MACs per image (batch 1) of Conv/ConvTranspose/Gemm/MatMul incl. grouped, depthwise and "
                 "quantized forms; FLOPs = 2 x MACs; params = weight/bias initializers, no BN running stats, "
                 "no quantization scales/zero points, no shape constants")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _attr(node: Node, name: str, default: Any) -> Any:
    return node.attrs.get(name, default)


def _node_macs(node: Node, shapes: dict[str, list[int | None]]) -> tuple[int | None, bool]:
    """(MACs of one node per image or None when shapes are unknown, is_depthwise)."""
    op = node.op_type
    get = lambda i: shapes.get(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] else None  # noqa: E731
    out = shapes.get(node.outputs[0]) if node.outputs else None
    if op in _CONV_OPS:
        xi, wi = _CONV_OPS[op]
        w, x = get(wi), get(xi)
        if not (_known(w) and _known(out)):
            return None, False
        group = int(_attr(node, "group", 1))
        channels_in = x[1] if _known(x) and len(x) > 1 else w[1] * group
        depthwise = group > 1 and group == channels_in and w[1] == 1
        return _numel(out) * _numel(w[1:]), depthwise
    if op in _CONVT_OPS:
        xi, wi = _CONVT_OPS[op]
        w, x = get(wi), get(xi)
        if not (_known(w) and _known(x)):
            return None, False
        return _numel(x) * _numel(w[1:]), False
    if op in _GEMM_OPS:
        ai, _ = _GEMM_OPS[op]
        a = get(ai)
        if not (_known(a) and _known(out)) or len(a) != 2:
            return None, False
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return _numel(out) * k, False
    if op in _MATMUL_OPS:
        ai, _ = _MATMUL_OPS[op]
        a = get(ai)
        if not (_known(a) and _known(out)):
            return None, False
        return _numel(out) * a[-1], False
    return 0, False


def _count_params(graph: Graph) -> int:
    inits = graph.initializers
    # DequantizeLinear output -> its quantized initializer, so W -> DQ -> Conv counts the int8 W
    dq_source = {n.outputs[0]: n.inputs[0] for n in graph.nodes
                 if n.op_type == "DequantizeLinear" and n.inputs and n.outputs and n.inputs[0] in inits}
    weights: set[str] = set()
    excluded: set[str] = set()
    for node in graph.nodes:
        for pos, name in enumerate(node.inputs):
            if not name:
                continue
            if pos in _WEIGHT_ROLES.get(node.op_type, ()):
                source = name if name in inits else dq_source.get(name)
                if source is not None:
                    weights.add(source)
            if pos in _EXCLUDED_ROLES.get(node.op_type, ()) and name in inits:
                excluded.add(name)
    total = 0
    for name, init in inits.items():
        n = _numel(init.dims)
        if name in weights:
            total += n
        elif name not in excluded and init.data_type in _FLOAT_TYPES and n >= 2:
            total += n
    return total


_COUNTED = set(_CONV_OPS) | set(_CONVT_OPS) | set(_GEMM_OPS) | set(_MATMUL_OPS)
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul",
              "MatMulInteger", "QGemm"}


def _feeds(graph: Graph, input_hw: Sequence[int] | None) -> tuple[dict[str, np.ndarray] | None, str]:
    """Zero inputs at batch 1 for every real graph input, or (None, reason)."""
    feeds: dict[str, np.ndarray] = {}
    for vi in graph.inputs:
        if vi.name in graph.initializers:
            continue
        dtype = _NP_TYPES.get(vi.elem_type or 0)
        if dtype is None:
            return None, f"graph input {vi.name!r} is not a float tensor (elem_type {vi.elem_type}): MACs not measured"
        if vi.dims is None:
            return None, f"graph input {vi.name!r} has no shape: MACs not measured"
        dims = list(vi.dims)
        if dims and dims[0] is None:
            dims[0] = 1
        if len(dims) == 4 and input_hw is not None:
            dims[2] = dims[2] or int(input_hw[0])
            dims[3] = dims[3] or int(input_hw[1])
        if any(d is None for d in dims):
            return None, f"graph input {vi.name!r} has a symbolic size {vi.dims} and no hint: MACs not measured"
        feeds[vi.name] = np.zeros(dims, dtype=dtype)
    return feeds, ""


def _runtime_shapes(model: bytes, graph: Graph, input_hw: Sequence[int] | None
                    ) -> tuple[dict[str, list[int | None]] | None, str]:
    """Concrete shapes (batch 1) of the tensors counted ops touch, measured by onnxruntime."""
    feeds, reason = _feeds(graph, input_hw)
    if feeds is None:
        return None, reason
    inits = graph.initializers
    existing = {o.name for o in graph.outputs}
    wanted: list[str] = []
    for node in graph.nodes:
        if node.op_type not in _COUNTED:
            continue
        for name in list(node.inputs) + list(node.outputs[:1]):
            if name and name not in inits and name not in feeds and name not in existing and name not in wanted:
                wanted.append(name)
    try:
        import onnxruntime as ort

        opts = session_options(1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # shapes as written
        opts.log_severity_level = 4  # a failing run is reported in the result, not logged
        session = ort.InferenceSession(with_outputs(model, wanted), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception as exc:  # onnxruntime's own error types: custom ops, bad graphs
        return None, f"onnxruntime could not run the graph to measure shapes ({type(exc).__name__}): MACs not measured"
    shapes: dict[str, list[int | None]] = {name: list(v.shape) for name, v in zip(names, values)}
    shapes.update({name: list(v.shape) for name, v in feeds.items()})
    for name, init in inits.items():
        shapes[name] = list(init.dims)
    for node in graph.nodes:  # W -> DequantizeLinear -> Conv: the DQ output has its initializer's shape
        if node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] in inits and node.outputs:
            shapes.setdefault(node.outputs[0], list(inits[node.inputs[0]].dims))
    return shapes, ""


def graph_stats(model: str | os.PathLike | bytes, input_hw: Sequence[int] | None = None) -> GraphStats:
    """Count parameters and per-image MACs of an ONNX model (path or bytes); see the module rules.

    ``input_hw`` fills a symbolic spatial input size (a bundle's ``preprocessing.input_size``).
    Needs onnxruntime only.
    """
    try:
        data = bytes(model) if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
        graph = parse_model(data)
    except Exception as exc:  # not a file, not ONNX, truncated protobuf
        return GraphStats(available=False, reason=f"not a readable ONNX graph ({type(exc).__name__}: {exc})")
    params = _count_params(graph)
    quantized = any(n.op_type in _QUANT_OPS for n in graph.nodes)
    shapes, reason = _runtime_shapes(data, graph, input_hw)
    if shapes is None:
        return GraphStats(available=True, params=params, quantized=quantized, reason=reason)
    total = depthwise = 0
    by_op: dict[str, int] = {}
    uncounted: list[dict[str, str]] = []
    for node in graph.nodes:
        macs, is_dw = _node_macs(node, shapes)
        if macs is None:
            uncounted.append({"node": node.name, "op": node.op_type})
            continue
        if macs:
            key = "Conv (depthwise)" if is_dw else node.op_type
            by_op[key] = by_op.get(key, 0) + macs
            total += macs
            depthwise += macs if is_dw else 0
    return GraphStats(available=True, params=params, macs=total, flops=2 * total, macs_by_op=by_op,
                      depthwise_macs=depthwise, quantized=quantized, uncounted=uncounted,
                      reason="shapes measured by onnxruntime (one run at batch 1)")
