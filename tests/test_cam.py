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


# --------------------------------------------------------------------------- overlays that explain themselves

def _legend(**kw):
    from cxr_edge.cam import OverlayLegend

    fields = dict(label="Nodule", probability=0.31, threshold=0.2, decision=True, model_id="tiny-test",
                  notice="Research and engineering demonstration only; not a medical device.", scale=2.0, empty=False)
    fields.update(kw)
    return OverlayLegend(**fields)


def _png_chunks(data: bytes) -> list[bytes]:
    import struct

    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return chunks


def test_overlay_with_legend_keeps_the_image_grid_and_has_no_metadata(tmp_path):
    import cv2

    from cxr_edge.cam import render_overlay

    img = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    heat = np.zeros_like(img)
    heat[100:150, 50:90] = 0.8
    rgb = render_overlay(img, heat, legend=_legend())
    assert rgb.shape[0] > 300 and rgb.shape[1] == 640  # legible: the canvas is at least 640 px wide
    np.testing.assert_array_equal(rgb[:300, :200], overlay_heatmap(img, heat))  # pixel (y, x) is the image's
    out = tmp_path / "o.png"
    write_overlay_png(str(out), img, heat, legend=_legend())
    chunks = _png_chunks(out.read_bytes())
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"} and chunks[-1] == b"IEND"  # no text/time/profile chunks
    assert cv2.imread(str(out)).shape == rgb.shape
    assert out.stat().st_mode & 0o777 != 0o600  # the usual new-file mode, not mkstemp's


def test_legend_states_decision_threshold_and_undetermined():
    from cxr_edge.cam import _decision_text

    title, detail, _ = _decision_text(_legend())
    assert title == "Nodule: POSITIVE" and "0.310 vs threshold 0.200 (margin +0.110)" in detail
    title, detail, _ = _decision_text(_legend(decision=False, probability=0.1))
    assert title == "Nodule: negative" and "margin -0.100" in detail
    title, detail, _ = _decision_text(_legend(threshold=None, decision=None))
    assert title == "Nodule: UNDETERMINED" and "no decision" in detail


def test_empty_map_is_stamped_on_the_image():
    from cxr_edge.cam import render_overlay

    img = np.full((300, 300), 0.5, np.float32)
    heat = np.zeros_like(img)
    plain = render_overlay(img, heat, legend=_legend(empty=False))
    stamped = render_overlay(img, heat, legend=_legend(empty=True))
    assert (plain[:300, :300] == 127).all() or (plain[:300, :300] == 128).all()
    assert not np.array_equal(stamped[:60, :300], plain[:60, :300])  # "no positive evidence" at the top left
    assert np.array_equal(stamped[150:300, :300], plain[150:300, :300])
    assert stamped.shape[0] > plain.shape[0]  # the panel has one more line saying so


def test_absolute_scale_makes_weak_maps_weaker():
    from cxr_edge.cam import absolute_map

    strong = np.zeros((4, 4), np.float32)
    strong[1, 1] = 4.0
    weak = strong / 4
    scale = 4.0  # the strongest location of any label
    a, b = absolute_map(strong, scale, (40, 40)), absolute_map(weak, scale, (40, 40))
    assert 0.85 < a.max() <= 1.0  # bilinear interpolation of a one-cell peak stays a little below it
    assert b.max() == pytest.approx(a.max() / 4, rel=1e-5)  # a 4x weaker map is 4x dimmer, not rescaled to 1
    assert not absolute_map(np.zeros((4, 4), np.float32), scale, (40, 40)).any()


def test_overlay_write_failures_are_output_errors(tmp_path):
    from cxr_edge.errors import OutputError

    img = np.zeros((64, 64), np.float32)
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "missing" / "o.png", tmp_path / "f" / "o.png", tmp_path):
        with pytest.raises(OutputError):
            write_overlay_png(str(bad), img, img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary file left behind
