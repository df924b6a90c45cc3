"""``cxr-edge`` command line: predict / explain / info / serve / calibrate, for people and firmware scripts.

Exit codes (stable; ``docs/cli.md``): 0 all inputs succeeded; 1 internal error (a bug: reported as a
typed ``InternalError``, never a traceback); 2 usage error; 3 some inputs failed (the others were
still processed); 4 the model could not be loaded; 5 an output could not be written; 6 every input
was read, but some were out of scope (the input scope gate flagged them) and got no decisions (3
takes precedence when any input failed, including inputs refused with ``--out-of-scope refuse``);
130 interrupted (SIGINT / Ctrl-C); 141 stdout closed early (broken pipe, e.g. ``| head -1``).
With ``--json`` each input gives one JSON object on stdout; errors, skipped files and the final
summary are JSON objects on stderr. Set ``CXR_EDGE_DEBUG=1`` to get Python tracebacks instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import BundleError, CxrEdgeError, ImageError, InvalidArgumentError, OutputError

from .cli_support import (EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT_FAILED, EXIT_MODEL, EXIT_OUTPUT, EXIT_OUT_OF_SCOPE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, UsageError, _Parser, walk_inputs, Progress, Reporter, add_scope_arguments, scope_mode)  # noqa: F401
from .cli_support import FOLDER_PREFETCH, add_overlay_arguments, add_trust_arguments, classifier_options, public_key_path, signature_warning


def _report_error(args, source: Any, exc: BaseException) -> None:
    from .engine import error_object

    Reporter(getattr(args, "json", False)).error(error_object(source, exc))


def _human(obj: dict[str, Any]) -> str:
    img = obj["image"]
    lines = [f"{obj['source']}  ({img['width']}x{img['height']} {img.get('format', '')}, "
             f"{obj['timings_ms']['total']:.1f} ms)"]
    if obj.get("out_of_scope"):
        lines.append("  OUT OF SCOPE: read only because of --allow-any-body-part (not a confirmed chest radiograph)")
    flagged = obj.get("in_scope") is False
    if flagged:
        lines.append(f"  {scope_line(obj.get('scope') or {})}")
    probs = obj["probabilities"]
    for name in sorted(probs, key=lambda n: -probs[n]):
        t = obj["thresholds"][name]
        if t is None:
            lines.append(f"  {name:<20} {probs[name]:6.3f}  (undetermined: no decision for this label)")
            continue
        if obj["decisions"][name] == "undetermined":
            why = "out of scope" if flagged else "no decision"
            lines.append(f"  {name:<20} {probs[name]:6.3f}  (threshold {t:.3f}) undetermined ({why})")
            continue
        flag = "POSITIVE" if obj["decisions"][name] is True else ""
        lines.append(f"  {name:<20} {probs[name]:6.3f}  (threshold {t:.3f}) {flag}".rstrip())
    for label, path in (obj.get("cam") or {}).items():
        note = "  (no positive evidence)" if (obj.get("cam_empty") or {}).get(label) else ""
        lines.append(f"  heatmap {label}: {path}{note}")
    return "\n".join(lines)


def scope_line(scope: dict[str, Any]) -> str:
    """``OUT OF SCOPE: <reasons> (score s > threshold t): no decisions`` for a flagged result's ``scope``."""
    reasons = "; ".join(scope.get("reasons") or []) or "flagged by the input scope gate"
    score, threshold = scope.get("score"), scope.get("threshold")
    numbers = ""
    if score is not None and threshold is not None:
        numbers = f" (score {score:.3f} {'>' if score > threshold else '<='} threshold {threshold:.3f})"
    return f"OUT OF SCOPE: {reasons}{numbers}: no decisions"


def _warn_scope_off(args, out: Reporter) -> None:
    if scope_mode(args) == "off":
        out.warning("scope_gate_off", "--no-scope-gate: the input scope gate is off (unsafe): decisions are given "
                                      "for any pixels, including images that are not frontal chest radiographs")


def _shown(path: Any) -> str:
    from .engine import display_path

    return display_path(path)


def prepare_output_dir(path: str, flag: str = "--cam-dir") -> None:
    """Create ``path`` (and parents) and prove it is writable, or raise OutputError naming the flag."""
    p = Path(path)
    shown = _shown(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {shown!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{flag} {shown!r} cannot be created: a path component is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"{flag} {shown!r} cannot be created ({exc.strerror or type(exc).__name__})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".cxr-edge-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {shown!r} is not writable ({exc.strerror or type(exc).__name__})") from None


# --------------------------------------------------------------------------- commands

def _engine(args, threads: int | None = None) -> Any:
    from .engine import Engine

    return Engine(args.model, threads=args.threads if threads is None else threads,
                  allow_any_body_part=getattr(args, "allow_any_body_part", False),
                  scope=scope_mode(args), **classifier_options(args))


def _warn_signature(args, engine, out: Reporter) -> None:
    text = signature_warning(engine.classifier.signature, public_key_path(args) is not None)
    if text:
        out.warning("bundle_unsigned", text)


def cmd_predict(args) -> int:
    from .engine import error_object, skipped_object

    if args.cam_label is not None and not args.cam_dir:
        raise UsageError(f"--cam-label {args.cam_label} needs --cam-dir (overlays are only written with --cam-dir)")
    from .engine import pipelined_model_threads

    entries = list(walk_inputs(args.paths))
    sources = [p for p, reason in entries if reason is None]
    engine = _engine(args, pipelined_model_threads(args.threads, len(sources), args.prefetch))
    cam_how = engine.resolve_cam_label(args.cam_label or "positive")
    if args.cam_dir:
        prepare_output_dir(args.cam_dir)
    progress = Progress(len(sources), enabled=sys.stderr.isatty() and len(sources) > 5 and not args.json)
    out = Reporter(args.json, progress)
    _warn_scope_off(args, out)
    _warn_signature(args, engine, out)
    failed = skipped = flagged = 0
    for path, reason in entries:
        if reason is None:
            continue
        if reason.startswith("unreadable folder"):
            failed += 1
            out.error(error_object(path, ImageError(f"could not list the folder: {reason}")))
        else:
            skipped += 1
            out.skipped(skipped_object(path, reason))
    if not sources:
        out.error(error_object("<inputs>", InvalidArgumentError("no image files found in the given paths")))
        _summary(args, engine, 0, 0, failed + 1, skipped, 0)
        return EXIT_INPUT_FAILED
    classified = 0
    for obj in engine.run(sources, batch_size=args.batch_size, cam_dir=args.cam_dir, cam_how=cam_how,
                          prefetch=args.prefetch):
        progress.step()
        if obj["ok"]:
            classified += 1
            flagged += obj.get("in_scope") is False
            out.result(obj, _human(obj))
        else:
            failed += 1
            out.error(obj)
    progress.close()
    _summary(args, engine, len(sources), classified, failed, skipped, flagged)
    if failed:
        return EXIT_INPUT_FAILED
    return EXIT_OUT_OF_SCOPE if flagged else EXIT_OK


def _summary(args, engine, attempted: int, classified: int, failed: int, skipped: int, flagged: int) -> None:
    from .classifier import SCHEMA_VERSION
    from .engine import dumps

    if args.json:
        print(dumps({"schema_version": SCHEMA_VERSION, "summary": True, "attempted": attempted,
                     "classified": classified, "failed": failed, "skipped": skipped, "out_of_scope": flagged,
                     "model_id": engine.model_id, "notice": engine.manifest.notice}), file=sys.stderr, flush=True)
    else:
        scoped = f"{flagged} out of scope (no decisions); " if flagged else ""
        print(f"{classified} of {attempted} images classified; {scoped}{failed} failed; {skipped} skipped "
              f"(not attempted); {engine.manifest.notice}", file=sys.stderr, flush=True)


def cmd_explain(args) -> int:
    from .engine import error_object

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file (got {_shown(args.out)!r}: "
                         f"{'no extension' if not out.suffix else repr(out.suffix)})")
    engine = _engine(args)
    label = engine.resolve_cam_label(args.label)
    if label in ("positive", "top", "all"):  # explain takes one label, not a selection
        raise UsageError("--label takes one label name (positive/top/all are for predict --cam-label)")
    if not engine.has_cam:
        raise InvalidArgumentError("this bundle carries no CAM (manifest cam.method is 'none')")
    parent = out.parent if str(out.parent) else Path(".")
    prepare_output_dir(str(parent), flag="--out folder")
    _warn_scope_off(args, Reporter(args.json))
    _warn_signature(args, engine, Reporter(args.json))
    try:
        pred = engine.classifier.predict(args.path)
    except CxrEdgeError as exc:
        Reporter(args.json).error(error_object(args.path, exc))
        return EXIT_INPUT_FAILED
    empty = pred.write_overlay(args.out, label)
    if args.json:
        from .engine import dumps

        obj = engine.result_object(pred, args.path, {label: _shown(args.out)}, {label: empty})
        obj.update(label=label, probability=round(pred.probabilities[label], 6), overlay=_shown(args.out))
        print(dumps(obj), flush=True)
    else:
        if pred.in_scope is False:
            print(scope_line(pred.scope or {}), flush=True)
        decision = {True: "positive", False: "negative", None: "undetermined"}[pred.decisions[label]]
        thr = pred.thresholds[label]
        vs = f" vs threshold {thr:.3f}" if thr is not None else ""
        note = "; no positive evidence (empty map)" if empty else ""
        print(f"{label}: probability {pred.probabilities[label]:.3f}{vs} ({decision}){note}; "
              f"overlay written to {_shown(args.out)}", flush=True)
    return EXIT_OUT_OF_SCOPE if pred.in_scope is False else EXIT_OK


def model_card_text(model_id: str) -> str | None:
    from importlib import resources

    ref = resources.files("cxr_edge") / "data" / f"{model_id}.md"
    return ref.read_text(encoding="utf-8") if ref.is_file() else None


def cmd_info(args) -> int:
    from .bundle import load_bundle

    opts = classifier_options(args)
    bundle = load_bundle(args.model, threads=1, public_key=opts["public_key"], require_signature=opts["require_signature"])
    m = bundle.manifest
    unsigned_note = signature_warning(bundle.signature, opts["public_key"] is not None)
    if unsigned_note:
        Reporter(args.json).warning("bundle_unsigned", unsigned_note)
    card = model_card_text(m.model_id)
    if args.card:  # only the card (exit 3 with a note on stderr when none ships)
        if card is None:
            print(f"cxr-edge: no model card ships for model {m.model_id!r}", file=sys.stderr)
            return EXIT_INPUT_FAILED
        if args.json:
            print(json.dumps({"model_id": m.model_id, "model_card": card}))
        else:
            sys.stdout.write(card if card.endswith("\n") else card + "\n")
        return EXIT_OK
    summary = m.summary()
    summary["file"] = {"path": bundle.path, "size_bytes": bundle.size_bytes}
    summary["runtime"] = {"cxr_edge": __version__}
    summary["signature"] = bundle.signature.to_dict()
    if args.json:
        if card:
            summary["model_card"] = card
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    p = m.preprocessing
    print(f"model      {m.model_id}\nfile       {bundle.path} ({bundle.size_bytes / 1e6:.2f} MB)\n"
          f"sha256     {m.model_sha256} (verified)\nsignature  {bundle.signature.describe()}\n"
          f"notice     {m.notice}\n"
          f"input      {p.input_name}: N x {p.channels} x {p.input_size[0]} x {p.input_size[1]} float32; resize "
          f"{p.resize} ({p.aspect}); (x - {list(p.mean)}) / {list(p.std)}; min side {p.min_side} px; "
          f"max {p.max_pixels:,} pixels (bundle)\n"
          f"cam        {m.cam.method} from output {m.cam.features_output!r}")
    print(f"scope      {scope_info_line(summary.get('scope'))}")
    print("labels     threshold")
    for name, t in zip(m.labels, m.thresholds):
        print(f"  {name:<20} {'undetermined' if t is None else f'{t:.3f}'}")
    print("provenance")
    for key, value in m.provenance.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        print(f"  {key}: {text if len(text) < 300 else text[:297] + '...'}")
    if card:
        print("\nmodel card: cxr-edge info --card")
    return EXIT_OK


def scope_info_line(scope: dict[str, Any] | None) -> str:
    """The ``info`` line of the manifest's scope block (``summary()["scope"]``)."""
    if not scope:
        return "none (this bundle has no scope block: no input scope gate runs; in_scope is null)"
    stats = scope.get("statistics") or {}
    k = stats.get("k") or (scope.get("components") or {}).get("shape", [None])[0]
    text = (f"{scope.get('method')} on output {scope.get('features_output')!r} ({scope.get('transform')}), k {k}, "
            f"threshold {float(scope['threshold']):.3f} + pixel rules")
    rule = scope.get("threshold_rule")
    return f"{text}\n           rule: {rule}" if rule else text


def cmd_serve(args) -> int:
    from .serve import serve_main

    return serve_main(args)


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_main

    return calibrate_main(args)


# --------------------------------------------------------------------------- parser and main

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cxr-edge", description="On-device chest X-ray classification with heatmaps. "
                     "Exit codes: 0 ok, 1 internal error, 2 usage error, 3 some inputs failed, 4 model could not "
                     "be loaded, 5 output could not be written, 6 some inputs were out of scope (no decisions), "
                     "130 interrupted, 141 broken pipe.")
    parser.add_argument("--version", action="version", version=f"cxr-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="bundle .onnx (default: the embedded default model)")
        p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
        p.add_argument("--json", action="store_true", help="machine-readable JSON (one object per line)")
        add_trust_arguments(p)

    p = sub.add_parser("predict", help="classify images (files and folders, recursively)")
    p.add_argument("paths", nargs="+")
    common(p)
    p.add_argument("--cam-dir", default=None, help="write heatmap overlays (RGB PNG) here")
    p.add_argument("--cam-label", default=None,
                   help="which labels get overlays: positive (default)|top|all|LABEL; needs --cam-dir")
    p.add_argument("--batch-size", type=int, default=1, help="images per model run (default 1: lowest memory)")
    p.add_argument("--prefetch", type=int, default=FOLDER_PREFETCH, metavar="N",
                   help=f"overlap inputs, at most N+1 in flight (default {FOLDER_PREFETCH}; 0: one at a time): with "
                        "several inputs and no --threads, one worker per core (plus a spare when N > cores) takes each "
                        "input through decode and a 1-thread model")
    p.add_argument("--allow-any-body-part", action="store_true",
                   help="accept DICOMs whose anatomy is not (confirmed) chest; such results carry out_of_scope=true")
    add_scope_arguments(p)
    add_overlay_arguments(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="write a heatmap overlay of one label for one image")
    p.add_argument("path")
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True, help="overlay PNG path (.png; missing folders are created)")
    p.add_argument("--allow-any-body-part", action="store_true")
    add_scope_arguments(p)
    add_overlay_arguments(p)
    common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("info", help="labels, thresholds, preprocessing, provenance, checksum")
    common(p)
    p.add_argument("--card", action="store_true", help="print only the model card")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="keep the bundle loaded and answer JSON-line requests (socket and/or stdio)")
    common(p)
    p.add_argument("--socket", default=None, metavar="PATH", help="listen on this Unix domain socket")
    p.add_argument("--stdio", action="store_true", help="read requests on stdin, reply on stdout")
    p.add_argument("--workers", type=int, default=1, help="inference threads sharing the session (default 1)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="decode up to N accepted requests ahead of the inference workers (default 0: each worker "
                        "decodes its own, the lowest latency for one request at a time; 1: more throughput for "
                        "clients that pipeline requests)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait for a worker; more get a 'busy' reply (default 8; 0 = none wait)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20,
                   help="longest request line accepted (default 64 MiB)")
    p.add_argument("--max-connections", type=int, default=16, metavar="N",
                   help="socket clients served at once; one more gets a 'busy' line and is closed (default 16)")
    p.add_argument("--send-timeout", type=float, default=10.0, metavar="S",
                   help="close a connection whose client does not take a reply within S seconds, so it cannot "
                        "stall the workers (default 10)")
    p.add_argument("--idle-timeout", type=float, default=0.0, metavar="S",
                   help="close a connection that sent nothing and waits for nothing for S seconds "
                        "(default 0: never)")
    p.add_argument("--allow-any-body-part", action="store_true")
    add_scope_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    p.add_argument("--test-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve, json=True)

    p = sub.add_parser("calibrate", help="refit per-label thresholds on local labelled images -> a new bundle")
    p.add_argument("paths", nargs="+", metavar="IMAGES")
    common(p)
    p.add_argument("--labels", required=True, help="CSV: image (file name), optional patient_id, one 0/1 column "
                   "per bundle label (blank = unknown)")
    p.add_argument("--out", required=True, help="the recalibrated bundle (.onnx) to write")
    p.add_argument("--rule", default="breakeven",
                   help="breakeven (default) | f1 | youden | specificity=0.9 | sensitivity=0.9")
    p.add_argument("--min-positive-patients", type=int, default=10,
                   help="fewer distinct positive patients -> the label is undetermined (default 10)")
    p.add_argument("--n-boot", type=int, default=1000, help="patient-bootstrap resamples (default 1000)")
    p.add_argument("--temperature", action="store_true",
                   help="also refit per-label temperature scaling on these images (folded into the head; the "
                        "thresholds are then fitted on the recalibrated probabilities)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model-id", default=None, help="model_id of the new bundle (default: the original's)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--sign-key", default=None, metavar="PRIVATE.pem",
                   help="sign the new bundle with this ed25519 private key (the source's signature never carries "
                        "over: it signed the old thresholds)")
    p.set_defaults(func=cmd_calibrate)
    return parser


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:
        try:
            if _STATE.get("json"):
                from .engine import dumps, error_object

                print(dumps(error_object("<run>", exc)), file=sys.stderr, flush=True)
            else:
                print("cxr-edge: interrupted", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        return EXIT_INTERRUPTED


_STATE: dict[str, Any] = {}


def _main(argv: Sequence[str] | None) -> int:
    _STATE.clear()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise UsageError("--threads must be >= 1")
        if getattr(args, "batch_size", 1) < 1:
            raise UsageError("--batch-size must be >= 1")
        if getattr(args, "prefetch", 0) < 0:
            raise UsageError("--prefetch must be >= 0")
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"cxr-edge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _STATE["json"] = bool(getattr(args, "json", False)) and args.command != "serve"
    try:
        return args.func(args)
    except UsageError as exc:
        if getattr(args, "json", False):
            _report_error(args, "<arguments>", InvalidArgumentError(str(exc)))
        else:
            print(f"cxr-edge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BundleError as exc:
        _report_error(args, getattr(args, "model", None) or "<default model>", exc)
        return EXIT_MODEL
    except InvalidArgumentError as exc:
        _report_error(args, "<arguments>", exc)
        return EXIT_USAGE
    except OutputError as exc:
        _report_error(args, "<output>", exc)
        return EXIT_OUTPUT
    except CxrEdgeError as exc:
        _report_error(args, "<run>", exc)
        return EXIT_INPUT_FAILED
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug: still a typed report and a documented exit code
        if os.environ.get("CXR_EDGE_DEBUG"):
            raise
        try:
            _report_error(args, "<run>", exc)
        except BrokenPipeError:
            raise
        except Exception:
            pass
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
