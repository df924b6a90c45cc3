"""Run the benchmark: every bundle variant x threads x batch, plus split, cold start and graph cost.

Runtime-only on purpose (onnxruntime, numpy, OpenCV): what is measured is what a device runs.
The result is one JSON-able dict whose layout is documented in :mod:`cxr_edge.bench.report`.
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..errors import BundleError, InvalidArgumentError
from .coldstart import cold_start
from .graphstats import graph_stats
from .machine import machine_info, peak_gflops
from .pipeline import stage_split, write_synthetic_png
from .scopecost import scope_cost
from .timing import RUN_POLICY, measure
from .variants import ProviderUnavailableError, Variant, resolve_variants

SCHEMA = "cxr-edge-bench/1"
INT8_MIN_SPEEDUP = 1.05  # below this INT8 is "not faster" (run-to-run noise is a few percent)
# INT8 is recommended only when it is >= 1.05x faster on the geometric mean AND not slower in any
# measured threads/batch configuration; otherwise FP32 (simpler, exact) with the per-config numbers.


@dataclass
class BenchConfig:
    """What to measure; ``runs=None`` means the automatic run policy of :mod:`.timing`."""

    models: list[str]
    #: None = the named files plus their existing fp32/int8 siblings; a list = exactly those formats
    formats: list[str] | None = None
    threads: list[int] = field(default_factory=lambda: [1])
    batches: list[int] = field(default_factory=lambda: [1])
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    runs: int | None = None
    warmup: int = 5
    image: str | None = None
    cold_repeats: int = 5
    cold_bytecode: str = "installed"  # coldstart.BYTECODE_MODES
    split_repeats: int = 10

    def validate(self) -> None:
        for name, values in (("threads", self.threads), ("batch", self.batches)):
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise InvalidArgumentError(f"--{name} needs positive integers, got {values}")
        if self.runs is not None and self.runs < 1:
            raise InvalidArgumentError(f"--runs must be >= 1, got {self.runs}")
        for name in ("warmup", "cold_repeats", "split_repeats"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 0")


def _load_average() -> float | None:
    """1-minute load average (None where the OS has none): a busy machine makes every number noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _model_input(bundle, image: str) -> np.ndarray:
    """The real preprocessed image as a 1 x C x H x W tensor (content barely matters for CPU timing)."""
    from ..imaging import read_image
    from ..preprocess import preprocess

    spec = bundle.manifest.preprocessing
    pixels = read_image(image, min_side=spec.min_side, max_pixels=spec.max_pixels).pixels
    return preprocess([pixels], spec)


def own_mean_auc(manifest, fmt: str) -> tuple[float | None, str]:
    """This bundle's own mean AUC from its provenance, and where it came from (never a sibling's).

    An INT8 bundle's ``provenance.metrics`` are those of the float model it was quantized from, so
    its own number is ``provenance.int8_verification.mean_auc_new`` (the INT8 graph on the held-out
    verification images); an fp32 bundle's is ``provenance.metrics.mean_auc`` (the exported graph
    matches the float model to ~1e-5, checked at export).
    """
    prov = manifest.provenance or {}
    if fmt == "int8":
        value = (prov.get("int8_verification") or {}).get("mean_auc_new")
        if value is not None:
            return float(value), "provenance.int8_verification.mean_auc_new"
        return None, "no INT8 measurement in provenance (provenance.metrics belong to the float model)"
    value = (prov.get("metrics") or {}).get("mean_auc")
    if value is not None:
        return float(value), "provenance.metrics.mean_auc"
    return None, "no provenance.metrics.mean_auc"


def _load(path: str, threads: int, providers: Sequence[str], self_check: bool):
    from ..bundle import load_bundle

    bundle = load_bundle(path, threads=threads, providers=providers, self_check=self_check)
    active = bundle.session.get_providers()
    if providers[0] not in active:
        raise ProviderUnavailableError(f"onnxruntime fell back from {providers[0]} to {active} for {path}; "
                                       "the provider's libraries (e.g. CUDA/cuDNN) are missing or incompatible")
    return bundle


def _configs(variant: Variant, cfg: BenchConfig, stats: dict[str, Any], machine: dict[str, Any],
             image: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    for threads in cfg.threads:
        bundle = _load(variant.path, threads, cfg.providers, self_check=False)
        x1 = _model_input(bundle, image)
        name = bundle.manifest.preprocessing.input_name
        for batch in cfg.batches:
            feeds = {name: np.ascontiguousarray(np.repeat(x1, batch, axis=0))}
            log(f"  {Path(variant.path).name} [{variant.format}] threads={threads} batch={batch}")
            timing = measure(lambda: bundle.session.run(None, feeds), cfg.runs, cfg.warmup)
            lat = timing.summary()
            throughput = batch * timing.runs / (timing.times_ms.sum() / 1e3)
            achieved = stats["flops"] * throughput / 1e9 if stats.get("flops") else None
            peak = peak_gflops(machine, threads)
            out.append({
                "threads": threads, "batch": batch, "runs": timing.runs, "warmup": timing.warmup,
                "latency_ms": lat, "latency_per_image_ms": lat["median"] / batch,
                "throughput_ips": throughput, "achieved_gflops": achieved,
                "fraction_of_fp32_peak": (achieved / peak) if (achieved and peak) else None,
            })
    return out


def _recommend(group: str, fp32: dict[str, Any], int8: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """Which format is faster on this machine, with the likely cause when INT8 does not pay off."""
    pairs = []
    by_key = {(c["threads"], c["batch"]): c for c in int8["configs"]}
    for c in fp32["configs"]:
        other = by_key.get((c["threads"], c["batch"]))
        if other:
            a, b = c["latency_ms"]["median"], other["latency_ms"]["median"]
            pairs.append({"threads": c["threads"], "batch": c["batch"], "fp32_ms": a, "int8_ms": b,
                          "int8_speedup": a / b})
    speedup = math.exp(np.mean([math.log(p["int8_speedup"]) for p in pairs])) if pairs else None
    size_ratio = fp32["size_bytes"] / int8["size_bytes"] if int8["size_bytes"] else None
    reasons = []
    if speedup is None:
        faster = None
        reasons.append("no common threads/batch configuration to compare")
    elif speedup >= INT8_MIN_SPEEDUP and all(p["int8_speedup"] >= 1.0 for p in pairs):
        faster = "int8"
        reasons.append(f"INT8 is {speedup:.2f}x faster than FP32 on this CPU (geometric mean over "
                       f"{len(pairs)} configurations)")
        if machine.get("int8_dot_product"):
            reasons.append("the CPU has INT8 dot-product instructions ("
                           + ", ".join(f for f in machine["isa"] if f in ("avx512_vnni", "avx_vnni", "amx_int8",
                                                                          "asimddp", "i8mm")) + ")")
    else:
        faster = "fp32"
        per = ", ".join(f"{p['threads']} threads batch {p['batch']}: {p['int8_speedup']:.2f}x" for p in pairs)
        if speedup >= INT8_MIN_SPEEDUP:  # faster on average, slower somewhere: not a consistent gain
            reasons.append(f"INT8 is not consistently faster than FP32 on this CPU ({per}); keep FP32 unless "
                           "the faster configuration is the one deployed")
        else:
            reasons.append(f"INT8 is not faster than FP32 on this CPU ({speedup:.2f}x, geometric mean; {per})")
        if not machine.get("int8_dot_product"):
            isa = machine.get("isa") or []
            simd = ("AVX-512" if "avx512f" in isa else "AVX2" if "avx2" in isa
                    else "NEON" if "asimd" in isa else "SIMD")
            reasons.append(f"likely cause: {simd} without VNNI/dot-product instructions, so each INT8 dot "
                           "product takes a multiply-add-widen sequence (vpmaddubsw + vpmaddwd on x86) instead "
                           "of one instruction, and the QDQ quantize/dequantize steps and the ops left in "
                           "float eat the smaller gain")
        dw = fp32.get("graph", {}).get("depthwise_macs") or 0
        macs = fp32.get("graph", {}).get("macs") or 0
        if macs and dw / macs > 0.1:
            reasons.append(f"depthwise convolutions ({dw / macs:.0%} of MACs) are memory-bound and gain little "
                           "from INT8")
    if size_ratio:
        reasons.append(f"the INT8 file is {size_ratio:.1f}x smaller, which matters if download/storage size "
                       "does more than latency")
    return {"model": group, "recommended_format": faster, "int8_speedup": speedup, "size_ratio_fp32_over_int8":
            size_ratio, "pairs": pairs, "reason": "; ".join(reasons)}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every variant; raises InvalidArgumentError (usage) or BundleError (model not loadable)."""
    cfg.validate()
    started = time.time()
    machine = machine_info()
    load_start = _load_average()
    variants, skipped = resolve_variants(cfg.models, cfg.formats)
    if not variants:
        raise BundleError("nothing to benchmark: " + "; ".join(s["reason"] for s in skipped))
    with tempfile.TemporaryDirectory(prefix="cxr-edge-bench-") as tmp:
        image = cfg.image or write_synthetic_png(Path(tmp) / "synthetic_1024.png")
        if cfg.image and not Path(cfg.image).is_file():
            raise InvalidArgumentError(f"--image {cfg.image!r} is not a file")
        models = []
        top_threads = max(cfg.threads)
        for variant in variants:
            log(f"{variant.path} [{variant.format}]")
            bundle = _load(variant.path, top_threads, cfg.providers, self_check=True)
            manifest = bundle.manifest
            stats = graph_stats(variant.path, manifest.preprocessing.input_size).to_dict()
            auc, auc_source = own_mean_auc(manifest, variant.format)
            entry: dict[str, Any] = {
                "model": variant.group, "path": variant.path, "format": variant.format,
                "format_source": variant.format_source, "named": variant.named,
                "model_id": manifest.model_id, "model_sha256": manifest.model_sha256,
                "size_bytes": bundle.size_bytes, "labels": len(manifest.labels),
                "input_size": list(manifest.preprocessing.input_size),
                "providers": list(bundle.session.get_providers()),
                "mean_auc": auc, "mean_auc_source": auc_source,
                "note": manifest.provenance.get("note"),
                "graph": stats,
            }
            if variant.note:
                entry["format_note"] = variant.note
            log(f"  scope gate cost (threads={top_threads})")
            entry["scope_gate"] = scope_cost(bundle, image, cfg.runs, cfg.warmup)
            del bundle
            entry["configs"] = _configs(variant, cfg, stats, machine, image, log)
            if cfg.split_repeats:
                log(f"  end-to-end split x{cfg.split_repeats} (threads={top_threads})")
                entry["split"] = stage_split(variant.path, image, top_threads, cfg.providers, cfg.split_repeats)
            if cfg.cold_repeats:
                log(f"  cold start x{cfg.cold_repeats} (threads={top_threads})")
                try:
                    entry["cold_start"] = cold_start(variant.path, image, top_threads, cfg.providers,
                                                     cfg.cold_repeats, cfg.cold_bytecode)
                except (BundleError, OSError, subprocess.SubprocessError) as exc:
                    # e.g. under qemu-user a child python cannot be spawned; the rest stays valid
                    entry["cold_start"] = {"error": str(exc), "repeats": 0}
                    log(f"  cold start failed: {exc}")
            models.append(entry)
        image_desc = {"path": cfg.image, "synthetic": False} if cfg.image else \
            {"path": None, "synthetic": True, "description": "deterministic 1024x1024 8-bit PNG (seed 0)"}
    recs = []
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for m in models:
        groups.setdefault(m["model"], {})[m["format"]] = m
    for group, fmts in groups.items():
        if "fp32" in fmts and "int8" in fmts:
            recs.append(_recommend(group, fmts["fp32"], fmts["int8"], machine))
    notes = [RUN_POLICY if cfg.runs is None else f"runs fixed at {cfg.runs} per configuration",
             "latency = one InferenceSession.run (all graph outputs) on a batch of the preprocessed image; "
             "throughput = batch x runs / total measured time",
             "scope_gate = the input scope gate per image (pixel rules on the decoded image + feature score on its "
             "feature maps), each timed alone; also the 'scope' stage of the end-to-end split",
             "fraction_of_fp32_peak = FLOPs per image (2 x MACs, float-equivalent also for INT8) x images/s / "
             "(min(threads, cores) x GHz x FLOPs/cycle); see machine.peak_fp32.assumption"]
    for m in models:
        if m["graph"].get("macs") is None:
            notes.append(f"MACs of {Path(m['path']).name}: {m['graph']['reason']}")
        if m.get("format_note"):
            notes.append(f"{Path(m['path']).name}: {m['format_note']}")
        cold = m.get("cold_start") or {}
        if cold.get("compiled_from_source"):
            notes.append(
                f"cold start of {Path(m['path']).name} includes compiling {cold['compiled_from_source']} of "
                f"{cold['python_modules']} Python modules from source at every start (no .pyc beside them"
                + (": PYTHONDONTWRITEBYTECODE is set" if cold.get("dont_write_bytecode") else "")
                + "): --cold-bytecode as-is measured this environment unchanged; an installed wheel has "
                "bytecode (pip compiles it), which the default --cold-bytecode installed measures")
    if any((m.get("cold_start") or {}).get("repeats") for m in models):
        notes.append("cold start: " + ("every module loads from bytecode, as after pip install (--cold-bytecode "
                                       "installed)" if cfg.cold_bytecode == "installed" else
                                       "this environment as it is (--cold-bytecode as-is)"))
    notes += machine.get("notes", [])
    load = _load_average()
    if load is not None and load_start is not None:
        if max(load, load_start) > machine["usable_cpus"] + 0.5:
            notes.append(f"the machine was busy (1-min load average {load_start:.1f} at start, {load:.1f} at end, "
                         f"on {machine['usable_cpus']} CPUs): other processes competed for the cores, so "
                         "latencies are inflated and noisy; rerun on an idle machine for reference numbers")
    return {
        "schema": SCHEMA, "tool": f"cxr-edge-bench {__version__}",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": time.time() - started, "machine": machine,
        "load_average": {"start": load_start, "end": load},
        "settings": {"formats": cfg.formats if cfg.formats is not None else "named files + fp32/int8 siblings", "threads": cfg.threads, "batches": cfg.batches,
                     "providers": cfg.providers, "runs": cfg.runs, "warmup": cfg.warmup,
                     "cold_repeats": cfg.cold_repeats, "cold_bytecode": cfg.cold_bytecode, "split_repeats": cfg.split_repeats, "image": image_desc},
        "models": models, "skipped": skipped, "recommendations": recs, "notes": notes,
    }
