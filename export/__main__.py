"""``python -m export``: trained model -> verified cxr-edge bundle (+ verification report JSON).

    python -m export --run runs/kd_s0 --out student_int8.onnx --format int8 --calib-images 200 \\
        --ingraph student_int8_bytes.onnx --report student_int8.report.json
    python -m export --checkpoint model_final.pt --config runs/kd_s0/config.json --out m.onnx --format fp32 \\
        --image-dir ../shared/data/nih-cxr14-sample/images --verify-images ../shared/teachers/teacher_val_images.csv

The flags become one ``export.build_bundle.ExportConfig`` (recorded in the manifest's provenance).
Exit codes: 0 bundle written; 2 bad arguments (also: --out exists without --overwrite); 3 INT8 gate failed
(no bundle; see the report); 4 export/parity failure; 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cxr_edge.errors import CxrEdgeError, InvalidArgumentError

from .errors import ExportError, QuantizationGateError
from .images import nih_sample_dir
from .quantize import CALIBRATION_METHODS, DEFAULT_FLOAT_LEADING_CONVS, DEFAULT_PRESET, PRESETS
from .scope_fit import DEFAULT_K as SCOPE_K
from .scope_fit import DEFAULT_QUANTILE as SCOPE_QUANTILE
from .thresholds import METHODS
from .verify import GateCriteria

if TYPE_CHECKING:
    from .build_bundle import ExportConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model source (a run directory, or a checkpoint + config/flags)")
    src.add_argument("--run", help="models.train run directory (config.json + model_final.pt + split)")
    src.add_argument("--run-checkpoint", default="final", choices=("final", "best", "last"))
    src.add_argument("--checkpoint", help="checkpoint file (model_final.pt or a bare state dict)")
    src.add_argument("--config", help="TrainConfig JSON for --checkpoint (one source of truth for preprocessing)")
    src.add_argument("--arch", help="registry model name (without --config)")
    src.add_argument("--input-size", type=int)
    src.add_argument("--channels", type=int, default=1)
    src.add_argument("--mean", type=float)
    src.add_argument("--std", type=float)
    src.add_argument("--resize", default="area")
    src.add_argument("--labels", help="comma-separated label names (when the checkpoint has none)")
    img = p.add_argument_group("images (flag mode; run mode uses the run's own split)")
    img.add_argument("--image-dir", default=None, help="default: <shared>/data/nih-cxr14-sample/images")
    img.add_argument("--labels-csv", default=None, help="default: <shared>/data/nih-cxr14-sample/labels.csv")
    img.add_argument("--verify-images", help="CSV/text list of held-out labelled images for the gate")
    img.add_argument("--calib-list", help="CSV/text list of calibration images (default: image dir minus verify)")
    img.add_argument("--threshold-images", help="CSV/text list of validation images for thresholds")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="bundle path (.onnx); a name saying int8/fp32 is corrected to "
                                                   "the precision actually written")
    out.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    out.add_argument("--format", choices=("int8", "fp32"), default="int8")
    out.add_argument("--report", help="verification report JSON (default: <out>.report.json)")
    out.add_argument("--ingraph", help="also write a bytes-in bundle with in-graph decoding/preprocessing")
    out.add_argument("--ingraph-images", type=int, default=50, help="real files to compare the in-graph path on")
    out.add_argument("--sign-key", metavar="PRIVATE.pem",
                     help="sign the written bundle with this ed25519 private key (python -m export.sign keygen); "
                          "devices check it with --public-key")
    q = p.add_argument_group("quantization and gate")
    q.add_argument("--calib-images", type=int, default=200, help="number of calibration images (seeded subset)")
    q.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    q.add_argument("--calibrate-method", choices=sorted(CALIBRATION_METHODS), default="minmax")
    q.add_argument("--float-leading-convs", type=int, default=DEFAULT_FLOAT_LEADING_CONVS, metavar="N",
                   help="keep the first N convolutions (and every node before them) float; 0: none. "
                        "EfficientNet-Lite0 passes the gate with 6 and --preset u8s8 (VNNI/ARM CPUs only: see "
                        "export/quantize.py)")
    q.add_argument("--fallback-fp32", action="store_true", help="ship fp32 (recorded in provenance) if INT8 fails")
    q.add_argument("--max-auc-drop", type=float, default=GateCriteria.max_auc_drop, help="AUC points")
    q.add_argument("--min-cam-median", type=float, default=GateCriteria.min_cam_median)
    q.add_argument("--max-flip-rate", type=float, default=GateCriteria.max_flip_rate)
    q.add_argument("--debug-quant", action="store_true", help="add qdq_loss_debug SQNR per tensor to the report")
    e = p.add_argument_group("export")
    e.add_argument("--thresholds", choices=METHODS, default="breakeven",
                   help="operating-point rule on the calibration split (export/thresholds.py)")
    e.add_argument("--min-sensitivity", "--target", dest="min_sensitivity", type=float, default=0.9,
                   help="the rule's target for --thresholds sensitivity / specificity")
    e.add_argument("--min-positive-patients", type=int, default=10,
                   help="labels with fewer positive calibration patients get no decision (undetermined)")
    e.add_argument("--temperature", action="store_true",
                   help="per-label temperature scaling fitted on the calibration split, folded into the head "
                        "before quantisation and thresholds (cxr_edge/temperature.py)")
    e.add_argument("--model-id", help="model id written into the manifest (default: architecture-run name)")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    e.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's offline basic optimization")
    e.add_argument("--seed", type=int, default=0)
    sc = p.add_argument_group("input scope gate (docs/scope.md)")
    sc.add_argument("--scope", dest="scope", action="store_true", default=None,
                    help="fit the scope gate into the manifest (default: on from 100 training images)")
    sc.add_argument("--no-scope", dest="scope", action="store_false", help="do not fit a scope gate")
    sc.add_argument("--scope-k", type=int, default=SCOPE_K, help="PCA components of the scope gate's density model")
    sc.add_argument("--scope-quantile", type=float, default=SCOPE_QUANTILE,
                    help="conformal quantile of in-scope calibration scores that sets the threshold")
    return p


def _source(args: argparse.Namespace):
    from .source import source_from_checkpoint, source_from_run

    if args.run and args.checkpoint:
        raise InvalidArgumentError("pass --run or --checkpoint, not both")
    if args.run:
        given = [f for f, v in (("--verify-images", args.verify_images), ("--calib-list", args.calib_list),
                                ("--threshold-images", args.threshold_images), ("--arch", args.arch),
                                ("--config", args.config)) if v]
        if given:
            raise InvalidArgumentError(f"{', '.join(given)} cannot be combined with --run: a run directory brings "
                                       "its own model, preprocessing and train/validation/evaluation split")
        return source_from_run(args.run, args.run_checkpoint)
    if not args.checkpoint:
        raise InvalidArgumentError("pass --run RUN_DIR or --checkpoint CKPT (with --config or --arch ...)")
    data = nih_sample_dir()
    return source_from_checkpoint(
        args.checkpoint, config=args.config, arch=args.arch,
        labels=[s.strip() for s in args.labels.split(",")] if args.labels else None,
        input_size=args.input_size, channels=args.channels, mean=args.mean, std=args.std, resize=args.resize,
        image_dir=args.image_dir or data / "images", labels_csv=args.labels_csv or data / "labels.csv",
        calib_list=args.calib_list, verify_list=args.verify_images, threshold_list=args.threshold_images)


def config_from_args(args: argparse.Namespace) -> "ExportConfig":
    """The flags as one :class:`export.build_bundle.ExportConfig` (checked: a bad value is exit code 2)."""
    from .build_bundle import ExportConfig

    return ExportConfig(
        precision=args.format, model_id=args.model_id, overwrite=args.overwrite,
        opset=args.opset, exporter=args.exporter, optimize=not args.no_optimize,
        calib_images=args.calib_images, preset=args.preset, calibrate_method=args.calibrate_method,
        float_leading_convs=args.float_leading_convs,
        criteria=GateCriteria(max_auc_drop=args.max_auc_drop, min_cam_median=args.min_cam_median,
                              max_flip_rate=args.max_flip_rate),
        fallback_fp32=args.fallback_fp32, debug=args.debug_quant,
        threshold_method=args.thresholds, min_sensitivity=args.min_sensitivity,
        min_positive_patients=args.min_positive_patients, temperature=args.temperature,
        scope=args.scope, scope_k=args.scope_k, scope_quantile=args.scope_quantile,
        ingraph_images=args.ingraph_images, seed=args.seed)


#: typed failure -> (exit code, message suffix); the first matching class wins (docstring: exit codes)
_EXIT_CODES: tuple[tuple[type[Exception], int, str], ...] = (
    (InvalidArgumentError, 2, ""),
    (QuantizationGateError, 3, " (numbers in {report}; --fallback-fp32 ships fp32 instead)"),
    (ExportError, 4, ""),
    (CxrEdgeError, 1, ""),
)


def _run(args: argparse.Namespace, report_path: str) -> dict:
    from .build_bundle import check_outputs, export_bundle, write_report

    config = config_from_args(args)
    check_outputs(args.out, args.ingraph, overwrite=config.overwrite)  # before the model is loaded
    sign = _signer(args.sign_key) if args.sign_key else None
    report = export_bundle(_source(args), args.out, config, ingraph_out=args.ingraph, report_path=report_path)
    if sign is not None:
        status = sign(report["bundle"]["path"], args.sign_key)
        report["bundle"]["signature"] = {"algorithm": "ed25519", "key_fingerprint": status.key_fingerprint}
        size = Path(report["bundle"]["path"]).stat().st_size
        report["bundle"]["size_bytes"] = report["files"]["bundle_bytes"] = size
        write_report(report, report_path)
    return report


def _signer(key_path: str):
    """``export.sign.sign_bundle_file``, after checking the key loads (a bad key or a missing ``cryptography``
    fails in a second, before the export, not after it). Imported lazily: only signing needs it."""
    from cxr_edge.signature import load_private_key

    from .sign import sign_bundle_file

    try:
        load_private_key(key_path)
    except CxrEdgeError as exc:
        raise InvalidArgumentError(f"--sign-key {key_path}: {exc}") from None
    return sign_bundle_file


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report_path = args.report or str(Path(args.out).with_suffix("")) + ".report.json"
    try:
        report = _run(args, report_path)
    except CxrEdgeError as exc:
        code, suffix = next((c, s) for cls, c, s in _EXIT_CODES if isinstance(exc, cls))
        name = f"{type(exc).__name__}: " if code == 1 else ""
        print(f"error: {name}{exc}{suffix.format(report=report_path)}", file=sys.stderr)
        return code
    written = report["bundle"]["path"]
    if Path(written) != Path(args.out):
        print(f"note: wrote {report['bundle']['precision']}, so the bundle is {written} (not {Path(args.out).name})",
              file=sys.stderr)
    summary = {k: report.get(k) for k in ("result", "bundle", "files", "latency_ms_batch1_1thread")}
    if report.get("scope"):
        summary["scope"] = {k: report["scope"][k] for k in ("threshold", "k", "manifest_bytes", "skipped")
                            if k in report["scope"]}
    if "gate" in report:
        summary["gate"] = {k: report["gate"][k] for k in ("passed", "mean_auc_drop_points", "cam_pearson_median",
                                                          "logit_max_abs_diff", "logit_mean_abs_diff")}
    if "ingraph" in report:
        summary["ingraph"] = report["ingraph"]["agreement"]
    print(json.dumps(summary, indent=2))
    print(f"report: {report_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
