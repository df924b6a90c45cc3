"""``cxr-edge serve`` under the clients a firmware box really has: one connection per radiograph, and a
client that stops reading its replies.

    python benchmarks/serve_soak.py [--model M] [--connections 20000] [--json out.json]

Two measurements on one server process (``--quiet``; the default model unless ``--model``):

* **connection churn**: ``--connections`` clients one after another, each connects, asks ``health``,
  reads the reply and closes (what the documented ``socat``/``python3 -c`` one-liners do per image).
  Reported: the server's resident memory (``VmRSS``) before and after, and its growth per 1,000
  connections, plus ``health``'s count of open connections at the end (1: the asking one).
* **silent client**: client A pipelines requests for 3 s and never reads a reply, so its replies fill
  the socket buffer; client B then asks for a prediction on the sample radiograph, retrying every
  0.5 s while it is told ``busy``. Reported: how long until B is answered (bounded by ``--send-timeout``)
  and whether SIGTERM then ends the server (exit 0) within 20 s.

Not a timed unit test: the figures depend on the machine (recorded beside them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "cxr_edge" / "data" / "sample_chest_pa.png"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc (Linux only)")


def _ask(path: str, request: dict, timeout_s: float = 30.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        with s.makefile("rb") as f:
            return json.loads(f.readline())


def churn(path: str, pid: int, connections: int) -> dict:
    _ask(path, {"op": "health"})
    before, t0 = _rss_kib(pid), time.monotonic()
    for i in range(connections):
        if not _ask(path, {"id": i, "op": "health"}).get("ok"):
            raise RuntimeError("health request failed")
    seconds, after = time.monotonic() - t0, _rss_kib(pid)
    return {"connections": connections, "seconds": round(seconds, 2), "rss_kib_before": before,
            "rss_kib_after": after, "rss_kib_per_1000": round((after - before) * 1000 / connections, 1),
            "open_connections_reported": _ask(path, {"op": "health"}).get("connections", {}).get("open")}


def silent_client(path: str, image: str) -> tuple[dict, socket.socket]:
    """The figures, and client A's socket, still open (it must not be what ends the server's wait)."""
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.connect(path)
    a.setblocking(False)
    flood = (json.dumps({"id": "a", "image_b64": "***"}) + "\n").encode() * 200
    sent, t0, closed_by_server = 0, time.monotonic(), False
    while time.monotonic() - t0 < 3:
        try:
            sent += a.send(flood)
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            closed_by_server = True
            break
    t0, tries, reply = time.monotonic(), 0, {}
    while time.monotonic() - t0 < 40:
        tries += 1
        try:
            reply = _ask(path, {"id": "b", "path": image})
        except socket.timeout:
            break
        if reply.get("ok"):
            break
        time.sleep(0.5)
    return {"bytes_sent_unread": sent, "silent_client_closed_by_server": closed_by_server,
            "b_answered": bool(reply.get("ok")), "b_seconds": round(time.monotonic() - t0, 2), "b_tries": tries}, a


def _code_version() -> str:
    """The commit, and whether the runtime's files differ from it (a measurement of uncommitted code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "cxr_edge"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted cxr_edge changes' if dirty else ''}" if head else "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundle (default: the embedded default model)")
    p.add_argument("--image", default=str(SAMPLE))
    p.add_argument("--connections", type=int, default=20000)
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)

    from cxr_edge.bench.machine import machine_info

    folder = tempfile.mkdtemp(prefix="soak-", dir="/tmp")  # short: sun_path is 108 bytes
    sock = os.path.join(folder, "s.sock")
    cmd = [sys.executable, "-m", "cxr_edge.cli", "serve", "--socket", sock, "--quiet"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        record = {"machine": machine_info(), "code": _code_version(), "load_average_1min": os.getloadavg()[0],
                  "churn": churn(sock, proc.pid, args.connections)}
        record["silent"], silent = silent_client(sock, args.image)
        proc.terminate()  # with the silent client still connected
        try:
            record["sigterm_exit"] = proc.wait(20)
        except subprocess.TimeoutExpired:
            record["sigterm_exit"] = "still running after 20 s"
        silent.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
    m, c, s = record["machine"], record["churn"], record["silent"]
    print(f"machine: {m['cpu_model']}, {m['usable_cpus']} CPU(s); load average {record['load_average_1min']:.2f}; "
          f"code {record['code']}")
    print(f"churn: {c['connections']} connections in {c['seconds']} s: server RSS {c['rss_kib_before']} -> "
          f"{c['rss_kib_after']} KiB ({c['rss_kib_per_1000']:+} KiB per 1000); health then reports "
          f"{c['open_connections_reported']} open connection(s)")
    print(f"silent client: {s['bytes_sent_unread']} bytes of requests, replies never read (closed by the server: "
          f"{s['silent_client_closed_by_server']}); another client answered: {s['b_answered']} after "
          f"{s['b_seconds']} s ({s['b_tries']} tries); SIGTERM exit: {record['sigterm_exit']}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if s["b_answered"] and record["sigterm_exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
