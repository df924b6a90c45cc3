"""Per-label temperature scaling: probabilities that mean what they say, numpy only.

A fine-tuned student is over- or under-confident per label; dividing label c's logit by a
temperature T_c (fitted by maximum likelihood on calibration images, never on the reporting split)
fixes the scale without changing any ranking, so AUC is unchanged and a threshold keeps its images.

Why the temperature lives in the graph and not in the runtime: :func:`scale_head` divides the
classifier's rows (Gemm weight and bias) by T_c in place, so every consumer of the ``logits``
output (runtime, INT8 gate, evaluation, ``cxr-edge calibrate``) sees calibrated logits without a
second code path, and the manifest's CAM weights are scaled alike (its head check proves they
match). The fitted values and the calibration error before and after go into the manifest's
provenance, which the bundle digest covers. Export (torch side) and ``cxr-edge calibrate`` (device
side) share these functions.
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

import numpy as np

import dataclasses

from .bench.onnxwalk import G_INITIALIZER, G_NODE, _graph_span, _node, _text, _varint_value
from .bundle import _fields
from .errors import InvalidArgumentError
from .manifest import Manifest
from .operating_points import sigmoid

#: the fitted temperature is kept inside this range (a label whose likelihood keeps improving beyond
#: it has separable or degenerate calibration data, not a meaningful scale)
T_MIN, T_MAX = 0.05, 20.0
#: labels with fewer positives (or negatives) than this on the calibration images keep T = 1
MIN_CLASS_COUNT = 5
ECE_BINS = 10
_FLOAT = 1  # TensorProto.FLOAT
_RAW_DATA, _FLOAT_DATA, _DATA_TYPE, _NAME = 9, 4, 2, 8


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimising the mean BCE of sigmoid(logits / T) against 0/1 ``targets``.

    The loss is convex in s = 1/T (logistic loss of s * z), so its derivative mean((sigmoid(s z) - y) z)
    rises with s: bisection on its sign finds the minimum to 1e-6 in s."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    if z.shape != y.shape or z.size == 0:
        raise InvalidArgumentError(f"logits {z.shape} and targets {y.shape} must be equal, non-empty vectors")

    def slope(s: float) -> float:
        return float(np.mean((sigmoid(s * z) - y) * z))

    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    if slope(lo) >= 0:
        return T_MAX
    if slope(hi) <= 0:
        return T_MIN
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return float(1.0 / (0.5 * (lo + hi)))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one label: the |mean probability - positive rate| of equal-width probability bins,
    weighted by the bins' share of images (NaN targets are left out)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    known = np.isfinite(y)
    p, y = p[known], y[known]
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / p.size)


def fit_temperatures(logits: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                     min_class_count: int = MIN_CLASS_COUNT) -> tuple[list[float], dict[str, Any]]:
    """One temperature per label on N x L logits and 0/1 targets (NaN = unknown), with each label's
    ECE before and after on the same images (optimistic: they are the fitting images)."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if z.shape != t.shape or z.ndim != 2 or z.shape[1] != len(labels):
        raise InvalidArgumentError(f"logits {z.shape} / targets {t.shape} do not match {len(labels)} labels")
    temps: list[float] = []
    per_label: dict[str, Any] = {}
    for j, name in enumerate(labels):
        known = np.isfinite(t[:, j])
        zj, yj = z[known, j], t[known, j]
        pos = int(yj.sum())
        if min(pos, len(yj) - pos) < min_class_count:
            temp, note = 1.0, f"kept 1: fewer than {min_class_count} positive or negative images"
        else:
            temp, note = fit_temperature(zj, yj), None
        temps.append(temp)
        per_label[name] = {"temperature": round(temp, 4), "positives": pos, "images": int(len(yj)),
                           "ece_before": round(expected_calibration_error(sigmoid(zj), yj), 4),
                           "ece_after": round(expected_calibration_error(sigmoid(zj / temp), yj), 4),
                           **({"note": note} if note else {})}
    return temps, {"method": "temperature", "objective": "mean BCE (maximum likelihood), per label",
                   "range": [T_MIN, T_MAX], "min_class_count": min_class_count, "ece_bins": ECE_BINS,
                   "per_label": per_label,
                   "mean_ece_before": round(float(np.nanmean([e["ece_before"] for e in per_label.values()])), 4),
                   "mean_ece_after": round(float(np.nanmean([e["ece_after"] for e in per_label.values()])), 4)}


def _head_gemm(graph: bytes, logits_output: str) -> tuple[str, str, bool]:
    """(weight name, bias name, transB) of the Gemm that writes ``logits_output``."""
    for number, wire, _, p, e in _fields(graph):
        if number != G_NODE or wire != 2:
            continue
        node = _node(graph[p:e])
        if logits_output in node.outputs:
            alpha_beta_ok = True
            for an, aw, _, ap, ae in _fields(graph[p:e]):
                if an == 5 and aw == 2:  # attribute: alpha / beta are FLOAT attributes (field 2, wire 5)
                    attr = graph[p:e][ap:ae]
                    name, value = "", None
                    for fn, fw, _, fp, fe in _fields(attr):
                        if fn == 1 and fw == 2:
                            name = _text(attr, fp, fe)
                        elif fn == 2 and fw == 5:
                            value = struct.unpack("<f", attr[fp:fe])[0]
                    if name in ("alpha", "beta") and value is not None and value != 1.0:
                        alpha_beta_ok = False
            if node.op_type != "Gemm" or len(node.inputs) != 3 or not alpha_beta_ok:
                raise InvalidArgumentError(
                    f"temperature scaling needs the logits to come from a Gemm with weight and bias (alpha = beta = 1); "
                    f"this graph's {logits_output!r} comes from {node.op_type} (an INT8 head? export fp32)")
            return node.inputs[1], node.inputs[2], bool(node.attrs.get("transB", 0))
    raise InvalidArgumentError(f"the graph has no node writing {logits_output!r}")


def _float_spans(graph: bytes, names: set[str]) -> dict[str, tuple[int, int, int]]:
    """name -> (start, end, field) of the raw_data / float_data payload of each named FLOAT initializer
    (offsets into ``graph``)."""
    found: dict[str, tuple[int, int, int]] = {}
    for number, wire, _, p, e in _fields(graph):
        if number != G_INITIALIZER or wire != 2:
            continue
        msg = graph[p:e]
        name, dtype, span = "", None, None
        for fn, fw, fs, fp, fe in _fields(msg):
            if fn == _NAME and fw == 2:
                name = _text(msg, fp, fe)
            elif fn == _DATA_TYPE and fw == 0:
                dtype = _varint_value(msg, fs)
            elif fn in (_RAW_DATA, _FLOAT_DATA) and fw == 2:
                span = (p + fp, p + fe, fn)
        if name in names:
            if dtype != _FLOAT or span is None:
                raise InvalidArgumentError(f"head initializer {name!r} is not a packed float32 tensor")
            found[name] = span
    missing = names - set(found)
    if missing:
        raise InvalidArgumentError(f"the head's initializer(s) {sorted(missing)} are not in the graph")
    return found


def scale_head(model_bytes: bytes, logits_output: str, temps: Sequence[float]) -> bytes:
    """The model with label c's head row (Gemm weight row and bias) divided by ``temps[c]``: same byte
    length, only those float payloads rewritten, so nothing else in the file moves."""
    t = np.asarray(temps, dtype=np.float64)
    if t.ndim != 1 or not np.isfinite(t).all() or (t <= 0).any():
        raise InvalidArgumentError("temperatures must be finite and > 0")
    s = 1.0 / t
    _, g0, g1, _ = _graph_span(model_bytes)
    graph = model_bytes[g0:g1]
    w_name, b_name, trans_b = _head_gemm(graph, logits_output)
    spans = _float_spans(graph, {w_name, b_name})
    out = bytearray(model_bytes)
    for name, per in ((w_name, "row"), (b_name, "vector")):
        start, end, _ = spans[name]
        values = np.frombuffer(graph[start:end], dtype="<f4").astype(np.float64)
        n = len(s)
        if per == "vector":
            if values.size != n:
                raise InvalidArgumentError(f"the head bias has {values.size} entries, not one per label ({n})")
            scaled = values * s
        else:
            if values.size % n:
                raise InvalidArgumentError(f"the head weight ({values.size} values) is not a multiple of {n} labels")
            w = values.reshape((n, -1) if trans_b else (-1, n))
            scaled = (w * (s[:, None] if trans_b else s[None, :])).ravel()
        out[g0 + start:g0 + end] = scaled.astype("<f4").tobytes()
    return bytes(out)


def scale_rows(weights: np.ndarray, bias: np.ndarray | None, temps: Sequence[float]
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """The head's W (labels x C) and b with label c's row divided by ``temps[c]`` (what :func:`scale_head`
    does to the graph), float32: the CAM weights that keep matching the scaled graph."""
    s = 1.0 / np.asarray(temps, dtype=np.float64)
    return ((np.asarray(weights) * s[:, None]).astype(np.float32),
            None if bias is None else (np.asarray(bias) * s).astype(np.float32))


def current_temperatures(manifest: Manifest) -> list[float]:
    """The temperatures already folded into a bundle's head (1 for every label when none were)."""
    rec = manifest.provenance.get("temperature") or {}
    temps = rec.get("temperatures") or {}
    return [float(temps.get(name, 1.0)) for name in manifest.labels]


def temperature_record(labels: Sequence[str], before: Sequence[float], temps: Sequence[float],
                       details: dict[str, Any]) -> dict[str, Any]:
    """The manifest provenance entry: the total temperature per label (``before`` x ``temps``) and the fit."""
    return {"temperatures": {name: round(b * t, 6) for name, b, t in zip(labels, before, temps)},
            "note": "logit_c / T_c folded into the head (Gemm row and bias) and the CAM weights; AUC and rankings "
                    "are unchanged", "fit": details, "previous": dict(zip(labels, before))}


def apply_temperatures(model_bytes: bytes, manifest: Manifest, temps: Sequence[float],
                       details: dict[str, Any]) -> tuple[bytes, Manifest]:
    """Fold ``temps`` (per label, on top of any already applied) into the graph's head and the
    manifest's CAM weights, and record the fit in ``provenance["temperature"]``. The caller writes
    the bundle (the digest then covers the record) and refits thresholds on the new outputs."""
    if len(temps) != len(manifest.labels):
        raise InvalidArgumentError(f"{len(temps)} temperatures for {len(manifest.labels)} labels")
    scaled = scale_head(model_bytes, manifest.logits_output, temps)
    cam = manifest.cam
    if cam.weights is not None:
        weights, bias = scale_rows(cam.weights, cam.bias, temps)
        cam = dataclasses.replace(cam, weights=weights, bias=bias)
    provenance = dict(manifest.provenance)
    provenance["temperature"] = temperature_record(manifest.labels, current_temperatures(manifest), temps, details)
    return scaled, dataclasses.replace(manifest, cam=cam, provenance=provenance)
