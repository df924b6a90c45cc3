"""Wrap the shared DenseNet-121 teacher ONNX into a cxr-edge bundle so the bench can run on it.

    .venv/bin/python benchmarks/wrap_teacher.py --out build/teacher.onnx [--int8] [--measure-auc]

The bundle is the teacher graph unchanged plus the manifest: the 14 ChestX-ray14 labels, the
teacher's preprocessing (resize "area" to 224, mean 0.49465, std 0.25223, from teachers/README.md),
and the CAM weights W/b read from the initializers of the final Gemm. Thresholds are 0.5
(uncalibrated: this bundle exists to be timed, not to make decisions).

``--int8`` also writes ``<out stem>.int8.onnx``: static QDQ INT8 with export.quantize (calibrated on
images the teacher was trained on; CAM head kept float). ``--measure-auc`` records the mean AUC of
each file on the teacher's 195 validation images (teacher_val_images.csv) in its provenance; without
it the fp32 bundle carries the 0.676 stated in teachers/README.md. The output files are derivatives of
shared data: keep them under git-ignored build/.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_edge.bundle import load_bundle, write_bundle  # noqa: E402
from cxr_edge.manifest import CamSpec, Manifest, PreprocessSpec  # noqa: E402

SHARED = Path(os.environ.get("CXR_EDGE_SHARED", REPO.parent / "shared"))
TEACHER = SHARED / "teachers" / "densenet121-nih1071.onnx"
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
README_MEAN_AUC = 0.676  # teachers/README.md: mean validation AUC over the 14 labels, 195 images


def head_weights(model_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """W [labels x C] and b of the final Gemm (transB=1), read with onnx.numpy_helper."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    gemms = [n for n in graph.node if n.op_type == "Gemm" and "logits" in n.output]
    if len(gemms) != 1:
        raise SystemExit("expected exactly one Gemm producing 'logits' in the teacher graph")
    gemm = gemms[0]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    w = inits[gemm.input[1]].astype(np.float32)
    w = w if trans_b else w.T
    b = inits[gemm.input[2]].astype(np.float32) if len(gemm.input) > 2 else np.zeros(w.shape[0], np.float32)
    return w, b


def teacher_manifest(model_bytes: bytes, source: Path, fmt: str, mean_auc: float | None,
                     auc_source: str) -> Manifest:
    w, b = head_weights(model_bytes)
    provenance = {
        "architecture": "densenet121", "source": f"shared teacher {source.name}",
        "source_sha256": hashlib.sha256(model_bytes).hexdigest(), "format": fmt,
        "training": "random init, 1,071 NIH ChestX-ray14 sample images (teachers/README.md)",
        "thresholds": "0.5 for every label, uncalibrated (benchmark bundle)",
    }
    if mean_auc is not None:
        provenance["metrics"] = {"mean_auc": round(float(mean_auc), 4), "source": auc_source}
    return Manifest(
        model_id=f"densenet121-nih1071{'-int8' if fmt == 'int8' else ''}", labels=NIH_LABELS,
        thresholds=tuple([0.5] * len(NIH_LABELS)),
        preprocessing=PreprocessSpec(input_name="image", input_size=(224, 224), channels=1, resize="area",
                                     mean=(0.49465,), std=(0.25223,)),
        cam=CamSpec(method="weights", features_output="features", weights=w, bias=b),
        logits_output="logits", model_sha256="0" * 64, provenance=provenance)


def mean_auc(bundle_path: Path) -> float:
    """Mean ROC AUC over labels with both classes, on the teacher's validation images."""
    from sklearn.metrics import roc_auc_score

    from export.images import load_batch, read_labels, resolve_images
    from models.datasets import read_image_list

    data = SHARED / "data" / "nih-cxr14-sample"
    names = read_image_list(SHARED / "teachers" / "teacher_val_images.csv")
    bundle = load_bundle(bundle_path, threads=os.cpu_count())
    spec = bundle.manifest.preprocessing
    y = read_labels(data / "labels.csv", names, NIH_LABELS)
    paths = resolve_images(names, data / "images")
    logits = []
    for i in range(0, len(paths), 16):
        x = load_batch(paths[i:i + 16], spec)
        logits.append(bundle.session.run(["logits"], {spec.input_name: x})[0])
    scores = np.concatenate(logits)
    aucs = [roc_auc_score(y[:, j], scores[:, j]) for j in range(len(NIH_LABELS)) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean(aucs))


def write_int8(fp32_bytes: bytes, out: Path, calib_count: int) -> Path:
    from export.calibration import reader_from_images, select_calibration
    from export.images import resolve_images
    from models.datasets import read_image_list
    from export.quantize import quantize_int8

    data = SHARED / "data" / "nih-cxr14-sample"
    names = read_image_list(SHARED / "teachers" / "teacher_train_images.csv")
    paths = select_calibration(resolve_images(names, data / "images"), calib_count, seed=0)
    spec = teacher_manifest(fp32_bytes, TEACHER, "fp32", None, "").preprocessing
    result = quantize_int8(fp32_bytes, reader_from_images(paths, spec), features_output="features",
                           input_name="image")
    manifest = teacher_manifest(result.model_bytes, TEACHER, "int8", None, "")
    manifest = replace(manifest, provenance={**manifest.provenance, "quantization": result.summary()})
    path = out.with_name(out.name[:-5] + ".int8.onnx")
    write_bundle(result.model_bytes, manifest, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, default=TEACHER, help="teacher ONNX (default: shared densenet121)")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "teacher.onnx", help="bundle path (*.onnx)")
    ap.add_argument("--int8", action="store_true", help="also write the QDQ INT8 sibling <out>.int8.onnx")
    ap.add_argument("--calibration-images", type=int, default=32)
    ap.add_argument("--measure-auc", action="store_true", help="measure mean AUC on the 195 validation images")
    args = ap.parse_args(argv)
    if not args.out.name.endswith(".onnx"):
        ap.error("--out must end with .onnx")
    if not args.teacher.is_file():
        print(f"teacher not found: {args.teacher} (set CXR_EDGE_SHARED)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_bytes = args.teacher.read_bytes()
    write_bundle(model_bytes, teacher_manifest(model_bytes, args.teacher, "fp32", README_MEAN_AUC,
                                               "teachers/README.md (195 validation images)"), args.out)
    written = [args.out]
    if args.int8:
        written.append(write_int8(model_bytes, args.out, args.calibration_images))
    for path in written:
        bundle = load_bundle(path)  # checksum, wiring and head self-check
        if args.measure_auc:
            auc = mean_auc(path)
            raw = path.read_bytes()
            m = bundle.manifest
            from cxr_edge.bundle import split_model

            body = split_model(raw)[0]
            prov = {**m.provenance, "metrics": {"mean_auc": round(auc, 4),
                                                "source": "measured: teacher_val_images.csv (195 images)"}}
            write_bundle(body, replace(m, provenance=prov), path)
            load_bundle(path)
            print(f"{path}: mean AUC {auc:.4f} on 195 validation images")
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, model_id {bundle.manifest.model_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
