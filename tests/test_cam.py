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


def test_overlay_shape_bounds_the_long_side_and_keeps_the_aspect():
    from cxr_edge.cam import OVERLAY_MAX_SIDE, check_max_side, overlay_shape

    assert overlay_shape((300, 200)) == (300, 200)  # never enlarged
    assert overlay_shape((8000, 8000)) == (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE)
    assert overlay_shape((6000, 4000), 1024) == (1024, 683)
    assert overlay_shape((4000, 6000), 2048) == (1365, 2048)
    for bad in (0, 10, 10 ** 6, 1.5, True, "1024"):
        with pytest.raises(Exception, match="longest side"):
            check_max_side(bad)


def test_overlay_of_a_large_input_has_bounded_dimensions(tiny_bundle, tmp_path, capsys):
    """A 3000 x 4500 input: the overlay image is 683 x 1024 (aspect kept), not the input's grid, and says so."""
    import cv2

    from cxr_edge.classifier import Classifier
    from cxr_edge.cli import main

    rng = np.random.default_rng(3)
    big = cv2.resize(rng.random((60, 90)).astype(np.float32), (4500, 3000), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big, 0.0, 1.0)
    clf = Classifier(tiny_bundle, threads=1)
    pred = clf.predict(big)
    assert pred.image_shape == (3000, 4500)
    out = tmp_path / "big.png"
    pred.write_overlay(out, 0)
    png = cv2.imread(str(out))
    assert png.shape[1] == 1024 and 683 < png.shape[0] < 683 + 700  # image area 683 x 1024, then the legend panel
    # the image area is the downscaled radiograph (gray where the map is cold), not padding
    assert float(png[:683].std()) > 5.0
    # smaller on request, through the API and the command line
    pred.write_overlay(out, 0, max_side=256)
    assert cv2.imread(str(out)).shape[1] == 640  # 171 x 256 image; the panel keeps a legible 640 px minimum
    path = tmp_path / "big_input.png"
    cv2.imwrite(str(path), (big * 255).astype(np.uint8))
    cams = tmp_path / "cams"
    assert main(["predict", str(path), "--model", str(tiny_bundle), "--cam-dir", str(cams), "--cam-label", "all",
                 "--overlay-max-side", "512", "--json"]) == 0
    written = sorted(cams.glob("*.png"))
    assert len(written) == 3
    for p in written:
        h, w = cv2.imread(str(p)).shape[:2]
        assert w == 640 and h < 341 + 700
    capsys.readouterr()
    assert main(["predict", str(path), "--model", str(tiny_bundle), "--cam-dir", str(cams),
                 "--overlay-max-side", "10"]) == 2


def test_overlay_legend_says_when_the_image_is_downscaled():
    from cxr_edge.cam import OverlayLegend, render_overlay

    legend = OverlayLegend(label="x", probability=0.7, threshold=0.5, decision=True, model_id="m", notice="n",
                           scale=1.0, empty=False, input_shape=(4000, 3000))
    img = np.full((1024, 768), 0.5, np.float32)
    with_note = render_overlay(img, np.zeros_like(img), legend=legend)
    same = render_overlay(img, np.zeros_like(img), legend=OverlayLegend(**{**legend.__dict__, "input_shape": (1024, 768)}))
    assert with_note.shape[0] > same.shape[0]  # one more legend line: "image shown at 768 x 1024 px (input 3000 x 4000 ...)"
