"""Parameters and MACs counted from an ONNX graph, the way a paper's table counts them.

Why ``onnx`` and not onnxruntime: onnxruntime exposes neither initializers nor inferred shapes.
Devices install only the runtime, so when ``onnx`` is not importable the counts are reported as
unavailable ("n/a (install onnx)") rather than guessed.

Counting rules (per image, i.e. batch dimension fixed to 1):

* MACs (multiply-accumulates); FLOPs = 2 x MACs. Counted ops: ``Conv`` (grouped and depthwise
  included: out_elements x in_channels/group x kernel), ``ConvTranspose`` (in_elements x
  out_channels/group x kernel), ``Gemm`` (M x N x K), ``MatMul`` (out_elements x K), and their
  quantized forms ``QLinearConv``, ``ConvInteger``, ``QLinearMatMul``, ``MatMulInteger``, ``QGemm``,
  ``FusedConv`` counted as the float-equivalent op. In a QDQ INT8 model the convs stay ``Conv`` nodes
  fed by ``DequantizeLinear`` and are counted the same way. Bias adds, normalisation, activations
  and pooling are not counted. Nodes whose shapes shape-inference cannot resolve are listed in
  ``uncounted`` (the MAC count is then a lower bound).
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
from typing import Any

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

UNAVAILABLE_REASON = "n/a (install onnx to count parameters and MACs)"


@dataclass
class GraphStats:
    """What the graph costs per image; ``available`` is False when ``onnx`` is not installed."""

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


def _fix_batch(model) -> None:
    """Give every symbolic/unknown dim of the graph inputs the value 1, so shapes infer concretely."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        for dim in inp.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1
    del model.graph.value_info[:]


def _shape_table(model) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _attr(node, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == 2 else (list(a.ints) if a.type == 7 else default)
    return default


def _node_macs(node, shapes: dict[str, list[int | None]]) -> tuple[int | None, bool]:
    """(MACs of one node per image or None when shapes are unknown, is_depthwise)."""
    op = node.op_type
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    out = shapes.get(node.output[0]) if node.output else None
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


def _count_params(model) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    # DequantizeLinear output -> its quantized initializer, so W -> DQ -> Conv counts the int8 W
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits}
    weights: set[str] = set()
    excluded: set[str] = set()
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
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


def graph_stats(model: str | os.PathLike | bytes) -> GraphStats:
    """Count parameters and per-image MACs of an ONNX model (path or bytes); see the module rules."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return GraphStats(available=False, reason=UNAVAILABLE_REASON)
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else onnx.load(os.fspath(model))
    params = _count_params(proto)
    _fix_batch(proto)
    try:
        inferred = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # onnx raises its own error types for malformed graphs
        return GraphStats(available=True, params=params, reason=f"shape inference failed: {exc}")
    shapes = _shape_table(inferred)
    total = depthwise = 0
    by_op: dict[str, int] = {}
    uncounted: list[dict[str, str]] = []
    quant_ops = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul",
                 "MatMulInteger", "QGemm"}
    quantized = False
    for node in inferred.graph.node:
        quantized = quantized or node.op_type in quant_ops
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
                      depthwise_macs=depthwise, quantized=quantized, uncounted=uncounted)
