"""One engine for every front end: read, infer, write overlays and format JSON the same way.

``cxr-edge predict`` and ``cxr-edge serve`` both go through :class:`Engine`, so an image gives
the same JSON object (``schema_version`` 2, ``cxr_edge/schema/prediction.schema.json``) whether it
came from a command line, a socket or stdin; errors are the same typed objects everywhere.

Thread safety: an Engine is read-only after construction; onnxruntime sessions may be run from
several threads at once, so one Engine can serve many requests concurrently.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .classifier import SCHEMA_VERSION, Classifier, Prediction, describe_source, label_index
from .errors import CxrEdgeError, InternalError, InvalidArgumentError, OutputError
from .radiograph import Radiograph

#: Python keyword spellings in library messages -> the command-line flag that does the same thing
_FLAG_SPELLINGS = (
    ("pass allow_any_body_part=True to read it anyway", "pass --allow-any-body-part to read it anyway"),
    ("allow_any_body_part=True", "--allow-any-body-part"),
    ("e.g. Classifier('model.onnx') or --model model.onnx", "e.g. --model model.onnx"),
    ("predict with keep_image=True", "rerun with --cam-dir"),
)


def display_path(source: Any) -> str:
    """A printable, JSON-safe name for a path: undecodable bytes of a file name become ``\\xNN``.

    Command-line paths are decoded with ``surrogateescape``; printing such a string would raise
    UnicodeEncodeError, and strict JSON parsers refuse lone surrogates, so they are escaped here.
    """
    text = os.fsdecode(source) if isinstance(source, (bytes, os.PathLike)) else str(source)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def flag_message(message: str) -> str:
    """A library message with Python keywords replaced by the CLI flags that set them."""
    for old, new in _FLAG_SPELLINGS:
        message = message.replace(old, new)
    return message


def error_dict(exc: BaseException, *, cli: bool = True) -> dict[str, Any]:
    """``{"type", "code", "message"[, "field"]}`` of a typed error (unexpected ones: InternalError)."""
    if isinstance(exc, CxrEdgeError):
        kind, code, message = type(exc).__name__, exc.code, str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        kind, code, message = "KeyboardInterrupt", "interrupted", "interrupted (SIGINT / Ctrl-C)"
    else:
        kind, code = InternalError.__name__, InternalError.code
        message = f"unexpected {type(exc).__name__}: {exc}"
    err: dict[str, Any] = {"type": kind, "code": code, "message": flag_message(message) if cli else message}
    if getattr(exc, "field", None):
        err["field"] = exc.field  # type: ignore[attr-defined]
    return err


def error_object(source: Any, exc: BaseException, *, cli: bool = True) -> dict[str, Any]:
    """The JSON error record of one input (or of the run, with a ``<...>`` source)."""
    return {"schema_version": SCHEMA_VERSION, "source": display_path(source), "ok": False,
            "error": error_dict(exc, cli=cli)}


def skipped_object(source: Any, reason: str) -> dict[str, Any]:
    """The JSON record of a file a folder walk did not attempt (suffix, hidden)."""
    return {"schema_version": SCHEMA_VERSION, "source": display_path(source), "ok": False, "skipped": True,
            "reason": reason}


def dumps(obj: dict[str, Any]) -> str:
    """One JSON line (ASCII, no NaN)."""
    return json.dumps(obj, allow_nan=False)


def safe_component(text: str, limit: int = 60) -> str:
    """A file-name-safe piece: letters, digits, ``-`` and ``_`` (path separators never survive)."""
    safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_" for ch in str(text))
    return safe[:limit] or "_"


def cam_file_name(source: Any, label: str) -> str:
    """``<stem>-<8 hex of the absolute path>_<label>.png``; works for undecodable names and odd labels."""
    raw = os.fsencode(source) if isinstance(source, (str, bytes, os.PathLike)) else str(source).encode()
    digest = hashlib.sha256(os.path.abspath(raw)).hexdigest()[:8]
    stem = Path(os.fsdecode(raw)).stem or "image"
    return f"{safe_component(stem)}-{digest}_{safe_component(label, 80)}.png"


CAM_CHOICES = ("positive", "top", "all")


def decode_workers(prefetch: int, model_threads: int | None = None) -> int:
    """Decoder threads for a prefetch depth: at most one per core the model's threads leave free (at least one).

    Used where decoding runs ahead of a separate inference stage (batches of more than one image, and
    ``serve --prefetch``). Measured on 2 cores, 1024 px PNGs (benchmarks/firmware_loop.py): while decoding
    a 1024 px PNG took longer than the 1-thread model, two decoders beat one (1.5-1.6x vs 1.3x the
    one-at-a-time rate); with the ISA-L inflate it is shorter (9.5 vs 10.4 ms), and one decoder beside the
    model beat two, which oversubscribed the cores (1.51x vs 1.47x, best of 5 rounds; see
    :func:`pipelined_model_threads`).
    """
    cores = os.cpu_count() or 2
    free = cores - model_threads if model_threads else cores
    return max(1, min(prefetch, free))


def path_workers(model_threads: int | None, prefetch: int) -> int:
    """Threads that each take one input through the whole path (decode, model, overlays, JSON) in a
    pipelined run of single images, at most ``prefetch`` + 1 inputs in flight: one per ``model_threads``
    cores, plus one spare when the window leaves room for it; 1 when the model takes all cores.

    Why not a decoder thread beside a model thread: the two stages never take the same time (decode
    depends on the file, the machine's noise moves both), so one of the two cores idles whenever its
    stage is ahead. Workers that each do whatever the next input needs keep both cores busy.

    Why a spare: the workers share one interpreter. A worker whose C call (inflate, imdecode, the model)
    has ended waits for the GIL while another runs Python, and its core idles meanwhile; a spare worker
    could run its own C call on that core. The spare needs a window of workers + 1 (with 3 workers and 3
    in flight, one late result stalls the other two), so it is added only when ``prefetch`` >= the cores'
    workers + 1. It is not the default: the series of sessions 25 and 26 found it level with the default
    (docs/cli.md has the figures; docs/results/firmware/PLAN-session2*.md every run).
    """
    cores = os.cpu_count() or 2
    base = max(1, cores // model_threads) if model_threads else 1
    if base == 1:
        return 1
    return min(base + 1, max(base, prefetch))


def pipelined_model_threads(threads: int | None, n_inputs: int, prefetch: int) -> int | None:
    """Model threads for a run of ``n_inputs`` at ``prefetch``: the user's choice when given; else 1
    when several inputs overlap (:func:`path_workers` or the decoders take the other cores, and a
    multi-threaded model would only compete with them), else None (the Classifier's default: all
    cores, the lowest latency for one image)."""
    if threads is not None:
        return threads
    return 1 if prefetch > 0 and n_inputs > 1 else None


def _checked_prefetch(prefetch: Any) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise InvalidArgumentError(f"prefetch must be an integer >= 0, got {prefetch!r}")
    return prefetch


def in_order(fn: Callable[[Any], Any], sources: Iterable[Any], *, window: int, workers: int,
             name: str) -> Iterator[Any]:
    """``fn`` of each source on ``workers`` threads, yielded in the sources' order.

    At most ``window`` sources are submitted and not yet yielded at any moment, so memory stays at
    ``window`` results however slow the consumer is. Closing the iterator early (a broken pipe, an
    interrupt) cancels what has not started and waits for what has.
    """
    it = iter(sources)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    pending: deque = deque()
    try:
        for source in it:
            pending.append(pool.submit(fn, source))
            if len(pending) == window:
                break
        while pending:
            item = pending.popleft().result()
            for source in it:  # refill before handing the item over: the work goes on meanwhile
                pending.append(pool.submit(fn, source))
                break
            yield item
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Decoded:
    """One input after the decode stage: its radiograph, or the error that refused it."""

    source: Any  # what the result names (the path, or the name given for in-memory bytes)
    image: Radiograph | None
    decode_ms: float = 0.0
    out_of_scope: bool = False  # the DICOM anatomy override let it through (Classifier.read_scoped)
    error: BaseException | None = None
    prepared: Any = None  # Classifier._prepare's result (pixel rules + model input), done in this stage



class Engine:
    """A loaded bundle plus the formatting every front end shares."""

    def __init__(self, model: str | os.PathLike | None = None, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, allow_any_body_part: bool = False,
                 scope: str = "flag", **options: Any) -> None:
        """``scope``: ``flag`` (default) | ``refuse`` | ``off`` (unsafe), as for :class:`Classifier`; ``options``
        (``public_key``, ``require_signature``, ``max_pixels``, ``overlay_max_side``) go to the Classifier."""
        self.classifier = Classifier(model, threads=threads, providers=providers,
                                     allow_any_body_part=allow_any_body_part, scope=scope, **options)
        self.manifest = self.classifier.manifest

    @property
    def labels(self) -> tuple[str, ...]:
        return self.classifier.labels

    @property
    def model_id(self) -> str:
        return self.classifier.model_id

    @property
    def has_cam(self) -> bool:
        return self.manifest.cam.method == "weights"

    def model_block(self) -> dict[str, Any]:
        return {"id": self.model_id, "sha256": self.manifest.model_sha256, "notice": self.manifest.notice}

    def resolve_cam_label(self, how: str) -> str:
        """``positive|top|all`` as is, or a label name (any spelling) -> the bundle's own spelling."""
        if how in CAM_CHOICES:
            return how
        return self.labels[label_index(self.labels, how)]

    @property
    def has_scope_gate(self) -> bool:
        """The input scope gate runs (the bundle has a scope block and it was not switched off)."""
        return self.classifier.scope_gate is not None

    def cam_labels(self, pred: Prediction, how: str) -> list[str]:
        if how == "positive":
            return pred.positive_labels
        if how == "top":
            return [max(pred.probabilities, key=pred.probabilities.get)]
        if how == "all":
            return list(pred.labels)
        return [pred.labels[label_index(pred.labels, how)]]

    def write_cams(self, pred: Prediction, source: Any, cam_dir: str | os.PathLike,
                   how: str) -> tuple[dict[str, str], dict[str, bool]]:
        """Overlays of the chosen labels into ``cam_dir``: ({label: path}, {label: map empty})."""
        cams: dict[str, str] = {}
        empty: dict[str, bool] = {}
        if not self.has_cam:
            return cams, empty
        for label in self.cam_labels(pred, how):
            out = os.path.join(os.fspath(cam_dir), cam_file_name(source, label))
            empty[label] = pred.write_overlay(out, label)
            cams[label] = display_path(out)
        return cams, empty

    def result_object(self, pred: Prediction, source: Any = None, cams: dict[str, str] | None = None,
                      cam_empty: dict[str, bool] | None = None) -> dict[str, Any]:
        """The success object (``predict --json`` line, ``serve`` reply without ``id``)."""
        obj = pred.to_dict()
        if source is not None:
            obj["source"] = display_path(source)
        obj["model"] = self.model_block()
        if cams:
            obj["cam"] = cams
            obj["cam_empty"] = dict(cam_empty or {})
        return obj

    def _finish(self, source: Any, res: Prediction | BaseException, cam_dir, cam_how: str) -> dict[str, Any]:
        if isinstance(res, BaseException):
            return error_object(source, res)
        try:
            cams, empty = self.write_cams(res, source, cam_dir, cam_how) if cam_dir else ({}, {})
        except OutputError as exc:
            return error_object(source, exc)
        return self.result_object(res, source, cams, empty)

    # ------------------------------------------------------------------ the two stages
    def decode(self, source: Any, *, name: Any = None, keep_image: bool = False) -> Decoded:
        """The decode stage of one input; never raises for a bad input (the error is kept).

        Thread-safe, and most of its time is spent in code that releases the GIL (zlib, libpng,
        libjpeg, numpy), so a pool of decoders overlaps with inference (:meth:`decoded`).
        ``keep_image`` False lets a large JPEG decode at reduced size (the pixels only feed the model).
        The pixel rules and the preprocessing run here too (``Classifier._prepare``), so with prefetch
        the thread that runs the model does little else.
        """
        shown = source if name is None else name
        try:
            image, ms, out_of_scope = self.classifier._read_timed(source, reduce=not keep_image)
            prepared = self.classifier._prepare(image)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # typed refusals, and bugs: reported for this input only
            return Decoded(shown, None, error=exc)
        return Decoded(shown, image, ms, out_of_scope, prepared=prepared)

    def finish(self, items: Sequence[Decoded], *, cam_dir: str | os.PathLike | None = None,
               cam_how: str = "positive") -> list[dict[str, Any]]:
        """The inference stage: ``items`` through the model as one batch, then overlays and JSON, in order.

        A batch whose inference fails (e.g. NaN logits) is retried one image at a time, so an error
        always belongs to the one input that caused it.
        """
        keep = bool(cam_dir)
        out: list[dict[str, Any] | None] = [None] * len(items)
        ready = []
        for i, item in enumerate(items):
            if item.error is not None:
                out[i] = error_object(item.source, item.error)
            else:
                ready.append(i)
        groups = [ready] if ready else []
        while groups:
            group = groups.pop()
            try:
                results = self.classifier._results(
                    [describe_source(items[i].source) for i in group], [items[i].image for i in group],
                    [items[i].decode_ms for i in group], keep, [items[i].out_of_scope for i in group],
                    [items[i].prepared for i in group])
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # InferenceError, or a bug
                if len(group) > 1:
                    groups.extend([i] for i in reversed(group))
                else:
                    out[group[0]] = error_object(items[group[0]].source, exc)
                continue
            for i, res in zip(group, results):
                out[i] = self._finish(items[i].source, res, cam_dir, cam_how)
        return out  # type: ignore[return-value]

    def decoded(self, sources: Iterable[Any], *, keep_image: bool = False, prefetch: int = 0,
                workers: int | None = None) -> Iterator[Decoded]:
        """:meth:`decode` of each source, in order; ``prefetch`` > 0 decodes up to that many ahead.

        With prefetch, ``workers`` threads (default :func:`decode_workers`) decode while the caller
        runs the model on what was yielded. At most ``prefetch`` inputs are submitted and not yet
        yielded at any moment, so at most ``prefetch`` decoded images wait in memory (plus what the
        caller holds). Closing the iterator early cancels what has not started.
        """
        if _checked_prefetch(prefetch) == 0:
            for source in sources:
                yield self.decode(source, keep_image=keep_image)
            return
        decode = functools.partial(self.decode, keep_image=keep_image)
        yield from in_order(decode, sources, window=prefetch, name="cxr-decode",
                            workers=workers or decode_workers(prefetch, self.classifier.bundle.threads))

    def predict_object(self, source: Any, *, name: Any = None, cam_dir: str | os.PathLike | None = None,
                       cam_how: str = "positive") -> dict[str, Any]:
        """One input -> its success or error object; never raises for a bad input."""
        return self.finish([self.decode(source, name=name, keep_image=bool(cam_dir))], cam_dir=cam_dir,
                           cam_how=cam_how)[0]

    def run(self, sources: Sequence[Any], *, batch_size: int = 1, cam_dir: str | os.PathLike | None = None,
            cam_how: str = "positive", prefetch: int = 0) -> Iterator[dict[str, Any]]:
        """Objects for ``sources`` in order, the model run on real batches of ``batch_size``.

        ``prefetch`` > 0 overlaps the inputs: single images go through :func:`path_workers` threads,
        each taking an input through the whole path, at most ``prefetch`` + 1 in flight; batches (and a
        model on all cores) get decoders running ``prefetch`` ahead (:meth:`decoded`). Either way the
        objects, their order and the per-input errors are the same as without it; only the wall time changes.
        """
        if _checked_prefetch(prefetch) and batch_size == 1:
            workers = path_workers(self.classifier.bundle.threads, prefetch)
            if workers > 1:
                whole = functools.partial(self.predict_object, cam_dir=cam_dir, cam_how=cam_how)
                yield from in_order(whole, sources, window=prefetch + 1, workers=workers, name="cxr-path")
                return
        batch: list[Decoded] = []
        for item in self.decoded(sources, keep_image=bool(cam_dir), prefetch=prefetch):
            batch.append(item)
            if len(batch) == batch_size:
                yield from self.finish(batch, cam_dir=cam_dir, cam_how=cam_how)
                batch = []
        if batch:
            yield from self.finish(batch, cam_dir=cam_dir, cam_how=cam_how)

    def info_object(self) -> dict[str, Any]:
        """The manifest summary (``info --json`` without the card)."""
        from . import __version__

        summary = self.manifest.summary()
        summary["file"] = {"size_bytes": self.classifier.bundle.size_bytes}
        summary["runtime"] = {"cxr_edge": __version__}
        summary["signature"] = self.classifier.signature.to_dict()
        return summary
