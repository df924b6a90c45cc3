"""``cxr-edge-bench``: latency, throughput, split, cold start, memory and graph cost of bundles.

Exit codes: 0 ok; 2 usage (bad flag, unknown format, unavailable execution provider, bad image);
4 a model could not be loaded. Runtime-only: needs onnxruntime, numpy, OpenCV (parameters and MACs
are counted without the ``onnx`` package).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..errors import BundleError, CxrEdgeError, ImageError, InvalidArgumentError
from .report import render
from .runner import BenchConfig, run_bench

EXIT_OK, EXIT_USAGE, EXIT_MODEL = 0, 2, 4


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise _UsageError(message)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip().lower() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cxr-edge-bench", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Example: cxr-edge-bench --model build/teacher.onnx --threads 1,2 --batch 1,8 --json out.json")
    p.add_argument("--model", action="append", metavar="M",
                   help="bundle path (repeatable; default: the embedded default model); measured exactly as named. "
                        "Existing siblings X.onnx / X.fp32.onnx / X.int8.onnx are added (see --format)")
    p.add_argument("--device", default="cpu", help="cpu (CPUExecutionProvider), cuda, tensorrt, openvino, coreml, ...")
    p.add_argument("--provider", help="onnxruntime execution provider by full name (overrides --device)")
    p.add_argument("--format", type=_names, default=None, help="only these precisions (fp32,fp16,int8; read from "
                   "each manifest's provenance.precision, else the graph). Default: the named files plus their "
                   "fp32/int8 siblings. Missing ones are listed as skipped")
    p.add_argument("--threads", type=_ints, default=None, help="intra-op thread counts, e.g. 1,2 (default: all "
                   "usable CPUs, at most 4)")
    p.add_argument("--batch", type=_ints, default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per configuration (default: auto policy)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per configuration (default 5)")
    p.add_argument("--image", help="image for the end-to-end split and cold start (default: a synthetic "
                   "1024x1024 8-bit PNG)")
    p.add_argument("--cold-repeats", type=int, default=5, help="fresh processes for cold start (0 = skip)")
    p.add_argument("--cold-bytecode", choices=("installed", "as-is"), default="installed",
                   help="cold start with every module loading from bytecode, as after pip install (default), or "
                   "with this environment as it is (e.g. an editable install that compiles its sources at every "
                   "start under PYTHONDONTWRITEBYTECODE)")
    p.add_argument("--split-repeats", type=int, default=10, help="repeats of the end-to-end split (0 = skip)")
    p.add_argument("--json", metavar="OUT", help="write the full result (schema cxr-edge-bench/1); '-' = stdout")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of plain text")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _default_threads() -> list[int]:
    from .machine import usable_cpus

    return [min(4, usable_cpus())]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"cxr-edge-bench: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        from .variants import resolve_providers

        providers = resolve_providers(args.device, args.provider)
        models = args.model
        if not models:
            from ..bundle import default_bundle_path

            models = [str(default_bundle_path())]
        cfg = BenchConfig(models=models, formats=args.format, threads=args.threads or _default_threads(),
                          batches=args.batch, providers=providers, runs=args.runs, warmup=args.warmup,
                          image=args.image, cold_repeats=args.cold_repeats, cold_bytecode=args.cold_bytecode,
                          split_repeats=args.split_repeats)
        result = run_bench(cfg, log=log)
    except (InvalidArgumentError, ImageError) as exc:
        print(f"cxr-edge-bench: error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BundleError as exc:
        print(f"cxr-edge-bench: model could not be loaded [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except CxrEdgeError as exc:
        print(f"cxr-edge-bench: error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_MODEL
    if args.json:
        text = json.dumps(result, indent=2, allow_nan=False)
        if args.json == "-":
            sys.stdout.write(text + "\n")
            return EXIT_OK
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        log(f"wrote {args.json}")
    sys.stdout.write(render(result, markdown=args.markdown))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
