import cv2
import numpy as np
import pytest

from cxr_edge.errors import InvalidImageError
from cxr_edge.manifest import PreprocessSpec
from cxr_edge.preprocess import preprocess, preprocess_one


def test_constant_image_normalises_exactly():
    spec = PreprocessSpec(input_size=(32, 48), mean=(0.5,), std=(0.25,))
    out = preprocess(np.full((100, 80), 0.75, np.float32), spec)
    assert out.shape == (1, 1, 32, 48) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_three_channels_repeat_gray_with_per_channel_stats():
    spec = PreprocessSpec(input_size=(16, 16), channels=3, mean=(0.1, 0.2, 0.3), std=(1.0, 0.5, 0.25))
    out = preprocess_one(np.full((20, 20), 0.5, np.float32), spec)
    np.testing.assert_allclose(out[:, 0, 0], [0.4, 0.6, 0.8], atol=1e-6)


def test_area_resize_averages_blocks():
    spec = PreprocessSpec(input_size=(2, 2), mean=(0.0,), std=(1.0,), min_side=1, max_pixels=16)
    img = np.zeros((4, 4), np.float32)
    img[:2, :2] = 1.0
    np.testing.assert_allclose(preprocess_one(img, spec)[0], [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)


def test_overshooting_interpolation_is_clipped():
    spec = PreprocessSpec(input_size=(64, 64), resize="lanczos", mean=(0.0,), std=(1.0,))
    img = np.zeros((16, 16), np.float32)
    img[::2] = 1.0
    out = preprocess_one(img, spec)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_rejects_non_2d_or_non_float32():
    spec = PreprocessSpec()
    with pytest.raises(InvalidImageError):
        preprocess_one(np.zeros((10, 10, 3), np.float32), spec)
    with pytest.raises(InvalidImageError):
        preprocess_one(np.zeros((10, 10), np.uint8), spec)


def test_batch_matches_single():
    rng = np.random.default_rng(0)
    spec = PreprocessSpec(input_size=(24, 24))
    imgs = [rng.random((50, 40), dtype=np.float32) for _ in range(3)]
    batch = preprocess(imgs, spec)
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], preprocess_one(img, spec))


def _fine_texture(h: int, w: int) -> np.ndarray:
    """Rows 1, 0, 0, 1, 0, 0, ... plus noise: pixel-area averaging and point sampling disagree strongly here."""
    rng = np.random.default_rng(3)
    img = np.zeros((h, w), np.float32)
    img[::3] = 1.0
    return np.clip(img + rng.normal(0, 0.05, (h, w)), 0, 1).astype(np.float32)


def test_area_downscale_is_the_block_mean_not_interpolation():
    """``resize: area`` is pixel-area averaging (cv2.INTER_AREA): for an integer factor, the mean of each block.

    On a 3-row texture, bilinear (INTER_LINEAR) samples the middle row of each block instead: about 0.0 where
    the block mean is 1/3, so swapping the interpolation fails here by ~0.3."""
    img = _fine_texture(90, 120)
    spec = PreprocessSpec(input_size=(30, 40), mean=(0.0,), std=(1.0,), min_side=1)
    out = preprocess_one(img, spec)[0]
    block_mean = img.reshape(30, 3, 40, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out, block_mean, atol=1e-5)
    linear = cv2.resize(img, (40, 30), interpolation=cv2.INTER_LINEAR)
    assert np.abs(linear - block_mean).mean() > 0.2  # the image tells the two filters apart


def test_area_downscale_matches_opencv_inter_area_at_a_fractional_factor():
    img = _fine_texture(100, 130)
    spec = PreprocessSpec(input_size=(37, 41), mean=(0.0,), std=(1.0,), min_side=1)
    ref = cv2.resize(img, (41, 37), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(preprocess_one(img, spec)[0], ref, atol=1e-6)
    assert np.abs(cv2.resize(img, (41, 37), interpolation=cv2.INTER_LINEAR) - ref).max() > 0.2
