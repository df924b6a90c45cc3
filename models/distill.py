"""Multi-label knowledge distillation: losses, teacher wrappers, and a teacher-output cache.

Loss (per student batch, labels may be NaN = unknown and are masked out of the BCE):

    L = (1 - alpha) * BCE(s, y) + alpha * T^2 * BCE(sigmoid(s / T), p_teacher) + beta * AT(f_s, f_t)

``p_teacher`` with several teachers (``combine``): ``"logits"`` = sigmoid(mean_k t_k / T) (average
the logits, then soften); ``"probs"`` = mean_k sigmoid(t_k / T) (average the softened probabilities).
Each label is an independent Bernoulli, so the KD term is a binary cross-entropy with soft targets;
T^2 keeps its gradient scale independent of T (Hinton et al. 2015). AT is attention transfer
(Zagoruyko & Komodakis 2017) on the final activations: a(f) = mean_c f^2, the student's map resized
to the teacher's grid, both L2-normalised, squared L2 distance averaged over the batch.

Teachers (and every model evaluated by :mod:`models.evaluate`) are *predictors*: a preprocessing
spec plus ``run(batch) -> (logits, features)``, backed by onnxruntime (an ONNX teacher or cxr-edge
bundle) or by a PyTorch model. A teacher too slow to run online on CPU is run once per image,
augmentation-free, and its outputs cached on disk keyed by teacher checksum + preprocessing + image
id + pixel digest; ``python -m models.distill cache`` fills that cache. Cached outputs are of the
clean image while the student sees a mildly augmented one (labels are image-level, so the soft
targets still hold); the cached attention maps are warped with the student's affine (models.data).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from cxr_edge.operating_points import sigmoid

CACHE_FORMAT = 1


# ============================================================================ losses
def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the label cells that are known (targets NaN are ignored)."""
    mask = ~torch.isnan(targets)
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits.float(), safe.float(), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def teacher_probs(teacher_logits: torch.Tensor, temperature: float, combine: str = "logits",
                  weights: Sequence[float] | None = None) -> torch.Tensor:
    """Soft targets at temperature T from N x L (one teacher) or N x K x L (K teachers) logits.

    A teacher with no output for an image (a cached-prediction teacher without a row) gives NaN
    logits there; averaging uses only the teachers available per image (weighted by ``weights``),
    and an image no teacher covers gets NaN soft targets, which :func:`kd_bce` masks out.
    """
    t = teacher_logits.float()
    if t.ndim == 2:
        return torch.sigmoid(t / temperature)
    if t.ndim != 3:
        raise InvalidArgumentError(f"teacher logits must be N x L or N x K x L, got {tuple(t.shape)}")
    if combine not in ("logits", "probs"):
        raise InvalidArgumentError(f"combine must be 'logits' or 'probs', got {combine!r}")
    k = t.shape[1]
    w = torch.ones(k) if not weights else torch.as_tensor([float(v) for v in weights])
    if len(w) != k or bool((w < 0).any()):
        raise InvalidArgumentError(f"need {k} non-negative teacher weights, got {list(weights or [])}")
    avail = torch.isfinite(t)
    wk = w.view(1, k, 1).to(t.device) * avail
    total = wk.sum(dim=1)
    values = t / temperature if combine == "logits" else torch.sigmoid(t / temperature)
    mixed = (torch.where(avail, values, torch.zeros_like(values)) * wk).sum(dim=1) / total.clamp(min=1e-12)
    out = torch.sigmoid(mixed) if combine == "logits" else mixed
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def kd_bce(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * BCE(sigmoid(s / T), soft_targets), averaged over the cells with a soft target (NaN = none)."""
    mask = torch.isfinite(soft_targets)
    safe = torch.where(mask, soft_targets, torch.zeros_like(soft_targets)).float()
    loss = F.binary_cross_entropy_with_logits(student_logits.float() / temperature, safe, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1) * (temperature ** 2)


def kd_logit_mse(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """1/2 (s / T - logit(p))^2, averaged over the cells with a soft target: logit matching.

    Why besides :func:`kd_bce`: a sigmoid BCE against a soft target p pulls with sigma(s) - p, which
    is tiny wherever the teacher and the student both say "unlikely" (most cells of rare findings),
    so the teacher's ranking among negatives barely reaches the student; the logit difference keeps
    it. Teacher probabilities are clipped to [1e-4, 1 - 1e-4] (logits within +-9.2)."""
    mask = torch.isfinite(soft_targets)
    p = torch.where(mask, soft_targets, torch.full_like(soft_targets, 0.5)).float().clamp(1e-4, 1 - 1e-4)
    diff = student_logits.float() / temperature - torch.logit(p)
    return 0.5 * (diff.pow(2) * mask).sum() / mask.sum().clamp(min=1)


KD_LOSSES = {"bce": kd_bce, "mse": kd_logit_mse}


def platt_recalibrate(teacher_logits: np.ndarray, targets: np.ndarray, min_per_class: int = 3
                      ) -> tuple[np.ndarray, list[list[dict]]]:
    """Per teacher and label, refit the teacher's logit to the training labels: t' = a t + b
    (Platt scaling, a 1-D logistic regression on the training images the teacher covers).

    Why: a teacher trained on another population is calibrated to that population's prevalence.
    The CheXNet-class teachers' mean probabilities on our pool are about half its label rates, so
    distilling them raw pulls the covered images' outputs down against the uncovered ones, and the
    student learns "looks like a covered image" instead of the finding (measured: KD from the raw
    ensemble cost 3 points of mean AUC). The ranking (what KD should carry) is kept: a > 0 is
    enforced, a label with fewer than ``min_per_class`` positives or negatives is left as it is.
    ``teacher_logits``: N x K x L (NaN = no row); ``targets``: N x L (NaN = unknown).
    Returns the new logits and, per teacher, per label {a, b, n, pos}.
    """
    from sklearn.linear_model import LogisticRegression

    out = np.array(teacher_logits, dtype=np.float32, copy=True)
    report: list[list[dict]] = []
    for k in range(out.shape[1]):
        per_label = []
        for j in range(out.shape[2]):
            t, y = out[:, k, j], targets[:, j]
            ok = np.isfinite(t) & np.isfinite(y)
            pos = int(y[ok].sum())
            entry = {"a": 1.0, "b": 0.0, "n": int(ok.sum()), "pos": pos}
            if pos >= min_per_class and ok.sum() - pos >= min_per_class:
                lr = LogisticRegression(C=1e4, max_iter=1000).fit(t[ok, None].astype(np.float64), y[ok].astype(int))
                a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
                if a > 0:
                    entry.update(a=round(a, 6), b=round(b, 6))
                    out[:, k, j] = np.where(np.isfinite(t), a * t + b, t)
                else:
                    entry["skipped"] = "the fitted slope is not positive (the teacher does not rank this label here)"
            else:
                entry["skipped"] = f"fewer than {min_per_class} positive or negative training images"
            per_label.append(entry)
        report.append(per_label)
    return out, report


def box_cam_loss(features: torch.Tensor, classifier_weight: torch.Tensor, masks: torch.Tensor,
                 has: torch.Tensor) -> torch.Tensor:
    """CAM supervision from radiologist boxes: -log(CAM mass inside the box), where the mass is the
    spatial softmax of the class map ``W[c] . features`` weighted by the box's cell coverage.
    Averaged over the (image, label) pairs that have a box; 0 when the batch has none."""
    if not bool(has.any()):
        return features.sum() * 0.0
    n, l = has.nonzero(as_tuple=True)
    cams = torch.einsum("nkhw,nk->nhw", features[n].float(), classifier_weight[l].float())
    logp = torch.log_softmax(cams.flatten(1), dim=1)
    m = masks[n, l].flatten(1).float()
    mass = torch.logsumexp(logp + torch.log(m.clamp(min=1e-12)), dim=1)
    return -mass.mean()


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """N x C x h x w activations -> N x h x w spatial energy mean_c f^2 (un-normalised)."""
    return features.float().pow(2).mean(dim=1)


def attention_transfer(student_features: torch.Tensor, teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over teachers of ||norm(a_s resized to the teacher grid) - norm(a_t)||^2, batch-averaged."""
    a_s = attention_map(student_features).unsqueeze(1)
    losses = []
    for a_t in teacher_maps:
        a_t = a_t.float()
        s = a_s if a_s.shape[-2:] == a_t.shape[-2:] else F.interpolate(
            a_s, size=a_t.shape[-2:], mode="bilinear", align_corners=False)
        s = F.normalize(s.flatten(1), dim=1)
        t = F.normalize(a_t.flatten(1), dim=1)
        losses.append((s - t).pow(2).sum(dim=1).mean())
    return torch.stack(losses).mean()


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                      teacher_logits: torch.Tensor | None = None, alpha: float = 0.0, temperature: float = 2.0,
                      combine: str = "logits", student_features: torch.Tensor | None = None,
                      teacher_maps: Sequence[torch.Tensor] | None = None,
                      beta: float = 0.0, teacher_weights: Sequence[float] | None = None,
                      kd_loss: str = "bce") -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging). alpha = 0 and beta = 0 is plain masked BCE;
    ``kd_loss``: bce (soft-target BCE, :func:`kd_bce`) or mse (logit matching, :func:`kd_logit_mse`)."""
    bce = masked_bce(student_logits, targets)
    total = bce if alpha == 0 else (1.0 - alpha) * bce
    parts = {"bce": float(bce.detach())}
    if alpha > 0:
        if teacher_logits is None:
            raise InvalidArgumentError("alpha > 0 needs teacher logits")
        if kd_loss not in KD_LOSSES:
            raise InvalidArgumentError(f"kd_loss must be one of {sorted(KD_LOSSES)}, got {kd_loss!r}")
        kd = KD_LOSSES[kd_loss](student_logits, teacher_probs(teacher_logits, temperature, combine, teacher_weights),
                                temperature)
        total = total + alpha * kd
        parts["kd"] = float(kd.detach())
    if beta > 0:
        if student_features is None or not teacher_maps:
            raise InvalidArgumentError("beta > 0 needs student features and teacher attention maps")
        at = attention_transfer(student_features, teacher_maps)
        total = total + beta * at
        parts["at"] = float(at.detach())
    return total, parts


# ============================================================================ predictors (teachers)
class Predictor:
    """A model plus the preprocessing it expects: ``run(batch) -> (logits, features or None)``.

    ``checksum`` identifies the weights (cache keys, provenance); ``head()`` returns the classifier
    (W [L x C], b [L]) for class activation maps, or None when unknown.
    """

    name: str
    checksum: str
    spec: PreprocessSpec
    labels: tuple[str, ...] | None = None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def head(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _onnx_head(model_bytes: bytes, logits_name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(W, b) of the Gemm that produces the logits, read from the graph (needs the ``onnx`` package)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover
        return None
    model = onnx.load_from_string(model_bytes)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gemm" and logits_name in node.output and len(node.input) >= 2:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.input[1] not in inits or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                return None
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            w = w if attrs.get("transB", 0) else w.T
            b = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) * attrs.get("beta", 1.0)
                 if len(node.input) > 2 and node.input[2] in inits else np.zeros(w.shape[0], np.float32))
            return w, b
    return None


class OnnxPredictor(Predictor):
    """An ONNX model run with onnxruntime: a cxr-edge bundle (spec/labels/CAM weights from its
    manifest) or a bare model such as the shared teacher (spec from the caller, head from the graph).

    ``spec`` applies to bare models only: a bundle is always run with its manifest's preprocessing.
    """

    def __init__(self, path: str | os.PathLike, spec: PreprocessSpec | None = None, threads: int | None = None,
                 logits_output: str = "logits", features_output: str | None = "features") -> None:
        import onnxruntime as ort

        from cxr_edge.bundle import MANIFEST_KEY, read_manifest, session_options, split_model

        self.path = Path(path)
        data = self.path.read_bytes()
        self.checksum = hashlib.sha256(data).hexdigest()
        self.name = self.path.stem
        self._head: tuple[np.ndarray, np.ndarray] | None = None
        self.thresholds = None
        self.temperatures: list[float] | None = None  # per label, folded into the graph (cxr_edge.temperature)
        if MANIFEST_KEY in split_model(data)[1]:
            from cxr_edge.temperature import current_temperatures

            manifest = read_manifest(data)
            self.spec, self.labels = manifest.preprocessing, manifest.labels
            self.thresholds = manifest.thresholds
            if "temperature" in manifest.provenance:
                self.temperatures = current_temperatures(manifest)
            logits_output = manifest.logits_output
            if manifest.cam.method == "weights":
                features_output = manifest.cam.features_output
                bias = manifest.cam.bias if manifest.cam.bias is not None else np.zeros(len(manifest.labels))
                self._head = (manifest.cam.weights, np.asarray(bias, np.float32))
        else:
            if spec is None:
                raise InvalidArgumentError(f"{self.path.name} has no cxr-edge manifest: pass its preprocessing spec")
            self.spec = spec
            self._head = _onnx_head(data, logits_output)
        self.session = ort.InferenceSession(data, sess_options=session_options(threads or min(2, os.cpu_count() or 1)),
                                            providers=["CPUExecutionProvider"])
        outputs = {o.name for o in self.session.get_outputs()}
        if logits_output not in outputs:
            raise InvalidArgumentError(f"{self.path.name}: no output {logits_output!r} (outputs {sorted(outputs)})")
        self.outputs = [logits_output] + ([features_output] if features_output in outputs else [])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(self.outputs, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return out[0], (out[1] if len(out) > 1 else None)

    def head(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._head


class TorchPredictor(Predictor):
    """A CAM-contract PyTorch model (``features``/``head``/``classifier``) in eval mode."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec, name: str, checksum: str,
                 device: str = "cpu", labels: Sequence[str] | None = None) -> None:
        self.model = model.to(device).eval()
        self.spec, self.name, self.checksum, self.device = spec, name, checksum, torch.device(device)
        self.labels = tuple(labels) if labels else None

    @torch.no_grad()
    def forward_torch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(x.to(self.device, non_blocking=True))
        return self.model.head(feats), feats

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        logits, feats = self.forward_torch(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        lin = self.model.classifier
        return lin.weight.detach().float().cpu().numpy(), lin.bias.detach().float().cpu().numpy()


class CsvTeacher:
    """Cached probabilities of a teacher that cannot be run here (e.g. the CheXNet-class ensemble of
    ``../shared/teachers/chexnet-ensemble``): a CSV with an ``image`` column and one probability
    column per label. Images without a row have no soft label (NaN logits: masked in the KD loss).
    """

    def __init__(self, path: str | os.PathLike, labels: Sequence[str]) -> None:
        import csv

        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidArgumentError(f"teacher CSV not found: {self.path}")
        self.name = self.path.stem
        self.checksum = file_sha256(self.path)
        self.labels = tuple(labels)
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("image", *self.labels) if c not in (reader.fieldnames or [])]
            if missing:
                raise InvalidArgumentError(f"{self.path.name}: missing column(s) {missing}")
            self._rows: dict[str, np.ndarray] = {}
            for k, row in enumerate(reader, start=2):
                try:
                    p = np.array([float(row[c]) for c in self.labels], dtype=np.float64)
                except ValueError:
                    raise InvalidArgumentError(f"{self.path.name} line {k}: a probability is not a number") from None
                if not np.all((p >= 0) & (p <= 1)):
                    raise InvalidArgumentError(f"{self.path.name} line {k}: probabilities must lie in [0, 1]")
                self._rows[row["image"]] = p

    def __len__(self) -> int:
        return len(self._rows)

    def logits(self, image_ids: Sequence[str], eps: float = 1e-4) -> np.ndarray:
        """N x L logits (probabilities clipped to [eps, 1 - eps]); NaN rows where the CSV has none."""
        out = np.full((len(image_ids), len(self.labels)), np.nan, dtype=np.float32)
        for i, image_id in enumerate(image_ids):
            p = self._rows.get(str(image_id))
            if p is not None:
                p = np.clip(p, eps, 1.0 - eps)
                out[i] = np.log(p / (1.0 - p))
        return out

    def coverage(self, image_ids: Sequence[str]) -> int:
        return sum(str(i) in self._rows for i in image_ids)


def write_teacher_csv(path: str | os.PathLike, image_ids: Sequence[str], probs: np.ndarray,
                      labels: Sequence[str]) -> None:
    """Write probabilities in the :class:`CsvTeacher` layout (6 decimals, like the shared ensemble)."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", *labels])
        for image_id, row in zip(image_ids, probs):
            w.writerow([image_id, *(f"{float(v):.6f}" for v in row)])


def load_predictor(source: str, spec: PreprocessSpec | None = None, device: str = "cpu",
                   num_classes: int = 14, threads: int | None = None, checkpoint: str = "final") -> Predictor:
    """A predictor from ``source``:

    - ``path.onnx``: onnxruntime (bundle manifest, or ``spec`` for a bare model);
    - ``registry_name:weights.pt``: a registry model with a state dict (e.g. the fp16 teacher), ``spec``;
    - a run directory of :mod:`models.train` (its ``model_final.pt``, or ``checkpoint="best"``), with
      the run's own student preprocessing.
    """
    path = Path(source)
    if path.is_dir():
        from models.runs import load_run_model

        model, cfg, labels, ckpt_path = load_run_model(path, checkpoint=checkpoint)
        return TorchPredictor(model, cfg.student_spec(), name=f"{path.name}", checksum=file_sha256(ckpt_path),
                              device=device, labels=labels)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise InvalidArgumentError(f"teacher/model file not found: {path}")
        return OnnxPredictor(path, spec=spec, threads=threads)
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+):(.+)", source)
    if match and Path(match.group(2)).is_file():
        from models.registry import create_model, load_state_dict_file

        if spec is None:
            raise InvalidArgumentError(f"{source}: a state-dict teacher needs its preprocessing spec")
        model = create_model(match.group(1), num_classes=num_classes, in_chans=spec.channels)
        load_state_dict_file(model, match.group(2))
        return TorchPredictor(model, spec, name=f"{match.group(1)}-{Path(match.group(2)).stem}",
                              checksum=file_sha256(match.group(2)), device=device)
    raise InvalidArgumentError(f"cannot load a model from {source!r}: expected a .onnx file, "
                               "'registry_name:weights.pt' or a training run directory")


# ============================================================================ teacher cache
def spec_key(spec: PreprocessSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


class TeacherCache:
    """Clean-image teacher outputs (logits, attention map) on disk, one .npz per teacher + preprocessing.

    The file name carries a hash of (teacher checksum, preprocessing spec, format); the file stores
    the same metadata and is ignored when it disagrees (invalidation). Each row is keyed by image id
    and the SHA-1 of the decoded pixels, so an image changed under the same id is recomputed.
    """

    def __init__(self, cache_dir: str | os.PathLike, predictor: Predictor) -> None:
        self.predictor = predictor
        self.meta = {"format": CACHE_FORMAT, "teacher": predictor.name, "checksum": predictor.checksum,
                     "spec": spec_key(predictor.spec)}
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", predictor.name)[:60]
        self.path = Path(cache_dir) / f"{safe}-{key}.npz"
        self.hits = self.misses = 0

    def _read(self) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if json.loads(str(z["meta"])) != self.meta:
                    return {}
                ids, digests, logits, maps = z["ids"], z["digests"], z["logits"], z["maps"]
        except (OSError, ValueError, KeyError):
            return {}
        return {str(i): (str(d), logits[k], maps[k]) for k, (i, d) in enumerate(zip(ids, digests))}

    def _write(self, rows: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = sorted(rows)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, meta=np.array(json.dumps(self.meta, sort_keys=True)), ids=np.array(ids),
                 digests=np.array([rows[i][0] for i in ids]),
                 logits=np.stack([rows[i][1] for i in ids]).astype(np.float32),
                 maps=np.stack([rows[i][2] for i in ids]).astype(np.float32))
        os.replace(tmp, self.path)

    def get(self, image_ids: Sequence[str], digests: Sequence[str], load_batch, batch_size: int = 32,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(logits N x L, attention maps N x h x w) for the images; misses are computed with
        ``load_batch(positions) -> preprocessed N x C x H x W`` and written back."""
        rows = self._read()
        todo = [k for k, (i, d) in enumerate(zip(image_ids, digests)) if i not in rows or rows[i][0] != d]
        self.hits, self.misses = len(image_ids) - len(todo), len(todo)
        if todo:
            start = time.perf_counter()
            for b in range(0, len(todo), batch_size):
                pos = todo[b:b + batch_size]
                logits, feats = self.predictor.run(load_batch(pos))
                if feats is None:
                    raise InvalidArgumentError(f"teacher {self.predictor.name} has no features output to cache")
                maps = (feats.astype(np.float32) ** 2).mean(axis=1)
                for k, p in enumerate(pos):
                    rows[str(image_ids[p])] = (str(digests[p]), logits[k].astype(np.float32), maps[k])
                if progress:
                    done = min(b + batch_size, len(todo))
                    print(f"  teacher {self.predictor.name}: {done}/{len(todo)} images "
                          f"({time.perf_counter() - start:.0f}s)", flush=True)
            self._write(rows)
        logits = np.stack([rows[str(i)][1] for i in image_ids]).astype(np.float32)
        maps = np.stack([rows[str(i)][2] for i in image_ids]).astype(np.float32)
        return logits, maps


def cached_teacher_outputs(predictor: Predictor, cache_dir: str | os.PathLike, images, cache_indices: Sequence[int],
                           batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray, TeacherCache]:
    """Teacher outputs for ``images`` (a :class:`models.data.ImageCache`) at the given positions."""
    from models.data import preprocess_batch

    idx = [int(i) for i in cache_indices]
    cache = TeacherCache(cache_dir, predictor)
    logits, maps = cache.get([images.ids[i] for i in idx], [images.digest(i) for i in idx],
                             lambda pos: preprocess_batch(images, [idx[p] for p in pos], predictor.spec),
                             batch_size=batch_size, progress=progress)
    return logits, maps, cache


# ============================================================================ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.distill cache --teachers T.onnx``: fill the teacher cache for every image."""
    from models.config import TrainConfig
    from models.data import ImageCache, image_path
    from models.datasets import read_nih_sample

    parser = argparse.ArgumentParser(prog="python -m models.distill", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cache", help="run teachers once per image (augmentation-free) and store the outputs")
    p.add_argument("--teachers", nargs="+", required=True)
    p.add_argument("--config", help="training config JSON to take teacher preprocessing and paths from")
    p.add_argument("--data-root", default=None)
    p.add_argument("--teacher-cache-dir", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    o = sub.add_parser("oof-csv", help="merge cross-fitted runs' out-of-fold predictions into a CSV teacher")
    o.add_argument("runs", nargs="+", help="run directories of models.train --n-folds K --fold 0..K-1")
    o.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "oof-csv":
        return _oof_csv(args.runs, args.out)

    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    if args.data_root:
        cfg.data_root = args.data_root
    if args.teacher_cache_dir:
        cfg.teacher_cache_dir = args.teacher_cache_dir
    threads = args.threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    table = read_nih_sample(cfg.data_path())
    start = time.perf_counter()
    images = ImageCache([image_path(cfg.data_path(), i) for i in table.image_ids], table.image_ids,
                        cfg.cache_dtype)
    print(f"decoded {len(images)} images in {time.perf_counter() - start:.1f}s", flush=True)
    for source in args.teachers:
        pred = load_predictor(source, spec=cfg.teacher_spec(), num_classes=len(table.label_names), threads=threads)
        start = time.perf_counter()
        logits, maps, cache = cached_teacher_outputs(pred, cfg.teacher_cache_dir, images, range(len(images)),
                                                     batch_size=args.batch_size, progress=True)
        print(f"{source}: {cache.hits} cached, {cache.misses} computed in {time.perf_counter() - start:.1f}s "
              f"-> {cache.path} (logits {logits.shape}, maps {maps.shape})")
    return 0


def _oof_csv(runs: Sequence[str], out: str) -> int:
    """One CSV of sigmoid(out-of-fold logits): every image predicted by the fold model that never saw it."""
    ids, probs, labels, folds = [], [], None, set()
    for run in runs:
        path = Path(run) / "oof_predictions.npz"
        if not path.is_file():
            raise InvalidArgumentError(f"{run}: no oof_predictions.npz (train with --n-folds K --fold k)")
        with np.load(path, allow_pickle=False) as z:
            names = [str(v) for v in z["label_names"]]
            if labels is not None and names != labels:
                raise InvalidArgumentError(f"{run}: labels differ from the other runs'")
            labels = names
            folds.add((int(z["fold"]), int(z["n_folds"])))
            ids += [str(v) for v in z["image_ids"]]
            probs.append(sigmoid(z["logits"]))
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError("the runs' held-out folds overlap (same fold twice?)")
    write_teacher_csv(out, ids, np.concatenate(probs), labels)
    print(f"{out}: {len(ids)} images from folds {sorted(folds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
