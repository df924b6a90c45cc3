"""``cxr-edge serve``: one process, the bundle loaded once, JSON-line requests over a Unix socket and/or stdio.

Protocol (one JSON object per line, UTF-8, ``\\n``-terminated; replies in the same form):

* ``{"id": ..., "path": "/data/img.dcm"}`` - classify a file the server can read;
* ``{"id": ..., "image_b64": "<base64 of the file bytes>"}`` - classify bytes sent inline;
* ``{"id": ..., "op": "health"}`` / ``{"id": ..., "op": "info"}`` - liveness / the manifest summary,
  answered at once, even when the queue is full.

A predict reply is exactly the object ``cxr-edge predict --json`` prints for that image (same
engine: :mod:`cxr_edge.engine`) with ``"id"`` added; a failure is the same typed error object
plus ``"id"``. ``id`` is echoed as given (any JSON value; null when absent or unparsable). On one
connection, requests may be pipelined; with several workers replies can come back out of order,
so match them by ``id``.

Concurrency: up to ``--max-connections`` clients at once (one reader thread each); one more gets a
single ``busy`` line and is closed. ``--workers`` inference threads share the onnxruntime session; at
most ``--workers + --queue-size`` predict requests are accepted at a time, further ones get
``{"ok": false, "error": {"type": "BusyError", "code": "busy"}}`` immediately. A request line over
``--max-request-bytes`` gets ``request_too_large`` (the rest of that line is discarded, the
connection stays usable).

No client can stall the others or the shutdown: a reply that a client does not take within
``--send-timeout`` seconds closes that connection (its remaining requests are dropped unanswered, as
nobody reads them); ``--idle-timeout`` (off by default) closes a connection that has sent nothing and
waits for nothing that long. A closed connection leaves nothing behind, so a script that connects
once per radiograph can run for months. Memory for requests is bounded: lines being read by
``--max-connections x --max-request-bytes``, accepted ones by ``(--workers + --queue-size) x
--max-request-bytes`` (an inline image is held until it is answered).

Decoding can overlap inference: with ``--prefetch N`` decoder threads read and decode accepted
requests while the workers run the model, and at most N decoded requests wait for a worker (memory
stays bounded). ``--prefetch 0`` (the default) has each worker decode its own request: no thread
hand-off for one request at a time, the firmware case. Prefetch only helps when requests overlap
(pipelined on a connection, or several clients); replies are the same.

Shutdown: SIGTERM or SIGINT (or EOF on stdin with ``--stdio``) stops accepting, answers every
request already accepted, replies ``shutting_down`` to anything read afterwards, removes the socket
file and exits 0. Logs (stderr) carry request counters, operations, outcome codes and timings only:
never paths, file names, ids or DICOM attributes.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .classifier import SCHEMA_VERSION
from .engine import Engine, decode_workers, dumps, error_object
from .errors import (BusyError, InvalidRequestError, OutputError, RequestTooLargeError, ShuttingDownError)

READ_CHUNK = 1 << 16
MAX_UNIX_PATH = 107  # sun_path is 108 bytes on Linux, NUL included
#: longest wait of one socket call: how soon a reader notices an idle or broken connection
SOCKET_TICK_S = 1.0


def iter_lines(recv: Callable[[], bytes], cap: int):
    """Yield ``("line", bytes)`` per ``\\n``-terminated line, or ``("too_large", None)`` once per line over
    ``cap`` bytes (whose remainder is discarded). A final unterminated line counts as a line."""
    buf = bytearray()
    discarding = False
    while True:
        chunk = recv()
        if not chunk:
            if buf and not discarding:
                yield "line", bytes(buf)
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if not discarding:
                    buf += chunk[start:]
                    if len(buf) > cap:
                        discarding = True
                        buf.clear()
                        yield "too_large", None
                break
            if discarding:
                discarding = False
            else:
                buf += chunk[start:nl]
                if len(buf) > cap:
                    yield "too_large", None
                else:
                    yield "line", bytes(buf)
            buf.clear()
            start = nl + 1


class StderrLog:
    """Log lines to stderr from a thread of their own, so that a stderr nobody reads (a full pipe) never
    blocks a worker or a reader: past ``capacity`` waiting lines, new ones are dropped and counted."""

    def __init__(self, capacity: int = 1000, stream=None) -> None:
        self._stream = stream or sys.stderr
        self._lines: "queue.Queue[str | None]" = queue.Queue(maxsize=capacity)
        self._dropped = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def __call__(self, message: str) -> None:
        try:
            self._lines.put_nowait(f"cxr-edge serve: {time.strftime('%H:%M:%S')} {message}\n")
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            if line is None:
                return
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                line = f"cxr-edge serve: {dropped} log line(s) dropped: stderr was not read\n" + line
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what waits (for at most ``timeout_s``: stderr may be blocked for good)."""
        try:
            self._lines.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)


class _Channel:
    """Where replies of one client go (a socket connection or stdout), with its pending count."""

    def __init__(self, send: Callable[[bytes], None], close: Callable[[], None] | None = None, *,
                 on_broken: Callable[[BaseException], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self._send, self._close = send, close
        self._on_broken, self._on_close = on_broken, on_close
        self._lock = threading.Lock()
        self.pending = 0
        self.reading = True
        self.broken = False
        self.closed = False
        #: monotonic time of the last byte received or reply sent (what ``--idle-timeout`` measures)
        self.last_activity = time.monotonic()

    def reply(self, obj: dict[str, Any]) -> None:
        data = (dumps(obj) + "\n").encode("ascii")
        with self._lock:
            if self.broken or self.closed:
                return
            try:
                self._send(data)
            except (OSError, ValueError) as exc:
                self.broken = True
                failure: BaseException | None = exc
            else:
                self.last_activity = time.monotonic()
                failure = None
        if failure is not None and self._on_broken:
            self._on_broken(failure)

    def add(self) -> None:
        with self._lock:
            self.pending += 1

    def done(self) -> None:
        with self._lock:
            self.pending -= 1
            last = not self.reading and self.pending == 0
        if last:
            self.close()

    def end_reading(self) -> None:
        with self._lock:
            self.reading = False
            last = self.pending == 0
        if last:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self._close:
            try:
                self._close()
            except OSError:
                pass
        if self._on_close:
            self._on_close()


@dataclass
class _Job:
    rid: Any
    request: dict[str, Any]
    channel: _Channel
    seq: int
    received: float = field(default_factory=time.perf_counter)


class Server:
    """The request loop around one :class:`~cxr_edge.engine.Engine` (see the module docstring)."""

    def __init__(self, engine: Engine, *, workers: int = 1, queue_size: int = 8, max_request_bytes: int = 64 << 20,
                 log: Callable[[str], None] | None = None, delay_s: float = 0.0, prefetch: int = 0,
                 max_connections: int = 16, send_timeout_s: float = 10.0, idle_timeout_s: float = 0.0) -> None:
        self.engine = engine
        self.workers = workers
        #: socket clients served at once; one more is refused with a ``busy`` line
        self.max_connections = max_connections
        #: a reply not taken by its client within this many seconds closes that connection
        self.send_timeout_s = send_timeout_s
        #: > 0: a connection with nothing received, sent or pending for this long is closed
        self.idle_timeout_s = idle_timeout_s
        #: > 0: accepted requests are decoded by decoder threads up to ``prefetch`` ahead of the inference
        #: workers (a second stage with a bounded queue); 0: each worker decodes its own request
        self.prefetch = prefetch
        self._ready: "queue.Queue[tuple[_Job, Any] | None]" = queue.Queue(maxsize=max(prefetch, 1))
        self.queue_size = queue_size
        self.max_request_bytes = max_request_bytes
        self.delay_s = delay_s
        self._log = log or (lambda s: None)
        self._slots = threading.Semaphore(workers + queue_size)
        self._queue: "queue.Queue[_Job | None]" = queue.Queue()
        self._lock = threading.Lock()
        self._stopping = False
        self.stop_event = threading.Event()
        self._seq = 0
        self._served = 0
        self._in_flight = 0
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._decoders: list[threading.Thread] = []
        #: open channels only (a channel leaves when it closes): what shutdown must unblock and close, and
        #: what ``max_connections`` counts (its socket ones)
        self._channels: dict[_Channel, socket.socket | None] = {}
        self._listener: socket.socket | None = None
        self._socket_path: str | None = None

    # ------------------------------------------------------------------ requests
    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def health(self, rid: Any) -> dict[str, Any]:
        with self._lock:
            waiting = self._queue.qsize() + self._ready.qsize()
            in_flight, served, stopping = self._in_flight, self._served, self._stopping
            connections = self._open_connections()
        return {"id": rid, "schema_version": SCHEMA_VERSION, "ok": True, "op": "health",
                "status": "stopping" if stopping else "ok", "model_id": self.engine.model_id,
                "uptime_s": round(time.monotonic() - self._started, 3), "workers": self.workers,
                "queue": {"capacity": self.queue_size, "waiting": waiting, "in_flight": in_flight},
                "connections": {"capacity": self.max_connections, "open": connections},
                "served": served}

    def _open_connections(self) -> int:
        """Socket channels still registered (the caller holds ``_lock``)."""
        return sum(conn is not None for conn in self._channels.values())

    def _error(self, rid: Any, exc: BaseException, source: str = "<request>") -> dict[str, Any]:
        return {"id": rid, **error_object(source, exc)}

    def handle_line(self, line: bytes, channel: _Channel) -> None:
        """Parse one request line and answer it (health/info/errors at once, predictions via the queue)."""
        seq = self._next_seq()
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._answer_now(channel, seq, "invalid", self._error(None, InvalidRequestError(
                "the request is not valid JSON (one JSON object per line is expected)")))
            return
        if not isinstance(req, dict):
            self._answer_now(channel, seq, "invalid", self._error(None, InvalidRequestError(
                "the request must be a JSON object")))
            return
        rid = req.get("id")
        op = req.get("op", "predict")
        if op == "health":
            self._answer_now(channel, seq, "health", self.health(rid))
            return
        if op == "info":
            self._answer_now(channel, seq, "info", {"id": rid, "schema_version": SCHEMA_VERSION, "ok": True,
                                                    "op": "info", "info": self.engine.info_object()})
            return
        if op != "predict":
            self._answer_now(channel, seq, "invalid", self._error(rid, InvalidRequestError(
                "unknown op; use 'predict' (default), 'health' or 'info'")))
            return
        has_path, has_b64 = "path" in req, "image_b64" in req
        if has_path == has_b64:
            self._answer_now(channel, seq, "invalid", self._error(rid, InvalidRequestError(
                "a predict request needs exactly one of 'path' or 'image_b64'")))
            return
        value = req["path" if has_path else "image_b64"]
        if not isinstance(value, str) or not value:
            self._answer_now(channel, seq, "invalid", self._error(rid, InvalidRequestError(
                f"'{'path' if has_path else 'image_b64'}' must be a non-empty string")))
            return
        with self._lock:
            if self._stopping:
                refused: BaseException | None = ShuttingDownError("the server is shutting down; no new requests")
            elif not self._slots.acquire(blocking=False):
                refused = BusyError(f"the request queue is full ({self.workers} worker(s) busy, "
                                    f"{self.queue_size} waiting); retry later")
            else:
                refused = None
                channel.add()
                self._queue.put(_Job(rid, req, channel, seq))
        if refused is not None:
            self._answer_now(channel, seq, "predict", self._error(rid, refused))

    def _answer_now(self, channel: _Channel, seq: int, op: str, obj: dict[str, Any]) -> None:
        channel.reply(obj)
        outcome = "ok" if obj.get("ok") else obj.get("error", {}).get("code", "error")
        self._log(f"#{seq} {op} {outcome}")

    def _decode_stage(self) -> None:
        """Decoder thread (``prefetch`` > 0): accepted jobs -> decoded items on the bounded ready queue."""
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            try:
                decoded: Any = self._decode(job)
            except Exception as exc:  # never lose a job: the worker answers it with a typed internal error
                decoded = exc
            self._ready.put((job, decoded))  # blocks while `prefetch` items wait: memory stays bounded
            self._queue.task_done()

    def _work(self) -> None:
        source = self._ready if self.prefetch else self._queue
        while True:
            item = source.get()
            if item is None:
                source.task_done()
                return
            job, decoded = item if self.prefetch else (item, None)
            with self._lock:
                self._in_flight += 1
            try:
                if job.channel.broken:  # its client stopped taking replies: nobody would read this one
                    self._log(f"#{job.seq} predict dropped (connection closed)")
                    continue
                if isinstance(decoded, BaseException):
                    raise decoded
                obj = self._predict(job, decoded)
                job.channel.reply(obj)
                outcome = "ok" if obj.get("ok") else obj["error"]["code"]
                ms = (time.perf_counter() - job.received) * 1e3
                self._log(f"#{job.seq} predict {outcome} {ms:.1f} ms")
            except Exception as exc:  # never let a worker die: answer with a typed internal error
                job.channel.reply(self._error(job.rid, exc))
                self._log(f"#{job.seq} predict internal_error")
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self._served += 1
                self._slots.release()
                job.channel.done()
                source.task_done()

    def _decode(self, job: _Job) -> Any:
        """The decode stage of a job: an :class:`~cxr_edge.engine.Decoded`, or its error reply (bad base64)."""
        req = job.request
        if "path" in req:
            return self.engine.decode(req["path"])
        try:
            data = base64.b64decode(req["image_b64"], validate=True)
        except (binascii.Error, ValueError):
            return self._error(job.rid, InvalidRequestError("'image_b64' is not valid base64"), "<image_b64>")
        return self.engine.decode(data, name="<image_b64>")

    def _predict(self, job: _Job, decoded: Any = None) -> dict[str, Any]:
        """The reply of a job: decoded here unless the decode stage did it already (``decoded``)."""
        if self.delay_s:
            time.sleep(self.delay_s)
        if decoded is None:
            decoded = self._decode(job)
        if isinstance(decoded, dict):  # an error reply from the decode stage
            return decoded
        return {"id": job.rid, **self.engine.finish([decoded])[0]}

    # ------------------------------------------------------------------ transports
    def _read_channel(self, recv: Callable[[], bytes], channel: _Channel) -> None:
        try:
            for kind, line in iter_lines(recv, self.max_request_bytes):
                if kind == "too_large":
                    seq = self._next_seq()
                    self._answer_now(channel, seq, "invalid", self._error(None, RequestTooLargeError(
                        f"the request line is over {self.max_request_bytes:,} bytes (--max-request-bytes)")))
                    continue
                if line.strip():
                    self.handle_line(line, channel)
        except OSError:
            pass
        finally:
            channel.end_reading()

    def _socket_channel(self, conn: socket.socket) -> _Channel:
        """A registered channel on an accepted connection whose every socket call waits at most a tick."""
        def send(data: bytes) -> None:
            view, deadline = memoryview(data), time.monotonic() + self.send_timeout_s
            while view:
                try:
                    view = view[conn.send(view):]
                except socket.timeout:
                    if time.monotonic() >= deadline:
                        raise
        def close() -> None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

        def broken(exc: BaseException) -> None:
            why = "did not take a reply within --send-timeout" if isinstance(exc, TimeoutError) else "went away"
            self._log(f"connection closed: the client {why}")
            try:
                conn.shutdown(socket.SHUT_RDWR)  # ends its reader; queued requests of it are dropped
            except OSError:
                pass

        def forget() -> None:
            with self._lock:
                self._channels.pop(channel, None)

        tick = min(SOCKET_TICK_S, self.send_timeout_s, self.idle_timeout_s or SOCKET_TICK_S)
        conn.settimeout(tick)
        channel = _Channel(send, close, on_broken=broken, on_close=forget)
        self._channels[channel] = conn
        return channel

    def _connection(self, conn: socket.socket, channel: _Channel) -> None:
        def recv() -> bytes:
            while True:
                try:
                    data = conn.recv(READ_CHUNK)
                except socket.timeout:
                    if channel.broken:
                        return b""
                    idle = time.monotonic() - channel.last_activity
                    if self.idle_timeout_s and channel.pending == 0 and idle >= self.idle_timeout_s:
                        self._log("connection closed: idle for --idle-timeout")
                        return b""
                    continue
                channel.last_activity = time.monotonic()
                return data

        self._read_channel(recv, channel)

    def _refuse(self, conn: socket.socket, exc: BaseException) -> None:
        """One error line to a connection that is not served, then close it (never blocks the accept loop)."""
        try:
            conn.settimeout(SOCKET_TICK_S)
            conn.sendall((dumps(self._error(None, exc, "<connection>")) + "\n").encode("ascii"))
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self.stop_event.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                refused: BaseException | None = None
                if self._stopping:
                    refused = ShuttingDownError("the server is shutting down; no new connections")
                elif self._open_connections() >= self.max_connections:
                    refused = BusyError(f"{self.max_connections} connections are open (--max-connections); "
                                        "close one or retry later")
                else:
                    channel = self._socket_channel(conn)
            if refused is not None:
                self._log(f"connection refused: {type(refused).__name__}")
                self._refuse(conn, refused)
                continue
            try:
                self._spawn(self._connection, conn, channel)
            except RuntimeError:  # no thread to read it (the process is at its thread limit)
                self._log("connection refused: no thread available")
                channel.close()

    def _stdio(self) -> None:
        out_fd = sys.stdout.fileno()

        def send(data: bytes) -> None:
            view = memoryview(data)
            while view:
                n = os.write(out_fd, view)
                view = view[n:]

        def forget() -> None:
            with self._lock:
                self._channels.pop(channel, None)

        channel = _Channel(send, on_close=forget)
        with self._lock:
            self._channels[channel] = None
        in_fd = sys.stdin.fileno()
        self._read_channel(lambda: os.read(in_fd, READ_CHUNK), channel)
        self._log("stdin closed: shutting down")
        self.stop_event.set()

    def _spawn(self, target, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        return t

    def listen(self, path: str) -> None:
        """Bind the Unix socket (mode 0600); a stale socket file is replaced, a live one refused."""
        raw = os.fsencode(path)
        if len(raw) > MAX_UNIX_PATH:
            raise OutputError(f"--socket path is {len(raw)} bytes, over the {MAX_UNIX_PATH}-byte limit of Unix sockets")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OutputError("--socket names an existing file that is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens
            else:
                raise OutputError("another server is already listening on --socket")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise OutputError(f"cannot bind --socket ({exc.strerror or type(exc).__name__})") from None
        finally:
            os.umask(old)
        sock.listen(64)
        sock.settimeout(0.25)
        self._listener, self._socket_path = sock, path

    def run(self, *, stdio: bool) -> None:
        """Serve until :attr:`stop_event` is set, then drain and clean up (see the module docstring)."""
        for _ in range(self.workers):
            self._threads.append(self._spawn(self._work))
        model_threads = self.workers * (self.engine.classifier.bundle.threads or 1)
        self._decoders = [self._spawn(self._decode_stage)
                          for _ in range(decode_workers(self.prefetch, model_threads))] if self.prefetch else []
        if self._listener is not None:
            self._spawn(self._accept)
        if stdio:
            self._spawn(self._stdio)
        while not self.stop_event.wait(0.2):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            channels = list(self._channels.items())
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for _, conn in channels:  # no new requests: unblock readers, keep the write side for replies
            if conn is not None:
                try:
                    conn.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        self._queue.join()  # every accepted request is decoded (prefetch) or answered
        if self.prefetch:
            self._ready.join()  # ... and answered
            for _ in self._decoders:
                self._queue.put(None)
        work_queue = self._ready if self.prefetch else self._queue
        for _ in self._threads:
            work_queue.put(None)
        for t in [*self._decoders, *self._threads]:
            t.join(timeout=30)
        for channel, _ in channels:
            channel.close()
        if self._socket_path:
            try:
                os.unlink(self._socket_path)
            except OSError:
                pass
        with self._lock:
            served = self._served
        self._log(f"stopped after {served} prediction(s)")


def serve_main(args) -> int:
    """Entry point of ``cxr-edge serve`` (called by :mod:`cxr_edge.cli`)."""
    from .cli_support import EXIT_OK, UsageError

    if not args.socket and not args.stdio:
        raise UsageError("serve needs --socket PATH and/or --stdio")
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.queue_size < 0:
        raise UsageError("--queue-size must be >= 0")
    if args.max_request_bytes < 1024:
        raise UsageError("--max-request-bytes must be >= 1024")
    if args.prefetch < 0:
        raise UsageError("--prefetch must be >= 0")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be >= 1")
    if not args.send_timeout > 0:
        raise UsageError("--send-timeout must be > 0")
    if not args.idle_timeout >= 0:
        raise UsageError("--idle-timeout must be >= 0 (0: never)")
    log = (lambda message: None) if args.quiet else StderrLog()

    from .cli_support import classifier_options, public_key_path, scope_mode, signature_warning

    mode = scope_mode(args)
    if mode == "off":  # printed even with --quiet: an unsafe setting must not go unnoticed
        print("cxr-edge serve: WARNING: --no-scope-gate: the input scope gate is off (unsafe): decisions are given for any pixels, "
            "including images that are not frontal chest radiographs", file=sys.stderr, flush=True)
    engine = Engine(args.model, threads=args.threads, allow_any_body_part=args.allow_any_body_part, scope=mode,
                    **classifier_options(args))
    unsigned_note = signature_warning(engine.classifier.signature, public_key_path(args) is not None)
    if unsigned_note:  # printed even with --quiet, like the scope-gate warning
        print(f"cxr-edge serve: WARNING: {unsigned_note}", file=sys.stderr, flush=True)
    server = Server(engine, workers=args.workers, queue_size=args.queue_size,
                    max_request_bytes=args.max_request_bytes, log=log, delay_s=args.test_delay_ms / 1e3,
                    prefetch=args.prefetch, max_connections=args.max_connections,
                    send_timeout_s=args.send_timeout, idle_timeout_s=args.idle_timeout)
    if args.socket:
        server.listen(args.socket)

    def on_signal(signum, frame) -> None:
        server.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = " and ".join(w for w, on in (("unix socket", bool(args.socket)), ("stdio", args.stdio)) if on)
    log(f"model {engine.model_id} loaded (signature: {engine.classifier.signature.describe()}); {args.workers} "
        f"worker(s), queue {args.queue_size}, up to {args.max_connections} connections; serving on {where}")
    server.run(stdio=args.stdio)
    if isinstance(log, StderrLog):
        log.close()
    return EXIT_OK
