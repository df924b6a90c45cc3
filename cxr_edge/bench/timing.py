"""Latency statistics over repeated runs, after a warm-up, with an honest run count.

Why a run policy instead of a fixed count: a 1 ms model needs hundreds of runs for a stable
p99, a 1 s model a few dozen; ``runs=None`` keeps going until both a minimum count and a minimum
measuring time are reached (capped), and the count actually used is always reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

AUTO_MIN_RUNS = 30
AUTO_MIN_SECONDS = 2.0
AUTO_MAX_RUNS = 1000
AUTO_MAX_SECONDS = 30.0
RUN_POLICY = (f"runs=auto: at least {AUTO_MIN_RUNS} runs and {AUTO_MIN_SECONDS:g} s of measuring, stopping at "
              f"{AUTO_MAX_RUNS} runs or {AUTO_MAX_SECONDS:g} s (at least 10 runs); p99 over fewer than 100 runs "
              "is close to the maximum")


@dataclass
class Timing:
    """Per-call wall-clock times in milliseconds, and their summary."""

    times_ms: np.ndarray
    warmup: int

    @property
    def runs(self) -> int:
        return int(self.times_ms.size)

    def summary(self) -> dict[str, float]:
        t = self.times_ms
        return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)),
                "p99": float(np.percentile(t, 99)), "mean": float(t.mean()), "min": float(t.min()),
                "max": float(t.max()), "std": float(t.std(ddof=1)) if t.size > 1 else 0.0}


def measure(fn: Callable[[], object], runs: int | None, warmup: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times (or by the auto policy) timed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        n, elapsed = len(times), time.perf_counter() - start
        if runs is not None:
            if n >= runs:
                break
        elif (n >= AUTO_MIN_RUNS and elapsed >= AUTO_MIN_SECONDS) or n >= AUTO_MAX_RUNS or \
                (elapsed >= AUTO_MAX_SECONDS and n >= 10):
            break
    return Timing(np.asarray(times, dtype=np.float64), warmup)
