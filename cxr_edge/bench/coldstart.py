"""Cold start and peak memory, measured in fresh processes as an app launch would pay them.

Each repeat spawns ``python -c <child>``; the child stamps CLOCK_MONOTONIC after importing
onnxruntime + cxr_edge, after creating the session (``Classifier(...)``: checksum, manifest and
head self-check included) and after its first prediction on the image file, and reports its peak
resident memory: ``VmHWM`` from /proc/self/status where it exists (Linux), else ``ru_maxrss``.
Why not ``ru_maxrss`` first: Linux carries it across fork + exec, so a child spawned by a big
parent (this benchmark, holding sessions) would report the parent's RSS. The parent stamps the
same clock just before spawning, so every phase is measured from process start, interpreter
start-up included.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BundleError

_CHILD = r"""
import time
t_start = time.monotonic_ns()
import json, sys
args = json.loads(sys.argv[1])
try:
    import onnxruntime
    from cxr_edge.classifier import Classifier
    t_import = time.monotonic_ns()
    clf = Classifier(args["model"], threads=args["threads"], providers=args["providers"])
    t_session = time.monotonic_ns()
    clf.predict(args["image"], keep_image=False)
    t_first = time.monotonic_ns()
    import os
    sources = [m for m in list(sys.modules.values())
               if getattr(getattr(m, "__spec__", None), "cached", None) and str(m.__spec__.origin).endswith(".py")]
    from_source = sum(1 for m in sources if not os.path.exists(m.__spec__.cached))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
    sys.exit(1)
rss_kib = None
try:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_kib = rss / 1024 if sys.platform == "darwin" else rss  # macOS reports bytes, Linux KiB
except ImportError:
    pass
hwm_kib = None
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm_kib = int(line.split()[1])
except OSError:
    pass
print(json.dumps({"t_start": t_start, "t_import": t_import, "t_session": t_session, "t_first": t_first,
                  "ru_maxrss_kib": rss_kib, "vmhwm_kib": hwm_kib, "python_modules": len(sources),
                  "compiled_from_source": from_source, "dont_write_bytecode": bool(sys.flags.dont_write_bytecode)}))
"""


BYTECODE_MODES = ("installed", "as-is")


def _child_env(pycache: str | None = None) -> dict[str, str]:
    """The child must import this very cxr_edge (working tree or installed), whatever the cwd.
    ``pycache``: a bytecode cache folder the child may write (PYTHONPYCACHEPREFIX), for ``installed``."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def cold_start_once(model: str, image: str, threads: int, providers: Sequence[str] | None,
                    timeout_s: float = 600.0, pycache: str | None = None) -> dict[str, float]:
    """One fresh process: milliseconds from spawn to each phase, and peak RSS in MiB."""
    payload = json.dumps({"model": str(model), "image": str(image), "threads": threads,
                          "providers": list(providers) if providers else None})
    t0 = time.monotonic_ns()
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], capture_output=True, text=True,
                          env=_child_env(pycache), timeout=timeout_s)
    t_exit = time.monotonic_ns()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": (proc.stderr or "no output").strip()[-500:]}
    if proc.returncode != 0 or "error" in result:
        raise BundleError(f"cold-start subprocess failed: {result.get('error', proc.stderr[-500:])}")
    ms = lambda key: (result[key] - t0) / 1e6  # noqa: E731
    rss = result["vmhwm_kib"] or result["ru_maxrss_kib"]
    return {"interpreter_ms": ms("t_start"), "import_ms": ms("t_import"), "session_ms": ms("t_session"),
            "first_prediction_ms": ms("t_first"), "process_exit_ms": (t_exit - t0) / 1e6,
            "peak_rss_mib": rss / 1024 if rss else None,
            "peak_rss_source": "VmHWM" if result["vmhwm_kib"] else "ru_maxrss",
            "compiled_from_source": result["compiled_from_source"], "python_modules": result["python_modules"],
            "dont_write_bytecode": result["dont_write_bytecode"]}


def cold_start(model: str, image: str, threads: int, providers: Sequence[str] | None,
               repeats: int, bytecode: str = "installed") -> dict[str, Any]:
    """Median over ``repeats`` fresh processes of each cumulative phase time (ms from process start).

    ``bytecode="installed"`` measures what an installed package pays: every module loads from bytecode, as
    after ``pip install`` (which compiles it), also where this environment would compile the sources at
    every start (an editable install under PYTHONDONTWRITEBYTECODE): one unmeasured start first fills a
    private bytecode cache (PYTHONPYCACHEPREFIX in a temporary folder). ``"as-is"``: the environment
    unchanged; ``compiled_from_source`` says what that cost."""
    import shutil
    import tempfile

    if bytecode not in BYTECODE_MODES:
        raise ValueError(f"bytecode must be one of {BYTECODE_MODES}, got {bytecode!r}")
    cache = tempfile.mkdtemp(prefix="cxr-edge-pyc-") if bytecode == "installed" else None
    try:
        if cache is not None:
            cold_start_once(model, image, threads, providers, pycache=cache)  # fills the cache, not measured
        runs = [cold_start_once(model, image, threads, providers, pycache=cache) for _ in range(repeats)]
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    med = {k: float(np.median([r[k] for r in runs])) for k in keys}
    return {
        "repeats": repeats, "threads": threads, "bytecode": bytecode,
        "median": med,
        "phases_ms_from_process_start": {k: med[k] for k in ("interpreter_ms", "import_ms", "session_ms",
                                                             "first_prediction_ms")},
        "cold_start_ms": med["first_prediction_ms"],
        "peak_rss_mib": med.get("peak_rss_mib"), "peak_rss_source": runs[0]["peak_rss_source"],
        # Python modules the child compiled from source (no .pyc beside them): an editable install under
        # PYTHONDONTWRITEBYTECODE pays this on every start, an installed wheel (pip compiles it) does not
        "compiled_from_source": max(r["compiled_from_source"] for r in runs),
        "python_modules": runs[0]["python_modules"], "dont_write_bytecode": runs[0]["dont_write_bytecode"],
        "method": ("fresh `python -c` per repeat: import onnxruntime + cxr_edge, Classifier(model) (checksum, "
                   "manifest, head self-check), first predict() on the image file; cumulative ms from spawn; "
                   "peak RSS = VmHWM of that process (ru_maxrss where /proc is absent); bytecode 'installed' = modules "
                   "load from bytecode as after pip install (a private cache filled by one unmeasured start), "
                   "'as-is' = the environment unchanged; compiled_from_source = imported modules without "
                   "bytecode (compiled at every start)"),
    }
