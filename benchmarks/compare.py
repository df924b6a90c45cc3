"""Student vs teacher, ONNX Runtime vs PyTorch eager: one run, one machine, one results file.

    .venv/bin/python benchmarks/compare.py --teacher build/teacher.onnx \
        [--student path/student.onnx] [--eager-arch mobilenetv3_large --eager-checkpoint ckpt.pt] \
        [--eager-teacher] [--threads 2] [--batch 1,8]

Measures with the cxr-edge-bench library (runtime-only) the student bundle (FP32 and its INT8
sibling ``X.int8.onnx`` when present; default: the packaged default model when one ships) and the
wrapped DenseNet-121 teacher (``benchmarks/wrap_teacher.py``); optionally the same weights in
PyTorch eager on the CPU (``models.registry.create_model`` + a checkpoint, same threads, same
preprocessed input). Writes ``benchmarks/results/<machine>.json`` (``cxr-edge-compare/1``: the
full bench result plus the eager timings and the ratios), ``<machine>.md`` (tables) and
``<machine>.png`` (batch-1 latency vs mean AUC, bubble area ~ parameters; AUC from each bundle's
manifest ``provenance.metrics.mean_auc``; models without one are listed, not plotted).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_edge.bench.machine import machine_slug  # noqa: E402
from cxr_edge.bench.report import render, table  # noqa: E402
from cxr_edge.bench.runner import BenchConfig, run_bench  # noqa: E402
from cxr_edge.bench.timing import measure  # noqa: E402
from cxr_edge.errors import CxrEdgeError, NoDefaultModelError  # noqa: E402

SHARED = REPO.parent / "shared"
TEACHER_STATE = SHARED / "teachers" / "densenet121-nih1071.fp16.pt"


def eager_timings(arch: str, checkpoint: Path, bundle_path: str, threads: int, batches: list[int],
                  runs: int | None, warmup: int) -> dict[str, Any]:
    """PyTorch eager CPU latency of ``arch`` with ``checkpoint``, on the bundle's preprocessed input."""
    import torch

    from cxr_edge.bench.pipeline import write_synthetic_png
    from cxr_edge.bundle import load_bundle
    from cxr_edge.imaging import read_image
    from cxr_edge.preprocess import preprocess
    from models.registry import count_macs, count_params, create_model, load_state_dict_file

    bundle = load_bundle(bundle_path, threads=threads)
    spec = bundle.manifest.preprocessing
    png = write_synthetic_png(REPO / "build" / "compare" / "synthetic_1024.png")
    x1 = preprocess([read_image(png).pixels], spec)
    model = create_model(arch, num_classes=len(bundle.manifest.labels), in_chans=spec.channels)
    load_state_dict_file(model, checkpoint)
    model.eval()
    torch.set_num_threads(threads)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x1)).numpy()
    onnx_logits = bundle.session.run([bundle.manifest.logits_output], {spec.input_name: x1})[0]
    configs = []
    for batch in batches:
        xb = torch.from_numpy(np.repeat(x1, batch, axis=0))
        with torch.inference_mode():
            t = measure(lambda: model(xb), runs, warmup)
        s = t.summary()
        configs.append({"threads": threads, "batch": batch, "runs": t.runs, "latency_ms": s,
                        "throughput_ips": batch * t.runs / (t.times_ms.sum() / 1e3)})
    return {"arch": arch, "checkpoint": str(checkpoint), "bundle": bundle_path, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "params": count_params(model),
            "macs": count_macs(model, spec.input_size, spec.channels),
            "max_abs_logit_diff_vs_onnx": float(np.max(np.abs(ref - onnx_logits))), "configs": configs}


def _lat(model: dict[str, Any], batch: int) -> float | None:
    return next((c["latency_ms"]["median"] for c in model["configs"] if c["batch"] == batch), None)


def ratios(bench: dict[str, Any], eager: list[dict[str, Any]], student: str | None, teacher: str,
           batches: list[int]) -> list[dict[str, Any]]:
    """Speed ratios (> 1 means the first named is faster) at each batch size, same threads."""
    by = {(m["model"], m["format"]): m for m in bench["models"]}
    out = []
    t32 = by.get((teacher, "fp32"))
    for batch in batches:
        if student and t32:
            for fmt in ("fp32", "int8"):
                s = by.get((student, fmt))
                if s and _lat(s, batch) and _lat(t32, batch):
                    out.append({"ratio": f"student {fmt} vs teacher fp32 (ONNX Runtime)", "batch": batch,
                                "speedup": _lat(t32, batch) / _lat(s, batch)})
        for e in eager:
            onnx_model = by.get((e["bundle"], "fp32"))
            e_lat = next((c["latency_ms"]["median"] for c in e["configs"] if c["batch"] == batch), None)
            if onnx_model and e_lat and _lat(onnx_model, batch):
                out.append({"ratio": f"ONNX Runtime fp32 vs PyTorch eager ({e['arch']})", "batch": batch,
                            "speedup": e_lat / _lat(onnx_model, batch)})
    return out


def plot(bench: dict[str, Any], eager: list[dict[str, Any]], path: Path, title: str) -> list[str]:
    """Batch-1 latency (log x) vs mean AUC, bubble area ~ parameters; returns models left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    missing = []
    auc_of = {}
    for m in bench["models"]:
        name = f"{Path(m['model']).stem} [{m['format']}]"
        lat, auc, params = _lat(m, 1), m.get("mean_auc"), m["graph"].get("params")
        auc_of[m["model"]] = auc if m["format"] == "fp32" else auc_of.get(m["model"])
        if lat is None or auc is None:
            missing.append(f"{name}: {'no batch-1 run' if lat is None else 'no mean_auc in its manifest'}")
            continue
        size = 40 + 400 * ((params or 1e6) / 7e6)
        ax.scatter([lat], [auc], s=size, alpha=0.55, label=f"{name} ORT, {(params or 0) / 1e6:.2f} M params")
        ax.annotate(name, (lat, auc), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for e in eager:
        lat = next((c["latency_ms"]["median"] for c in e["configs"] if c["batch"] == 1), None)
        auc = auc_of.get(e["bundle"])
        if lat is None or auc is None:
            missing.append(f"{e['arch']} eager: {'no batch-1 run' if lat is None else 'its bundle has no mean_auc'}")
            continue
        ax.scatter([lat], [auc], s=40 + 400 * e["params"] / 7e6, alpha=0.55, marker="s",
                   label=f"{e['arch']} PyTorch eager, {e['params'] / 1e6:.2f} M params")
        ax.annotate(f"{e['arch']} eager", (lat, auc), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = ax.get_ylim()
    if hi - lo < 0.05:  # keep AUC differences in proportion: at least a 0.05-wide axis
        mid = (hi + lo) / 2
        ax.set_ylim(mid - 0.025, mid + 0.025)
    ax.set_xlabel("median latency, batch 1 (ms, log scale)")
    ax.set_ylabel("mean AUC (manifest provenance)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=7, loc="best", markerscale=0.5)
    if missing:
        fig.text(0.01, 0.01, "not plotted: " + "; ".join(missing), fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return missing


def markdown(bench: dict[str, Any], eager: list[dict[str, Any]], rat: list[dict[str, Any]],
             missing: list[str]) -> str:
    parts = [f"# cxr-edge comparison on {bench['machine']['cpu_model']} ({bench['machine']['arch']})", "",
             f"Generated {bench['created_utc']} by benchmarks/compare.py. Not a medical device.", "",
             "Models:", *[f"- `{Path(m['path']).name}`: model_id `{m['model_id']}`, {m['format']}, "
                          f"{m['graph'].get('params') or 'n/a'} parameters"
                          + (f", mean AUC {m['mean_auc']}" if m.get("mean_auc") is not None else ", no mean AUC")
                          + (f" — {m['note']}" if m.get("note") else "") for m in bench["models"]], "",
             render(bench, markdown=True)]
    if eager:
        rows = [[e["arch"], c["threads"], c["batch"], c["runs"], f"{c['latency_ms']['median']:.2f}",
                 f"{c['latency_ms']['p90']:.2f}", f"{c['throughput_ips']:.2f}",
                 f"{e['max_abs_logit_diff_vs_onnx']:.2e}"]
                for e in eager for c in e["configs"]]
        parts += ["### PyTorch eager (CPU)", table(["arch", "threads", "batch", "runs", "median ms", "p90 ms",
                                                    "images/s", "max |logit diff| vs ONNX"], rows, True), ""]
    if rat:
        parts += ["### Speed ratios (> 1: the first named is faster)",
                  table(["comparison", "batch", "speedup"], [[r["ratio"], r["batch"], f"{r['speedup']:.2f}x"]
                                                             for r in rat], True), ""]
    if missing:
        parts += ["Not in the plot: " + "; ".join(missing), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", help="student bundle (default: the packaged default model, when one ships)")
    ap.add_argument("--teacher", default=str(REPO / "build" / "teacher.onnx"),
                    help="wrapped teacher bundle (benchmarks/wrap_teacher.py)")
    ap.add_argument("--eager-arch", help="models.registry name of the student, for the PyTorch eager timing")
    ap.add_argument("--eager-checkpoint", type=Path, help="student state dict for --eager-arch")
    ap.add_argument("--eager-teacher", action="store_true", help="also time the teacher in PyTorch eager "
                    "(densenet121 + the shared fp16 state dict)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every model (default: all CPUs)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--split-repeats", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    from cxr_edge.bench.machine import usable_cpus

    threads = args.threads or usable_cpus()
    batches = [int(b) for b in args.batch.split(",")]
    notes = []
    student = args.student
    if student is None:
        try:
            from cxr_edge.bundle import default_bundle_path

            student = str(default_bundle_path())
        except NoDefaultModelError:
            notes.append("no student: no --student given and no packaged default model ships yet")
    models = [m for m in (student, args.teacher) if m]
    if not Path(args.teacher).is_file():
        print(f"teacher bundle {args.teacher} not found: run benchmarks/wrap_teacher.py first", file=sys.stderr)
        return 2
    cfg = BenchConfig(models=models, formats=["fp32", "int8"], threads=[threads], batches=batches, runs=args.runs,
                      warmup=args.warmup, cold_repeats=args.cold_repeats, split_repeats=args.split_repeats)
    try:
        bench = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except CxrEdgeError as exc:
        print(f"compare: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 4
    eager = []
    if args.eager_arch:
        if not (args.eager_checkpoint and student):
            print("--eager-arch needs --eager-checkpoint and a student bundle", file=sys.stderr)
            return 2
        eager.append(eager_timings(args.eager_arch, args.eager_checkpoint, student, threads, batches, args.runs,
                                   args.warmup))
    elif student:
        notes.append("student PyTorch eager not measured (pass --eager-arch and --eager-checkpoint)")
    if args.eager_teacher:
        print("PyTorch eager: densenet121 teacher", file=sys.stderr)
        eager.append(eager_timings("densenet121", TEACHER_STATE, args.teacher, threads, batches, args.runs,
                                   args.warmup))
    rat = ratios(bench, eager, student, args.teacher, batches)
    if eager:
        notes.append("PyTorch eager runs on OpenMP threads that spin-wait at every layer; when other processes hold "
                     "the cores (see load_average) eager slows down far more than ONNX Runtime, so the ONNX-vs-eager "
                     "ratio is only meaningful on an idle machine")
    slug = machine_slug(bench["machine"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    missing = plot(bench, eager, args.out_dir / f"{slug}.png",
                   f"{bench['machine']['cpu_model']}, {threads} threads, onnxruntime {bench['machine']['onnxruntime']}")
    result = {"schema": "cxr-edge-compare/1", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine_slug": slug, "threads": threads, "bench": bench, "eager": eager, "ratios": rat,
              "notes": notes + bench["notes"]}
    (args.out_dir / f"{slug}.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    md = markdown(bench, eager, rat, missing)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (args.out_dir / f"{slug}.md").write_text(md)
    print(md)
    print(f"wrote {args.out_dir / slug}.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
