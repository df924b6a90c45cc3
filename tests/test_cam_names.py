"""Overlay (CAM) file names: one file per (source, label), never two sources in one file.

``a/chest.png`` and ``b/chest.png`` share the stem ``chest``; without the path hash in the name the second
overlay would silently replace the first (the bug these tests name).
"""
from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np

from cxr_edge.cli import EXIT_OK, main
from cxr_edge.engine import cam_file_name

NAME = re.compile(r"^(?P<stem>[A-Za-z0-9_-]+)-(?P<hash>[0-9a-f]{8})_(?P<label>[A-Za-z0-9_-]+)\.png$")


def test_same_stem_in_two_folders_gives_two_names(tmp_path):
    a, b = tmp_path / "a" / "chest.png", tmp_path / "b" / "chest.png"
    na, nb = cam_file_name(a, "Effusion"), cam_file_name(b, "Effusion")
    assert na != nb
    for name in (na, nb):
        m = NAME.match(name)
        assert m and m["stem"] == "chest" and m["label"] == "Effusion"
    assert NAME.match(na)["hash"] != NAME.match(nb)["hash"]


def test_name_is_stable_for_the_same_source(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "chest.png"
    first = cam_file_name(path, "Effusion")
    assert cam_file_name(path, "Effusion") == first  # same call, same name (no time or counter in it)
    assert cam_file_name(str(path), "Effusion") == first == cam_file_name(os.fsencode(path), "Effusion")
    monkeypatch.chdir(tmp_path)
    assert cam_file_name(os.path.join("sub", "chest.png"), "Effusion") == first  # relative = absolute
    assert cam_file_name(path, "Nodule") != first and NAME.match(cam_file_name(path, "Nodule"))["label"] == "Nodule"


def test_names_are_safe_for_odd_stems_and_labels(tmp_path):
    name = cam_file_name(tmp_path / "x y;rm -rf.png", "Pleural Thickening/../x")
    assert NAME.match(name) and "/" not in name and " " not in name


def test_cli_writes_one_overlay_per_source_for_equal_stems(tiny_bundle, tmp_path, capsys):
    paths = []
    for i, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        rng = np.random.default_rng(i)
        paths.append(tmp_path / folder / "chest.png")
        cv2.imwrite(str(paths[-1]), cv2.GaussianBlur((rng.random((200, 200)) * 255).astype(np.uint8), (0, 0), 3))
    cams = tmp_path / "cams"
    code = main(["predict", *map(str, paths), "--json", "--model", str(tiny_bundle), "--cam-dir", str(cams),
                 "--cam-label", "label_0", "--threads", "1"])
    assert code == EXIT_OK
    written = [json.loads(line)["cam"]["label_0"] for line in capsys.readouterr().out.splitlines()]
    assert len(set(written)) == 2 and len(list(cams.iterdir())) == 2
    assert cv2.imread(written[0]).tobytes() != cv2.imread(written[1]).tobytes()  # each source's own overlay
