"""One dataclass that records everything a training run depends on.

Why: a run must be reproducible from its ``config.json`` alone. Every field is a CLI flag of the
same name (``epochs`` -> ``--epochs``, ``kd_alpha`` -> ``--kd-alpha``), ``--config file.json``
loads a saved config and flags given on the command line override it. The JSON is saved next to
every checkpoint and inside it.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from cxr_edge.errors import InvalidArgumentError, ManifestError
from cxr_edge.manifest import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]

#: Normalisation the shared DenseNet-121 teacher was trained with (../shared/teachers/README.md).
NIH_MEAN = 0.49465
NIH_STD = 0.25223

#: Label layouts ``models.datasets.load_dataset`` reads (``--dataset``); csv is the generic layout.
DATASETS: tuple[str, ...] = ("nih-sample", "chestxray14", "chexpert", "padchest", "csv")

#: Fields that may differ between an interrupted run and its ``--resume`` (they do not change the math).
OPERATIONAL_FIELDS = frozenset({"resume", "stop_after_epochs", "num_workers", "threads", "device",
                                "teacher_cache_dir", "log_every", "data_root", "shared_dir", "channels_last",
                                "labels_csv", "image_dir",
                                "compile", "eval_batch_size", "bootstrap", "keep_checkpoints"})


def shared_dir() -> Path:
    """``$CXR_EDGE_SHARED`` or ``<repo>/../shared``: where the read-only real data lives."""
    return Path(os.environ.get("CXR_EDGE_SHARED", REPO.parent / "shared")).resolve()


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults = the student recipe on the NIH sample."""

    # --- model
    model: str = "eeea_c2"             # a models.registry name
    drop_rate: float = 0.2
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False           # load the registry's ImageNet weights (its pretrained_cfg: file, SHA-256, mean/std)
    head_lr_mult: float = 1.0          # learning-rate multiplier of the (new) classifier vs the backbone
    layer_decay: float = 1.0           # learning rate x this per backbone stage from the top down (1: off)
    # --- student preprocessing (a cxr_edge PreprocessSpec; the runtime uses the same numbers)
    input_size: int = 128              # student input side (px)
    channels: int = 1
    mean: float = -1.0                 # < 0: the pretrained weights' normalisation, else the NIH pool's (0.49465)
    std: float = -1.0                  # < 0: the pretrained weights' normalisation, else the NIH pool's (0.25223)
    resize: str = "area"
    # --- distillation: teacher specs are ONNX paths, "registry_name:weights.pt" or a run dir
    teachers: list = field(default_factory=list)  # .onnx path(s), registry_name:weights.pt, or run dir(s)
    teacher_mode: str = "cache"        # cache: clean-image outputs stored on disk; online: run every batch
    teacher_combine: str = "logits"    # logits: sigmoid(mean_k t_k / T); probs: mean_k sigmoid(t_k / T)
    teacher_weights: list = field(default_factory=list)  # one weight per teacher (default equal); missing rows skipped
    teacher_input_size: int = 224      # teacher input side (px); a bundle teacher uses its manifest's
    teacher_mean: float = NIH_MEAN
    teacher_std: float = NIH_STD
    teacher_resize: str = "area"
    teacher_cache_dir: str = ".cache/teacher"
    kd_alpha: float = 0.0              # 0 = plain supervised BCE
    kd_temperature: float = 2.0
    teacher_calibration: str = "none"  # platt: refit each teacher's logits to the training labels (prior shift)
    kd_loss: str = "bce"               # bce: soft-target BCE; mse: logit matching 1/2 (s/T - logit p)^2 (models.distill)
    at_beta: float = 0.0               # attention-transfer weight (final activations)
    box_beta: float = 0.0              # CAM supervision from the training images' radiologist boxes (bbox.csv)
    # --- data
    dataset: str = "nih-sample"        # nih-sample | chestxray14 | chexpert | padchest | csv (the generic layout, README)
    labels_csv: str = ""               # the label file (default: <data_root>/labels.csv)
    image_dir: str = ""                # folder the label file's image paths are relative to (default: <data_root>/images for nih-sample, else <data_root>)
    label_set: str = "own"             # own: the dataset's labels (csv: its label columns); common: the labels all datasets share
    uncertainty_policy: str = "U-Ignore"  # CheXpert / csv -1 (uncertain): U-Ones -> 1, U-Zeros -> 0, U-Ignore -> unknown (masked)
    label_columns: list = field(default_factory=list)  # csv: the label columns (default: all but image/patient_id/view)
    frontal_only: bool = True          # keep frontal views only (view / Projection / Frontal/Lateral column)
    padchest_min_images: int = 1       # padchest: labels carried by fewer images are dropped
    skip_missing_images: bool = False  # skip rows whose image is not on disk (default: refuse the label file)
    data_root: str = ""                # default: <shared>/data/nih-cxr14-sample
    shared_dir: str = ""               # default: $CXR_EDGE_SHARED or <repo>/../shared
    split: str = "teacher"             # teacher: train on teacher_train, evaluate on teacher_val; patient: random
    train_list: str = ""               # split=teacher: default <shared>/teachers/teacher_train_images.csv
    eval_list: str = ""                # split=teacher: default <shared>/teachers/teacher_val_images.csv
    eval_fraction: float = 0.2         # split=patient: fraction of patients held out for evaluation
    split_seed: int = 0                # patient-wise splits (kept apart from `seed` so all seeds share eval images)
    val_fraction: float = 0.0          # >0: patient-wise part of the training images to pick the epoch on
    n_folds: int = 0                   # >1: cross-fitting: train on all folds of the training images but `fold`
    fold: int = 0                      # the held-out fold (its out-of-fold predictions -> oof_predictions.npz)
    limit_train: int = 0               # >0: use only the first N training images (smoke tests)
    limit_eval: int = 0
    cache_dtype: str = "auto"          # in-memory decoded images: uint8 (8-bit sources), float16, auto
    # --- augmentation on the [0, 1] image before preprocess_one
    augment: bool = True
    aug_scale: float = 0.1             # scale in [1 - s, 1 + s]
    aug_rotate: float = 7.0            # degrees
    aug_shift: float = 0.05            # fraction of the side
    aug_gamma: float = 0.2             # gamma = exp(U(-g, g))
    aug_contrast: float = 0.1          # contrast factor in [1 - c, 1 + c]
    hflip: bool = False
    # --- optimisation
    epochs: int = 25
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    schedule: str = "onecycle"         # onecycle | cosine (linear warmup then cosine)
    warmup_frac: float = 0.15
    grad_clip: float = 0.0
    ema_decay: float = 0.0             # >0: evaluate/ship an exponential moving average of the weights (per step)
    mixup_alpha: float = 0.0           # >0: mixup, each batch blended with a shuffled copy (lam ~ Beta(a, a)), losses blended alike
    seed: int = 0
    init_seed: int = -1                # >=0 and != seed: the head's random init from this seed, data order and augmentation from seed (runs that share an init, for soups)
    # --- runtime
    device: str = "cpu"
    amp: bool = False                  # bf16 autocast
    channels_last: bool = True         # NHWC: ~1.5x faster for the depthwise students on CPU
    compile: bool = False              # torch.compile the training step (minutes to compile; opt-in)
    num_workers: int = 0
    threads: int = 0                   # torch.set_num_threads; 0 = min(2, cpu count) on CPU
    out_dir: str = "runs/default"
    resume: bool = False               # continue from <out_dir>/last.pt (refused if the recipe changed)
    stop_after_epochs: int = 0         # >0: exit after this many epochs in this invocation (preemption test)
    keep_checkpoints: bool = False     # keep epoch_NNN.pt besides last.pt
    eval_batch_size: int = 64
    bootstrap: int = 1000
    log_every: int = 0                 # >0: also print every N steps

    # ------------------------------------------------------------------ derived values
    def normalisation(self) -> tuple[float, float]:
        """(mean, std) of the student input: explicit values, else the pretrained weights' own
        (registry ``pretrained_cfg``: one source of truth), else the NIH pool's statistics."""
        if self.mean >= 0 and self.std > 0:
            return self.mean, self.std
        if self.pretrained:
            from models.registry import model_config

            pcfg = model_config(self.model).pretrained
            if pcfg is not None:
                return pcfg.gray_mean_std()
        return NIH_MEAN, NIH_STD

    def student_spec(self) -> PreprocessSpec:
        mean, std = self.normalisation()
        spec = PreprocessSpec(input_size=(self.input_size, self.input_size), channels=self.channels,
                              resize=self.resize, mean=(mean,) * self.channels,
                              std=(std,) * self.channels, min_side=min(128, self.input_size))
        spec.validate()
        return spec

    def teacher_spec(self) -> PreprocessSpec:
        spec = PreprocessSpec(input_size=(self.teacher_input_size, self.teacher_input_size), channels=1,
                              resize=self.teacher_resize, mean=(self.teacher_mean,), std=(self.teacher_std,))
        spec.validate()
        return spec

    def shared_path(self) -> Path:
        return Path(self.shared_dir).resolve() if self.shared_dir else shared_dir()

    def data_path(self) -> Path:
        return Path(self.data_root) if self.data_root else self.shared_path() / "data" / "nih-cxr14-sample"

    def labels_path(self) -> Path:
        """The label file: ``labels_csv``, else ``<data_root>/labels.csv``."""
        return Path(self.labels_csv) if self.labels_csv else self.data_path() / "labels.csv"

    def image_root(self) -> Path:
        """The folder image paths are relative to: ``image_dir``, else ``<data_root>/images`` (nih-sample)
        or ``<data_root>``."""
        if self.image_dir:
            return Path(self.image_dir)
        return self.data_path() / "images" if self.dataset == "nih-sample" else self.data_path()

    def split_lists(self) -> tuple[Path, Path]:
        """(train, eval) image lists of split=teacher."""
        teachers = self.shared_path() / "teachers"
        return (Path(self.train_list) if self.train_list else teachers / "teacher_train_images.csv",
                Path(self.eval_list) if self.eval_list else teachers / "teacher_val_images.csv")

    def validate(self) -> None:
        """Refuse settings that would silently train something else than asked."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0"),
            (0.0 <= self.kd_alpha <= 1.0, "kd_alpha must lie in [0, 1]"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (self.at_beta >= 0, "at_beta must be >= 0"),
            (self.head_lr_mult > 0, "head_lr_mult must be > 0"),
            (0.0 < self.layer_decay <= 1.0, "layer_decay must lie in (0, 1]"),
            (self.box_beta >= 0, "box_beta must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must lie in [0, 1)"),
            (self.mixup_alpha >= 0, "mixup_alpha must be >= 0"),
            (not self.teacher_weights or len(self.teacher_weights) == len(self.teachers),
             "teacher_weights needs one weight per --teachers entry"),
            (self.n_folds == 0 or (self.n_folds >= 2 and 0 <= self.fold < self.n_folds),
             "n_folds must be 0 or >= 2, with 0 <= fold < n_folds"),
            (not ((self.kd_alpha > 0 or self.at_beta > 0) and not self.teachers),
             "kd_alpha/at_beta > 0 need at least one --teachers entry"),
            (self.teacher_mode in ("cache", "online"), "teacher_mode must be cache or online"),
            (self.teacher_combine in ("logits", "probs"), "teacher_combine must be logits or probs"),
            (self.kd_loss in ("bce", "mse"), "kd_loss must be bce or mse"),
            (self.teacher_calibration in ("none", "platt"), "teacher_calibration must be none or platt"),
            (self.teacher_calibration == "none" or self.teacher_mode == "cache",
             "teacher_calibration platt needs --teacher-mode cache (the logits are refitted once, before training)"),
            (self.split in ("teacher", "patient"), "split must be teacher or patient"),
            (self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}"),
            (self.label_set in ("own", "common"), "label_set must be own or common"),
            (self.uncertainty_policy in ("U-Ones", "U-Zeros", "U-Ignore"),
             "uncertainty_policy must be U-Ones, U-Zeros or U-Ignore"),
            (self.padchest_min_images >= 1, "padchest_min_images must be >= 1"),
            (not self.label_columns or self.dataset == "csv", "label_columns applies to --dataset csv only"),
            (self.dataset == "nih-sample" or bool(self.data_root) or bool(self.labels_csv and self.image_dir),
             f"--dataset {self.dataset} needs --data-root (or --labels-csv and --image-dir): where its labels and "
             "images are"),
            (self.split != "teacher" or self.dataset == "nih-sample" or bool(self.train_list and self.eval_list),
             f"split=teacher uses the NIH sample's teacher image lists; with --dataset {self.dataset} use "
             "--split patient (or give --train-list and --eval-list)"),
            (0.0 < self.eval_fraction < 1.0, "eval_fraction must lie in (0, 1)"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must lie in [0, 1)"),
            (self.schedule in ("onecycle", "cosine"), "schedule must be onecycle or cosine"),
            (0.0 <= self.warmup_frac < 1.0, "warmup_frac must lie in [0, 1)"),
            (self.device.split(":")[0] in ("cpu", "cuda"), "device must be cpu or cuda[:N]"),
            (self.cache_dtype in ("auto", "uint8", "float16"), "cache_dtype must be auto, uint8 or float16"),
            (0 <= self.aug_scale < 1 and 0 <= self.aug_shift < 0.5 and self.aug_rotate >= 0
             and self.aug_gamma >= 0 and 0 <= self.aug_contrast < 1, "augmentation ranges out of bounds"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(f"config: {message}")
        if self.pretrained:
            from models.registry import model_config

            pcfg = model_config(self.model).pretrained
            if pcfg is None:
                raise InvalidArgumentError(f"config: model {self.model!r} has no pretrained weights registered")
            if (self.mean >= 0 or self.std > 0) and (self.mean, self.std) != pcfg.gray_mean_std():
                raise InvalidArgumentError(
                    f"config: --mean/--std {self.mean}/{self.std} differ from the pretrained weights' normalisation "
                    f"{pcfg.gray_mean_std()}: leave them unset")
        try:
            self.student_spec()
            if self.teachers:
                self.teacher_spec()
        except ManifestError as exc:
            raise InvalidArgumentError(f"config: {exc}") from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgumentError(f"config: unknown field(s) {unknown}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot read config {path}: {exc}") from None
        return cls.from_dict(d)

    def math_diff(self, other: "TrainConfig") -> list[str]:
        """Fields (other than operational ones) whose values differ: resume refuses these."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a if k not in OPERATIONAL_FIELDS and a[k] != b[k])

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


# ---------------------------------------------------------------------- CLI mapping
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_comments() -> dict[str, str]:
    """The ``# ...`` comment after each field in the class source: the flag's help text."""
    import inspect
    import re

    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # pragma: no cover - no source available (frozen build)
        return {}
    pattern = re.compile(r"^\s+(\w+): [^#\n]+#\s*(.+)$", re.MULTILINE)
    return {m.group(1): m.group(2).strip() for m in pattern.finditer(source)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, defaults suppressed so only flags actually given override ``--config``."""
    parser.add_argument("--config", help="JSON config to start from (flags override it)")
    comments = _field_comments()
    for f in fields(TrainConfig):
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw,
                                help=_help(comments, f.name, default))
        elif isinstance(default, list):
            parser.add_argument(_flag(f.name), nargs="*", **kw, help=_help(comments, f.name, default))
        elif isinstance(default, dict):
            parser.add_argument(_flag(f.name), type=json.loads, **kw,
                                help="JSON object; " + _help(comments, f.name, default))
        else:
            parser.add_argument(_flag(f.name), type=type(default), **kw, help=_help(comments, f.name, default))


def _help(comments: dict[str, str], name: str, default: Any) -> str:
    text = comments.get(name, "")
    return (f"{text} " if text else "") + f"(default: {default!r})".replace("%", "%%")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Base config (``--config`` file or defaults) with the given flags applied, validated."""
    base = TrainConfig.load(args.config) if getattr(args, "config", None) else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if ("dataset" in overrides and overrides["dataset"] != "nih-sample" and "split" not in overrides
            and base.split == "teacher" and not (base.train_list or overrides.get("train_list"))):
        overrides["split"] = "patient"  # the teacher lists are the NIH sample's; another dataset splits by patient
    cfg = replace(base, **overrides)
    cfg.validate()
    return cfg


def parse_config(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))
