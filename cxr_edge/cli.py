"""``cxr-edge`` command line: predict / explain / info, made for people and firmware scripts.

Exit codes (stable): 0 all inputs succeeded; 2 usage error; 3 some inputs failed (the others
were still processed); 4 the model could not be loaded. With ``--json`` each input gives one JSON
object on stdout; errors are JSON objects on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import __version__
from .errors import BundleError, CxrEdgeError, InvalidArgumentError

EXIT_OK, EXIT_USAGE, EXIT_INPUT_FAILED, EXIT_MODEL = 0, 2, 3, 4
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"}


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 by itself; keep it but make it typed
        raise UsageError(message)


def iter_inputs(paths: Sequence[str]) -> Iterator[str]:
    """Files as given, folders walked recursively (sorted) for image-like files.

    In folders, files with image suffixes and suffix-less files (DICOM often has none) are taken;
    hidden files are skipped. A named file is always attempted, whatever its suffix.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    suffix = Path(name).suffix.lower()
                    if suffix in IMAGE_SUFFIXES or suffix == "":
                        yield str(Path(root) / name)
        else:
            yield raw


def error_object(source: str, exc: BaseException) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type(exc).__name__, "code": getattr(exc, "code", "error"), "message": str(exc)}
    if getattr(exc, "field", None):
        err["field"] = exc.field  # type: ignore[attr-defined]
    return {"source": source, "ok": False, "error": err}


class Progress:
    """A one-line progress bar on stderr, only when stdout is a terminal and the run is long."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            total = self.total or 0
            width = 30
            filled = int(width * self.done / total) if total else 0
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


def _cam_name(source: str, label: str) -> str:
    stem = Path(source).stem or "image"
    digest = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:60]
    return f"{safe}-{digest}_{label}.png"


def _cam_labels(pred, how: str) -> list[str]:
    if how == "positive":
        return pred.positive_labels
    if how == "top":
        return [max(pred.probabilities, key=pred.probabilities.get)]
    if how == "all":
        return list(pred.labels)
    from .classifier import label_index

    return [pred.labels[label_index(pred.labels, how)]]


def _human(pred, cams: dict[str, str]) -> str:
    lines = [f"{pred.source}  ({pred.image_shape[1]}x{pred.image_shape[0]} {pred.image_info.get('format', '')}, "
             f"{pred.timings_ms['total']:.1f} ms)"]
    for name in sorted(pred.labels, key=lambda n: -pred.probabilities[n]):
        t = pred.thresholds[name]
        if t is None:
            lines.append(f"  {name:<20} {pred.probabilities[name]:6.3f}  (undetermined: no decision for this label)")
            continue
        flag = "POSITIVE" if pred.decisions[name] else ""
        lines.append(f"  {name:<20} {pred.probabilities[name]:6.3f}  (threshold {t:.3f}) {flag}".rstrip())
    for label, path in cams.items():
        lines.append(f"  heatmap {label}: {path}")
    return "\n".join(lines)


def _load(args) -> Any:
    from .classifier import Classifier

    return Classifier(args.model, threads=args.threads, allow_any_body_part=getattr(args, "allow_any_body_part", False))


def cmd_predict(args) -> int:
    clf = _load(args)
    if args.cam_label not in ("positive", "top", "all"):
        from .classifier import label_index

        label_index(clf.labels, args.cam_label)
    if args.cam_dir:
        Path(args.cam_dir).mkdir(parents=True, exist_ok=True)
    sources = list(iter_inputs(args.paths))
    failed = 0
    progress = Progress(len(sources), enabled=sys.stdout.isatty() and len(sources) > 5 and not args.json)
    if not sources:
        _report_error(args, "<inputs>", InvalidArgumentError("no image files found in the given folders"))
        return EXIT_INPUT_FAILED
    for start in range(0, len(sources), args.batch_size):
        chunk = sources[start:start + args.batch_size]
        results = clf.predict_batch(chunk, batch_size=args.batch_size, keep_image=bool(args.cam_dir), errors="collect")
        for source, res in zip(chunk, results):
            progress.step()
            if isinstance(res, CxrEdgeError):
                failed += 1
                _report_error(args, source, res)
                continue
            cams: dict[str, str] = {}
            if args.cam_dir:
                for label in _cam_labels(res, args.cam_label):
                    out = str(Path(args.cam_dir) / _cam_name(source, label))
                    res.write_overlay(out, label)
                    cams[label] = out
            if args.json:
                obj = res.to_dict()
                obj["model"] = {"id": clf.model_id, "sha256": clf.manifest.model_sha256, "notice": clf.manifest.notice}
                if cams:
                    obj["cam"] = cams
                print(json.dumps(obj), flush=True)
            else:
                print(_human(res, cams), flush=True)
    progress.close()
    if not args.json:
        print(f"{len(sources) - failed} of {len(sources)} images classified; {clf.manifest.notice}", file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else EXIT_OK


def _report_error(args, source: str, exc: BaseException) -> None:
    if getattr(args, "json", False):
        print(json.dumps(error_object(source, exc)), file=sys.stderr, flush=True)
    else:
        print(f"{source}: error [{getattr(exc, 'code', 'error')}]: {exc}", file=sys.stderr, flush=True)


def cmd_explain(args) -> int:
    clf = _load(args)
    from .classifier import label_index

    label = clf.labels[label_index(clf.labels, args.label)]
    try:
        pred = clf.predict(args.path)
    except CxrEdgeError as exc:
        _report_error(args, args.path, exc)
        return EXIT_INPUT_FAILED
    pred.write_overlay(args.out, label)
    if args.json:
        print(json.dumps({**pred.to_dict(), "label": label, "probability": pred.probabilities[label],
                          "overlay": args.out, "model": {"id": clf.model_id, "notice": clf.manifest.notice}}))
    else:
        print(f"{label}: probability {pred.probabilities[label]:.3f} "
              f"({ {True: 'positive', False: 'negative', None: 'undetermined'}[pred.decisions[label]] }); "
              f"overlay written to {args.out}")
    return EXIT_OK


def model_card_text(model_id: str) -> str | None:
    from importlib import resources

    ref = resources.files("cxr_edge") / "data" / f"{model_id}.md"
    return ref.read_text(encoding="utf-8") if ref.is_file() else None


def cmd_info(args) -> int:
    from .bundle import load_bundle

    bundle = load_bundle(args.model, threads=1)
    m = bundle.manifest
    summary = m.summary()
    summary["file"] = {"path": bundle.path, "size_bytes": bundle.size_bytes}
    summary["runtime"] = {"cxr_edge": __version__}
    card = model_card_text(m.model_id)
    if args.json:
        if card:
            summary["model_card"] = card
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    p = m.preprocessing
    print(f"model      {m.model_id}\nfile       {bundle.path} ({bundle.size_bytes / 1e6:.2f} MB)\n"
          f"sha256     {m.model_sha256} (verified)\nnotice     {m.notice}\n"
          f"input      {p.input_name}: N x {p.channels} x {p.input_size[0]} x {p.input_size[1]} float32; resize "
          f"{p.resize} ({p.aspect}); (x - {list(p.mean)}) / {list(p.std)}; min side {p.min_side} px\n"
          f"cam        {m.cam.method} from output {m.cam.features_output!r}")
    print("labels     threshold")
    for name, t in zip(m.labels, m.thresholds):
        print(f"  {name:<20} {'undetermined' if t is None else f'{t:.3f}'}")
    print("provenance")
    for key, value in m.provenance.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        print(f"  {key}: {text if len(text) < 300 else text[:297] + '...'}")
    if args.card:
        print("\n" + (card or "(no model card ships for this model)"))
    elif card:
        print("\nmodel card: cxr-edge info --card")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cxr-edge", description="On-device chest X-ray classification with heatmaps. "
                     "Exit codes: 0 ok, 2 usage error, 3 some inputs failed, 4 model could not be loaded.")
    parser.add_argument("--version", action="version", version=f"cxr-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="bundle .onnx (default: the embedded default model)")
        p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
        p.add_argument("--json", action="store_true", help="machine-readable JSON (one object per input)")

    p = sub.add_parser("predict", help="classify images (files and folders, recursively)")
    p.add_argument("paths", nargs="+")
    common(p)
    p.add_argument("--cam-dir", default=None, help="write heatmap overlays (RGB PNG) here")
    p.add_argument("--cam-label", default="positive", help="which labels get overlays: positive|top|all|LABEL")
    p.add_argument("--batch-size", type=int, default=1, help="images per model run (default 1: lowest memory)")
    p.add_argument("--allow-any-body-part", action="store_true",
                   help="accept DICOMs whose BodyPartExamined is not chest (results are then out of scope)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="write a heatmap overlay of one label for one image")
    p.add_argument("path")
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True, help="overlay PNG path")
    p.add_argument("--allow-any-body-part", action="store_true")
    common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("info", help="labels, thresholds, preprocessing, provenance, checksum")
    common(p)
    p.add_argument("--card", action="store_true", help="print the model card")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise UsageError("--threads must be >= 1")
        if getattr(args, "batch_size", 1) < 1:
            raise UsageError("--batch-size must be >= 1")
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"cxr-edge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except BundleError as exc:
        _report_error(args, getattr(args, "model", None) or "<default model>", exc)
        return EXIT_MODEL
    except InvalidArgumentError as exc:
        _report_error(args, "<arguments>", exc)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
