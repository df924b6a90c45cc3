import numpy as np
import pytest

from cxr_edge.cam import class_activation_map, overlay_heatmap, write_overlay_png


def test_cam_is_the_weighted_sum_of_features():
    rng = np.random.default_rng(1)
    f = rng.random((4, 3, 3)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
    heat = class_activation_map(f, w, (3, 3))
    raw = np.maximum(np.tensordot(w, f, axes=1), 0)
    np.testing.assert_allclose(heat, raw / raw.max(), atol=1e-6)


def test_cam_peak_lands_where_the_evidence_is():
    f = np.zeros((2, 7, 7), np.float32)
    f[0, 1, 5] = 3.0
    heat = class_activation_map(f, np.array([1.0, 0.0], np.float32), (700, 700))
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert heat.shape == (700, 700) and 50 <= y <= 250 and 450 <= x <= 650
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)


def test_no_positive_evidence_gives_zeros():
    f = np.ones((2, 4, 4), np.float32)
    heat = class_activation_map(f, np.array([-1.0, -1.0], np.float32), (8, 8))
    assert not heat.any()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        class_activation_map(np.ones((3, 2, 2), np.float32), np.ones(4, np.float32), (4, 4))


def test_overlay_is_rgb_and_keeps_cold_regions_gray(tmp_path):
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    heat = np.zeros_like(img)
    heat[:8, :8] = 1.0
    rgb = overlay_heatmap(img, heat)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    cold = rgb[40:, 40:]
    assert (cold[..., 0] == cold[..., 1]).all() and (cold[..., 1] == cold[..., 2]).all()
    assert not (rgb[:8, :8, 0] == rgb[:8, :8, 2]).all()
    out = tmp_path / "o.png"
    write_overlay_png(str(out), img, heat)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
