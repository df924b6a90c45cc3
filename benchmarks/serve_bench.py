"""Per-request overhead of ``cxr-edge serve`` vs in-process prediction (and vs one CLI process per image).

    python benchmarks/serve_bench.py [--model M] [--image IMG] [--requests 50] [--threads 1] [--json out.json]

Measures, on the same image and bundle, median wall time per request of:

* ``in-process``: :meth:`cxr_edge.engine.Engine.predict_object` (read + preprocess + infer + JSON object);
* ``serve (path)``: one Unix-socket connection, sequential ``{"id", "path"}`` requests, full round trip
  (JSON encode, socket, server thread hand-off, the same engine call, reply parse);
* ``serve (image_b64)``: the same with the file's bytes sent inline (base64 encode + decode included);
* ``serve (new connection per request)``: connect + one request + close;
* ``cli process``: ``python -m cxr_edge.cli predict IMG --json`` per image (interpreter start, imports,
  bundle load and checks every time): what a firmware script pays without the server.

Overhead = serve median - in-process median. Runtime only (no torch). Keep ``--requests`` small on a
busy machine: numbers are noisy when other processes share the cores (the 1-minute load average is
reported).
"""
from __future__ import annotations

import argparse
import base64
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


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def _client(path: str) -> tuple[socket.socket, "object"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s, s.makefile("rb")


def _ask(sock: socket.socket, reader, payload: bytes) -> dict:
    sock.sendall(payload)
    reply = json.loads(reader.readline())
    if not reply.get("ok"):
        raise RuntimeError(f"serve replied with an error: {reply.get('error')}")
    return reply


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundle (default: the embedded default model)")
    p.add_argument("--image", default=str(REPO / "cxr_edge" / "data" / "sample_chest_pa.png"))
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cli-runs", type=int, default=3, help="fresh CLI processes to time (0 = skip)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    from cxr_edge.engine import Engine

    image = os.path.abspath(args.image)
    engine = Engine(args.model, threads=args.threads)
    model_path = engine.classifier.bundle.path
    for _ in range(args.warmup):
        engine.predict_object(image)
    inproc = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        engine.predict_object(image)
        inproc.append(time.perf_counter() - t0)

    tmp = tempfile.mkdtemp(prefix="cxsb-", dir="/tmp")
    sock_path = os.path.join(tmp, "s.sock")
    server = subprocess.Popen([sys.executable, "-m", "cxr_edge.cli", "serve", "--socket", sock_path, "--model",
                               model_path, "--threads", str(args.threads), "--quiet"], cwd=REPO)
    results: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock_path):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        path_req = (json.dumps({"id": 0, "path": image}) + "\n").encode()
        b64_req = (json.dumps({"id": 0, "image_b64": base64.b64encode(Path(image).read_bytes()).decode()}) + "\n").encode()
        sock, reader = _client(sock_path)
        for name, payload in (("serve (path)", path_req), ("serve (image_b64)", b64_req)):
            for _ in range(args.warmup):
                _ask(sock, reader, payload)
            samples = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                _ask(sock, reader, payload)
                samples.append(time.perf_counter() - t0)
            results[name] = _median_ms(samples)
        sock.close()
        samples = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            s, r = _client(sock_path)
            _ask(s, r, path_req)
            s.close()
            samples.append(time.perf_counter() - t0)
        results["serve (new connection per request)"] = _median_ms(samples)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    cli = []
    for _ in range(args.cli_runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", image, "--json", "--model", model_path,
                        "--threads", str(args.threads)], cwd=REPO, check=True, capture_output=True)
        cli.append(time.perf_counter() - t0)

    base = _median_ms(inproc)
    out = {
        "model_id": engine.model_id, "image": os.path.basename(image), "requests": args.requests,
        "threads": args.threads, "load_average_1min": round(os.getloadavg()[0], 2),
        "median_ms": {"in-process": base, **results, **({"cli process": _median_ms(cli)} if cli else {})},
    }
    out["overhead_ms_vs_in_process"] = {k: round(v - base, 3) for k, v in out["median_ms"].items() if k != "in-process"}
    width = max(len(k) for k in out["median_ms"])
    print(f"model {out['model_id']}, {out['image']}, {args.requests} requests, {args.threads} thread(s), "
          f"load average {out['load_average_1min']}")
    for k, v in out["median_ms"].items():
        extra = "" if k == "in-process" else f"  ({out['overhead_ms_vs_in_process'][k]:+.2f} ms)"
        print(f"  {k:<{width}}  {v:8.2f} ms median{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
