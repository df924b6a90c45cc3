"""What machine a benchmark ran on, and its theoretical FP32 peak, with the assumptions spelled out.

A latency number means little without the CPU, its SIMD/dot-product extensions (which decide
whether INT8 pays off), the core count and the library versions, so every bench result carries
this block. Linux reads /proc/cpuinfo and cpufreq; elsewhere ``platform`` gives what it can.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

# ISA flags worth reporting for inference: SIMD width, FMA, and INT8/BF16 dot-product units.
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model, flag set, clock and core topology out of /proc/cpuinfo text (x86 or arm)."""
    model = None
    flags: set[str] = set()
    mhz: list[float] = []
    cores: set[tuple[str, str]] = set()
    processors = 0
    phys = core = None
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, value = (s.strip() for s in line.partition(":"))
        key = key.lower()
        if key == "processor":
            processors += 1
        elif key in ("model name", "hardware", "cpu model") and not model:
            model = value
        elif key in ("flags", "features"):
            flags.update(value.split())
        elif key == "cpu mhz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
            cores.add((phys or "0", core))
    return {"model": model, "flags": flags, "mhz": max(mhz) if mhz else None,
            "physical_cores": len(cores) or None, "processors": processors or None,
            "x86_style": "vendor_id" in text or "fpu" in text}


def _max_freq_ghz() -> tuple[float | None, str]:
    raw = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    if raw.isdigit():
        return int(raw) / 1e6, "cpufreq cpuinfo_max_freq (max boost clock of cpu0)"
    return None, ""


def usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fp32_flops_per_cycle(arch: str, flags: set[str]) -> tuple[int | None, str]:
    """Peak FP32 FLOPs per cycle per core from the ISA, and the assumption behind the number."""
    if arch in ("x86_64", "AMD64", "i686", "x86"):
        if "avx512f" in flags:
            return 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2 FLOPs (parts with 1 FMA unit reach half)"
        if "avx2" in flags and "fma" in flags:
            return 32, "AVX2+FMA: 2 FMA units x 8 fp32 lanes x 2 FLOPs"
        if "avx" in flags:
            return 16, "AVX without FMA: 1 add + 1 mul unit x 8 fp32 lanes"
        return 8, "SSE: 1 add + 1 mul unit x 4 fp32 lanes"
    if arch in ("aarch64", "arm64"):
        return 16, ("NEON: 2 FMA pipes x 4 fp32 lanes x 2 FLOPs (Cortex-A7x/Neoverse N1 class; "
                    "Neoverse V1/V2 and Apple cores have 4 pipes, i.e. twice this)")
    return None, f"no FLOPs/cycle model for architecture {arch!r}"


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to interpret the numbers: CPU, ISA flags, cores, clock, versions."""
    import numpy as np

    arch = platform.machine()
    cpu = parse_cpuinfo(_read("/proc/cpuinfo"))
    is_arm = arch in ("aarch64", "arm64")
    notes: list[str] = []
    # qemu-user passes the host's /proc/cpuinfo through: an aarch64 process seeing x86 flags is emulated.
    emulated = bool(is_arm and cpu["x86_style"])
    if emulated:
        notes.append("aarch64 process reads an x86 /proc/cpuinfo: running under user-mode emulation (QEMU); "
                     "CPU model/flags below are the host's and timings are not an ARM benchmark")
        cpu = {**cpu, "flags": set(), "mhz": None}
    wanted = ARM_FLAGS if is_arm else X86_FLAGS
    isa = [f for f in wanted if f in cpu["flags"]]
    ghz, ghz_source = _max_freq_ghz()
    if ghz is None and cpu["mhz"]:
        ghz, ghz_source = cpu["mhz"] / 1000.0, ("/proc/cpuinfo 'cpu MHz' (current clock; in VMs usually the "
                                                 "nominal clock, boost not included)")
    fpc, fpc_note = fp32_flops_per_cycle(arch, cpu["flags"])
    cores = cpu["physical_cores"] or usable_cpus()
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError:
        ort_version, providers = None, []
    try:
        import cv2

        cv_version = cv2.__version__
    except ImportError:
        cv_version = None
    peak = None
    if ghz and fpc:
        peak = {"ghz": round(ghz, 3), "ghz_source": ghz_source, "flops_per_cycle_per_core": fpc,
                "cores": min(cores, usable_cpus()), "gflops": round(min(cores, usable_cpus()) * ghz * fpc, 1),
                "assumption": fpc_note + "; peak = cores x GHz x FLOPs/cycle, logical CPUs that are SMT "
                              "siblings share one core's FMA units"}
    else:
        notes.append("FP32 peak unknown (no clock or FLOPs/cycle model for this CPU): fraction of peak not reported")
    return {
        "arch": arch, "system": platform.system(), "platform": platform.platform(),
        "cpu_model": cpu["model"] or platform.processor() or None,
        "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "physical_cores": cpu["physical_cores"],
        "isa": isa, "int8_dot_product": any(f in isa for f in INT8_DOT_FLAGS), "emulated": emulated,
        "python": sys.version.split()[0], "onnxruntime": ort_version, "numpy": np.__version__, "opencv": cv_version,
        "providers_available": providers, "peak_fp32": peak, "notes": notes,
    }


def peak_gflops(machine: dict[str, Any], threads: int) -> float | None:
    """FP32 peak for ``threads`` intra-op threads (capped at the physical cores the peak counts)."""
    peak = machine.get("peak_fp32")
    if not peak:
        return None
    return min(threads, peak["cores"]) * peak["ghz"] * peak["flops_per_cycle_per_core"]


def machine_slug(machine: dict[str, Any]) -> str:
    """A file-name-safe name for a machine, e.g. ``amd-epyc-2c-x86_64``."""
    model = (machine.get("cpu_model") or "unknown-cpu").lower()
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", " ", model)
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-")[:40] or "cpu"
    cores = machine.get("physical_cores") or machine.get("usable_cpus")
    suffix = "-qemu" if machine.get("emulated") else ""
    return f"{model}-{cores}c-{machine.get('arch', 'unknown')}{suffix}"
