"""Measure INT8 presets against fp32 on this CPU: accuracy (vs fp32 on real images) and latency.

    python -m export.quant_bench --model mobile --calib 64 --images 96 --threads 1 2
    python -m export.quant_bench --onnx ../shared/teachers/densenet121-nih1071.onnx --input-size 224

Why: on AVX2 without VNNI the U8S8 kernels can saturate and U8U8 is a different kernel, so the
preset is chosen from numbers measured here, not from a rule of thumb. Latencies are medians of
interleaved runs (batch 1), the way the runtime calls the model; other processes on the machine
add noise, so compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Sequence

import numpy as np

from cxr_edge.manifest import PreprocessSpec

from .calibration import ArrayCalibrationReader
from .images import list_image_dir, load_batch, nih_sample_dir
from .onnx_export import run_onnx
from .quantize import DEFAULT_FLOAT_LEADING_CONVS, PRESETS, prepare_for_quantization, quantize_int8
from .verify import cam_correlations


def _cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith("avx") or "vnni" in f or f == "amx_int8")


def _latencies(models: dict[str, bytes], x: np.ndarray, input_name: str, threads: int, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    from cxr_edge.bundle import session_options

    sessions = {k: ort.InferenceSession(v, session_options(threads), providers=["CPUExecutionProvider"])
                for k, v in models.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {input_name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):  # interleaved: drift from other load hits every model alike
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {input_name: x})
            times[k].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


def bench(fp32: bytes, spec: PreprocessSpec, calib: np.ndarray, evalb: np.ndarray, presets: Sequence[str],
          threads: Sequence[int], runs: int, features_output: str = "features",
          logits_output: str = "logits", float_leading_convs: int = DEFAULT_FLOAT_LEADING_CONVS) -> dict:
    import onnx

    prepared = prepare_for_quantization(fp32)
    weights = next(np.asarray(onnx.numpy_helper.to_array(i)) for i in onnx.load_from_string(fp32).graph.initializer
                   if i.dims and len(i.dims) == 2)  # the classifier: the only 2-D initializer of a CAM net
    ref_l, ref_f = run_onnx(fp32, evalb, [logits_output, features_output], spec.input_name, threads=2)
    models = {"fp32": fp32}
    out: dict = {"presets": {}}
    for name in presets:
        t = time.perf_counter()
        q = quantize_int8(prepared, ArrayCalibrationReader(calib, spec.input_name), features_output=features_output,
                          input_name=spec.input_name, preset=name, float_leading_convs=float_leading_convs,
                          prepared=True)
        secs = time.perf_counter() - t
        models[name] = q.model_bytes
        l, f = run_onnx(q.model_bytes, evalb, [logits_output, features_output], spec.input_name, threads=2)
        w = weights if weights.shape[1] == f.shape[1] else weights.T
        corr = cam_correlations(ref_f, f, w)
        sqnr = 10 * np.log10(float(np.sum(ref_f.astype(np.float64) ** 2)) /
                             max(float(np.sum((ref_f - f).astype(np.float64) ** 2)), 1e-30))
        out["presets"][name] = {"note": PRESETS[name].note, "quantize_seconds": round(secs, 1),
                                "size_bytes": len(q.model_bytes),
                                "logit_max_abs_diff": float(np.abs(l - ref_l).max()),
                                "logit_mean_abs_diff": float(np.abs(l - ref_l).mean()),
                                "features_sqnr_db": round(float(sqnr), 2),
                                "cam_pearson_median": float(np.nanmedian(corr)),
                                "cam_pairs_both_empty": int(np.isnan(corr).sum())}
    out["fp32_size_bytes"] = len(fp32)
    out["logit_std_across_images"] = float(ref_l.std(axis=0).mean())
    out["latency_ms_batch1"] = {f"{n}_threads": _latencies(models, evalb[:1], spec.input_name, n, runs)
                                for n in threads}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.quant_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobile", choices=("mobile", "tiny"), help="toy CAM net (export.toy)")
    p.add_argument("--onnx", help="an fp32 ONNX CAM model instead (outputs logits + features)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mean", type=float, default=0.49465)
    p.add_argument("--std", type=float, default=0.25223)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--presets", nargs="*", default=["u8u8", "u8s8_rr", "u8s8", "s8s8"])
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--float-leading-convs", type=int, default=DEFAULT_FLOAT_LEADING_CONVS,
                   help="as python -m export --float-leading-convs")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    spec = PreprocessSpec(input_size=(args.input_size, args.input_size), mean=(args.mean,), std=(args.std,))
    paths = list_image_dir(nih_sample_dir() / "images")
    calib = load_batch(paths[:args.calib], spec)  # first images calibrate, last images evaluate: disjoint
    evalb = load_batch(paths[-args.images:], spec)
    if args.onnx:
        fp32, what = open(args.onnx, "rb").read(), args.onnx
    else:
        from .onnx_export import export_onnx
        from .toy import MOBILE_STAGES, TINY_STAGES, make_toy_model

        stages = MOBILE_STAGES if args.model == "mobile" else TINY_STAGES
        width = 32 if args.model == "mobile" else 16
        model = make_toy_model(stages=stages, width=width, bn_batch=calib[:32])
        fp32, what = export_onnx(model, spec), f"export.toy {args.model} (random init, settled BN, positive head)"
    result = {"model": what, "input_size": args.input_size, "cpu_flags": _cpu_flags(),
              "machine": platform.machine(), "calibration_images": len(calib), "eval_images": len(evalb),
              "float_leading_convs": args.float_leading_convs,
              **bench(fp32, spec, calib, evalb, args.presets, args.threads, args.runs,
                      float_leading_convs=args.float_leading_convs)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
