"""Calibration data for static INT8 quantization: real radiographs through the runtime's preprocessing.

onnxruntime's calibrator pulls ``{input_name: batch}`` dicts from a :class:`CalibrationDataReader`
until it returns None; the activation ranges it records decide every INT8 scale, so the images
must be real, preprocessed exactly as on device, and drawn from the training distribution.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from cxr_edge.errors import InvalidArgumentError
from cxr_edge.manifest import PreprocessSpec

from .images import load_batch


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds an N x C x H x W float32 array in batches; ``rewind`` lets one reader serve several passes."""

    def __init__(self, batch: np.ndarray, input_name: str, batch_size: int = 8) -> None:
        if batch.ndim != 4 or batch.dtype != np.float32 or len(batch) == 0:
            raise InvalidArgumentError(f"calibration data must be a non-empty N x C x H x W float32 array, "
                                       f"got {batch.dtype} {batch.shape}")
        if batch_size < 1:
            raise InvalidArgumentError("calibration batch_size must be >= 1")
        self.batch = batch
        self.input_name = input_name
        self.batch_size = batch_size
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.batch):
            return None
        chunk = self.batch[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: np.ascontiguousarray(chunk)}

    def rewind(self) -> None:
        self._pos = 0

    def __len__(self) -> int:
        return len(self.batch)


def select_calibration(paths: Sequence[str | os.PathLike], count: int, seed: int = 0) -> list:
    """A seeded random subset of ``count`` paths (all when fewer): spread over the pool, reproducible."""
    if count < 1:
        raise InvalidArgumentError(f"calibration needs at least 1 image, got {count}")
    paths = list(paths)
    if count >= len(paths):
        return paths
    idx = np.sort(np.random.default_rng(seed).choice(len(paths), size=count, replace=False))
    return [paths[i] for i in idx]


def reader_from_images(paths: Sequence[str | os.PathLike], spec: PreprocessSpec,
                       batch_size: int = 8) -> ArrayCalibrationReader:
    """Read + preprocess ``paths`` with the runtime's code and wrap them in a reader."""
    return ArrayCalibrationReader(load_batch(paths, spec), spec.input_name, batch_size)
