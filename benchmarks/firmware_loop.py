"""Whole-path speed of the runtime as firmware uses it, every figure and ratio from one run.

    python benchmarks/firmware_loop.py [--images 50] [--side 1024] [--threads N] [--rounds 15] [--repeats 30]
        [--requests N] [--model M] [--json out.json]

Makes ``--images`` radiographs from the shared pool (``../shared/data/nih-cxr14-sample/images``,
area/Lanczos-resized to ``--side`` px, written as PNG into a temporary folder that is removed at the
end; nothing is written into the repository) and measures:

(a) **firmware shell loop**: one ``cxr-edge serve --socket`` process, then per image one short
    client process (``socat`` when installed, else ``python3 -c`` with the socket module: what a
    shell script runs) vs one ``cxr-edge predict IMG --json`` process per image. Throughput and
    p50/p99 latency per image for both.
(b) **folder throughput**: ``Engine.run`` over the folder at the CLI's default ``--prefetch`` (as
    ``cxr-edge predict FOLDER`` runs it: one whole-path worker per core, each with a 1-thread model) vs
    ``prefetch=0`` (one at a time, the model on all cores), in the same rounds as one ``--prefetch``
    more (a spare worker) and one decoder ahead of the model, each timed pass after an untimed one over
    a few images; and ``serve`` with requests pipelined on one connection
    at ``--prefetch 1`` vs ``0``, and with ``--workers 2 --threads 1``. Goal: >= 1.5x on 2 cores, judged on
    the median of per-round ratios (``--rounds`` alternating ABBA rounds after a warm-up pass, with a
    bootstrap 95% CI); the ratio of each mode's best round is printed too. And what the
    machine allows: the pipeline's two stages timed alone and then at once on two threads
    (``two_core_capacity``: two vCPUs need not deliver twice one's work).
(c) **end to end vs its parts** on one ``--side`` PNG: ``Engine.predict_object`` vs decode
    (``Classifier.read``) + model (preprocess + ``session.run``), medians. Goal: e2e <= decode +
    model + 2 ms. Also a 2048 px JPEG decoded at full and at reduced size (libjpeg DCT scaling).
(d) **serve per-request overhead**: sequential requests on one persistent connection vs
    in-process ``Engine.predict_object`` on the same image, in alternating (ABBA) blocks of up to 10
    requests: the median of per-block differences with a bootstrap 95% CI, and the difference of the
    two overall medians. Goal: <= 1 ms.

The machine (``lscpu`` model and flags, cores, load average) is printed beside the figures, and
the run is marked NOT FINAL when a training run (``models.train``) shares the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETTLE = 10  # images each mode runs untimed before its timed pass (folder_throughput)
POOL = Path(os.environ.get("CXR_EDGE_SHARED", REPO.parent / "shared")) / "data" / "nih-cxr14-sample" / "images"

CLIENT = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
          "s.sendall(sys.argv[2].encode() + b'\\n'); sys.stdout.write(s.makefile().readline())")


# --------------------------------------------------------------------------- helpers

def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile in ms (p99 of 50 samples is the second largest)."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return round(ordered[k] * 1e3, 3)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def paired_median(values: list[float], digits: int = 3, seed: int = 0) -> dict:
    """The median of per-round (or per-block) paired figures, with a bootstrap 95% CI of that median.

    Why paired: this VM drifts (one-at-a-time 17-24 ms per image within a minute), and the two modes do
    not drift alike, so a ratio of each mode's best round rides on luck; a round's figure compares two
    modes timed next to each other, and drift slower than a round cancels in it.
    """
    import numpy as np

    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(v, size=(2000, v.size), replace=True), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": round(float(np.median(v)), digits), "ci95": [round(float(lo), digits), round(float(hi), digits)],
            "n": int(v.size), "values": [round(float(x), digits) for x in v]}


def timed(call, items) -> list[float]:
    """Seconds each ``call(item)`` took, one after another."""
    out = []
    for item in items:
        t0 = time.perf_counter()
        call(item)
        out.append(time.perf_counter() - t0)
    return out


def abba(keys: list, round_index: int) -> list:
    """The order of the modes in a round: reversed every other round, so neither always goes first."""
    return list(keys) if round_index % 2 == 0 else list(reversed(keys))


def lat(samples: list[float]) -> dict[str, float]:
    total = sum(samples)
    return {"n": len(samples), "p50_ms": pct(samples, 50), "p99_ms": pct(samples, 99),
            "throughput_img_s": round(len(samples) / total, 3) if total else 0.0}


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keys = ("Model name", "CPU family", "Model", "Stepping", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
            "Flags")
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            out[key.strip()] = value.strip()
    return out


def training_running() -> bool:
    try:
        return subprocess.run(["pgrep", "-f", "models.train"], capture_output=True).returncode == 0
    except OSError:
        return False


def make_images(folder: Path, n: int, side: int) -> list[str]:
    import cv2

    pool = sorted(POOL.glob("*.png"))
    if len(pool) < n:
        raise SystemExit(f"need {n} pool images in {POOL} (found {len(pool)}); set CXR_EDGE_SHARED")
    paths = []
    for i, src in enumerate(pool[:n]):
        img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        interp = cv2.INTER_AREA if side < img.shape[0] else cv2.INTER_LANCZOS4
        img = cv2.resize(img, (side, side), interpolation=interp)
        out = folder / f"img{i:03d}.png"
        cv2.imwrite(str(out), img)
        paths.append(str(out))
    return paths


def cli_command() -> list[str]:
    exe = Path(sys.executable).with_name("cxr-edge")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cxr_edge.cli"]


class ServeProcess:
    def __init__(self, folder: Path, model: str, threads: int | None, *extra: str) -> None:
        self.path = str(folder / f"s{time.monotonic_ns() % 10**6}.sock")
        cmd = [*cli_command(), "serve", "--socket", self.path, "--model", model, "--quiet", *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=REPO)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cxr-edge serve did not start")
            time.sleep(0.05)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        return s, s.makefile("rb")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def _req(i, path: str) -> bytes:
    return (json.dumps({"id": i, "path": path}) + "\n").encode()


def _check(reply: dict) -> dict:
    if not reply.get("ok"):
        raise RuntimeError(f"serve replied with an error: {reply.get('error')}")
    return reply


# --------------------------------------------------------------------------- the four measurements

def firmware_loop(paths: list[str], model: str, threads: int | None, folder: Path) -> dict:
    socat = shutil.which("socat")
    server = ServeProcess(folder, model, threads)
    try:
        s, r = server.connect()  # warm up the server (first request pays lazy initialisation)
        s.sendall(_req("warm", paths[0]))
        _check(json.loads(r.readline()))
        s.close()
        serve_lat = []
        for i, path in enumerate(paths):
            req = json.dumps({"id": i, "path": path})
            if socat:
                cmd = ["sh", "-c", f"printf '%s\\n' '{req}' | socat -t 60 - UNIX-CONNECT:{server.path}"]
            else:
                cmd = ["python3", "-c", CLIENT, server.path, req]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            serve_lat.append(time.perf_counter() - t0)
            _check(json.loads(out))
    finally:
        server.stop()
    cli_lat = []
    for path in paths:
        cmd = [*cli_command(), "predict", path, "--json", "--model", model] + (["--threads", str(threads)] if threads else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        cli_lat.append(time.perf_counter() - t0)
        if proc.returncode not in (0, 6):  # 6: flagged out of scope, still a full answer
            raise RuntimeError(f"cxr-edge predict failed ({proc.returncode}): {proc.stderr[-500:]}")
    a = {"client": "socat" if socat else "python3 -c (socket)", "serve_loop": lat(serve_lat), "cli_loop": lat(cli_lat)}
    a["speedup_throughput"] = round(a["serve_loop"]["throughput_img_s"] / a["cli_loop"]["throughput_img_s"], 2)
    return a


def folder_throughput(engine, paths: list[str], model: str, threads: int | None, folder: Path, rounds: int) -> dict:
    """``cxr-edge predict FOLDER`` as the CLI runs it: one at a time (``--prefetch 0``, the model on its
    default threads) vs pipelined at the CLI's default ``--prefetch`` (the model on
    ``pipelined_model_threads`` threads, 1 unless ``--threads`` is given, and ``path_workers`` threads
    each taking an input through the whole path). Two other schedules run in the same rounds for a
    paired comparison: one ``--prefetch`` more (``path_workers``' spare worker) and one decoder thread
    ahead of the model (the schedule before session 21).

    Each timed pass follows an untimed pass of the same mode over the first ``SETTLE`` images: in
    session 25's rounds a mode timed right after the one-at-a-time engine lost about 20 ms, nearly all
    in its first 10 images (docs/results/firmware/PLAN-session25.md), which biased any comparison whose
    modes followed that engine unequally often."""
    from cxr_edge.cli_support import FOLDER_PREFETCH
    from cxr_edge.engine import Engine, path_workers, pipelined_model_threads

    piped_engine = Engine(model, threads=pipelined_model_threads(threads, len(paths), FOLDER_PREFETCH))
    spare = FOLDER_PREFETCH + 1

    def decoder_ahead(items):  # the schedule before session 21: one decoder thread ahead of the model's thread
        for item in piped_engine.decoded(items, prefetch=2):
            yield from piped_engine.finish([item])

    runs = {0: lambda items: engine.run(items, prefetch=0),
            "cli": lambda items: piped_engine.run(items, prefetch=FOLDER_PREFETCH),
            "spare": lambda items: piped_engine.run(items, prefetch=spare), "decoder_ahead": decoder_ahead}
    for fn in runs.values():  # warm-up pass of each mode, not timed
        sum(1 for _ in fn(paths))
    times: dict = {key: [] for key in runs}
    for r in range(rounds):  # alternate (ABBA); keep every round: best of each, and per-round ratios
        for key in abba(list(runs), r):
            sum(1 for _ in runs[key](paths[:SETTLE]))  # settle: not timed
            t0 = time.perf_counter()
            n = sum(1 for _ in runs[key](paths))
            times[key].append(time.perf_counter() - t0)
            assert n == len(paths)
    best = {key: min(v) for key, v in times.items()}
    img_s = lambda key: round(len(paths) / best[key], 3)  # noqa: E731
    paired = lambda key: paired_median([a / c for a, c in zip(times[0], times[key])])  # noqa: E731
    workers = lambda prefetch: path_workers(piped_engine.classifier.bundle.threads, prefetch)  # noqa: E731
    b = {"in_process": {"prefetch": FOLDER_PREFETCH, "settle_images": SETTLE, "one_at_a_time_img_s": img_s(0),
                        "pipelined_img_s": img_s("cli"), "spare_worker_img_s": img_s("spare"),
                        "decoder_ahead_img_s": img_s("decoder_ahead")}}
    b["in_process"]["speedup"] = round(best[0] / best["cli"], 2)
    b["in_process"]["spare_worker_speedup"] = round(best[0] / best["spare"], 2)
    b["in_process"]["decoder_ahead_speedup"] = round(best[0] / best["decoder_ahead"], 2)
    b["in_process"]["paired_speedup"] = paired("cli")  # the goal's figure: the CLI's default
    b["in_process"]["paired_spare_worker_speedup"] = paired("spare")
    b["in_process"]["paired_decoder_ahead_speedup"] = paired("decoder_ahead")
    b["in_process"]["paired_default_over_spare"] = paired_median(
        [a / c for a, c in zip(times["cli"], times["spare"])])  # > 1: the spare worker is faster
    b["in_process"]["rounds"] = rounds
    b["in_process"]["round_ms_per_image"] = {str(key): [round(1e3 * t / len(paths), 3) for t in v]
                                             for key, v in times.items()}
    b["in_process"]["model_threads"] = {"one_at_a_time": engine.classifier.bundle.threads,
                                        "pipelined": piped_engine.classifier.bundle.threads}
    b["in_process"]["path_workers"] = workers(FOLDER_PREFETCH)
    b["in_process"]["spare_prefetch"], b["in_process"]["spare_path_workers"] = spare, workers(spare)
    piped = {}
    configs = {"prefetch0": (threads, "--prefetch", "0"), "prefetch1": (threads, "--prefetch", "1")}
    if threads is None:  # the throughput set-up for pipelining clients: a 1-thread model per core
        configs["workers2_threads1"] = (1, "--workers", "2")
    for key, (n_threads, *extra) in configs.items():
        server = ServeProcess(folder, model, n_threads, *extra, "--queue-size", str(len(paths)))
        try:
            s, r = server.connect()
            s.sendall(_req("warm", paths[0]))
            _check(json.loads(r.readline()))
            t_best = float("inf")
            for _ in range(min(rounds, 5)):  # a side figure: five rounds keep the run short
                t0 = time.perf_counter()
                s.sendall(b"".join(_req(i, p) for i, p in enumerate(paths)))  # pipelined
                for _ in paths:
                    _check(json.loads(r.readline()))
                t_best = min(t_best, time.perf_counter() - t0)
            s.close()
        finally:
            server.stop()
        piped[key] = t_best
    b["serve_pipelined"] = {f"{key}_img_s": round(len(paths) / t, 3) for key, t in piped.items()}
    b["serve_pipelined"]["speedup"] = round(piped["prefetch0"] / piped["prefetch1"], 2)
    if "workers2_threads1" in piped:
        b["serve_pipelined"]["workers2_speedup"] = round(piped["prefetch0"] / piped["workers2_threads1"], 2)
    return b


def two_core_capacity(one, model: str, pngs: list[str], runs: int) -> dict:
    """What two busy threads deliver on this machine, measured with the pipeline's own two stages (PNG
    decode + pixel rules + preprocessing, and the 1-thread model), cycling over the folder's images as
    (b) does: each alone, then both at once on two threads. A VM's two vCPUs may share a physical core,
    or memory bandwidth, so two threads need not do twice the work. ``pipeline_bound`` (one-at-a-time
    time / the concurrent period) is the folder speedup this machine allows before any overhead of the
    pipeline itself; ``ideal_bound`` is what two full cores would allow (one at a time / half the two
    stages' sum): below 2 because one at a time already runs the model on both cores. ``one``: the
    one-at-a-time engine (the model on its default threads), the baseline of (b)."""
    import itertools
    import threading

    from cxr_edge.engine import Engine

    engine = Engine(model, threads=1)
    clf = engine.classifier
    spec, outputs = clf.manifest.preprocessing, clf._outputs
    batches = [engine.decode(p).prepared.tensor[None] for p in pngs]  # what the decoder stage hands the model
    n = max(runs, len(pngs))

    def cycling(fn, items, count: int):
        def loop() -> None:
            for item in itertools.islice(itertools.cycle(items), count):
                fn(item)
        return loop

    stages = {"decode": (engine.decode, pngs),
              "model": (lambda x: clf.bundle.session.run(outputs, {spec.input_name: x}), batches),
              "one": (one.predict_object, pngs)}
    stage_decode, stage_model, stage_one = (cycling(fn, items, n) for fn, items in stages.values())

    def alone(name: str) -> float:
        cycling(*stages[name], 3)()  # warm-up: a few calls, not a whole pass
        t0 = time.perf_counter()
        cycling(*stages[name], n)()
        return time.perf_counter() - t0

    def together(la, lb) -> float:
        start = threading.Barrier(3)
        threads = [threading.Thread(target=lambda f=f: (start.wait(), f())) for f in (la, lb)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    t_dec, t_mod = alone("decode"), alone("model")
    t_mm, t_dm = together(stage_model, stage_model), together(stage_decode, stage_model)
    t_one = alone("one")
    ms = lambda t: round(1e3 * t / n, 3)  # noqa: E731
    return {"runs": n, "images": len(pngs), "decode_stage_ms": ms(t_dec), "model_1thread_ms": ms(t_mod),
            "model_x2_concurrent_capacity": round(2 * t_mod / t_mm, 2),
            "decode_and_model_concurrent_period_ms": ms(t_dm),
            "decode_and_model_capacity": round((t_dec + t_mod) / t_dm, 2),
            "one_at_a_time_ms": ms(t_one), "pipeline_bound": round(t_one / t_dm, 2),
            "ideal_bound": round(t_one / ((t_dec + t_mod) / 2), 2)}


def end_to_end(engine, png: str, folder: Path, repeats: int) -> dict:
    import cv2

    from cxr_edge.preprocess import preprocess

    clf = engine.classifier
    spec = clf.manifest.preprocessing
    outputs = clf._outputs
    for _ in range(3):
        engine.predict_object(png)
    e2e, dec, model, scope = [], [], [], []
    for _ in range(repeats):  # interleaved, so a disturbance hits all three alike
        t0 = time.perf_counter()
        obj = engine.predict_object(png)
        t1 = time.perf_counter()
        scope.append(obj["timings_ms"].get("scope", 0.0) / 1e3)
        rad = clf.read(png)
        t2 = time.perf_counter()
        batch = preprocess([rad.pixels], spec)
        clf.bundle.session.run(outputs, {spec.input_name: batch})
        t3 = time.perf_counter()
        e2e.append(t1 - t0)
        dec.append(t2 - t1)
        model.append(t3 - t2)
    c = {"image": f"{rad.pixels.shape[1]}x{rad.pixels.shape[0]} PNG", "e2e_ms": median_ms(e2e),
         "decode_ms": median_ms(dec), "model_ms": median_ms(model)}
    c["e2e_minus_parts_ms"] = round(c["e2e_ms"] - c["decode_ms"] - c["model_ms"], 3)
    c["of_which_scope_gate_ms"] = median_ms(scope)  # the input scope gate's pixel rules + feature score
    big = cv2.resize(cv2.imread(png, cv2.IMREAD_GRAYSCALE), (2048, 2048), interpolation=cv2.INTER_LANCZOS4)
    jpg = folder / "big2048.jpg"
    cv2.imwrite(str(jpg), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    full, reduced = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.read_scoped(str(jpg), reduce=False)
        t1 = time.perf_counter()
        rad, _ = clf.read_scoped(str(jpg), reduce=True)
        reduced.append(time.perf_counter() - t1)
        full.append(t1 - t0)
    c["jpeg_2048"] = {"decode_full_ms": median_ms(full), "decode_reduced_ms": median_ms(reduced),
                      "decode_scale": rad.info.get("decode_scale", 1),
                      "speedup": round(statistics.median(full) / statistics.median(reduced), 2)}
    return c


def serve_overhead(engine, png: str, model: str, threads: int | None, folder: Path, requests: int) -> dict:
    for _ in range(3):
        engine.predict_object(png)
    d: dict = {}
    for depth in (1, 0):  # the default (a decoder thread hands each request to the worker), and without it
        server = ServeProcess(folder, model, threads, "--prefetch", str(depth))
        inproc, served = [], []
        try:
            s, r = server.connect()
            for _ in range(3):
                s.sendall(_req("warm", png))
                _check(json.loads(r.readline()))
            # alternating blocks (ABBA), a pause before each: each process's onnxruntime threads spin for
            # a while after a run, and a request issued right after the other process's would pay for it
            block = max(1, min(10, requests // 10))

            def served_one(i: int) -> None:
                s.sendall(_req(i, png))
                _check(json.loads(r.readline()))

            sides = [("in", lambda i: engine.predict_object(png)), ("serve", served_one)]
            diffs = []
            for k, b0 in enumerate(range(0, requests, block)):
                ids = range(b0, min(b0 + block, requests))
                got = {}
                for side, call in abba(sides, k):
                    time.sleep(0.05)
                    got[side] = timed(call, ids)
                inproc += got["in"]
                served += got["serve"]
                diffs.append(1e3 * (statistics.median(got["serve"]) - statistics.median(got["in"])))
            s.close()
        finally:
            server.stop()
        row = {"in_process_ms": median_ms(inproc), "serve_ms": median_ms(served)}
        row["overhead_ms"] = round(row["serve_ms"] - row["in_process_ms"], 3)
        row["paired_overhead_ms"] = paired_median(diffs)
        row["block"] = block
        d[f"prefetch{depth}"] = row
    return d


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50, help="images in the folder / firmware loop (default 50)")
    p.add_argument("--side", type=int, default=1024, help="pixel size of the generated PNGs (default 1024)")
    p.add_argument("--repeats", type=int, default=30, help="repeats for (b2) and (c) (default 30)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests each way for (d), per --prefetch depth (default: --repeats); its CI narrows "
                        "with the square root of this")
    p.add_argument("--rounds", type=int, default=15,
                   help="alternating rounds for (b): the best of each mode, and per-round ratios (default 15)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: the runtime's)")
    p.add_argument("--model", default=None, help="bundle (default: the embedded default model)")
    p.add_argument("--skip-cli-loop", action="store_true", help="skip (a) (it starts one process per image)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from cxr_edge.bench.machine import machine_info
    from cxr_edge.engine import Engine

    busy = training_running()
    engine = Engine(args.model, threads=args.threads)
    model = engine.classifier.bundle.path
    cpu = lscpu()
    result: dict = {"model_id": engine.model_id, "threads": engine.classifier.bundle.threads,
                    "images": args.images, "side": args.side,
                    "machine": {"lscpu_model": cpu.get("Model name"),
                                # a VM's model name can be just "AMD EPYC": family/model/stepping tell its generation
                                "lscpu_family_model_stepping": "/".join(cpu.get(k, "?") for k in
                                                                        ("CPU family", "Model", "Stepping")),
                                "cpus": cpu.get("CPU(s)"),
                                "threads_per_core": cpu.get("Thread(s) per core"),
                                "isa": machine_info().get("isa"), "lscpu_flags": cpu.get("Flags"),
                                "load_average_1min_start": round(os.getloadavg()[0], 2)},
                    "final": not busy}
    tmp = Path(tempfile.mkdtemp(prefix="cxfw-", dir="/tmp"))
    try:
        paths = make_images(tmp, args.images, args.side)
        if not args.skip_cli_loop:
            result["a_firmware_loop"] = firmware_loop(paths, model, args.threads, tmp)
        result["b_folder_throughput"] = folder_throughput(engine, paths, model, args.threads, tmp, args.rounds)
        result["b2_two_core_capacity"] = two_core_capacity(engine, model, paths, args.repeats)
        result["c_end_to_end"] = end_to_end(engine, paths[0], tmp, args.repeats)
        result["d_serve_overhead"] = serve_overhead(engine, paths[0], model, args.threads, tmp,
                                                   args.requests or args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    result["final"] = result["final"] and not training_running()
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def report(r: dict) -> None:
    m = r["machine"]
    print(f"machine: {m['lscpu_model']} (family/model/stepping {m.get('lscpu_family_model_stepping')}), "
          f"{m['cpus']} CPU(s), {m['threads_per_core']} thread(s)/core; "
          f"ISA {' '.join(m['isa'] or [])}; load average {m['load_average_1min_start']} -> {m['load_average_1min_end']}")
    print(f"lscpu flags: {m['lscpu_flags']}")
    print(f"model {r['model_id']}, onnxruntime threads {r['threads']}, {r['images']} images of {r['side']} px")
    if not r["final"]:
        print("NOT FINAL: a training run (models.train) shared the machine during this run")
    if "a_firmware_loop" in r:
        a = r["a_firmware_loop"]
        for name in ("serve_loop", "cli_loop"):
            x = a[name]
            label = f"serve + {a['client']} per image" if name == "serve_loop" else "cxr-edge predict --json per image"
            print(f"(a) {label:<42} {x['throughput_img_s']:7.2f} img/s  p50 {x['p50_ms']:8.1f} ms  p99 {x['p99_ms']:8.1f} ms")
        print(f"    serve loop / per-call CLI throughput: {a['speedup_throughput']}x")
    b = r["b_folder_throughput"]
    bi, bs = b["in_process"], b["serve_pipelined"]
    ps, pd = bi["paired_speedup"], bi["paired_decoder_ahead_speedup"]
    p3, po, n, n3 = bi["paired_spare_worker_speedup"], bi["paired_default_over_spare"], bi["prefetch"], bi["spare_prefetch"]
    print(f"(b) folder, paired rounds: prefetch {n} / one at a time {ps['median']:.2f}x, 95% CI {ps['ci95'][0]:.2f}-"
          f"{ps['ci95'][1]:.2f} over {ps['n']} rounds (goal >= 1.5x; {bi['path_workers']} whole-path "
          f"workers); one decoder ahead instead {pd['median']:.2f}x ({pd['ci95'][0]:.2f}-{pd['ci95'][1]:.2f})")
    print(f"    prefetch {n3} ({bi['spare_path_workers']} workers) / one at a time {p3['median']:.2f}x "
          f"({p3['ci95'][0]:.2f}-{p3['ci95'][1]:.2f}); prefetch {n} time / prefetch {n3} time {po['median']:.3f} "
          f"({po['ci95'][0]:.3f}-{po['ci95'][1]:.3f}); each timed pass after an untimed one over "
          f"{bi['settle_images']} images")
    print(f"(b) folder, best rounds: one at a time {bi['one_at_a_time_img_s']:.2f} img/s, prefetch {n} "
          f"{bi['pipelined_img_s']:.2f} img/s: {bi['speedup']}x; one decoder ahead of the model instead: "
          f"{bi['decoder_ahead_img_s']:.2f} img/s, {bi['decoder_ahead_speedup']}x")
    print(f"    serve pipelined, --prefetch 0 {bs['prefetch0_img_s']:.2f} img/s, --prefetch 1 {bs['prefetch1_img_s']:.2f} "
          f"img/s: {bs['speedup']}x" + (f"; --workers 2 --threads 1 {bs['workers2_threads1_img_s']:.2f} img/s: "
                                        f"{bs['workers2_speedup']}x" if "workers2_speedup" in bs else ""))
    k = r.get("b2_two_core_capacity")
    if k:
        print(f"    two busy threads here: model+model {k['model_x2_concurrent_capacity']}x one thread's work, "
              f"decode+model {k['decode_and_model_capacity']}x (decode stage {k['decode_stage_ms']:.2f} ms, "
              f"1-thread model {k['model_1thread_ms']:.2f} ms, together {k['decode_and_model_concurrent_period_ms']:.2f}"
              f" ms per image); one at a time {k['one_at_a_time_ms']:.2f} ms: this machine bounds the folder "
              f"speedup at {k['pipeline_bound']}x" + (f" (two full cores: {k['ideal_bound']}x)" if "ideal_bound" in k else ""))
    c = r["c_end_to_end"]
    print(f"(c) {c['image']}: e2e {c['e2e_ms']:.2f} ms = decode {c['decode_ms']:.2f} + model {c['model_ms']:.2f} "
          f"{c['e2e_minus_parts_ms']:+.2f} ms (goal <= +2 ms; of which the scope gate {c['of_which_scope_gate_ms']:.2f} ms)")
    j = c["jpeg_2048"]
    print(f"    2048 px JPEG decode: full {j['decode_full_ms']:.2f} ms, reduced (1/{j['decode_scale']}) "
          f"{j['decode_reduced_ms']:.2f} ms: {j['speedup']}x")
    for depth, d in r["d_serve_overhead"].items():
        paired = d.get("paired_overhead_ms")
        extra = (f"; paired blocks of {d['block']}: {paired['median']:+.3f} ms, 95% CI {paired['ci95'][0]:+.3f} to "
                 f"{paired['ci95'][1]:+.3f} over {paired['n']} blocks" if paired else "")
        print(f"(d) serve --{depth.replace('prefetch', 'prefetch ')}: {d['serve_ms']:.2f} ms vs in-process "
              f"{d['in_process_ms']:.2f} ms: overhead {d['overhead_ms']:+.3f} ms per request{extra} (goal <= 1 ms)")


if __name__ == "__main__":
    sys.exit(main())
