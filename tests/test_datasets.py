"""Label readers, patient splits and the common label map: synthetic CSVs plus the real label files."""
from __future__ import annotations

import ast
import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import NIH_LABELS, need_shared
from cxr_edge.errors import InvalidArgumentError
from models.datasets import (LabelFileError, LabelTable, official_split, parse_label_list, patient_split,
                             read_bboxes, read_chestxray14, read_chexpert, read_csv_labels, read_nih_sample,
                             read_padchest)
from models.labelsets import CHEXPERT_LABELS, COMMON_LABELS, COMMON_MAPS

PADCHEST_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"


def write_csv(path, header, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------- ChestX-ray14
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]"]


def nih_rows():
    return [["00000001_000.png", "Cardiomegaly", "0", "1", "57", "M", "PA", "2682", "2749"],
            ["00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "58", "M", "PA", "2894", "2729"],
            ["00000002_000.png", "No Finding", "0", "2", "81", "F", "AP", "2500", "2048"],
            ["00000003_000.png", "Hernia|Atelectasis", "0", "3", "", "F", "PA", "2500", "2048"]]


@pytest.mark.parametrize("gz", [False, True])
def test_chestxray14_synthetic(tmp_path, gz):
    path = write_csv(tmp_path / ("d.csv.gz" if gz else "d.csv"), NIH_HEADER, nih_rows(), gz=gz)
    table = read_chestxray14(path)
    assert table.dataset == "chestxray14" and table.label_names == NIH_LABELS
    assert table.patient_ids == ("1", "1", "2", "3") and len(table) == 4 and table.n_patients == 3
    assert table.targets.dtype == np.float32
    assert np.all(table.targets[2] == 0)  # No Finding -> all zeros
    assert {table.label_names[j] for j in np.flatnonzero(table.targets[1])} == {"Cardiomegaly", "Emphysema"}
    assert table.targets[3, 0] == 1 and table.targets[3, 13] == 1 and table.targets[3].sum() == 2
    assert list(table.extra["view"]) == ["PA", "PA", "AP", "PA"] and table.extra["frontal"].all()
    assert np.isnan(table.extra["age"][3]) and table.extra["age"][0] == 57
    assert list(table.extra["sex"]) == ["M", "M", "F", "F"]
    assert table.extra["follow_up"].tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError):
        table.targets[0, 0] = 0.0  # read-only


@pytest.mark.parametrize("labels", ["Cardiomegaly|Pneumonitis", "No Finding|Effusion", ""])
def test_chestxray14_rejects_unknown_findings(tmp_path, labels):
    rows = nih_rows()
    rows[1][1] = labels
    with pytest.raises(LabelFileError, match="row 3"):
        read_chestxray14(write_csv(tmp_path / "d.csv", NIH_HEADER, rows))


def test_chestxray14_missing_column_and_ragged_row(tmp_path):
    header = [h for h in NIH_HEADER if h != "Patient ID"]
    with pytest.raises(LabelFileError, match="Patient ID"):
        read_chestxray14(write_csv(tmp_path / "a.csv", header, [r[:3] + r[4:] for r in nih_rows()]))
    rows = nih_rows()
    rows[2] = rows[2][:5]
    with pytest.raises(LabelFileError, match="row 4"):
        read_chestxray14(write_csv(tmp_path / "b.csv", NIH_HEADER, rows))
    (tmp_path / "c.csv").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(LabelFileError):
        read_chestxray14(tmp_path / "c.csv")


def test_chestxray14_image_dir_filter(tmp_path):
    path = write_csv(tmp_path / "d.csv", NIH_HEADER, nih_rows())
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    for name in ("00000001_001.png", "00000003_000.png", "unrelated.png"):
        (tmp_path / "images_001" / "images" / name).write_bytes(b"")
    table = read_chestxray14(path, image_dir=tmp_path / "images_001")
    assert table.image_ids == ("00000001_001.png", "00000003_000.png")
    assert table.skipped == {"missing_image": 2}
    assert table.targets[1].sum() == 2
    with pytest.raises(FileNotFoundError):
        read_chestxray14(path, image_dir=tmp_path / "nope")


def test_official_split_lists(tmp_path):
    table = read_chestxray14(write_csv(tmp_path / "d.csv", NIH_HEADER, nih_rows()))
    with pytest.raises(FileNotFoundError):
        official_split(table)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n\n")
    train_val, test = official_split(table)
    assert train_val.tolist() == [0, 1, 3] and test.tolist() == [2]
    (tmp_path / "other.txt").write_text("00000002_000.png\n00000001_000.png\n")
    with pytest.raises(LabelFileError, match="both"):
        official_split(table, test_list=tmp_path / "other.txt")


# ----------------------------------------------------------------------------------------- CheXpert
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def chexpert_rows():
    def row(path, view, fl, values):
        return [path, "Female", "68", fl, view, *values, *[""] * (14 - len(values))]
    return [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "AP", "Frontal", ["1.0"]),
            row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "PA", "Frontal", ["", "0.0"]),
            row("CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg", "", "Lateral", ["", "-1.0"]),
            row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "AP", "Frontal",
                ["", "1.0", "-1.0", "0.0", ""])]


@pytest.mark.parametrize("policy,uncertain", [("U-Ones", 1.0), ("U-Zeros", 0.0), ("U-Ignore", np.nan)])
def test_chexpert_policies_synthetic(tmp_path, policy, uncertain):
    table = read_chexpert(write_csv(tmp_path / "t.csv", CHEXPERT_HEADER, chexpert_rows()), policy=policy)
    expected = np.zeros((4, 14), dtype=np.float32)
    expected[0, 0] = 1           # 1.0
    expected[2, 1] = uncertain   # -1.0
    expected[3, 1] = 1
    expected[3, 2] = uncertain
    np.testing.assert_array_equal(table.targets, expected)  # NaN == NaN here; blanks and 0.0 -> 0
    assert table.label_names == CHEXPERT_LABELS
    assert table.patient_ids == ("patient00001", "patient00002", "patient00002", "patient64541")
    assert list(table.extra["view"]) == ["AP", "PA", "L", "AP"]
    assert table.extra["frontal"].tolist() == [True, True, False, True]
    assert set(table.extra["sex"]) == {"F"}


def test_chexpert_frontal_only_and_errors(tmp_path):
    path = write_csv(tmp_path / "t.csv", CHEXPERT_HEADER, chexpert_rows())
    table = read_chexpert(path, frontal_only=True)
    assert len(table) == 3 and table.skipped == {"lateral": 1} and table.extra["frontal"].all()
    with pytest.raises(InvalidArgumentError):
        read_chexpert(path, policy="U-MultiClass")
    rows = chexpert_rows()
    rows[1][7] = "2.0"
    with pytest.raises(LabelFileError, match="2.0"):
        read_chexpert(write_csv(tmp_path / "bad.csv", CHEXPERT_HEADER, rows))
    rows = chexpert_rows()
    rows[0][0] = "train/someone/view1.jpg"
    with pytest.raises(LabelFileError, match="row 2"):
        read_chexpert(write_csv(tmp_path / "bad2.csv", CHEXPERT_HEADER, rows))


# ----------------------------------------------------------------------------------------- PadChest
PADCHEST_HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                   "PatientSex_DICOM", "Projection", "MethodLabel", "Labels"]


def padchest_rows():
    labels = ["['normal']", "['pleural effusion', ' cardiomegaly', '']", "nan", "['']",
              "[\"crohn's sign\", 'cardiomegaly', 'cardiomegaly']", "['pericardial effusion'", "[1, 2]",
              "['loculated pleural effusion', 'pneumothorax']", "['cardiomegaly']"]
    views = ["PA", "L", "PA", "PA", "AP_horizontal", "PA", "PA", "AP", "COSTAL"]
    return [[str(i), f"img{i}.png", str(i % 2), "20150914", f"s{i}", f"p{i // 2}", "1950.0" if i else "None",
             "O" if i == 3 else "M", views[i], "Physician", lab] for i, lab in enumerate(labels)]


def test_parse_label_list_cases():
    assert parse_label_list("['a', ' b', '', 'a']") == ("a", "b")
    assert parse_label_list("[]") == () and parse_label_list("['']") == ()
    assert parse_label_list('["crohn\'s sign"]') == ("crohn's sign",)  # literal_eval path
    for bad in ("nan", "", "['a'", "[1, 2]", "'a'", "__import__('os')", "{'a': 1}"):
        assert parse_label_list(bad) is None, bad


def test_padchest_synthetic(tmp_path):
    path = write_csv(tmp_path / "p.csv.gz", PADCHEST_HEADER, padchest_rows(), gz=True)
    table = read_padchest(path)
    assert table.skipped == {"unparsable_labels": 3, "empty_labels": 1, "not_frontal": 0}
    assert table.image_ids == ("img0.png", "img1.png", "img4.png", "img7.png", "img8.png")
    assert table.label_names == ("cardiomegaly", "crohn's sign", "loculated pleural effusion", "normal",
                                 "pleural effusion", "pneumothorax")
    pos = {img: {table.label_names[j] for j in np.flatnonzero(row)} for img, row in zip(table.image_ids, table.targets)}
    assert pos["img1.png"] == {"pleural effusion", "cardiomegaly"}
    assert pos["img4.png"] == {"crohn's sign", "cardiomegaly"}
    assert not np.isnan(table.targets).any()
    assert table.patient_ids == ("p0", "p0", "p2", "p3", "p4")
    assert np.isnan(table.extra["age"][0]) and table.extra["age"][1] == 65
    assert table.extra["frontal"].tolist() == [True, False, True, True, False]

    common = table.to_common()
    eff = COMMON_LABELS.index("Effusion")
    assert common.targets[:, eff].tolist() == [0, 1, 0, 1, 0]
    assert common.targets[:, COMMON_LABELS.index("Cardiomegaly")].tolist() == [0, 1, 1, 0, 1]
    assert np.isnan(common.targets[:, COMMON_LABELS.index("Edema")]).all()  # no source label in this table

    frequent = read_padchest(path, min_images=2)
    assert frequent.label_names == ("cardiomegaly",) and len(frequent) == 5
    frontal = read_padchest(path, frontal_only=True)
    assert frontal.image_ids == ("img0.png", "img4.png", "img7.png") and frontal.skipped["not_frontal"] == 2
    with pytest.raises(InvalidArgumentError):
        read_padchest(path, min_images=0)


# ----------------------------------------------------------------------------------------- generic CSV
CSV_HEADER = ["image", "patient_id", "Opacity", "view", "Device"]


def csv_rows():
    return [["a/1.png", "p1", "1", "PA", ""], ["a/2.png", "p1", "0", "lateral", "1"],
            ["b/3.png", "p2", "-1", "", "0"], ["b/4.png", "p3", "1.0", "ap", "-1.0"]]


@pytest.mark.parametrize("policy,uncertain", [("U-Ones", 1.0), ("U-Zeros", 0.0), ("U-Ignore", np.nan)])
def test_generic_csv_values_policy_and_column_order(tmp_path, policy, uncertain):
    table = read_csv_labels(write_csv(tmp_path / "l.csv", CSV_HEADER, csv_rows()), policy=policy)
    assert table.dataset == "csv" and table.label_names == ("Opacity", "Device")  # file order, view excluded
    expected = np.array([[1, np.nan], [0, 1], [uncertain, 0], [1, uncertain]], dtype=np.float32)
    np.testing.assert_array_equal(table.targets, expected)  # blank = unknown (NaN), -1 by the policy
    assert table.patient_ids == ("p1", "p1", "p2", "p3") and table.image_ids[0] == "a/1.png"
    assert table.extra["frontal"].tolist() == [True, False, True, True]  # blank view kept, case-insensitive
    picked = read_csv_labels(tmp_path / "l.csv", label_columns=["Device", "Opacity"], frontal_only=True)
    assert picked.label_names == ("Device", "Opacity") and picked.skipped == {"not_frontal": 1}
    assert picked.image_ids == ("a/1.png", "b/3.png", "b/4.png")


@pytest.mark.parametrize("edit, message", [
    (lambda h, r: (["file", *h[1:]], r), "no 'image' column"),
    (lambda h, r: ([h[0], "pid", *h[2:]], r), "no 'patient_id' column"),
    (lambda h, r: (h[:2] + ["view"], [x[:2] + [x[3]] for x in r]), "no label columns"),
    (lambda h, r: (h, [r[0], [r[1][0], *r[1][1:2], "yes", *r[1][3:]]]), "column 'Opacity' has 1 value"),
    (lambda h, r: (h, [r[0], [r[0][0], *r[1][1:]]]), "row 3: the image of row 2 again"),
    (lambda h, r: (h, [["", *r[0][1:]]]), "row 2: empty 'image'"),
    (lambda h, r: (h, []), "no data rows"),
    (lambda h, r: (h[:4] + ["Opacity"], r), "duplicate column"),
])
def test_generic_csv_refusals(tmp_path, edit, message):
    header, rows = edit(list(CSV_HEADER), csv_rows())
    with pytest.raises(LabelFileError, match=message):
        read_csv_labels(write_csv(tmp_path / "l.csv", header, rows))


def test_generic_csv_label_column_choice_errors(tmp_path):
    path = write_csv(tmp_path / "l.csv", CSV_HEADER, csv_rows())
    with pytest.raises(LabelFileError, match="not in the header"):
        read_csv_labels(path, label_columns=["Opacity", "Edema"])
    with pytest.raises(LabelFileError, match="cannot be label columns"):
        read_csv_labels(path, label_columns=["view"])
    with pytest.raises(LabelFileError, match="label file not found"):
        read_csv_labels(tmp_path / "none.csv")


def test_load_dataset_resolves_images_per_layout_and_refuses_missing_ones(tmp_path):
    from models.datasets import load_dataset

    for rel in ("a/1.png", "a/2.png", "b/3.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    path = write_csv(tmp_path / "l.csv", CSV_HEADER, csv_rows())
    with pytest.raises(LabelFileError, match="1 of 3 images listed in l.csv are not under .*first: b/4.png"):
        load_dataset("csv", path, tmp_path)  # a/2.png is lateral: dropped before the check
    table = load_dataset("csv", path, tmp_path, skip_missing_images=True, frontal_only=False)
    assert table.image_ids == ("a/1.png", "a/2.png", "b/3.png") and table.skipped["missing_image"] == 1
    assert [Path(p) for p in table.extra["path"]] == [tmp_path / "a/1.png", tmp_path / "a/2.png", tmp_path / "b/3.png"]
    with pytest.raises(LabelFileError, match="needs label columns named like the common labels"):
        load_dataset("csv", path, tmp_path, label_set="common", skip_missing_images=True)
    with pytest.raises(LabelFileError, match="image folder not found"):
        load_dataset("csv", path, tmp_path / "nope")
    with pytest.raises(InvalidArgumentError, match="unknown dataset"):
        load_dataset("mimic", path, tmp_path)

    nih = write_csv(tmp_path / "d.csv", NIH_HEADER, nih_rows())  # ChestX-ray14: any depth below the folder
    for k, name in enumerate(("00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png")):
        (tmp_path / "cxr" / f"images_00{k % 2 + 1}" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cxr" / f"images_00{k % 2 + 1}" / "images" / name).write_bytes(b"")
    cxr = load_dataset("chestxray14", nih, tmp_path / "cxr", label_set="common")
    assert cxr.label_names == COMMON_LABELS
    assert Path(cxr.extra["path"][1]) == tmp_path / "cxr" / "images_002" / "images" / "00000001_001.png"

    pad = write_csv(tmp_path / "p.csv", PADCHEST_HEADER, padchest_rows())  # <ImageDir>/<ImageID> or flat
    for i in range(9):
        target = tmp_path / "pc" / (str(i % 2) if i % 3 else "") / f"img{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    pc = load_dataset("padchest", pad, tmp_path / "pc", frontal_only=False)
    assert [Path(p).relative_to(tmp_path / "pc").as_posix() for p in pc.extra["path"]] == [
        "img0.png", "1/img1.png", "0/img4.png", "1/img7.png", "0/img8.png"]


# ----------------------------------------------------------------------------------------- table, split, map
def make_table(patients, dataset="chestxray14", labels=NIH_LABELS):
    n = len(patients)
    rng = np.random.default_rng(1)
    return LabelTable(dataset=dataset, label_names=labels, image_ids=[f"i{k}" for k in range(n)],
                      patient_ids=patients, targets=(rng.random((n, len(labels))) < 0.3).astype(np.float32),
                      extra={"view": np.array(["PA"] * n)})


def test_label_table_validation_and_subset():
    table = make_table(["a", "a", "b", "c"])
    sub = table.subset(np.array([False, True, False, True]))
    assert sub.image_ids == ("i1", "i3") and sub.patient_ids == ("a", "c")
    np.testing.assert_array_equal(sub.targets, table.targets[[1, 3]])
    assert table.subset([2]).image_ids == ("i2",) and len(table.subset([])) == 0
    for bad in ([True, False], [4], [-1], [[0, 1]], [0.5]):
        with pytest.raises(InvalidArgumentError):
            table.subset(bad)
    with pytest.raises(InvalidArgumentError):
        table.subset([0, 0])  # would duplicate an image
    with pytest.raises(InvalidArgumentError):
        LabelTable("x", ("a",), ("i",), ("p",), np.array([[0.5]]))
    with pytest.raises(InvalidArgumentError):
        LabelTable("x", ("a",), ("i", "j"), ("p",), np.zeros((2, 1)))
    with pytest.raises(InvalidArgumentError):
        LabelTable("x", ("a",), ("i",), ("p",), np.zeros((1, 1)), extra={"age": np.zeros(2)})


def test_patient_split_disjoint_complete_deterministic():
    rng = np.random.default_rng(0)
    patients = [f"p{k}" for k in rng.integers(0, 300, 1000)]
    table = make_table(patients)
    parts = patient_split(table, (0.7, 0.2, 0.1), seed=3)
    assert sum(p.size for p in parts) == len(table)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(table)))
    groups = [{patients[i] for i in p} for p in parts]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    n_pat = len(set(patients))
    assert [len(g) for g in groups] == [round(0.7 * n_pat), round(0.9 * n_pat) - round(0.7 * n_pat),
                                        n_pat - round(0.9 * n_pat)]
    again = patient_split(table, (0.7, 0.2, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = patient_split(table, (0.7, 0.2, 0.1), seed=4)
    assert not np.array_equal(parts[2], other[2])
    # row order does not matter: the same patients land in the same sets
    order = rng.permutation(len(table))
    shuffled = patient_split(table.subset(order), (0.7, 0.2, 0.1), seed=3)
    assert [{patients[order[i]] for i in p} for p in shuffled] == groups


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (0.9, 0.2, -0.1), (), (float("nan"), 1.0)])
def test_patient_split_rejects_bad_fractions(fractions):
    with pytest.raises(InvalidArgumentError):
        patient_split(make_table(["a", "b"]), fractions)


def test_patient_split_too_few_patients():
    with pytest.raises(InvalidArgumentError, match="too few"):
        patient_split(make_table(["a", "a", "b"]), (0.8, 0.1, 0.1))
    train, test = patient_split(make_table(["a", "a", "b"]), (0.5, 0.5))
    assert {train.size, test.size} == {1, 2}


def test_to_common_rules():
    nih = make_table(["a", "b", "c"])
    common = nih.to_common()
    assert common.label_names == COMMON_LABELS
    np.testing.assert_array_equal(common.targets, nih.targets[:, [NIH_LABELS.index(c) for c in COMMON_LABELS]])
    # any positive -> 1; all known 0 -> 0; otherwise NaN
    t = np.array([[1, np.nan], [0, 0], [np.nan, 0], [0, 1]], dtype=np.float32)
    table = LabelTable("custom", ("x", "y"), ("1", "2", "3", "4"), ("a", "b", "c", "d"), t)
    out = table.to_common(("Z", "X"), mapping={"Z": ("x", "y", "absent"), "X": ("x",)})
    np.testing.assert_array_equal(out.targets, np.array([[1, 1], [0, 0], [np.nan, np.nan], [1, 0]], np.float32))
    with pytest.raises(InvalidArgumentError):
        table.to_common()
    assert COMMON_MAPS["chexpert"]["Effusion"] == ("Pleural Effusion",)
    assert "pericardial effusion" not in COMMON_MAPS["padchest"]["Effusion"]
    for dataset, mapping in COMMON_MAPS.items():
        assert set(COMMON_LABELS) <= set(mapping), dataset  # every dataset expresses every common label


# ----------------------------------------------------------------------------------------- boxes
def test_read_bboxes_both_layouts(tmp_path):
    sample = tmp_path / "bbox.csv"
    sample.write_text("image,finding,x,y,w,h,x_orig,y_orig,w_orig,h_orig\n"
                      "a.png,Infiltration,10.5,20,30,40,33.6,64,96,128\n")
    assert read_bboxes(sample) == [("a.png", "Infiltration", 10.5, 20.0, 30.0, 40.0)]
    nih = tmp_path / "BBox_List_2017.csv"
    nih.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Infiltrate,32,64,96,128\n")
    box = read_bboxes(nih, scale=0.5)[0]
    assert box.finding == "Infiltration" and (box.x, box.y, box.w, box.h) == (16, 32, 48, 64)
    for bad in ("a.png,Mass,1,2,3\n", "a.png,Mass,1,2,-3,4\n", "a.png,Mass,1,x,3,4\n"):
        nih.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + bad)
        with pytest.raises(LabelFileError, match="row 2"):
            read_bboxes(nih)
    with pytest.raises(InvalidArgumentError):
        read_bboxes(sample, scale=0)


# ----------------------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def nih_table():
    return read_chestxray14(need_shared("data", "labels", "Data_Entry_2017_v2020.csv.gz"))


@pytest.fixture(scope="module")
def chexpert_tables():
    path = need_shared("data", "labels", "chexpert_train.csv.gz")
    # two policies suffice here (U-Zeros is checked exactly on the synthetic file); parsing is the slow part
    return {p: read_chexpert(path, policy=p) for p in ("U-Ones", "U-Ignore")}


@pytest.fixture(scope="module")
def padchest_table():
    return read_padchest(need_shared("data", "labels", PADCHEST_FILE))


def test_real_chestxray14(nih_table):
    raw = gzip.open(need_shared("data", "labels", "Data_Entry_2017_v2020.csv.gz"), "rt").read()
    assert len(nih_table) == 112_120 == raw.count(".png,")
    assert nih_table.n_patients == 30_805
    assert nih_table.label_names == NIH_LABELS
    assert int((nih_table.targets.sum(axis=1) == 0).sum()) == raw.count(".png,No Finding,")
    for j, name in enumerate(NIH_LABELS):  # every pipe-separated token became one positive
        assert int(nih_table.targets[:, j].sum()) == len(re.findall(rf"[,|]{name}[,|]", raw)), name
    assert set(nih_table.extra["view"]) == {"PA", "AP"}
    parts = patient_split(nih_table, seed=0)
    pats = [set(np.asarray(nih_table.patient_ids)[p]) for p in parts]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    assert abs(parts[0].size / len(nih_table) - 0.8) < 0.02


def test_real_nih_sample_agrees_with_data_entry(nih_table):
    sample = read_nih_sample(need_shared("data", "nih-cxr14-sample"))
    assert len(sample) == 1266 and sample.n_patients == 1087
    assert int((sample.extra["view"] == "PA").sum()) == 846
    row = {img: i for i, img in enumerate(nih_table.image_ids)}
    idx = np.array([row[img] for img in sample.image_ids])
    np.testing.assert_array_equal(sample.targets, nih_table.targets[idx])
    assert sample.patient_ids == tuple(nih_table.patient_ids[i] for i in idx)
    np.testing.assert_array_equal(sample.extra["view"], nih_table.extra["view"][idx])
    np.testing.assert_array_equal(sample.extra["age"], nih_table.extra["age"][idx])
    np.testing.assert_array_equal(sample.extra["follow_up"], nih_table.extra["follow_up"][idx])
    assert (sample.extra["original_width"] > 0).all()
    np.testing.assert_array_equal(sample.to_common().targets, nih_table.to_common().targets[idx])


def test_real_chexpert_policies(chexpert_tables):
    lines = gzip.open(need_shared("data", "labels", "chexpert_train.csv.gz"), "rt").read().splitlines()[1:]
    n_uncertain = sum(line.split(",")[5:].count("-1.0") for line in lines)
    ones, ignore = chexpert_tables["U-Ones"], chexpert_tables["U-Ignore"]
    assert len(ones) == len(lines) == 223_414 and ones.n_patients == 64_540
    assert n_uncertain > 0 and int(np.isnan(ignore.targets).sum()) == n_uncertain
    assert int(ones.targets.sum() - np.nansum(ignore.targets)) == n_uncertain
    known = ~np.isnan(ignore.targets)
    assert np.array_equal(ones.targets[known], ignore.targets[known])
    assert (ones.targets[~known] == 1).all()
    assert int(ones.extra["frontal"].sum()) == sum(",Frontal," in line for line in lines)
    common = ignore.to_common()
    np.testing.assert_array_equal(common.targets[:, COMMON_LABELS.index("Effusion")],
                                  ignore.targets[:, CHEXPERT_LABELS.index("Pleural Effusion")])


def test_real_padchest(padchest_table):
    table = padchest_table
    cells = []
    with gzip.open(need_shared("data", "labels", PADCHEST_FILE), "rt", newline="") as fh:
        reader = csv.reader(fh)
        column = next(reader).index("Labels")
        cells = [row[column] for row in reader]
    n_nan = cells.count("nan")
    assert len(cells) == 160_861 and n_nan > 0
    assert table.skipped["unparsable_labels"] == n_nan
    assert len(table) + table.skipped["unparsable_labels"] + table.skipped["empty_labels"] == len(cells)
    for cell in set(cells) - {"nan"}:  # the regex fast path agrees with literal_eval on every real cell
        expected = tuple(dict.fromkeys(s.strip() for s in ast.literal_eval(cell) if s.strip()))
        assert parse_label_list(cell) == expected, cell
    assert all(name == name.strip() and name for name in table.label_names)
    assert {"normal", "pleural effusion", "cardiomegaly", "pneumothorax"} <= set(table.label_names)
    assert not np.isnan(table.targets).any() and (table.targets.sum(axis=1) >= 1).all()
    assert table.n_patients > 60_000
    common = table.to_common()
    assert not np.isnan(common.targets).any()
    eff = common.targets[:, COMMON_LABELS.index("Effusion")]
    assert eff.sum() >= table.targets[:, table.label_names.index("pleural effusion")].sum()


def test_real_bboxes_match_nih_list():
    sample = read_bboxes(need_shared("data", "nih-cxr14-sample", "bbox.csv"))
    full = read_bboxes(need_shared("data", "labels", "BBox_List_2017.csv.gz"), scale=320 / 1024)
    assert len(sample) == 738 and len({b.image for b in sample}) == 660
    assert {b.finding for b in sample} <= set(NIH_LABELS)
    lookup = {}
    for b in full:
        lookup.setdefault((b.image, b.finding), []).append(b)
    for b in sample:
        candidates = lookup[(b.image, b.finding)]
        assert any(np.allclose((b.x, b.y, b.w, b.h), (c.x, c.y, c.w, c.h), atol=0.006) for c in candidates), b
