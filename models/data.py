"""Training data: decoded images cached in memory, radiograph augmentation, a torch Dataset.

Why a cache: the NIH sample is 1,266 images of 320 x 320; decoding the PNGs every epoch costs more
than a small student's forward pass on 2 cores, so each image is decoded once (uint8 for 8-bit
sources: exact, 100 kB each). Why augmentation is seeded per (seed, epoch, image): the batch
content is then a pure function of the config, identical with any number of workers, under DDP,
and after ``--resume``.

Augmentation works on the [0, 1] image *before* :func:`cxr_edge.preprocess.preprocess_one`, so the
student and a teacher with another input size see the same augmented radiograph.
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec
from cxr_edge.preprocess import preprocess_one

from cxr_edge.imaging import read_image


def load_pixels(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode one radiograph to float32 [0, 1] with the runtime's reader; returns (pixels, bit depth)."""
    rad = read_image(str(path))
    return rad.pixels, int(rad.bit_depth)


class ImageCache:
    """All images of a table decoded once, kept as uint8 (8-bit sources) or float16.

    ``get(i)`` returns the float32 [0, 1] image; ``digest(i)`` a SHA-1 of the stored pixels, used by
    the teacher cache to notice an image that changed under the same id.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], ids: Sequence[str], dtype: str = "auto",
                 workers: int = 2) -> None:
        if len(paths) != len(ids):
            raise InvalidArgumentError("ImageCache: one id per path is required")
        if dtype not in ("auto", "uint8", "float16"):
            raise InvalidArgumentError(f"ImageCache: dtype must be auto, uint8 or float16, got {dtype!r}")
        self.ids = [str(i) for i in ids]
        self._pos = {image_id: k for k, image_id in enumerate(self.ids)}
        if len(self._pos) != len(self.ids):
            raise InvalidArgumentError("ImageCache: image ids must be unique")
        with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2/zlib decode releases the GIL
            self._data = list(pool.map(lambda p: self._encode(*load_pixels(p), dtype), paths))
        self._digests: list[str | None] = [None] * len(self._data)

    @staticmethod
    def _encode(pixels: np.ndarray, bit_depth: int, dtype: str) -> np.ndarray:
        if dtype == "uint8" or (dtype == "auto" and bit_depth <= 8):
            return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
        return pixels.astype(np.float16)

    def __len__(self) -> int:
        return len(self._data)

    def index(self, image_id: str) -> int:
        try:
            return self._pos[image_id]
        except KeyError:
            raise InvalidArgumentError(f"image {image_id!r} is not in the image cache") from None

    def raw(self, i: int) -> np.ndarray:
        """Stored array (uint8 or float16), no copy."""
        return self._data[i]

    def get(self, i: int) -> np.ndarray:
        a = self._data[i]
        if a.dtype == np.uint8:
            return _U8_TO_FLOAT[a]
        return a.astype(np.float32)

    def digest(self, i: int) -> str:
        d = self._digests[i]
        if d is None:
            a = self._data[i]
            d = hashlib.sha1(a.tobytes() + str((a.dtype.str, a.shape)).encode()).hexdigest()
            self._digests[i] = d
        return d

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._data)


_U8_TO_FLOAT = (np.arange(256, dtype=np.float32) / 255.0)


# ---------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the radiograph augmentation (defaults: mild, no flip: anatomy is not symmetric)."""

    scale: float = 0.1
    rotate: float = 7.0
    shift: float = 0.05
    gamma: float = 0.2
    contrast: float = 0.1
    hflip: bool = False


def random_affine(rng: np.random.Generator, h: int, w: int, p: AugmentParams) -> np.ndarray:
    """2 x 3 matrix (source pixel -> destination pixel) for cv2.warpAffine: scale/rotate about the
    centre, shift, optional horizontal flip."""
    scale = float(rng.uniform(1.0 - p.scale, 1.0 + p.scale))
    angle = float(rng.uniform(-p.rotate, p.rotate))
    tx, ty = (float(v) for v in rng.uniform(-p.shift, p.shift, size=2))
    flip = bool(p.hflip and rng.random() < 0.5)
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, scale)
    m[0, 2] += tx * w
    m[1, 2] += ty * h
    if flip:
        m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
    return m


def grid_affine(m: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """The same geometric transform expressed on another grid (pixel-centre convention): used to
    warp a teacher's h x w attention map exactly like the H x W image it came from."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    s = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    full = s @ np.vstack([m, [0.0, 0.0, 1.0]]) @ np.linalg.inv(s)
    return full[:2]


def augment_image(img: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Augment one stored image (uint8 or float) -> (float32 [0, 1] image, affine matrix used).

    Intensity first (gamma, contrast about the mean; a 256-entry LUT for uint8), then the affine
    warp with black borders, as radiographs have.
    """
    gamma = math.exp(float(rng.uniform(-p.gamma, p.gamma)))
    contrast = float(rng.uniform(1.0 - p.contrast, 1.0 + p.contrast))
    if img.dtype == np.uint8:
        x = (_U8_TO_FLOAT ** gamma)[img]
    else:
        x = np.power(np.clip(img.astype(np.float32), 0.0, 1.0), gamma, dtype=np.float32)
    mean = float(x.mean())
    x = (x - mean) * contrast + mean
    np.clip(x, 0.0, 1.0, out=x)
    h, w = x.shape
    m = random_affine(rng, h, w, p)
    x = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return x.astype(np.float32, copy=False), m


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation RNG of one sample: a pure function of (seed, epoch, image)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


# ---------------------------------------------------------------------------- dataset
class CxrDataset(Dataset):
    """Images (by cache index) with targets and, for KD, cached teacher outputs.

    Items are dicts: ``image`` (C x H x W, student preprocessing), ``target`` (labels, NaN =
    unknown), ``index`` (position in this dataset); with ``teacher_logits`` (K x L) and
    ``teacher_maps`` (tuple of K h x w attention maps, warped like the image) when given; with
    ``teacher_images`` (tuple of K tensors at each teacher's preprocessing) when ``teacher_specs``
    is set (online teachers see the same augmented radiograph at their own resolution).
    """

    def __init__(self, cache: ImageCache, cache_indices: Sequence[int], targets: np.ndarray,
                 spec: PreprocessSpec, augment: AugmentParams | None = None, seed: int = 0,
                 teacher_logits: np.ndarray | None = None, teacher_maps: Sequence[np.ndarray] | None = None,
                 teacher_specs: Sequence[PreprocessSpec] | None = None,
                 boxes: Sequence[Sequence[tuple[int, float, float, float, float]]] | None = None,
                 box_grid: tuple[int, int] | None = None) -> None:
        self.cache = cache
        self.cache_indices = np.asarray(cache_indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.float32)
        if len(self.targets) != len(self.cache_indices):
            raise InvalidArgumentError("CxrDataset: one target row per image is required")
        if teacher_logits is not None and len(teacher_logits) != len(self.cache_indices):
            raise InvalidArgumentError("CxrDataset: one teacher-logit row per image is required")
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.teacher_logits = None if teacher_logits is None else np.asarray(teacher_logits, np.float32)
        self.teacher_maps = None if not teacher_maps else [np.asarray(m, np.float32) for m in teacher_maps]
        self.teacher_specs = list(teacher_specs) if teacher_specs else None
        if boxes is not None and (len(boxes) != len(self.cache_indices) or box_grid is None):
            raise InvalidArgumentError("CxrDataset: one box list per image and a box_grid are required")
        self.boxes = boxes
        self.box_grid = box_grid

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of this epoch (call before iterating, like a sampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cache_indices)

    def __getitem__(self, i: int) -> dict:
        ci = int(self.cache_indices[i])
        m = None
        if self.augment is not None:
            pixels, m = augment_image(self.cache.raw(ci), sample_rng(self.seed, self.epoch, ci), self.augment)
        else:
            pixels = self.cache.get(ci)
        item = {"image": torch.from_numpy(np.ascontiguousarray(preprocess_one(pixels, self.spec))),
                "target": torch.from_numpy(self.targets[i]), "index": i}
        if self.teacher_logits is not None:
            item["teacher_logits"] = torch.from_numpy(self.teacher_logits[i])
        if self.teacher_maps is not None:
            maps = []
            for tm in self.teacher_maps:
                a = tm[i]
                if m is not None:
                    a = cv2.warpAffine(a, grid_affine(m, pixels.shape, a.shape), (a.shape[1], a.shape[0]),
                                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
                maps.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
            item["teacher_maps"] = tuple(maps)
        if self.boxes is not None:
            item["box_mask"], item["box_has"] = box_masks(self.boxes[i], pixels.shape, m, self.box_grid,
                                                          self.targets.shape[1])
        if self.teacher_specs is not None:
            item["teacher_images"] = tuple(torch.from_numpy(np.ascontiguousarray(preprocess_one(pixels, s)))
                                           for s in self.teacher_specs)
        return item


def box_masks(boxes: Sequence[tuple[int, float, float, float, float]], image_hw: tuple[int, int],
               affine: np.ndarray | None, grid: tuple[int, int], n_labels: int,
               min_cover: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Radiologist boxes of one image as L x h x w masks on the CAM grid (fraction of each cell
    the box covers), moved with the image's augmentation affine; ``has[c]`` is False for labels
    without a box or whose box left the view (under ``min_cover`` cells of area)."""
    masks = np.zeros((n_labels, *grid), dtype=np.float32)
    has = np.zeros(n_labels, dtype=bool)
    h, w = image_hw
    for label, x, y, bw, bh in boxes:
        full = np.zeros((h, w), dtype=np.float32)
        x0, y0 = int(max(0, np.floor(x))), int(max(0, np.floor(y)))
        x1, y1 = int(min(w, np.ceil(x + bw))), int(min(h, np.ceil(y + bh)))
        full[y0:y1, x0:x1] = 1.0
        if affine is not None:
            full = cv2.warpAffine(full, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        cell = cv2.resize(full, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
        if cell.sum() >= min_cover:
            masks[label] = np.maximum(masks[label], cell)
            has[label] = True
    return torch.from_numpy(masks), torch.from_numpy(has)


def preprocess_batch(cache: ImageCache, cache_indices: Sequence[int], spec: PreprocessSpec) -> np.ndarray:
    """Clean (augmentation-free) N x C x H x W batch, for evaluation and teacher caching."""
    out = np.empty((len(cache_indices), spec.channels, *spec.input_size), dtype=np.float32)
    for k, ci in enumerate(cache_indices):
        out[k] = preprocess_one(cache.get(int(ci)), spec)
    return out


def image_path(root: str | os.PathLike, image_id: str) -> Path:
    """``<root>/images/<id>`` (adding ``.png`` when the id has no extension)."""
    name = image_id if Path(image_id).suffix else f"{image_id}.png"
    return Path(root) / "images" / name
