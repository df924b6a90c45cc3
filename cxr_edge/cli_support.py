"""What the ``cxr-edge`` commands share (exit codes, usage errors, the folder walk, progress and
result reporting), in a module of its own so that ``cli``, ``serve`` and ``calibrate`` import it
instead of each other."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT_FAILED, EXIT_MODEL, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5
EXIT_OUT_OF_SCOPE = 6  # every input was read, but some were out of scope and got no decisions
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141
#: ``predict``'s ``--prefetch`` default: one worker per core, 3 inputs in flight. ``--prefetch 3`` would add
#: :func:`cxr_edge.engine.path_workers`' spare worker; session 25's series found no gain from it (time
#: ratio 0.99, CI 0.98-1.00, docs/results/firmware/PLAN-session25.md), so the default stayed at 2.
FOLDER_PREFETCH = 2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff"}


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


SCOPE_CHOICES = ("flag", "refuse")


def add_scope_arguments(p: argparse.ArgumentParser) -> None:
    """``--out-of-scope flag|refuse`` and ``--no-scope-gate`` (predict, serve, explain)."""
    p.add_argument("--out-of-scope", choices=SCOPE_CHOICES, default="flag", dest="out_of_scope",
                   help="what to do with images the input scope gate says are not frontal adult chest radiographs: "
                        "flag (default: classified, but every decision undetermined and in_scope=false) or refuse "
                        "(an out_of_scope error, counted as a failed input)")
    p.add_argument("--no-scope-gate", action="store_true",
                   help="UNSAFE: switch the input scope gate off; decisions are then given for any pixels "
                        "(photographs, blank frames, inverted or rotated films)")


def scope_mode(args) -> str:
    """The ``Classifier(scope=...)`` mode the scope arguments ask for."""
    if getattr(args, "no_scope_gate", False):
        if getattr(args, "out_of_scope", "flag") == "refuse":
            raise UsageError("--no-scope-gate switches the gate off; it cannot be combined with --out-of-scope refuse")
        return "off"
    return getattr(args, "out_of_scope", None) or "flag"


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """``--public-key PATH`` (default ``$CXR_EDGE_PUBLIC_KEY``), ``--require-signature`` and ``--max-pixels``
    (predict, explain, info, serve, calibrate)."""
    p.add_argument("--public-key", default=None, metavar="PATH",
                   help="ed25519 public key (PEM) a signed bundle must verify against (default: $CXR_EDGE_PUBLIC_KEY); "
                        "a bundle signed by another key, or altered after signing, is refused (exit 4)")
    p.add_argument("--require-signature", action="store_true",
                   help="refuse unsigned bundles too (needs --public-key or $CXR_EDGE_PUBLIC_KEY)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="largest input accepted, in pixels (default 36000000 = 6000 x 6000; never above the "
                        "bundle's own max_pixels); bounds decoding memory")


def public_key_path(args) -> str | None:
    """``--public-key``, else ``$CXR_EDGE_PUBLIC_KEY`` (empty = unset)."""
    from .signature import PUBLIC_KEY_ENV

    return getattr(args, "public_key", None) or os.environ.get(PUBLIC_KEY_ENV) or None


def classifier_options(args) -> dict[str, Any]:
    """The ``Classifier`` keyword arguments of the trust and memory flags (usage errors for bad values)."""
    key = public_key_path(args)
    require = bool(getattr(args, "require_signature", False))
    if require and key is None:
        from .signature import PUBLIC_KEY_ENV

        raise UsageError(f"--require-signature needs a public key: --public-key PATH or {PUBLIC_KEY_ENV}")
    opts: dict[str, Any] = {"public_key": key, "require_signature": require}
    max_pixels = getattr(args, "max_pixels", None)
    if max_pixels is not None:
        if max_pixels < 1:
            raise UsageError("--max-pixels must be >= 1")
        opts["max_pixels"] = max_pixels
    side = getattr(args, "overlay_max_side", None)
    if side is not None:
        from .cam import OVERLAY_SIDE_RANGE

        if not OVERLAY_SIDE_RANGE[0] <= side <= OVERLAY_SIDE_RANGE[1]:
            raise UsageError(f"--overlay-max-side must be in [{OVERLAY_SIDE_RANGE[0]}, {OVERLAY_SIDE_RANGE[1]}]")
        opts["overlay_max_side"] = side
    return opts


def add_overlay_arguments(p: argparse.ArgumentParser) -> None:
    """``--overlay-max-side N`` (predict, explain)."""
    p.add_argument("--overlay-max-side", type=int, default=None, metavar="PX",
                   help="longest side of an overlay's image, px (default 1024; larger inputs are downscaled "
                        "for the overlay, which bounds its memory)")


def signature_warning(signature, key_given: bool) -> str | None:
    """A warning when a public key was given but the bundle is unsigned (so the key checked nothing)."""
    if key_given and not signature.signed:
        return ("the bundle is unsigned, so the public key checked nothing; pass --require-signature to refuse "
                "unsigned bundles")
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 by itself; keep it but make it typed
        raise UsageError(message)


# --------------------------------------------------------------------------- inputs

def walk_inputs(paths: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """``(path, None)`` for every input to attempt, ``(path, reason)`` for every file or folder not attempted.

    Files named on the command line are always attempted, whatever their suffix. In folders (walked
    recursively, sorted): files with image suffixes and suffix-less files (DICOM often has none) are
    attempted; other suffixes, hidden files and hidden folders are reported with the reason; a
    folder that cannot be listed is reported with ``reason`` starting "unreadable folder".
    """
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            yield raw, None
            continue
        problems: list[OSError] = []
        for root, dirs, files in os.walk(path, onerror=problems.append):
            while problems:
                exc = problems.pop(0)
                yield str(exc.filename or root), f"unreadable folder ({exc.strerror or type(exc).__name__})"
            hidden_dirs = sorted(d for d in dirs if d.startswith("."))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in hidden_dirs:
                yield str(Path(root) / d), "hidden folder (not walked)"
            for name in sorted(files):
                full = str(Path(root) / name)
                if name.startswith("."):
                    yield full, "hidden file"
                    continue
                suffix = Path(name).suffix.lower()
                if suffix in IMAGE_SUFFIXES or suffix == "":
                    yield full, None
                else:
                    yield full, (f"suffix {suffix!r} is not an image suffix "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))} or none)")
        while problems:
            exc = problems.pop(0)
            yield str(exc.filename or path), f"unreadable folder ({exc.strerror or type(exc).__name__})"


def iter_inputs(paths: Sequence[str]) -> Iterator[str]:
    """The inputs :func:`walk_inputs` attempts (files as given, image-like files of folders)."""
    for path, reason in walk_inputs(paths):
        if reason is None:
            yield path


# --------------------------------------------------------------------------- output helpers

class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal and the run is long.

    Result lines are printed with the bar cleared first and the bar redrawn after, so the two
    never share a line (stdout and stderr usually go to the same terminal).
    """

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.shown = total, enabled, 0, False

    def clear(self) -> None:
        if self.enabled and self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False

    def draw(self) -> None:
        if self.enabled:
            total = self.total or 0
            width = 30
            filled = int(width * self.done / total) if total else 0
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{total}")
            sys.stderr.flush()
            self.shown = True

    def step(self) -> None:
        self.done += 1
        self.draw()

    def close(self) -> None:
        self.clear()


class Reporter:
    """Writes results (stdout), errors / skipped records / summary (stderr), human or JSON."""

    def __init__(self, json_mode: bool, progress: Progress | None = None) -> None:
        self.json = json_mode
        self.progress = progress or Progress(None, False)

    def _emit(self, text: str, stream) -> None:
        self.progress.clear()
        print(text, file=stream, flush=True)

    def result(self, obj: dict[str, Any], human: str) -> None:
        from .engine import dumps

        self._emit(dumps(obj) if self.json else human, sys.stdout)

    def error(self, obj: dict[str, Any]) -> None:
        from .engine import dumps

        if self.json:
            self._emit(dumps(obj), sys.stderr)
        else:
            err = obj["error"]
            src = obj["source"]
            who = "cxr-edge" if src.startswith("<") and src.endswith(">") else src  # a run-level error
            self._emit(f"{who}: error [{err['code']}]: {err['message']}", sys.stderr)

    def warning(self, code: str, message: str) -> None:
        """A run-level warning on stderr (a JSON ``warning`` object under ``--json``)."""
        from .classifier import SCHEMA_VERSION
        from .engine import dumps

        if self.json:
            self._emit(dumps({"schema_version": SCHEMA_VERSION, "warning": True, "code": code, "message": message}),
                       sys.stderr)
        else:
            self._emit(f"cxr-edge: warning: {message}", sys.stderr)

    def skipped(self, obj: dict[str, Any]) -> None:
        from .engine import dumps

        self._emit(dumps(obj) if self.json else f"{obj['source']}: skipped ({obj['reason']})", sys.stderr)
