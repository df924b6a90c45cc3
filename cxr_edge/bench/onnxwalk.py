"""A read-only walk of an ONNX ``ModelProto`` without the ``onnx`` package (devices have only onnxruntime).

Built on the protobuf field walk of :mod:`cxr_edge.bundle`; decodes just what the graph-cost count
needs: nodes (op type, inputs, outputs, integer attributes), initializers (name, dims, data type,
never their data), and the graph's inputs/outputs/value_info (name, element type, dims).
:func:`with_outputs` appends extra graph outputs, so onnxruntime itself can report the concrete
shape of any intermediate tensor (one run at batch 1): no shape inference has to be written here.

Field numbers are those of ``onnx.proto`` (proto2): ModelProto.graph = 7; GraphProto node = 1,
initializer = 5, input = 11, output = 12, value_info = 13; NodeProto input = 1, output = 2, name = 3,
op_type = 4, attribute = 5; AttributeProto name = 1, i = 3, ints = 8, type = 20; TensorProto dims = 1,
data_type = 2, name = 8; ValueInfoProto name = 1, type = 2; TypeProto.tensor_type = 1; elem_type = 1,
shape = 2; TensorShapeProto.dim = 1; dim_value = 1, dim_param = 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..bundle import _encode_varint, _fields, _len_field, _read_varint
from ..errors import BundleError

MODEL_GRAPH = 7
G_NODE, G_INITIALIZER, G_INPUT, G_OUTPUT, G_VALUE_INFO = 1, 5, 11, 12, 13


@dataclass
class Node:
    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, int | list[int]] = field(default_factory=dict)


@dataclass
class Initializer:
    name: str
    dims: list[int]
    data_type: int


@dataclass
class ValueInfo:
    name: str
    elem_type: int | None
    dims: list[int | None] | None  # None: no shape; an entry None: symbolic or unknown


@dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, Initializer]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    value_info: list[ValueInfo]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _varint_value(msg: bytes, start: int) -> int:
    """The value of a wire-0 field whose tag starts at ``start``."""
    _, pos = _read_varint(msg, start)  # the tag
    v, _ = _read_varint(msg, pos)
    return _signed(v)


def _text(msg: bytes, payload: int, end: int) -> str:
    return msg[payload:end].decode("utf-8", errors="replace")


def _ints(msg: bytes, number_wanted: int) -> list[int]:
    out: list[int] = []
    for number, wire, start, payload, end in _fields(msg):
        if number != number_wanted:
            continue
        if wire == 0:
            out.append(_varint_value(msg, start))
        elif wire == 2:
            pos = payload
            while pos < end:
                v, pos = _read_varint(msg, pos)
                out.append(_signed(v))
    return out


def _attribute(msg: bytes) -> tuple[str, int | list[int] | None]:
    """(name, value) of an INT or INTS attribute; other kinds give None (not needed here)."""
    name, value, kind = "", None, None
    ints: list[int] = []
    for number, wire, start, payload, end in _fields(msg):
        if number == 1 and wire == 2:
            name = _text(msg, payload, end)
        elif number == 3 and wire == 0:
            value = _varint_value(msg, start)
        elif number == 20 and wire == 0:
            kind = _varint_value(msg, start)
        elif number == 8 and wire == 0:
            ints.append(_varint_value(msg, start))
        elif number == 8 and wire == 2:
            pos = payload
            while pos < end:
                v, pos = _read_varint(msg, pos)
                ints.append(_signed(v))
    if kind == 7 or (kind is None and ints):
        return name, ints
    if kind == 2 or (kind is None and value is not None):
        return name, value if value is not None else 0
    return name, None


def _node(msg: bytes) -> Node:
    node = Node(op_type="", name="", inputs=[], outputs=[])
    for number, wire, start, payload, end in _fields(msg):
        if wire != 2:
            continue
        if number == 1:
            node.inputs.append(_text(msg, payload, end))
        elif number == 2:
            node.outputs.append(_text(msg, payload, end))
        elif number == 3:
            node.name = _text(msg, payload, end)
        elif number == 4:
            node.op_type = _text(msg, payload, end)
        elif number == 5:
            key, value = _attribute(msg[payload:end])
            if key and value is not None:
                node.attrs[key] = value
    return node


def _initializer(msg: bytes) -> Initializer:
    name, data_type = "", 0
    for number, wire, start, payload, end in _fields(msg):
        if number == 8 and wire == 2:
            name = _text(msg, payload, end)
        elif number == 2 and wire == 0:
            data_type = _varint_value(msg, start)
    return Initializer(name=name, dims=_ints(msg, 1), data_type=data_type)


def _value_info(msg: bytes) -> ValueInfo:
    name, elem, dims = "", None, None
    for number, wire, start, payload, end in _fields(msg):
        if number == 1 and wire == 2:
            name = _text(msg, payload, end)
        elif number == 2 and wire == 2:
            type_msg = msg[payload:end]
            for tn, tw, _, tp, te in _fields(type_msg):
                if tn != 1 or tw != 2:  # only tensor_type
                    continue
                tensor = type_msg[tp:te]
                for fn, fw, fs, fp, fe in _fields(tensor):
                    if fn == 1 and fw == 0:
                        elem = _varint_value(tensor, fs)
                    elif fn == 2 and fw == 2:
                        dims = []
                        shape = tensor[fp:fe]
                        for dn, dw, _, dp, de in _fields(shape):
                            if dn != 1 or dw != 2:
                                continue
                            dim = shape[dp:de]
                            value = None
                            for xn, xw, xs, _, _ in _fields(dim):
                                if xn == 1 and xw == 0:
                                    value = _varint_value(dim, xs)
                            dims.append(value if value is not None and value > 0 else None)
    return ValueInfo(name=name, elem_type=elem, dims=dims)


def _graph_span(model: bytes) -> tuple[int, int, int, int]:
    """(field start, payload start, end) of ModelProto.graph, plus the field count seen."""
    for number, wire, start, payload, end in _fields(model):
        if number == MODEL_GRAPH and wire == 2:
            return start, payload, end, 1
    raise BundleError("not an ONNX model: no graph")


def parse_model(model: bytes) -> Graph:
    """Nodes, initializers (metadata only) and value infos of the main graph (subgraphs are not walked)."""
    _, payload, end, _ = _graph_span(model)
    g = model[payload:end]
    graph = Graph(nodes=[], initializers={}, inputs=[], outputs=[], value_info=[])
    for number, wire, start, p, e in _fields(g):
        if wire != 2:
            continue
        if number == G_NODE:
            graph.nodes.append(_node(g[p:e]))
        elif number == G_INITIALIZER:
            init = _initializer(g[p:e])
            graph.initializers[init.name] = init
        elif number == G_INPUT:
            graph.inputs.append(_value_info(g[p:e]))
        elif number == G_OUTPUT:
            graph.outputs.append(_value_info(g[p:e]))
        elif number == G_VALUE_INFO:
            graph.value_info.append(_value_info(g[p:e]))
    return graph


def with_outputs(model: bytes, names: list[str]) -> bytes:
    """The model with ``names`` appended as (untyped) graph outputs; onnxruntime infers their types."""
    start, payload, end, _ = _graph_span(model)
    extra = b"".join(_len_field(G_OUTPUT, _len_field(1, n.encode("utf-8"))) for n in names)
    graph = model[payload:end] + extra
    return model[:start] + _encode_varint((MODEL_GRAPH << 3) | 2) + _encode_varint(len(graph)) + graph + model[end:]
