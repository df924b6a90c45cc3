"""Manifest-driven preprocessing, written once: the runtime uses it and training imports it.

Input is the [0, 1] float32 grayscale image from :func:`cxr_edge.imaging.read_image`; output is
the model's N x C x H x W float32 tensor. Pure numpy + OpenCV, no torch.

A change here is a preprocessing change: it follows the rule at :class:`cxr_edge.manifest.PreprocessSpec`
(format version bump; the same change in ``export/ingraph.py`` and training; docs/refactor.md).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .errors import InvalidImageError
from .manifest import PreprocessSpec

_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


def resize_image(pixels: np.ndarray, size_hw: tuple[int, int], method: str) -> np.ndarray:
    """Resize a 2-D float32 image to (H, W); ``area`` falls back to linear when enlarging."""
    h, w = size_hw
    interp = _INTERPOLATION[method]
    if method == "area" and (pixels.shape[0] < h or pixels.shape[1] < w):
        interp = cv2.INTER_LINEAR
    if pixels.shape == (h, w):
        return pixels
    return cv2.resize(pixels, (w, h), interpolation=interp)


def preprocess_one(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One [0, 1] H x W image -> C x H x W float32 model input, exactly as the manifest says."""
    if pixels.ndim != 2 or pixels.dtype != np.float32:
        raise InvalidImageError(f"preprocess expects a 2-D float32 image, got {pixels.dtype} {pixels.shape}")
    resized = resize_image(pixels, spec.input_size, spec.resize)
    resized = np.clip(resized, 0.0, 1.0)  # cubic/lanczos overshoot; inputs are already in [0, 1]
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    inv_std = (1.0 / np.asarray(spec.std, dtype=np.float32))[:, None, None]
    chw = np.broadcast_to(resized, (spec.channels, *resized.shape))
    return ((chw - mean) * inv_std).astype(np.float32, copy=False)


def preprocess(images: Sequence[np.ndarray] | np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A batch of [0, 1] images (list, or a single 2-D array) -> N x C x H x W float32."""
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    batch = np.empty((len(images), spec.channels, *spec.input_size), dtype=np.float32)
    for i, img in enumerate(images):
        batch[i] = preprocess_one(img, spec)
    return batch
