"""Label readers for ChestX-ray14, CheXpert and PadChest, plus patient-wise splits.

Why: training and evaluation need the three public label files as one typed table (images x
labels, NaN = unknown and masked in the loss) with patient ids, so that splits never put one
patient's images on both sides. Only csv + gzip + numpy: no pandas, no torch.

Run ``python -m models.datasets`` for a summary of the real label files under ../shared.
"""
from __future__ import annotations

import ast
import csv
import functools
import gc
import gzip
import io
import operator
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar, Union

import numpy as np

from cxr_edge.errors import CxrEdgeError, InvalidArgumentError
from models.config import DATASETS, shared_dir
from models.labelsets import CHESTXRAY14_LABELS, CHEXPERT_LABELS, COMMON_LABELS, COMMON_MAPS

PathLike = Union[str, "os.PathLike[str]"]

CHEXPERT_POLICIES: tuple[str, ...] = ("U-Ones", "U-Zeros", "U-Ignore")
PADCHEST_FRONTAL_VIEWS: frozenset[str] = frozenset({"PA", "AP", "AP_horizontal"})
_SEX = {"M": "M", "F": "F", "Male": "M", "Female": "F"}  # anything else -> "U" (unknown / other)


class LabelFileError(CxrEdgeError, ValueError):
    """A label file is missing columns or holds values the reader cannot interpret safely."""

    code = "label_file_error"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LabelTable:
    """One dataset's labels: ``targets[i, j]`` is 1/0 or NaN (unknown: mask it in the loss).

    ``extra`` holds per-image arrays (first axis = images): ``view`` (PA/AP/L...), ``frontal``
    (bool), ``age`` (float32 years, NaN unknown), ``sex`` ("M"/"F"/"U") and dataset-specific
    fields. ``skipped`` counts source rows left out, by reason; ``source`` is the file read.
    Arrays are read-only views: copy before changing them.
    """

    dataset: str
    label_names: tuple[str, ...]
    image_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    targets: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)
    skipped: Mapping[str, int] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        labels, images, patients = tuple(self.label_names), tuple(self.image_ids), tuple(self.patient_ids)
        n = len(images)
        targets = _readonly(np.asarray(self.targets, dtype=np.float32))
        if targets.ndim != 2 or targets.shape != (n, len(labels)):
            raise InvalidArgumentError(f"targets shape {targets.shape} != (images {n}, labels {len(labels)})")
        if len(patients) != n:
            raise InvalidArgumentError(f"{len(patients)} patient ids for {n} images")
        if len(set(labels)) != len(labels):
            raise InvalidArgumentError("duplicate label names")
        if len(set(images)) != n:
            raise InvalidArgumentError("duplicate image ids: an image must appear once")
        if targets.size and not np.all(np.isnan(targets) | (targets == 0) | (targets == 1)):
            raise InvalidArgumentError("targets must be 0, 1 or NaN")
        extra = {}
        for key, value in dict(self.extra).items():
            arr = np.asarray(value)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise InvalidArgumentError(f"extra[{key!r}] has shape {arr.shape}, expected ({n}, ...)")
            extra[key] = _readonly(arr)
        object.__setattr__(self, "label_names", labels)
        object.__setattr__(self, "image_ids", images)
        object.__setattr__(self, "patient_ids", patients)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "extra", extra)
        object.__setattr__(self, "skipped", dict(self.skipped))

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def n_patients(self) -> int:
        return len(set(self.patient_ids))

    def subset(self, mask_or_indices: np.ndarray | Sequence[int] | Sequence[bool]) -> "LabelTable":
        """Rows selected by a boolean mask (one per image) or by non-negative integer indices."""
        sel = np.asarray(mask_or_indices)
        n = len(self)
        if sel.dtype == bool:
            if sel.shape != (n,):
                raise InvalidArgumentError(f"boolean mask has shape {sel.shape}, expected ({n},)")
            idx = np.flatnonzero(sel)
        elif sel.size == 0:
            idx = np.zeros(0, dtype=np.int64)
        elif np.issubdtype(sel.dtype, np.integer) and sel.ndim == 1:
            if sel.min() < 0 or sel.max() >= n:
                raise InvalidArgumentError(f"indices must lie in [0, {n})")
            idx = sel.astype(np.int64)
        else:
            raise InvalidArgumentError(f"expected a boolean mask or 1-D integer indices, got {sel.dtype} {sel.shape}")
        return LabelTable(
            dataset=self.dataset, label_names=self.label_names,
            image_ids=tuple(self.image_ids[i] for i in idx), patient_ids=tuple(self.patient_ids[i] for i in idx),
            targets=self.targets[idx], extra={k: v[idx] for k, v in self.extra.items()},
            skipped=self.skipped, source=self.source)

    def to_common(self, common: Sequence[str] = COMMON_LABELS,
                  mapping: Mapping[str, Sequence[str]] | None = None) -> "LabelTable":
        """Re-express the targets on ``common`` labels (apply once, to a source table).

        ``mapping`` (default: ``labelsets.COMMON_MAPS[self.dataset]``) gives, per common label, the
        source labels it covers: positive if any is 1, negative if all are 0, else NaN. A common
        label with no source label in this table is NaN for every image (unknown, not absent).
        """
        if mapping is None:
            if self.dataset not in COMMON_MAPS:
                raise InvalidArgumentError(f"no common-label map for dataset {self.dataset!r}; pass mapping=")
            mapping = COMMON_MAPS[self.dataset]
        column = {name: j for j, name in enumerate(self.label_names)}
        out = np.full((len(self), len(common)), np.nan, dtype=np.float32)
        for k, name in enumerate(common):
            cols = [column[s] for s in mapping.get(name, ()) if s in column]
            if not cols:
                continue
            block = self.targets[:, cols]
            out[:, k] = np.where((block == 1).any(axis=1), 1.0, np.where((block == 0).all(axis=1), 0.0, np.nan))
        return LabelTable(dataset=self.dataset, label_names=tuple(common), image_ids=self.image_ids,
                          patient_ids=self.patient_ids, targets=out, extra=self.extra, skipped=self.skipped,
                          source=self.source)


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


# --------------------------------------------------------------------------------------------
# CSV plumbing
# --------------------------------------------------------------------------------------------
_F = TypeVar("_F", bound=Callable)


def _gc_paused(func: _F) -> _F:
    """Pause the cyclic garbage collector while a reader builds millions of small objects.

    The rows are acyclic, yet CPython's GC rescans the growing heap again and again during the
    parse: pausing it halves the time to read the 160k-223k-row files.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return wrapper  # type: ignore[return-value]


def _open_text(path: PathLike) -> io.StringIO:
    """The whole CSV as text, plain or gzip (decided by the magic bytes, not the suffix).

    One-shot decompression is several times faster than streaming through gzip.open, and the
    largest file (PadChest, ~17 MB gzip) fits in memory comfortably.
    """
    data = Path(path).read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return io.StringIO(data.decode("utf-8-sig"), newline="")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"{path}: not a readable UTF-8 CSV (plain or gzip): {exc}") from None


def _read_rows(path: PathLike) -> list[list[str]]:
    """Header + rows of a CSV; an empty file or a ragged row (field count != header's) is an error."""
    try:
        rows = list(csv.reader(_open_text(path)))
    except csv.Error as exc:
        raise LabelFileError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise LabelFileError(f"{path}: empty file, expected a CSV header")
    width = len(rows[0])
    ragged = next((line for line, row in enumerate(rows[1:], start=2) if len(row) != width), None)
    if ragged is not None:
        raise LabelFileError(f"{path}: row {ragged} has {len(rows[ragged - 1])} fields, the header has {width}")
    return rows


def _read_columns(path: PathLike, required: Iterable[str]) -> dict[str, list[str]]:
    """The named columns of a CSV as lists of strings; a missing column or ragged row is an error."""
    required = list(required)
    if not Path(path).is_file():
        raise LabelFileError(f"label file not found: {path}")
    rows = _read_rows(path)
    header = rows[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise LabelFileError(f"{path}: missing column(s) {missing}")
    if len(rows) == 1:
        return {c: [] for c in required}
    # the trailing 0 keeps itemgetter returning a tuple even for one column; zip below drops it
    columns = zip(*map(operator.itemgetter(*(header.index(c) for c in required), 0), rows[1:]))
    return {c: list(values) for c, values in zip(required, columns)}


def _floats(values: Sequence[str]) -> np.ndarray:
    """float32 array; blanks and unparsable values ('None', 'nan') become NaN."""
    out = np.full(len(values), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except ValueError:
            pass
    return out


def _ints(values: Sequence[str]) -> np.ndarray:
    """int32 array; blanks and unparsable values become -1 (these columns are never negative)."""
    out = np.full(len(values), -1, dtype=np.int32)
    for i, v in enumerate(values):
        try:
            out[i] = int(float(v))
        except (ValueError, OverflowError):
            pass
    return out


def _sex(values: Sequence[str]) -> np.ndarray:
    return np.array([_SEX.get(v.strip(), "U") for v in values])


# --------------------------------------------------------------------------------------------
# ChestX-ray14
# --------------------------------------------------------------------------------------------
_NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position")


@_gc_paused
def read_chestxray14(data_entry_csv: PathLike, image_dir: PathLike | None = None) -> LabelTable:
    """Data_Entry_2017(_v2020).csv(.gz): 14 labels in the official order, "No Finding" = all 0.

    With ``image_dir`` only rows whose image file exists below it (any depth, as in the
    images_001..012 release folders) are kept; ``skipped["missing_image"]`` counts the rest.
    """
    cols = _read_columns(data_entry_csv, _NIH_COLUMNS)
    column = {name: j for j, name in enumerate(CHESTXRAY14_LABELS)}
    parsed: dict[str, np.ndarray] = {}
    targets = np.zeros((len(cols["Image Index"]), len(CHESTXRAY14_LABELS)), dtype=np.float32)
    for i, text in enumerate(cols["Finding Labels"]):
        row = parsed.get(text)
        if row is None:
            tokens = [t.strip() for t in text.split("|")]
            row = np.zeros(len(CHESTXRAY14_LABELS), dtype=np.float32)
            if tokens != ["No Finding"]:
                for t in tokens:
                    if t not in column:
                        raise LabelFileError(f"{data_entry_csv}: row {i + 2}: unknown finding {t!r}"
                                             + (" (No Finding must stand alone)" if t == "No Finding" else ""))
                    row[column[t]] = 1.0
            parsed[text] = row
        targets[i] = row
    views = np.array([v.strip() for v in cols["View Position"]])
    table = LabelTable(
        dataset="chestxray14", label_names=CHESTXRAY14_LABELS, image_ids=cols["Image Index"],
        patient_ids=[p.strip() for p in cols["Patient ID"]], targets=targets,
        extra={"view": views, "frontal": np.isin(views, ("PA", "AP")), "age": _floats(cols["Patient Age"]),
               "sex": _sex(cols["Patient Gender"]), "follow_up": _ints(cols["Follow-up #"])},
        skipped={"missing_image": 0}, source=str(data_entry_csv))
    if image_dir is None:
        return table
    present = _file_names(image_dir)
    keep = np.array([name in present for name in table.image_ids], dtype=bool)
    return replace(table.subset(keep), skipped={"missing_image": int((~keep).sum())})


def _file_names(folder: PathLike) -> set[str]:
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return {name for _, _, files in os.walk(folder) for name in files}


def official_split(table: LabelTable, train_val_list: PathLike | None = None,
                   test_list: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the official ChestX-ray14 train_val / test lists (patient-disjoint by design).

    The lists default to ``train_val_list.txt`` / ``test_list.txt`` beside ``table.source``.
    Rows in neither list are in neither result; an image in both lists is an error.
    """
    folder = Path(table.source).parent
    paths = [Path(p) if p is not None else folder / default
             for p, default in ((train_val_list, "train_val_list.txt"), (test_list, "test_list.txt"))]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"official split list not found: {p}")
    names = [{line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()} for p in paths]
    both = names[0] & names[1]
    if both:
        raise LabelFileError(f"{len(both)} image(s) in both official lists, e.g. {sorted(both)[0]}")
    return tuple(np.flatnonzero([img in s for img in table.image_ids]) for s in names)  # type: ignore[return-value]


@_gc_paused
def read_image_list(path: str | os.PathLike) -> list[str]:
    """Image names from a CSV with an ``image`` column (e.g. teacher_val_images.csv) or a text file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read image list {p}: {exc.strerror or exc}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    is_csv = bool(lines) and ("," in lines[0] or lines[0].lower() in ("image", "image_index", "path"))
    if is_csv:
        rows = list(csv.DictReader(lines))
        key = next((k for k in ("image", "Image Index", "image_index", "path") if rows and k in rows[0]), None)
        if key is None:
            raise InvalidArgumentError(f"{p}: CSV image list needs an 'image' column")
        return [r[key].strip() for r in rows if (r[key] or "").strip()]
    return lines


def read_nih_sample(root: PathLike) -> LabelTable:
    """The 1,266-image NIH sample's labels.csv (same labels as Data_Entry_2017_v2020); ``root`` is
    the sample folder (its ``labels.csv`` is read) or the CSV itself."""
    path = Path(root) if Path(root).suffix.lower() in (".csv", ".gz") else Path(root) / "labels.csv"
    required = ("image", "patient_id", "follow_up", "age", "sex", "view", "original_width", "original_height",
                *CHESTXRAY14_LABELS, "no_finding")
    cols = _read_columns(path, required)
    binary = {"0": 0.0, "1": 1.0}
    try:
        targets = np.array([[binary[v.strip()] for v in cols[name]] for name in CHESTXRAY14_LABELS],
                           dtype=np.float32).T.reshape(len(cols["image"]), len(CHESTXRAY14_LABELS))
        no_finding = np.array([binary[v.strip()] for v in cols["no_finding"]], dtype=np.float32)
    except KeyError as exc:
        raise LabelFileError(f"{path}: label value {exc.args[0]!r} is not 0 or 1") from None
    inconsistent = np.flatnonzero((no_finding == 1) != (targets.sum(axis=1) == 0))
    if inconsistent.size:
        raise LabelFileError(f"{path}: row {inconsistent[0] + 2}: no_finding disagrees with the 14 labels")
    views = np.array([v.strip() for v in cols["view"]])
    return LabelTable(
        dataset="nih-sample", label_names=CHESTXRAY14_LABELS, image_ids=cols["image"],
        patient_ids=[p.strip() for p in cols["patient_id"]], targets=targets,
        extra={"view": views, "frontal": np.isin(views, ("PA", "AP")), "age": _floats(cols["age"]),
               "sex": _sex(cols["sex"]), "follow_up": _ints(cols["follow_up"]),
               "original_width": _ints(cols["original_width"]),
               "original_height": _ints(cols["original_height"])},
        source=str(path))


# --------------------------------------------------------------------------------------------
# CheXpert
# --------------------------------------------------------------------------------------------
_CHEXPERT_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": 0.0}
_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


@_gc_paused
def read_chexpert(csv_path: PathLike, policy: str = "U-Ones", frontal_only: bool = False) -> LabelTable:
    """CheXpert train.csv / valid.csv: 1 / 0 / -1 (uncertain) / blank (not mentioned -> 0).

    ``policy`` maps uncertain -1 to 1 ("U-Ones"), 0 ("U-Zeros") or NaN ("U-Ignore", masked in
    the loss). Patient id is the ``patientNNNNN`` part of Path; ``frontal_only`` drops laterals
    (``skipped["lateral"]``). ``extra["view"]`` is AP/PA, or "L" for a lateral.
    """
    if policy not in CHEXPERT_POLICIES:
        raise InvalidArgumentError(f"unknown uncertainty policy {policy!r}; use one of {CHEXPERT_POLICIES}")
    cols = _read_columns(csv_path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS))
    n = len(cols["Path"])
    raw = np.empty((n, len(CHEXPERT_LABELS)), dtype=np.float32)
    for j, name in enumerate(CHEXPERT_LABELS):
        try:
            raw[:, j] = [_CHEXPERT_VALUES[v] if v in _CHEXPERT_VALUES else _CHEXPERT_VALUES[v.strip()]
                         for v in cols[name]]
        except KeyError as exc:
            raise LabelFileError(f"{csv_path}: column {name!r}: value {exc.args[0]!r} is not 1/0/-1/blank") from None
    raw[raw == -1] = {"U-Ones": 1.0, "U-Zeros": 0.0, "U-Ignore": np.nan}[policy]
    patients = []
    for i, p in enumerate(cols["Path"]):
        match = _CHEXPERT_PATIENT.search(p)
        if match is None:
            raise LabelFileError(f"{csv_path}: row {i + 2}: no patientNNNNN folder in Path")
        patients.append(match.group(1))
    frontal = np.array([v.strip() == "Frontal" for v in cols["Frontal/Lateral"]], dtype=bool)
    views = np.array([v.strip() or ("L" if not f else "") for v, f in zip(cols["AP/PA"], frontal)])
    table = LabelTable(
        dataset="chexpert", label_names=CHEXPERT_LABELS, image_ids=cols["Path"], patient_ids=patients,
        targets=raw, extra={"view": views, "frontal": frontal, "age": _floats(cols["Age"]), "sex": _sex(cols["Sex"])},
        skipped={"lateral": 0}, source=str(csv_path))
    if not frontal_only:
        return table
    return replace(table.subset(frontal), skipped={"lateral": int((~frontal).sum())})


# --------------------------------------------------------------------------------------------
# PadChest
# --------------------------------------------------------------------------------------------
_PADCHEST_COLUMNS = ("ImageID", "ImageDir", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
                     "StudyDate_DICOM", "Projection", "MethodLabel", "Labels")


_SIMPLE_LIST = re.compile(r"\[\s*(?:'[^'\\]*'\s*(?:,\s*'[^'\\]*'\s*)*)?\]")
_QUOTED = re.compile(r"'([^'\\]*)'")


def parse_label_list(text: str) -> tuple[str, ...] | None:
    """A PadChest ``Labels`` cell ("['a', ' b', '']") -> stripped, de-duplicated, non-empty labels.

    None when the cell is not a Python list of strings (e.g. "nan"). Plain single-quoted lists
    (nearly all cells) take a regex fast path; anything else goes to ast.literal_eval, which
    evaluates literals only, never code.
    """
    text = text.strip()
    if _SIMPLE_LIST.fullmatch(text):
        value: object = _QUOTED.findall(text)
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))


@_gc_paused
def read_padchest(csv_path: PathLike, min_images: int = 1, frontal_only: bool = False) -> LabelTable:
    """PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) as a 0/1 table.

    The label set is built from the data: every distinct stripped label carried by at least
    ``min_images`` of the kept images (1 = all labels present), sorted case-insensitively. It
    keeps the dataset's own terms, including "normal" and report-quality terms ("exclude",
    "suboptimal study", "unchanged"); filter on them yourself if needed. Rows whose Labels cell
    is not a list of strings are skipped (``skipped["unparsable_labels"]``), as are rows whose
    list holds only blanks (``skipped["empty_labels"]``) and, with ``frontal_only``, rows whose
    Projection is not PA/AP/AP_horizontal (``skipped["not_frontal"]``). Labels of a kept
    image absent from the label set (rare, under ``min_images``) are dropped, not NaN.
    """
    if isinstance(min_images, bool) or not isinstance(min_images, (int, np.integer)) or min_images < 1:
        raise InvalidArgumentError(f"min_images must be an integer >= 1, got {min_images!r}")
    cols = _read_columns(csv_path, _PADCHEST_COLUMNS)
    cache: dict[str, tuple[str, ...] | None] = {}
    parsed: list[tuple[str, ...] | None] = []
    for text in cols["Labels"]:
        if text not in cache:
            cache[text] = parse_label_list(text)
        parsed.append(cache[text])
    projection = np.array([v.strip() for v in cols["Projection"]])
    frontal = np.isin(projection, sorted(PADCHEST_FRONTAL_VIEWS))
    unparsable = np.array([p is None for p in parsed], dtype=bool)
    empty = np.array([p is not None and not p for p in parsed], dtype=bool)
    keep = ~unparsable & ~empty
    skipped = {"unparsable_labels": int(unparsable.sum()), "empty_labels": int(empty.sum()), "not_frontal": 0}
    if frontal_only:
        skipped["not_frontal"] = int((keep & ~frontal).sum())
        keep &= frontal
    idx = np.flatnonzero(keep)

    counts: dict[str, int] = {}
    for i in idx:
        for label in parsed[i]:  # type: ignore[union-attr]
            counts[label] = counts.get(label, 0) + 1
    names = tuple(sorted((k for k, c in counts.items() if c >= min_images), key=lambda s: (s.lower(), s)))
    column = {name: j for j, name in enumerate(names)}
    rows, cols_ = [], []
    for r, i in enumerate(idx):
        for label in parsed[i]:  # type: ignore[union-attr]
            j = column.get(label)
            if j is not None:
                rows.append(r)
                cols_.append(j)
    targets = np.zeros((idx.size, len(names)), dtype=np.float32)
    targets[rows, cols_] = 1.0

    def pick(name: str) -> list[str]:
        return [cols[name][i].strip() for i in idx]

    study_year = _floats([d[:4] for d in pick("StudyDate_DICOM")])
    return LabelTable(
        dataset="padchest", label_names=names, image_ids=pick("ImageID"), patient_ids=pick("PatientID"),
        targets=targets,
        extra={"view": projection[idx], "frontal": frontal[idx], "age": study_year - _floats(pick("PatientBirth")),
               "sex": _sex(pick("PatientSex_DICOM")), "method": np.array(pick("MethodLabel")),
               "image_dir": np.array(pick("ImageDir")), "study_id": np.array(pick("StudyID"))},
        skipped=skipped, source=str(csv_path))


# --------------------------------------------------------------------------------------------
# Generic CSV (the user's own labels)
# --------------------------------------------------------------------------------------------
#: The generic layout's fixed column names: image path (relative to the image folder), patient id,
#: optional view. Every other column is a label unless ``label_columns`` names the labels.
CSV_IMAGE_COLUMN, CSV_PATIENT_COLUMN, CSV_VIEW_COLUMN = "image", "patient_id", "view"
#: View values (case-insensitive) kept by the frontal filter; a blank view is unknown and kept.
CSV_FRONTAL_VIEWS: frozenset[str] = frozenset({"pa", "ap", "ap_horizontal", "ap horizontal", "frontal",
                                               "posteroanterior", "anteroposterior"})
_CSV_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}


@_gc_paused
def read_csv_labels(csv_path: PathLike, label_columns: Sequence[str] | None = None, policy: str = "U-Ignore",
                    frontal_only: bool = False) -> LabelTable:
    """The generic layout: ``image``, ``patient_id``, label columns, optional ``view``.

    Label cells are 1 / 0, blank (unknown: NaN, masked in the loss and the AUC) or -1 (uncertain,
    mapped by ``policy`` like CheXpert's: U-Ones -> 1, U-Zeros -> 0, U-Ignore -> NaN). The labels
    are ``label_columns`` in that order, default every column but image / patient_id / view in
    file order. ``frontal_only`` with a view column keeps rows whose view is frontal
    (:data:`CSV_FRONTAL_VIEWS`) or blank (``skipped["not_frontal"]`` counts the rest).
    Messages name columns and rows, never a cell's value (it may be patient data).
    """
    if policy not in CHEXPERT_POLICIES:
        raise InvalidArgumentError(f"unknown uncertainty policy {policy!r}; use one of {CHEXPERT_POLICIES}")
    if not Path(csv_path).is_file():
        raise LabelFileError(f"label file not found: {csv_path}")
    rows = _read_rows(csv_path)
    header = [h.strip() for h in rows[0]]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise LabelFileError(f"{csv_path}: duplicate column name(s) {dupes}")
    layout = (f"the generic layout is {CSV_IMAGE_COLUMN!r} (image path relative to the image folder), "
              f"{CSV_PATIENT_COLUMN!r}, one 1/0/blank column per label, optional {CSV_VIEW_COLUMN!r}")
    for col in (CSV_IMAGE_COLUMN, CSV_PATIENT_COLUMN):
        if col not in header:
            raise LabelFileError(f"{csv_path}: no {col!r} column ({layout}); its columns are {header}")
    fixed = {CSV_IMAGE_COLUMN, CSV_PATIENT_COLUMN, CSV_VIEW_COLUMN}
    if label_columns:
        names = tuple(label_columns)
        missing = [c for c in names if c not in header]
        if missing:
            raise LabelFileError(f"{csv_path}: label column(s) {missing} not in the header {header}")
        clash = [c for c in names if c in fixed]
        if clash:
            raise LabelFileError(f"{csv_path}: {clash} cannot be label columns ({layout})")
    else:
        names = tuple(h for h in header if h not in fixed)
    if not names:
        raise LabelFileError(f"{csv_path}: no label columns ({layout})")
    body = rows[1:]
    if not body:
        raise LabelFileError(f"{csv_path}: no data rows")
    col = {h: k for k, h in enumerate(header)}
    images = [r[col[CSV_IMAGE_COLUMN]].strip() for r in body]
    patients = [r[col[CSV_PATIENT_COLUMN]].strip() for r in body]
    for what, values in ((CSV_IMAGE_COLUMN, images), (CSV_PATIENT_COLUMN, patients)):
        blank = next((i for i, v in enumerate(values) if not v), None)
        if blank is not None:
            raise LabelFileError(f"{csv_path}: row {blank + 2}: empty {what!r}")
    seen: dict[str, int] = {}
    for i, image in enumerate(images):
        if image in seen:
            raise LabelFileError(f"{csv_path}: row {i + 2}: the image of row {seen[image] + 2} again "
                                 "(one row per image)")
        seen[image] = i
    targets = np.empty((len(body), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        k = col[name]
        bad = []
        for i, r in enumerate(body):
            v = _CSV_VALUES.get(r[k].strip())
            if v is None:
                bad.append(i)
                v = np.nan
            targets[i, j] = v
        if bad:
            raise LabelFileError(
                f"{csv_path}: column {name!r} has {len(bad)} value(s) that are not 1, 0, -1 or blank (first at row "
                f"{bad[0] + 2}); label columns hold 1 (present), 0 (absent), blank (unknown) or -1 (uncertain)"
                + ("" if label_columns else "; name the label columns with --label-columns if other columns "
                   "(age, sex, ...) are in the file"))
    targets[targets == -1] = {"U-Ones": 1.0, "U-Zeros": 0.0, "U-Ignore": np.nan}[policy]
    extra: dict[str, np.ndarray] = {}
    skipped = {"not_frontal": 0}
    if CSV_VIEW_COLUMN in col:
        views = np.array([r[col[CSV_VIEW_COLUMN]].strip() for r in body])
        extra["view"] = views
        extra["frontal"] = np.array([v.lower() in CSV_FRONTAL_VIEWS or not v for v in views], dtype=bool)
    table = LabelTable(dataset="csv", label_names=names, image_ids=images, patient_ids=patients, targets=targets,
                       extra=extra, skipped=skipped, source=str(csv_path))
    if not frontal_only or "frontal" not in extra:
        return table
    frontal = table.extra["frontal"]
    return replace(table.subset(frontal), skipped={"not_frontal": int((~frontal).sum())})


# --------------------------------------------------------------------------------------------
# One entry point for training / evaluation / export: a dataset by name, with image paths
# --------------------------------------------------------------------------------------------
LABEL_SETS: tuple[str, ...] = ("own", "common")


def load_dataset(dataset: str, labels_csv: PathLike, image_root: PathLike, *, policy: str = "U-Ignore",
                 label_set: str = "own", frontal_only: bool = True, label_columns: Sequence[str] | None = None,
                 padchest_min_images: int = 1, skip_missing_images: bool = False) -> LabelTable:
    """A dataset's labels with ``extra["path"]``, every image's file, checked to exist.

    Where the images are, below ``image_root``: nih-sample ``<id>`` (``.png`` added when the id has
    no suffix); chestxray14 the file of that name at any depth (the release's images_001..012
    folders); chexpert the ``Path`` column; padchest ``<ImageDir>/<ImageID>`` or ``<ImageID>``;
    csv the ``image`` column. ``label_set`` "common" re-expresses the labels on
    :data:`labelsets.COMMON_LABELS` (a csv maps the columns spelled like them). A listed image not
    on disk is an error, or with ``skip_missing_images`` a skipped row (``skipped["missing_image"]``).
    """
    if dataset not in DATASETS:
        raise InvalidArgumentError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
    if label_set not in LABEL_SETS:
        raise InvalidArgumentError(f"unknown label set {label_set!r}; use one of {LABEL_SETS}")
    root = Path(image_root)
    if not root.is_dir():
        raise LabelFileError(f"image folder not found: {root}")
    try:
        if dataset == "nih-sample":
            table = read_nih_sample(labels_csv)
        elif dataset == "chestxray14":
            table = read_chestxray14(labels_csv)
        elif dataset == "chexpert":
            table = read_chexpert(labels_csv, policy=policy, frontal_only=frontal_only)
        elif dataset == "padchest":
            table = read_padchest(labels_csv, min_images=padchest_min_images, frontal_only=frontal_only)
        else:
            table = read_csv_labels(labels_csv, label_columns=label_columns, policy=policy,
                                    frontal_only=frontal_only)
    except LabelFileError as exc:
        if dataset != "csv" and "missing column" in str(exc):
            raise LabelFileError(f"{exc} (the {dataset} layout; for your own labels use --dataset csv: image, "
                                 "patient_id, one column per label)") from None
        raise
    if frontal_only and dataset in ("nih-sample", "chestxray14"):
        frontal = table.extra["frontal"]
        table = replace(table.subset(frontal), skipped={**table.skipped, "not_frontal": int((~frontal).sum())})
    if label_set == "common":
        mapping = None
        if dataset == "csv":
            mapping = {name: (name,) for name in COMMON_LABELS if name in table.label_names}
            if not mapping:
                raise LabelFileError(f"{labels_csv}: --label-set common needs label columns named like the common "
                                     f"labels {list(COMMON_LABELS)}; none found")
        table = table.to_common(mapping=mapping)
    paths = _image_files(dataset, table, root)
    exists = np.array([p.is_file() for p in paths], dtype=bool)
    n_missing = int((~exists).sum())
    if n_missing and not skip_missing_images:
        first = table.image_ids[int(np.flatnonzero(~exists)[0])]
        raise LabelFileError(f"{n_missing} of {len(table)} images listed in {Path(labels_csv).name} are not under "
                             f"{root} (first: {first}); fix the image folder (--image-dir / --data-root) or pass "
                             "--skip-missing-images")
    if n_missing:
        table = replace(table.subset(exists), skipped={**table.skipped, "missing_image": n_missing})
        paths = [p for p, ok in zip(paths, exists) if ok]
    if not len(table):
        raise LabelFileError(f"{Path(labels_csv).name}: no images left to use (skipped {dict(table.skipped)})")
    return replace(table, extra={**table.extra, "path": np.array([str(p) for p in paths])})


def _image_files(dataset: str, table: LabelTable, root: Path) -> list[Path]:
    if dataset == "nih-sample":
        return [root / (i if Path(i).suffix else f"{i}.png") for i in table.image_ids]
    if dataset == "chestxray14":
        found: dict[str, Path] = {}
        for folder, _, files in os.walk(root):
            for name in files:
                found.setdefault(name, Path(folder) / name)
        return [found.get(i, root / i) for i in table.image_ids]
    if dataset == "padchest":
        nested = [root / d / i for d, i in zip(table.extra["image_dir"], table.image_ids)]
        return [p if p.is_file() else root / i for p, i in zip(nested, table.image_ids)]
    return [root / i for i in table.image_ids]


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def patient_split(table: LabelTable, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> tuple[np.ndarray, ...]:
    """Sorted row-index arrays, one per fraction; a patient's images all land in one set.

    Patients (sorted ids, so the result ignores row order) are shuffled with ``seed`` and cut
    at the cumulative fractions of the patient count; image fractions follow approximately.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or not np.all(np.isfinite(fr)) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise InvalidArgumentError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    patients, inverse = np.unique(np.asarray(table.patient_ids, dtype=str), return_inverse=True)
    n_patients = patients.size
    rank = np.empty(n_patients, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(n_patients)] = np.arange(n_patients)
    bounds = np.round(np.cumsum(fr) * n_patients).astype(np.int64)
    bounds[-1] = n_patients
    group = np.searchsorted(bounds, rank, side="right")[inverse.reshape(-1)]
    parts = tuple(np.flatnonzero(group == k) for k in range(fr.size))
    for k, part in enumerate(parts):
        if fr[k] > 0 and part.size == 0:
            raise InvalidArgumentError(f"split {k} (fraction {fr[k]}) is empty: {n_patients} patients are too few")
    return parts


# --------------------------------------------------------------------------------------------
# Bounding boxes
# --------------------------------------------------------------------------------------------
class BBox(NamedTuple):
    image: str
    finding: str
    x: float
    y: float
    w: float
    h: float


@_gc_paused
def read_bboxes(path: PathLike, scale: float = 1.0) -> list[BBox]:
    """Radiologist boxes as (image, finding, x, y, w, h), each coordinate times ``scale``.

    Reads the NIH sample's bbox.csv (``image,finding,x,y,w,h``: 320-px coordinates) or the NIH
    BBox_List_2017.csv(.gz) (1024-px coordinates; use ``scale=320/1024`` to match the sample).
    The NIH list spells "Infiltrate"; it becomes "Infiltration", the ChestX-ray14 label name.
    """
    if not np.isfinite(scale) or scale <= 0:
        raise InvalidArgumentError(f"scale must be a positive number, got {scale!r}")
    with _open_text(path) as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise LabelFileError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    if header[:2] == ["Image Index", "Finding Label"]:
        positions = (0, 1, 2, 3, 4, 5)
    elif {"image", "finding", "x", "y", "w", "h"} <= set(header):
        positions = tuple(header.index(c) for c in ("image", "finding", "x", "y", "w", "h"))
    else:
        raise LabelFileError(f"{path}: not a bbox file (header {header[:6]})")
    boxes = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            image, finding, *coords = (row[p] for p in positions)
            x, y, w, h = (float(c) * scale for c in coords)
        except (IndexError, ValueError):
            raise LabelFileError(f"{path}: row {line}: expected image, finding and four numbers") from None
        if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
            raise LabelFileError(f"{path}: row {line}: box must be finite with positive width and height")
        finding = finding.strip()
        boxes.append(BBox(image.strip(), "Infiltration" if finding == "Infiltrate" else finding, x, y, w, h))
    return boxes


# --------------------------------------------------------------------------------------------
# Summary CLI
# --------------------------------------------------------------------------------------------
def _summary(table: LabelTable) -> str:
    positives = np.nansum(table.targets, axis=0).astype(int)
    top = sorted(zip(positives, table.label_names), reverse=True)[:8]
    return (f"{table.dataset}: {len(table)} images, {table.n_patients} patients, {len(table.label_names)} labels, "
            f"unknown {int(np.isnan(table.targets).sum())} cells, skipped {table.skipped}\n  top: "
            + ", ".join(f"{name}={count}" for count, name in top))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=shared_dir(), help="shared folder (default: %(default)s)")
    args = parser.parse_args(argv)
    labels = args.shared / "data" / "labels"
    print(_summary(read_chestxray14(labels / "Data_Entry_2017_v2020.csv.gz")))
    print(_summary(read_nih_sample(args.shared / "data" / "nih-cxr14-sample")))
    for policy in CHEXPERT_POLICIES:
        print(policy, _summary(read_chexpert(labels / "chexpert_train.csv.gz", policy=policy)))
    print(_summary(read_padchest(labels / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
