"""Gradient-free class activation maps from one forward pass.

For a head that is global-average-pool then linear, ``logit_c = mean_xy(W[c] . f[:, y, x]) + b_c``,
so ``W[c] . f`` is exactly the per-location contribution to the logit: no gradients needed.
"""
from __future__ import annotations

import cv2
import numpy as np


def class_activation_map(features: np.ndarray, weights: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """CAM of one label: ReLU(W[c] . features), upsampled to ``out_hw`` (H, W), scaled to [0, 1].

    ``features`` is C x h x w (one image), ``weights`` the label's C classifier weights. A map with no
    positive evidence anywhere is all zeros (not rescaled noise).
    """
    if features.ndim != 3 or weights.ndim != 1 or weights.shape[0] != features.shape[0]:
        raise ValueError(f"features C x h x w and weights C expected, got {features.shape} and {weights.shape}")
    c, h, w = features.shape
    raw = (weights.astype(np.float32) @ features.reshape(c, h * w).astype(np.float32)).reshape(h, w)
    np.maximum(raw, 0.0, out=raw)
    peak = float(raw.max())
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(out_hw, dtype=np.float32)
    heat = cv2.resize(raw, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    heat *= 1.0 / float(heat.max())  # bilinear interpolation can miss the peak: rescale on the output grid
    return np.clip(heat, 0.0, 1.0, out=heat)


def overlay_heatmap(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image: the radiograph in gray with the heatmap (JET colours) blended where it is warm.

    Blending is weighted by the heatmap itself so cold regions keep the plain radiograph visible.
    """
    if pixels.shape != heatmap.shape:
        raise ValueError(f"image {pixels.shape} and heatmap {heatmap.shape} must have the same grid")
    gray = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB).astype(np.float32)
    colour = cv2.applyColorMap(np.clip(heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    weight = (alpha * heatmap)[..., None]
    return np.clip(base * (1.0 - weight) + colour * weight + 0.5, 0, 255).astype(np.uint8)


def write_overlay_png(path: str, pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> None:
    """Write the overlay as an RGB PNG (no metadata: nothing from the source file is carried over)."""
    rgb = overlay_heatmap(pixels, heatmap, alpha)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write overlay PNG to {path!r}")
