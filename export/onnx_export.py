"""PyTorch CAM network -> ONNX graph with two outputs: logits and the pre-pool features.

Why two outputs: the runtime draws class activation maps from ``features`` with the classifier
weights stored in the manifest, and checks ``GAP(features) @ W.T + b == logits`` on load. The
graph is exported from a wrapper so the names come from the manifest, never hard-coded.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cxr_edge.bundle import session_options
from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec

from .errors import ExportError, ParityError

DEFAULT_OPSET = 18  # >= 17 required; 18 lets the in-graph variant use Resize(antialias=1) without conversion
EXPORTERS = ("torchscript", "dynamo")
#: fp32 ONNX vs PyTorch on real images: CPU kernels differ (im2col/Winograd, fused BN, summation
#: order), so outputs agree to ~1e-5 relative; the gate allows atol' + rtol * |reference|, where
#: atol' = atol * max(1, max |reference|) scales with the tensor's range: a ReLU6 activation that is
#: ~0 in one kernel and 1.2e-4 in the other (a 1e-5 relative rounding of a pre-activation of ~12)
#: is the same computation, not a wrong export (seen on the session-15 Lite0 features, range 0-6).
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3


class FeatureHeadWrapper(nn.Module):
    """``x -> (head(features(x)), features(x))`` for any model with the CAM contract."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for attr in ("features", "head", "classifier"):
            if not hasattr(model, attr):
                raise InvalidArgumentError(f"model {type(model).__name__} lacks `{attr}`: it does not follow the "
                                           "CAM contract (features(x) -> head(features) -> classifier)")
        if not isinstance(model.classifier, nn.Linear):
            raise InvalidArgumentError("model.classifier must be an nn.Linear for weight-based CAMs")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(x)
        return self.model.head(feats), feats


def classifier_weights(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(W [labels x C], b [labels]) of the linear classifier, float32."""
    lin = model.classifier
    w = lin.weight.detach().cpu().float().numpy()
    b = lin.bias.detach().cpu().float().numpy() if lin.bias is not None else np.zeros(w.shape[0], np.float32)
    return np.ascontiguousarray(w), np.ascontiguousarray(b)


def export_onnx(model: nn.Module, spec: PreprocessSpec, *, logits_output: str = "logits",
                features_output: str = "features", opset: int = DEFAULT_OPSET,
                exporter: str = "torchscript") -> bytes:
    """Export ``model`` (put in eval mode) to ONNX bytes with a dynamic batch axis.

    ``torchscript`` (``dynamo=False``) is the default: it folds BatchNorm into the convolutions,
    takes ~0.1 s and its node names are stable for ``nodes_to_exclude``. ``dynamo`` also works
    here (onnxscript 0.7) but costs seconds per export; it is offered, not the default.
    """
    if opset < 17:
        raise InvalidArgumentError(f"opset must be >= 17, got {opset}")
    if exporter not in EXPORTERS:
        raise InvalidArgumentError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if logits_output == features_output:
        raise InvalidArgumentError("logits and features outputs need different names")
    model = model.eval()
    wrapper = FeatureHeadWrapper(model).eval()
    dummy = torch.zeros(2, spec.channels, *spec.input_size, dtype=torch.float32)
    names = dict(input_names=[spec.input_name], output_names=[logits_output, features_output])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            if exporter == "torchscript":
                buf = io.BytesIO()
                torch.onnx.export(wrapper, (dummy,), buf, dynamo=False, opset_version=opset,
                                  do_constant_folding=True, **names,
                                  dynamic_axes={spec.input_name: {0: "N"}, logits_output: {0: "N"},
                                                features_output: {0: "N"}})
                data = buf.getvalue()
            else:
                program = torch.onnx.export(wrapper, (dummy,), dynamo=True, opset_version=opset, optimize=True,
                                            dynamic_shapes={"x": {0: torch.export.Dim("N", min=1)}}, **names)
                data = program.model_proto.SerializeToString()
    except Exception as exc:  # the exporters raise many untyped errors
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(exc).__name__}: {exc}") from exc
    proto = onnx.load_from_string(data)
    proto.producer_name = "cxr-edge-export"
    check_onnx(proto)
    return proto.SerializeToString()


def check_onnx(model: onnx.ModelProto | bytes) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference), as a typed error."""
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported ONNX model is invalid: {exc}") from None


def prune_opset_imports(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop opset imports of domains no node uses (in place; returns ``proto``).

    onnxruntime's optimizer (offline optimization, ``quant_pre_process``) writes every domain its
    registry knows - ``com.microsoft.*``, ``ai.onnx.contrib`` 1000 when onnxruntime-extensions is
    loaded - which other runtimes may reject and ``onnx.compose`` refuses to merge.
    """
    used = {n.domain or "" for n in proto.graph.node}
    keep = [o for o in proto.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


def optimize_offline(model_bytes: bytes, level: str = "basic") -> bytes:
    """Constant folding / redundant-node removal with onnxruntime's offline optimizer.

    Only ``basic`` (ONNX-standard ops) is allowed: ``extended``/``all`` would write
    onnxruntime-internal fused ops that other runtimes and the quantizer cannot read.
    """
    import onnxruntime as ort

    if level != "basic":
        raise InvalidArgumentError("only the 'basic' offline optimization level keeps a portable ONNX graph")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = session_options(1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        proto = onnx.load(str(out))
    # onnxruntime tags the file with its own producer; keep ours so provenance stays readable
    proto.producer_name = "cxr-edge-export"
    prune_opset_imports(proto)
    check_onnx(proto)
    return proto.SerializeToString()


def run_onnx(model_bytes: bytes, batch: np.ndarray, output_names: list[str], input_name: str,
             threads: int = 1, custom_ops: bool = False) -> list[np.ndarray]:
    """Run a model on a batch with deterministic CPU settings (used for parity and gate checks)."""
    import onnxruntime as ort

    opts = session_options(threads)  # the runtime's settings: parity is checked as the device will run it
    if custom_ops:
        from onnxruntime_extensions import get_library_path

        opts.register_custom_ops_library(get_library_path())
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(output_names, {input_name: batch})


@torch.no_grad()
def torch_outputs(model: nn.Module, batch: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of the PyTorch model in eval mode, in chunks to bound memory."""
    wrapper = FeatureHeadWrapper(model.eval()).eval()
    outs = [wrapper(torch.from_numpy(np.ascontiguousarray(batch[i:i + chunk]))) for i in range(0, len(batch), chunk)]
    return (torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy())


def check_parity(model: nn.Module, model_bytes: bytes, batch: np.ndarray, spec: PreprocessSpec, *,
                 logits_output: str = "logits", features_output: str = "features",
                 atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL) -> dict[str, Any]:
    """Compare ONNX and PyTorch on ``batch`` (real preprocessed images); ParityError when off.

    Passes when ``|onnx - torch| <= atol * max(1, max|torch|) + rtol * |torch|`` everywhere (numpy's
    allclose rule with the absolute part scaled to the tensor's range), for both the logits and the features. Returns the measured numbers for the report.
    """
    t_logits, t_feats = torch_outputs(model, batch)
    o_logits, o_feats = run_onnx(model_bytes, batch, [logits_output, features_output], spec.input_name, threads=2)
    numbers: dict[str, Any] = {"images": int(len(batch)), "atol": atol, "rtol": rtol}
    ok = True
    for key, ref, got in (("logits", t_logits, o_logits), ("features", t_feats, o_feats)):
        if ref.shape != got.shape:
            raise ParityError(f"ONNX {key} shape {got.shape} != PyTorch {ref.shape}", numbers)
        diff = np.abs(ref - got)
        scaled_atol = atol * max(1.0, float(np.abs(ref).max()))
        numbers[f"{key}_max_abs_diff"] = float(diff.max())
        numbers[f"{key}_mean_abs_diff"] = float(diff.mean())
        numbers[f"{key}_atol_scaled"] = scaled_atol
        ok &= bool(np.all(diff <= scaled_atol + rtol * np.abs(ref)))
    if not ok:
        raise ParityError(f"ONNX export disagrees with PyTorch beyond atol={atol}, rtol={rtol}: {numbers}", numbers)
    return numbers
