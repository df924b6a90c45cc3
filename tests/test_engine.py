"""Engine: the decode and inference stages, and prefetch (decoding ahead while the model runs)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_edge.engine import Decoded, Engine, decode_workers
from cxr_edge.errors import InferenceError, InvalidArgumentError
from tests.conftest import encode


def _without_timings(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "timings_ms"}


@pytest.fixture
def mixed_folder(tmp_path):
    """Good PNGs and JPEGs of different sizes, a truncated PNG, a cut JPEG, a tiny image, a missing path."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(9):
        img = (rng.random((160 + 8 * i, 150 + 4 * i)) * 255).astype(np.uint8)
        path = tmp_path / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(encode(path.suffix, img))
        paths.append(path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cut = encode(".jpg", (rng.random((200, 200)) * 255).astype(np.uint8))
    (tmp_path / "cut.jpg").write_bytes(cut[: len(cut) // 2] + b"\xff\xd9")
    (tmp_path / "small.png").write_bytes(encode(".png", np.zeros((20, 20), np.uint8)))
    order = paths[:3] + [tmp_path / "bad.png"] + paths[3:6] + [tmp_path / "cut.jpg", tmp_path / "missing.png"] \
        + paths[6:] + [tmp_path / "small.png"]
    return [str(p) for p in order]


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_prefetch_gives_the_same_objects_in_the_same_order_with_every_error(tiny_bundle, mixed_folder, batch_size,
                                                                            prefetch, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # batch 1: two whole-path workers; batch 3: one decoder
    engine = Engine(tiny_bundle, threads=1)
    serial = list(engine.run(mixed_folder, batch_size=batch_size, prefetch=0))
    ahead = list(engine.run(mixed_folder, batch_size=batch_size, prefetch=prefetch))
    assert [o["source"] for o in ahead] == [o["source"] for o in serial] == mixed_folder  # every file, in order
    assert [_without_timings(o) for o in ahead] == [_without_timings(o) for o in serial]
    errors = {o["source"].rsplit("/", 1)[-1]: o["error"]["type"] for o in ahead if not o["ok"]}
    assert errors == {"bad.png": "CorruptImageError", "cut.jpg": "CorruptImageError", "missing.png": "ImageError",
                      "small.png": "InvalidImageError"}
    assert sum(o["ok"] for o in ahead) == 9


def _thread_spy(monkeypatch, delay: float = 0.0):
    """Engine.decode wrapped to record the thread names it ran on and how many ran at once."""
    lock = threading.Lock()
    state = {"names": set(), "running": 0, "max_running": 0, "started": 0}
    real = Engine.decode

    def spy(self, source, **kw):
        with lock:
            state["names"].add(threading.current_thread().name)
            state["started"] += 1
            state["running"] += 1
            state["max_running"] = max(state["max_running"], state["running"])
        time.sleep(delay)
        try:
            return real(self, source, **kw)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(Engine, "decode", spy)
    return state


def test_prefetch_decodes_on_other_threads_while_the_consumer_works(tiny_bundle, mixed_folder, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    engine = Engine(tiny_bundle, threads=1)
    state = _thread_spy(monkeypatch)
    list(engine.run(mixed_folder, prefetch=2))  # single images: whole-path workers
    assert state["names"] and all(name.startswith("cxr-path") for name in state["names"])
    state["names"].clear()
    list(engine.run(mixed_folder, prefetch=2, batch_size=3))  # batches: decoders ahead of the model
    assert state["names"] and all(name.startswith("cxr-decode") for name in state["names"])
    state["names"].clear()
    list(engine.run(mixed_folder, prefetch=0))
    assert state["names"] == {threading.current_thread().name}


def test_single_images_go_through_one_worker_per_model_thread_core(tiny_bundle, mixed_folder, monkeypatch):
    """On 2 cores with a 1-thread model, two inputs are worked on at once (neither core waits for the other
    stage) at prefetch 1 and 2 (the CLI's default), three from prefetch 3 on (the spare worker), never more,
    and at most prefetch + 1 are in flight ahead of the results handed out."""
    from cxr_edge.cli_support import FOLDER_PREFETCH

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    engine = Engine(tiny_bundle, threads=1)
    state = _thread_spy(monkeypatch, delay=0.02)
    for prefetch, workers in ((FOLDER_PREFETCH, 2), (1, 2), (3, 3), (6, 3)):
        state.update(max_running=0, started=0)
        seen = 0
        for obj in engine.run(mixed_folder, prefetch=prefetch):
            seen += 1
            time.sleep(0.005)
            assert state["started"] <= seen + prefetch + 1
        assert seen == len(mixed_folder)
        assert state["max_running"] == workers, prefetch


def test_path_workers_one_per_model_threads_cores_and_a_spare_when_the_window_allows(monkeypatch):
    from cxr_edge.engine import path_workers

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert [path_workers(1, p) for p in (1, 2, 3, 8)] == [2, 2, 3, 3]
    assert path_workers(2, 8) == 1 and path_workers(None, 8) == 1 and path_workers(4, 8) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert path_workers(1, 3) == 8 and path_workers(1, 9) == 9 and path_workers(2, 4) == 4
    assert path_workers(2, 5) == 5 and path_workers(3, 3) == 3 and path_workers(8, 9) == 1
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert path_workers(1, 3) == 3


def test_a_model_on_all_cores_keeps_the_decoder_ahead_of_it(tiny_bundle, mixed_folder, monkeypatch):
    """--threads 2 on 2 cores: no room for a second worker, so a decoder runs ahead of the model thread."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    engine = Engine(tiny_bundle, threads=2)
    state = _thread_spy(monkeypatch)
    objs = list(engine.run(mixed_folder, prefetch=2))
    assert [o["source"] for o in objs] == mixed_folder
    assert state["names"] and all(name.startswith("cxr-decode") for name in state["names"])


@pytest.mark.parametrize("prefetch, workers, batch_size", [(1, 1, 1), (3, 2, 1), (4, 4, 2), (2, 2, 3)])
def test_prefetch_keeps_the_in_flight_count_bounded(tiny_bundle, mixed_folder, monkeypatch, prefetch, workers,
                                                    batch_size):
    """Decodes started never run more than ``prefetch`` (+ the batch being filled) ahead of the results
    handed out, and never more than ``workers`` at once, however slow the consumer is."""
    engine = Engine(tiny_bundle, threads=1)
    lock = threading.Lock()
    state = {"started": 0, "running": 0, "max_running": 0}
    real = Engine.decode

    def counted(self, source, **kw):
        with lock:
            state["started"] += 1
            state["running"] += 1
            state["max_running"] = max(state["max_running"], state["running"])
        time.sleep(0.002)
        try:
            return real(self, source, **kw)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(Engine, "decode", counted)
    items = engine.decoded(mixed_folder, prefetch=prefetch, workers=workers)
    for consumed, _ in enumerate(items, start=1):
        time.sleep(0.01)  # a slow model: decoders would run far ahead if nothing bounded them
        with lock:
            assert state["started"] <= consumed + prefetch
    assert state["max_running"] <= workers
    state.update(started=0)
    seen = 0
    for obj in engine.run(mixed_folder, batch_size=batch_size, prefetch=prefetch):
        seen += 1
        time.sleep(0.005)
        with lock:
            assert state["started"] <= seen + batch_size + prefetch
    assert seen == len(mixed_folder)


def test_closing_the_iterator_early_stops_decoding(tiny_bundle, mixed_folder, monkeypatch):
    engine = Engine(tiny_bundle, threads=1)
    calls = []
    real = Engine.decode
    monkeypatch.setattr(Engine, "decode", lambda self, s, **kw: (calls.append(s), real(self, s, **kw))[1])
    it = engine.run(mixed_folder, prefetch=3)
    next(it)
    it.close()  # like a broken pipe: the consumer stops
    time.sleep(0.05)
    assert len(calls) <= 1 + 3 + 1 < len(mixed_folder)


def test_a_failing_batch_is_retried_per_image_so_the_error_names_its_input(tiny_bundle, mixed_folder, monkeypatch):
    engine = Engine(tiny_bundle, threads=1)
    real = engine.classifier._results
    poison = mixed_folder[1]

    def results(names, *a, **k):
        if poison in names:  # like NaN logits: the whole batch's run fails
            raise InferenceError("simulated NaN logits")
        return real(names, *a, **k)

    monkeypatch.setattr(engine.classifier, "_results", results)
    objs = list(engine.run(mixed_folder, batch_size=3, prefetch=2))
    assert [o["source"] for o in objs] == mixed_folder
    failed = [o["source"] for o in objs if not o["ok"] and o["error"]["type"] == "InferenceError"]
    assert failed == [poison]
    assert objs[0]["ok"] and objs[2]["ok"]  # its batch mates were answered


def test_decode_never_raises_for_a_bad_input(tiny_bundle, tmp_path):
    engine = Engine(tiny_bundle, threads=1)
    item = engine.decode(str(tmp_path / "missing.png"))
    assert isinstance(item, Decoded) and item.image is None and type(item.error).__name__ == "ImageError"
    (obj,) = engine.finish([item])
    assert obj["ok"] is False and obj["error"]["code"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_prefetch_is_validated(tiny_bundle, bad):
    with pytest.raises(InvalidArgumentError):
        list(Engine(tiny_bundle, threads=1).decoded(["x"], prefetch=bad))
    with pytest.raises(InvalidArgumentError):
        list(Engine(tiny_bundle, threads=1).run(["x"], prefetch=bad))


def test_decode_workers_one_per_free_core_at_most(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert decode_workers(1) == 1 and decode_workers(2) == 2 and decode_workers(8) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert decode_workers(2) == 2 and decode_workers(64) == 16
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert decode_workers(3) == 2
    # the cores the model's threads take are not offered to decoders, but one decoder always runs
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert decode_workers(2, model_threads=1) == 1 and decode_workers(2, model_threads=2) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert decode_workers(8, model_threads=2) == 6 and decode_workers(3, model_threads=2) == 3


def test_pipelined_runs_give_the_model_one_thread_unless_told():
    from cxr_edge.engine import pipelined_model_threads

    assert pipelined_model_threads(None, 10, 2) == 1      # folder, decoders on the cores
    assert pipelined_model_threads(None, 1, 2) is None    # one image: all cores for the model
    assert pipelined_model_threads(None, 10, 0) is None   # one at a time
    assert pipelined_model_threads(2, 10, 2) == 2         # --threads wins


def test_cli_folder_run_uses_the_pipelined_thread_count(tmp_path, tiny_bundle_factory, monkeypatch):
    """The CLI builds its engine with one model thread for a prefetched folder, the default for one file."""
    import cxr_edge.engine as engine_mod
    from cxr_edge.cli import main

    bundle = tiny_bundle_factory()
    img = (np.random.default_rng(5).random((200, 200)) * 255).astype(np.uint8)
    for k in range(3):
        cv2.imwrite(str(tmp_path / f"i{k}.png"), img)
    seen = []
    real = engine_mod.Engine.__init__

    def spy(self, *a, threads=None, **kw):
        seen.append(threads)
        real(self, *a, threads=threads, **kw)

    monkeypatch.setattr(engine_mod.Engine, "__init__", spy)
    main(["predict", str(tmp_path), "--model", str(bundle), "--json", "--no-scope-gate"])
    main(["predict", str(tmp_path / "i0.png"), "--model", str(bundle), "--json", "--no-scope-gate"])
    main(["predict", str(tmp_path), "--model", str(bundle), "--json", "--threads", "2", "--no-scope-gate"])
    assert seen == [1, None, 2]


def test_folder_run_with_large_jpegs_reduces_only_without_overlays(tmp_path, tiny_bundle_factory):
    """Overlays need the full-size pixels: with a cam dir the JPEG is decoded at full size."""
    bundle = tiny_bundle_factory()  # 64 px input: a 1024 px JPEG is >= 4 x 64 at 1/4
    img = cv2.resize((np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8), (1024, 1024))
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(".jpg", img))
    engine = Engine(bundle, threads=1)
    (plain,) = engine.run([str(path)], prefetch=1)
    assert plain["image"]["width"] == 1024 and plain["image"]["decode_scale"] == 4
    (tmp_path / "cams").mkdir()
    (cams,) = engine.run([str(path)], prefetch=1, cam_dir=str(tmp_path / "cams"), cam_how="all")
    assert cams["ok"] and "decode_scale" not in cams["image"]


def test_workers_writing_overlays_for_the_same_file_twice_leave_one_whole_overlay(tmp_path, tiny_bundle_factory,
                                                                                monkeypatch):
    """Two workers may write the overlay of one input named twice at the same moment: each writes a temporary
    file and renames it, so the folder ends with that overlay once, whole, and no temporary files."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    bundle = tiny_bundle_factory()
    img = (np.random.default_rng(11).random((200, 200)) * 255).astype(np.uint8)
    path = tmp_path / "same.png"
    path.write_bytes(encode(".png", img))
    cams = tmp_path / "cams"
    cams.mkdir()
    engine = Engine(bundle, threads=1)
    objs = list(engine.run([str(path)] * 6, prefetch=3, cam_dir=str(cams), cam_how="all"))
    assert all(o["ok"] for o in objs) and len({tuple(sorted(o["cam"].items())) for o in objs}) == 1
    written = sorted(p.name for p in cams.iterdir())
    assert written == sorted(Path(p).name for p in objs[0]["cam"].values())  # no .cxr-edge-*.tmp left
    for p in objs[0]["cam"].values():
        assert cv2.imread(p) is not None
