"""Training on any dataset, end to end: generic CSV, CheXpert and PadChest layouts -> train -> evaluate
-> fp32 bundle -> cxr_edge.Classifier, with the labels flowing from the label file into the bundle;
degenerate (near-constant) predictions warned about and scored identically by training and evaluate.

The CheXpert / PadChest samples are real rows of their label files (../shared/data/labels) with NIH
pool images standing in for the pixels; everything is written under tmp_path.
"""
from __future__ import annotations

import ast
import csv
import gzip
import itertools
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import need_shared
from models.config import TrainConfig
from models.datasets import LabelFileError
from models.layers import CamNet
from models.registry import ModelConfig, list_models, register_model

SIDE = 128  # stored image side (>= the runtime's 128-px minimum); the model runs at 64 px
LABEL_DIR = ("data", "labels")
POOL_DIR = ("data", "nih-cxr14-sample", "images")
CHEXPERT = "chexpert_train.csv.gz"
PADCHEST = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
COMMON_FLAGS = ["--model", "eeea_c2", "--model-kwargs", '{"head_ch": 64}', "--input-size", "64", "--epochs", "1",
                "--batch-size", "4", "--lr", "1e-3", "--bootstrap", "20", "--threads", "1", "--eval-fraction", "0.3",
                "--no-augment"]


# ----------------------------------------------------------------------------------------------- helpers
def pool_images(n: int) -> list[np.ndarray]:
    """The first ``n`` NIH pool radiographs (sorted names), 8-bit, SIDE x SIDE."""
    folder = need_shared(*POOL_DIR)
    files = sorted(folder.glob("*.png"))[:n]
    return [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
            for f in files]


def put(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)  # the suffix picks PNG or JPEG


def real_rows(name: str, n: int) -> tuple[list[str], list[list[str]]]:
    """Header and the first ``n`` rows of a real label file, verbatim (streamed: no full read)."""
    path = need_shared(*LABEL_DIR, name)
    with gzip.open(path, "rt", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(itertools.islice(reader, n))


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def run_train(argv: list[str]) -> Path:
    from models.train import main

    assert main(argv) == 0
    return Path(argv[argv.index("--out-dir") + 1])


def end_to_end(tmp_path: Path, train_argv: list[str]):
    """train -> evaluate score -> fp32 export -> Classifier; returns (run, metrics, eval, classifier)."""
    from cxr_edge import Classifier
    from export.__main__ import main as export_main
    from models.evaluate import main as evaluate_main

    run = run_train([*COMMON_FLAGS, *train_argv, "--out-dir", str(tmp_path / "run"),
                     "--teacher-cache-dir", str(tmp_path / "cache")])
    metrics = json.loads((run / "metrics.json").read_text())
    assert evaluate_main(["score", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    bundle = tmp_path / "bundle.fp32.onnx"
    assert export_main(["--run", str(run), "--out", str(bundle), "--format", "fp32", "--no-scope",
                        "--model-id", "test-dataset", "--report", str(tmp_path / "report.json")]) == 0
    return run, metrics, evaluated, Classifier(bundle, threads=1)


def check_run(run: Path, metrics: dict, evaluated: dict, clf, labels: tuple[str, ...], sample: Path) -> None:
    """Labels equal everywhere; training's and evaluate's AUCs identical; the bundle predicts."""
    ckpt = torch.load(run / "model_final.pt", map_location="cpu", weights_only=True)
    assert tuple(ckpt["labels"]) == labels
    assert tuple(metrics["per_label"]) == labels and tuple(evaluated["per_label"]) == labels
    assert clf.labels == labels
    assert clf.manifest.provenance["training_data"]["dataset"] == json.loads((run / "config.json").read_text())[
        "dataset"]
    for name in labels:  # same model, same images, one AUC implementation: the same numbers
        assert metrics["per_label"][name]["auc"] == evaluated["per_label"][name]["auc"], name
    assert metrics["mean_auc"] == evaluated["mean_auc"]
    with np.load(run / "predictions.npz") as z:
        assert tuple(str(v) for v in z["label_names"]) == labels
    pred = clf.predict(str(sample))
    assert tuple(pred.probabilities) == labels
    assert all(0.0 <= p <= 1.0 for p in pred.probabilities.values())


def finite_loss(run: Path) -> bool:
    """NaN targets reach the loss unmasked -> a NaN loss: the training history says which."""
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return all(np.isfinite(h["loss"]) for h in state["history"])


# ----------------------------------------------------------------------------------------- generic CSV
GENERIC_LABELS = ("Opacity", "Device", "Fracture")


def make_generic(root: Path, images: list[np.ndarray]) -> Path:
    """labels.csv in the generic layout (blanks, one -1, a lateral row) + images in nested folders."""
    header = ["image", "patient_id", "view", *GENERIC_LABELS]
    cells = ["1", "0", ""]
    rows = []
    for i, img in enumerate(images):
        rel = f"site_a/p{i // 2:02d}/img{i}.png"
        put(root / rel, img)
        view = "LL" if i == 3 else ("PA" if i % 3 else "ap")
        rows.append([rel, f"P{i // 2:02d}", view, str(i % 2), cells[i % 3], "-1" if i == 5 else cells[(i + 1) % 3]])
    return write_csv(root / "labels.csv", header, rows)


def test_generic_csv_end_to_end(tmp_path):
    from models.runs import load_table

    images = pool_images(14)
    data = tmp_path / "data"
    make_generic(data, images)
    run, metrics, evaluated, clf = end_to_end(tmp_path, ["--dataset", "csv", "--data-root", str(data)])
    check_run(run, metrics, evaluated, clf, GENERIC_LABELS, data / "site_a/p00/img0.png")
    cfg = TrainConfig.load(run / "config.json")
    assert cfg.split == "patient"  # the CLI picked a patient split for a non-NIH dataset
    table = load_table(cfg)
    assert "site_a/p01/img3.png" not in table.image_ids and table.skipped["not_frontal"] == 1  # LL dropped
    j = GENERIC_LABELS.index("Fracture")
    assert np.isnan(table.targets[table.image_ids.index("site_a/p02/img5.png"), j])  # -1 under U-Ignore
    assert np.isnan(table.targets[:, GENERIC_LABELS.index("Device")]).sum() == 4  # blanks stay unknown
    assert metrics["dataset"] == "csv" and finite_loss(run)


# ----------------------------------------------------------------------------------------- CheXpert
def test_chexpert_layout_end_to_end(tmp_path):
    from models.labelsets import CHEXPERT_LABELS
    from models.runs import load_table

    header, rows = real_rows(CHEXPERT, 16)  # patients 1-8: 13 frontal views, 3 laterals, -1 cells
    images = pool_images(len(rows))
    data = tmp_path / "chexpert"
    labels_csv = write_csv(data / "CheXpert-v1.0-small" / "train.csv", header, rows)
    for row, img in zip(rows, images):
        put(data / row[0], img)
    run, metrics, evaluated, clf = end_to_end(
        tmp_path, ["--dataset", "chexpert", "--data-root", str(data), "--labels-csv", str(labels_csv),
                   "--uncertainty-policy", "U-Ones"])
    labels = tuple(header[5:])  # the file's own label columns, in its order
    assert labels == CHEXPERT_LABELS
    check_run(run, metrics, evaluated, clf, labels, data / rows[0][0])
    table = load_table(TrainConfig.load(run / "config.json"))
    assert len(table) == sum(r[3] == "Frontal" for r in rows) == 13
    row = next(r for r in rows if "-1.0" in r and r[3] == "Frontal")
    k = table.image_ids.index(row[0])
    for j, cell in enumerate(row[5:]):
        assert table.targets[k, j] == {"1.0": 1, "-1.0": 1, "0.0": 0, "": 0}[cell]  # U-Ones; blank = 0 (CheXpert)
    assert finite_loss(run)


# ----------------------------------------------------------------------------------------- PadChest
def padchest_sample(tmp_path: Path, n: int = 24) -> tuple[Path, list[str], list[list[str]]]:
    header, rows = real_rows(PADCHEST, n)
    images = pool_images(len(rows))
    data = tmp_path / "padchest"
    iid, idir = header.index("ImageID"), header.index("ImageDir")
    for row, img in zip(rows, images):
        put(data / row[idir] / row[iid], img)  # the release layout: <ImageDir>/<ImageID>
    write_csv(data / "labels.csv", header, rows)
    return data, header, rows


def test_padchest_layout_end_to_end(tmp_path):
    data, header, rows = padchest_sample(tmp_path)
    frontal = [r for r in rows if r[header.index("Projection")] in ("PA", "AP", "AP_horizontal")]
    counts: dict[str, int] = {}
    for r in frontal:
        for lab in {v.strip() for v in ast.literal_eval(r[header.index("Labels")]) if v.strip()}:
            counts[lab] = counts.get(lab, 0) + 1
    expected = tuple(sorted((k for k, c in counts.items() if c >= 2), key=lambda s: (s.lower(), s)))
    assert "normal" in expected and "pleural effusion" in expected and len(expected) >= 4
    run, metrics, evaluated, clf = end_to_end(
        tmp_path, ["--dataset", "padchest", "--data-root", str(data), "--padchest-min-images", "2"])
    check_run(run, metrics, evaluated, clf, expected,
              data / frontal[0][header.index("ImageDir")] / frontal[0][header.index("ImageID")])
    assert metrics["n_images"] < len(frontal) and finite_loss(run)


def test_padchest_common_label_set_maps_report_terms(tmp_path):
    from models.labelsets import COMMON_LABELS
    from models.runs import load_table

    data, header, rows = padchest_sample(tmp_path)
    table = load_table(TrainConfig(dataset="padchest", data_root=str(data), label_set="common", split="patient"))
    assert table.label_names == COMMON_LABELS
    labels_of = {r[header.index("ImageID")]: r[header.index("Labels")] for r in rows}
    eff = COMMON_LABELS.index("Effusion")
    for k, image in enumerate(table.image_ids):
        assert table.targets[k, eff] == ("pleural effusion" in labels_of[image])
    assert Path(table.extra["path"][0]).is_file()


# ----------------------------------------------------------------------------------------- bad label files
@pytest.mark.parametrize("case, message", [
    ("no_image", "no 'image' column"),
    ("no_patient", "no 'patient_id' column"),
    ("no_labels", "no label columns"),
    ("words", "column 'surname' has 2 value"),
    ("missing_file", "1 of 2 images listed in labels.csv are not under"),
])
def test_bad_label_files_are_one_line_errors_not_tracebacks(tmp_path, capsys, case, message):
    from models.train import main

    data = tmp_path / "data"
    put(data / "a.png", np.full((SIDE, SIDE), 100, np.uint8))
    put(data / "b.png", np.full((SIDE, SIDE), 120, np.uint8))
    header, rows = ["image", "patient_id", "Opacity"], [["a.png", "1", "1"], ["b.png", "2", "0"]]
    if case == "no_image":
        header[0] = "file"
    elif case == "no_patient":
        header[1] = "patient"
    elif case == "no_labels":
        header, rows = header[:2], [r[:2] for r in rows]
    elif case == "words":
        header.append("surname")  # a non-label column left in the file
        rows = [r + [a] for r, a in zip(rows, ("Smithers", "Jonesbury"))]
    else:
        rows[1][0] = "gone.png"
    write_csv(data / "labels.csv", header, rows)
    code = main(["--dataset", "csv", "--data-root", str(data), "--out-dir", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert "Smithers" not in err and "Jonesbury" not in err  # cell values (patient data) never echoed
    assert not (tmp_path / "run" / "last.pt").exists()


def test_own_labels_under_the_default_layout_point_to_dataset_csv(tmp_path, capsys):
    """The reported case: image, patient_id and own label columns, trained without --dataset."""
    from models.train import main

    put(tmp_path / "images" / "a.png", np.full((SIDE, SIDE), 100, np.uint8))
    write_csv(tmp_path / "labels.csv", ["image", "patient_id", "follow_up_needed"], [["a.png", "1", "1"]])
    assert main(["--data-root", str(tmp_path), "--split", "patient", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s)" in err and "--dataset csv" in err and "Traceback" not in err


def test_non_nih_dataset_refuses_the_teacher_split_and_a_missing_data_root():
    from cxr_edge.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="--split patient"):
        TrainConfig(dataset="csv", data_root="/x").validate()
    with pytest.raises(InvalidArgumentError, match="needs --data-root"):
        TrainConfig(dataset="csv", split="patient").validate()
    with pytest.raises(InvalidArgumentError, match="dataset must be one of"):
        TrainConfig(dataset="mimic", split="patient", data_root="/x").validate()
    with pytest.raises(LabelFileError, match="label file not found"):
        from models.runs import load_table

        load_table(TrainConfig(dataset="csv", split="patient", data_root=str(Path(__file__).parent)))


# ----------------------------------------------------------------------------------------- degenerate models
NEAR_CONSTANT = "near_constant_test"


class NearConstantNet(CamNet):
    """Features 1 + 1e-6 x conv: in float32 they round to a few ulps of 1, so the logits of all images
    agree to ~1e-7 and their order is decided by rounding: measured here, the same weights and images
    give AUCs 0.49 / 0.58 / 0.43 in batches of 5 / of 32 / channels-last."""

    def __init__(self, num_classes: int = 2, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 32, 3, 2, 1)
        self.num_features = 32
        self.classifier = nn.Linear(32, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + 1e-6 * torch.relu(self.conv(x))


if NEAR_CONSTANT not in list_models():
    @register_model(ModelConfig(NEAR_CONSTANT, "student", 64, 32, "near-constant unit-test net",
                                "tests/test_train_datasets.py"))
    def near_constant_test(num_classes: int = 2, in_chans: int = 1, **kw) -> NearConstantNet:
        return NearConstantNet(num_classes, in_chans, **kw)


def test_degenerate_predictions_are_flagged_and_scored_alike_by_training_and_evaluate(tmp_path, caplog):
    """Regression: training scored its channels-last model in batches of eval_batch_size, evaluate the
    reloaded (contiguous) checkpoint in batches of 32: on a near-constant model that alone moved the AUC."""
    from models.evaluate import main as evaluate_main
    from models.runs import load_table, split_indices
    from models.train import train

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    rows = []
    for i in range(40):  # 20 patients, each with one positive and one negative image per label
        put(data / f"{i}.png", rng.integers(0, 255, (SIDE, SIDE)).astype(np.uint8))
        rows.append([f"{i}.png", f"p{i // 2}", str(i % 2), str((i + i // 2) % 2)])
    write_csv(data / "labels.csv", ["image", "patient_id", "A", "B"], rows)
    cfg = TrainConfig(dataset="csv", data_root=str(data), split="patient", eval_fraction=0.4, val_fraction=0.4,
                      model=NEAR_CONSTANT, input_size=64, epochs=1, batch_size=8, lr=1e-12, bootstrap=50,
                      eval_batch_size=5, threads=1, out_dir=str(tmp_path / "run"),
                      teacher_cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="models.evaluate"):
        result = train(cfg)
    assert any("degenerate predictions" in r.getMessage() for r in caplog.records)
    assert result.history[0]["val_degenerate_labels"] == ["A", "B"]
    metrics = result.metrics
    assert metrics["degenerate_labels"] == ["A", "B"]
    assert all(metrics["per_label"][k]["degenerate_predictions"] for k in "AB")
    assert metrics["degenerate_predictions"]["A"]["spread"] < 1e-3

    # evaluate score on the same checkpoint: held-out split, then the validation images
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.evaluate"):
        assert evaluate_main(["score", str(result.run_dir), "--out", str(tmp_path / "eval.json")]) == 0
    assert any("degenerate predictions" in r.getMessage() for r in caplog.records)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["degenerate_labels"] == ["A", "B"]
    for k in "AB":
        assert evaluated["per_label"][k]["auc"] == metrics["per_label"][k]["auc"], k
        assert evaluated["per_label"][k]["ci_low"] == metrics["per_label"][k]["ci_low"], k
    table = load_table(cfg)
    _, val_rows, _ = split_indices(cfg, table)
    write_csv(tmp_path / "val.csv", ["image"], [[table.image_ids[r]] for r in val_rows])
    assert evaluate_main(["score", str(result.run_dir), "--images", str(tmp_path / "val.csv"),
                          "--out", str(tmp_path / "val.json")]) == 0
    val = json.loads((tmp_path / "val.json").read_text())
    assert round(val["mean_auc"], 5) == result.history[0]["val_mean_auc"]


def test_degenerate_rule_spares_a_real_ranking():
    from models.evaluate import degenerate_predictions

    rng = np.random.default_rng(1)
    logits = np.stack([rng.normal(size=50), 0.3 + 1e-8 * rng.normal(size=50), np.r_[np.zeros(40), np.ones(10)]], 1)
    targets = (rng.random((50, 3)) < 0.5).astype(np.float32)
    found = degenerate_predictions(logits.astype(np.float32), ["real", "constant", "tied"], targets)
    assert sorted(found) == ["constant", "tied"]
    assert "span" in found["constant"]["reason"] and "share one score" in found["tied"]["reason"]
    targets[:, 1] = np.nan  # no known target: nothing to rank, nothing to flag
    assert "constant" not in degenerate_predictions(logits, ["real", "constant", "tied"], targets)

