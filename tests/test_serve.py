"""cxr-edge serve: a real server process on a temporary Unix socket (and on stdio) with the tiny bundle."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_edge.cli import main

REPO = Path(__file__).resolve().parents[1]


def _png(path, seed=0, size=200):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((size, size)) * 255).astype(np.uint8), (0, 0), 3)
    cv2.imwrite(str(path), img)
    return path


class Server:
    """``cxr-edge serve --socket`` in a subprocess; stopped (SIGTERM) when the test ends."""

    def __init__(self, bundle: Path, *extra: str, drain_stderr: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="cxs-", dir="/tmp")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "s.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "cxr_edge.cli", "serve", "--socket", self.path,
                                      "--model", str(bundle), "--threads", "1", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self._err: list[str] = []
        self._drain = threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True) \
            if drain_stderr else None  # for tests that make the server log a lot (a pipe holds 64 KiB)
        if self._drain:
            self._drain.start()
        deadline = time.monotonic() + 120
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def connect(self) -> "Client":
        return Client(self.path)

    def stop(self, sig=signal.SIGTERM, timeout=60) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            if self._drain:
                self.proc.wait(timeout=timeout)
                self._drain.join(timeout)
                err = "".join(self._err)
            else:
                _, err = self.proc.communicate(timeout=timeout)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode, err


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else (json.dumps(obj) + "\n").encode()
        self.sock.sendall(data)

    def recv(self) -> dict:
        line = self.file.readline()
        assert line, "server closed the connection"
        return json.loads(line)

    def ask(self, obj) -> dict:
        self.send(obj)
        return self.recv()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def images(tmp_path):
    return [_png(tmp_path / f"img{i}.png", seed=i) for i in range(4)]


def _schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "cxr_edge" / "schema" / "prediction.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def test_concurrent_clients_health_info_and_bad_input(tiny_bundle, images, tmp_path, capsys):
    validator = _schema_validator()
    # the reference: the CLI's own predict --json for the same files
    assert main(["predict", *map(str, images), "--json", "--model", str(tiny_bundle), "--threads", "1"]) == 0
    expected = {json.loads(l)["source"]: json.loads(l) for l in capsys.readouterr().out.splitlines()}
    server = Server(tiny_bundle, "--workers", "2", "--queue-size", "16")
    try:
        c = server.connect()
        health = c.ask({"id": "h", "op": "health"})
        assert health["ok"] and health["status"] == "ok" and health["model_id"] == "tiny-test" and health["id"] == "h"
        info = c.ask({"id": 7, "op": "info"})
        assert info["ok"] and info["info"]["labels"] == ["label_0", "label_1", "label_2"] and info["id"] == 7
        replies: dict[str, dict] = {}
        lock = threading.Lock()

        def client(k: int) -> None:
            cl = server.connect()
            for i, img in enumerate(images):  # pipelined: all requests first, then the replies
                req = {"id": f"c{k}-{i}", "path": str(img)} if (k + i) % 2 else \
                    {"id": f"c{k}-{i}", "image_b64": base64.b64encode(img.read_bytes()).decode()}
                cl.send(req)
            got = [cl.recv() for _ in images]
            cl.close()
            with lock:
                replies.update({r["id"]: r for r in got})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(replies) == 16
        for rid, r in replies.items():
            k, i = map(int, rid[1:].split("-"))
            ref = expected[str(images[i])]
            assert r["ok"] and r["probabilities"] == ref["probabilities"] and r["decisions"] == ref["decisions"]
            assert r["source"] == (str(images[i]) if (k + i) % 2 else "<image_b64>")
            assert set(r) == set(ref) | {"id"}  # the same object as predict --json, plus id
            validator.validate(r)
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        for req, code in (({"id": 1, "path": str(bad)}, "corrupt_image"),
                          ({"id": 2, "path": str(tmp_path / "missing.png")}, "image_error"),
                          ({"id": 3, "image_b64": "@@not base64@@"}, "invalid_request"),
                          ({"id": 4}, "invalid_request"),
                          ({"id": 5, "path": "a", "image_b64": "b"}, "invalid_request"),
                          ({"id": 6, "op": "reboot"}, "invalid_request")):
            r = c.ask(req)
            assert r["ok"] is False and r["id"] == req["id"] and r["error"]["code"] == code, r
            validator.validate(r)
        r = c.ask(b"this is not json\n")
        assert r["id"] is None and r["error"]["code"] == "invalid_request"
        validator.validate(health)
        validator.validate(info)
        assert c.ask({"id": "again", "op": "health"})["served"] >= 16  # the connection is still usable
        c.close()
    finally:
        rc, err = server.stop()
    assert rc == 0 and "Traceback" not in err
    for img in images:  # no paths or file names in the logs
        assert str(img) not in err and img.name not in err
    assert "img0" not in err and "bad.png" not in err


def test_busy_reply_when_the_queue_is_full_and_request_size_cap(tiny_bundle, images):
    server = Server(tiny_bundle, "--workers", "1", "--queue-size", "0", "--test-delay-ms", "1500",
                    "--max-request-bytes", "4096")
    try:
        a, b = server.connect(), server.connect()
        a.send({"id": "slow", "path": str(images[0])})
        time.sleep(0.5)  # "slow" now occupies the only worker, nothing may wait
        busy = b.ask({"id": "second", "path": str(images[1])})
        assert busy["ok"] is False and busy["id"] == "second"
        assert busy["error"]["type"] == "BusyError" and busy["error"]["code"] == "busy"
        health = b.ask({"id": "h", "op": "health"})  # answered at once, even when busy
        assert health["ok"] and health["queue"]["in_flight"] == 1
        assert a.recv()["ok"] is True
        big = b.ask({"id": "big", "image_b64": "A" * 10_000})
        assert big["error"]["code"] == "request_too_large" and big["id"] is None
        assert b.ask({"id": "after", "op": "health"})["ok"]  # the rest of the long line was discarded
        _schema_validator().validate(busy)
        a.close()
        b.close()
    finally:
        rc, err = server.stop()
    assert rc == 0 and "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_answers_in_flight_requests_then_exits_cleanly(tiny_bundle, images, sig):
    server = Server(tiny_bundle, "--workers", "1", "--queue-size", "2", "--test-delay-ms", "800")
    c = server.connect()
    c.send({"id": "in-flight", "path": str(images[0])})
    c.send({"id": "queued", "path": str(images[1])})
    time.sleep(0.3)
    server.proc.send_signal(sig)
    first, second = c.recv(), c.recv()
    assert {first["id"], second["id"]} == {"in-flight", "queued"} and first["ok"] and second["ok"]
    assert c.file.readline() == b""  # then the server closes the connection
    c.close()
    server.proc.wait(timeout=60)  # it exits by itself (a second signal during interpreter exit would kill it)
    rc, err = server.stop()
    assert rc == 0 and "Traceback" not in err and "stopped after 2 prediction(s)" in err
    assert not os.path.exists(server.path)  # the socket file is removed


def test_stdio_mode(tiny_bundle, images):
    reqs = [{"id": 1, "path": str(images[0])}, {"id": 2, "op": "health"},
            {"id": 3, "image_b64": base64.b64encode(images[1].read_bytes()).decode()}]
    proc = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "serve", "--stdio", "--model", str(tiny_bundle),
                           "--threads", "1", "--quiet"], input="".join(json.dumps(r) + "\n" for r in reqs),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stderr == ""
    replies = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(replies) == {1, 2, 3} and all(r["ok"] for r in replies.values())
    assert replies[2]["op"] == "health"


def test_serve_usage_errors(tiny_bundle, tmp_path, capsys):
    assert main(["serve", "--model", str(tiny_bundle)]) == 2  # neither --socket nor --stdio
    assert "--socket" in capsys.readouterr().err
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    assert main(["serve", "--socket", str(not_a_socket), "--model", str(tiny_bundle)]) == 5
    assert not_a_socket.read_text() == "x"  # never replaced
    assert main(["serve", "--socket", "/tmp/" + "x" * 120, "--model", str(tiny_bundle)]) == 5
    assert main(["serve", "--stdio", "--workers", "0", "--model", str(tiny_bundle)]) == 2
    for flag, value in (("--max-connections", "0"), ("--send-timeout", "0"), ("--idle-timeout", "-1"),
                        ("--send-timeout", "nan")):
        assert main(["serve", "--stdio", flag, value, "--model", str(tiny_bundle)]) == 2
        assert flag in capsys.readouterr().err


def _wait_for(predicate, timeout=30.0, step=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def test_closed_connections_leave_nothing_behind(tiny_bundle):
    """A firmware script connects once per radiograph: the server must not keep each closed connection."""
    server = Server(tiny_bundle)
    try:
        for i in range(300):
            c = server.connect()
            assert c.ask({"id": i, "op": "health"})["ok"]
            c.close()
        probe = server.connect()
        assert _wait_for(lambda: probe.ask({"op": "health"})["connections"]["open"] == 1)
        health = probe.ask({"id": "h", "op": "health"})
        assert health["connections"] == {"capacity": 16, "open": 1}
        _schema_validator().validate(health)
        probe.close()
    finally:
        rc, err = server.stop()
    assert rc == 0 and "Traceback" not in err


def test_max_connections_refuses_one_more_with_a_busy_line(tiny_bundle):
    server = Server(tiny_bundle, "--max-connections", "2")
    try:
        a, b = server.connect(), server.connect()
        assert a.ask({"op": "health"})["ok"] and b.ask({"op": "health"})["ok"]
        c = server.connect()
        refused = c.recv()  # sent at once, before any request
        assert refused["ok"] is False and refused["id"] is None and refused["source"] == "<connection>"
        assert refused["error"]["type"] == "BusyError" and "--max-connections" in refused["error"]["message"]
        _schema_validator().validate(refused)
        assert c.file.readline() == b""  # and closed
        c.close()
        a.close()  # a freed place is given to the next client

        def served() -> bool:
            d = server.connect()
            ok = d.ask({"op": "health"}).get("ok", False)
            d.close()
            return ok

        assert _wait_for(served)
        assert b.ask({"op": "health"})["connections"]["open"] <= 2
        b.close()
    finally:
        rc, err = server.stop()
    assert rc == 0 and "Traceback" not in err and "connection refused: BusyError" in err


def test_a_client_that_never_reads_cannot_stall_the_server(tiny_bundle, images):
    """Its replies fill the socket buffer; without a send deadline the worker blocks in it for good: every
    other client gets 'busy' forever and SIGTERM never finishes the drain."""
    server = Server(tiny_bundle, "--workers", "1", "--send-timeout", "1", drain_stderr=True)
    try:
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        a.connect(server.path)
        a.setblocking(False)
        flood = (json.dumps({"id": "a", "image_b64": "***"}) + "\n").encode() * 200  # answered by the worker
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:  # until the server stops reading it (its replies are not taken)
            try:
                a.send(flood)
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):  # the server has closed it already
                break

        def answered() -> bool:
            c = server.connect()
            r = c.ask({"id": "b", "path": str(images[0])})
            c.close()
            return r["ok"]

        assert _wait_for(answered, timeout=30, step=0.25)
    finally:
        rc, err = server.stop(timeout=30)  # the drain ends: nothing waits on the silent client any more
        a.close()
    assert rc == 0 and "Traceback" not in err
    assert "connection closed: the client did not take a reply within --send-timeout" in err


def test_logging_never_waits_for_a_stderr_nobody_reads():
    """A log line per request: written straight to a full pipe, each would block the worker that logs it."""
    from cxr_edge.serve import StderrLog

    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    log = StderrLog(capacity=50, stream=stream)
    done = threading.Event()

    def flood() -> None:
        for i in range(5000):  # 500 KB: several times what the pipe holds
            log(f"#{i} predict ok 9.9 ms " + "x" * 70)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(20), "a log call blocked on the full pipe"
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: os.read(read_fd, 1 << 16), b"")), daemon=True)
    reader.start()
    log("stopped after 5000 prediction(s)")
    log.close()
    stream.close()
    reader.join(20)
    text = b"".join(out).decode()
    assert "log line(s) dropped: stderr was not read" in text and text.endswith("stopped after 5000 prediction(s)\n")


def test_idle_timeout_closes_only_idle_connections(tiny_bundle, images):
    server = Server(tiny_bundle, "--idle-timeout", "0.5", "--test-delay-ms", "1500")
    try:
        idle, busy = server.connect(), server.connect()
        busy.send({"id": "slow", "path": str(images[0])})  # waits 1.5 s for its reply: not idle
        assert busy.recv()["ok"] is True
        assert idle.file.readline() == b""  # closed after 0.5 s without traffic
        assert busy.file.readline() == b""  # and this one 0.5 s after its reply
        idle.close()
        busy.close()
    finally:
        rc, err = server.stop()
    assert rc == 0 and "Traceback" not in err and "connection closed: idle for --idle-timeout" in err


def test_iter_lines_caps_and_recovers():
    from cxr_edge.serve import iter_lines

    chunks = iter([b'{"a": 1}\n{"b"', b': 2}\n' + b"x" * 50, b"y" * 50 + b"\n", b'{"c": 3}', b""])
    out = list(iter_lines(lambda: next(chunks), cap=40))
    assert out == [("line", b'{"a": 1}'), ("line", b'{"b": 2}'), ("too_large", None), ("line", b'{"c": 3}')]


def _scope_images(tmp_path):
    from conftest import sample_chest

    chest, blank = tmp_path / "chest.png", tmp_path / "blank.png"
    cv2.imwrite(str(chest), (sample_chest() * 255).astype(np.uint8))
    cv2.imwrite(str(blank), np.full((200, 200), 128, np.uint8))
    return chest, blank


@pytest.mark.parametrize("flags", [[], ["--out-of-scope", "refuse"], ["--no-scope-gate"]])
def test_stdio_replies_carry_the_scope_verdict(scoped_bundle, tmp_path, flags):
    chest, blank = _scope_images(tmp_path)
    reqs = [{"id": 1, "path": str(chest)}, {"id": 2, "image_b64": base64.b64encode(blank.read_bytes()).decode()}]
    proc = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "serve", "--stdio", "--model", str(scoped_bundle),
                           "--threads", "1", "--quiet", *flags], input="".join(json.dumps(r) + "\n" for r in reqs),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    replies = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    if flags == ["--no-scope-gate"]:
        assert "WARNING" in proc.stderr and "unsafe" in proc.stderr  # even with --quiet
        assert all(r["ok"] and r["in_scope"] is None and r["scope"] is None for r in replies.values())
        assert "undetermined" not in replies[2]["decisions"].values()
        return
    assert proc.stderr == ""
    assert replies[1]["ok"] and replies[1]["in_scope"] is True and replies[1]["scope"]["reasons"] == []
    if flags:
        assert replies[2]["ok"] is False and replies[2]["error"]["code"] == "out_of_scope"
        assert replies[2]["error"]["type"] == "OutOfScopeError"
    else:
        assert replies[2]["ok"] and replies[2]["in_scope"] is False
        assert set(replies[2]["decisions"].values()) == {"undetermined"}
        assert "near-constant" in replies[2]["scope"]["reasons"][0]


# --------------------------------------------------------------------------- prefetch (in-process)

class _Collect:
    def __init__(self) -> None:
        self.lines: list[dict] = []
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.lines.extend(json.loads(line) for line in data.decode().splitlines())


def _serve_in_thread(engine, **kw):
    from cxr_edge.serve import Server as InProcess

    server = InProcess(engine, **kw)
    thread = threading.Thread(target=server.run, kwargs={"stdio": False}, daemon=True)
    thread.start()
    return server, thread


def _requests(images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    reqs = [{"id": i, "path": str(p)} for i, p in enumerate(images)]
    reqs += [{"id": "bad", "path": str(bad)}, {"id": "missing", "path": str(tmp_path / "nope.png")},
             {"id": "b64", "image_b64": base64.b64encode(images[0].read_bytes()).decode()},
             {"id": "notb64", "image_b64": "***"}]
    return reqs


@pytest.mark.parametrize("prefetch, workers", [(1, 1), (3, 2)])
def test_serve_prefetch_gives_the_same_replies_and_every_error(tiny_bundle, images, tmp_path, prefetch, workers):
    from cxr_edge.engine import Engine
    from cxr_edge.serve import _Channel

    engine = Engine(tiny_bundle, threads=1)
    reqs = _requests(images, tmp_path)
    replies = {}
    for depth in (0, prefetch):
        out = _Collect()
        server, thread = _serve_in_thread(engine, workers=workers, queue_size=len(reqs), prefetch=depth)
        channel = _Channel(out.send)
        for r in reqs:
            server.handle_line(json.dumps(r).encode(), channel)
        server.stop_event.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        replies[depth] = {r["id"]: {k: v for k, v in r.items() if k != "timings_ms"} for r in out.lines}
    assert set(replies[prefetch]) == {r["id"] for r in reqs}  # every request answered exactly once
    assert replies[prefetch] == replies[0]
    codes = {k: v["error"]["code"] for k, v in replies[prefetch].items() if not v["ok"]}
    assert set(codes) == {"bad", "missing", "notb64"} and codes["notb64"] == "invalid_request"


def test_serve_prefetch_bounds_the_decoded_requests_waiting(tiny_bundle, images, tmp_path, monkeypatch):
    """A slow model and 24 queued requests: decoders run at most the ready queue plus one each ahead."""
    from cxr_edge.engine import Engine, decode_workers
    from cxr_edge.serve import _Channel

    engine = Engine(tiny_bundle, threads=1)
    lock = threading.Lock()
    state = {"decoded": 0, "answered": 0, "worst": 0}
    real_decode, real_finish = engine.decode, engine.finish

    def decode(source, **kw):
        with lock:
            state["decoded"] += 1
            state["worst"] = max(state["worst"], state["decoded"] - state["answered"])
        return real_decode(source, **kw)

    def finish(items, **kw):
        time.sleep(0.02)
        try:
            return real_finish(items, **kw)
        finally:
            with lock:
                state["answered"] += 1

    monkeypatch.setattr(engine, "decode", decode)
    monkeypatch.setattr(engine, "finish", finish)
    prefetch, workers = 2, 1
    server, thread = _serve_in_thread(engine, workers=workers, queue_size=32, prefetch=prefetch)
    out = _Collect()
    channel = _Channel(out.send)
    for i in range(24):
        server.handle_line(json.dumps({"id": i, "path": str(images[i % len(images)])}).encode(), channel)
    time.sleep(0.2)
    server.stop_event.set()
    thread.join(timeout=60)
    assert sorted(r["id"] for r in out.lines) == list(range(24)) and all(r["ok"] for r in out.lines)
    assert state["worst"] <= prefetch + decode_workers(prefetch) + workers
