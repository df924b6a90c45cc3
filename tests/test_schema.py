"""Every JSON object the CLI prints validates against cxr_edge/schema/prediction.schema.json (schema_version 2)."""
from __future__ import annotations

import json
from importlib import resources

import cv2
import numpy as np
import pytest

from cxr_edge.cli import main

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((resources.files("cxr_edge") / "schema" / "prediction.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _kind(obj: dict) -> str:
    if obj.get("summary") is True:
        return "summary"
    if obj.get("skipped") is True:
        return "skipped"
    return "result" if obj["ok"] else "error"


def test_schema_ships_as_package_data():
    assert (resources.files("cxr_edge") / "schema" / "prediction.schema.json").is_file()


def test_every_output_of_a_folder_run_validates(validator, tiny_bundle_factory, tmp_path, capsys):
    from tests.test_classifier import make_tiff
    from tests.test_dicom import chest_pixels, write

    bundle = tiny_bundle_factory(thresholds=(0.5, None, 0.3))
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(d / "a.png"), (rng.random((200, 200)) * 255).astype(np.uint8))
    cv2.imwrite(str(d / "b16.png"), (rng.random((200, 200)) * 65535).astype(np.uint16))
    cv2.imwrite(str(d / "c.jpg"), (rng.random((200, 200)) * 255).astype(np.uint8))
    (d / "d.tif").write_bytes(make_tiff((rng.random((200, 200)) * 65535).astype(np.uint16)))
    write(d, chest_pixels(200, 200), "e.dcm")
    write(d, chest_pixels(200, 200), "hand.dcm", body_part="HAND")  # refused: DicomRefusedError with a field
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "notes.txt").write_text("skipped")
    (d / ".hidden").write_text("skipped")
    code = main(["predict", str(d), "--json", "--model", str(bundle), "--cam-dir", str(tmp_path / "cams"),
                 "--cam-label", "all"])
    out, err = capsys.readouterr()
    assert code == 3
    objs = _lines(out) + _lines(err)
    kinds = [_kind(o) for o in objs]
    assert kinds.count("result") == 5 and kinds.count("error") == 2 and kinds.count("skipped") == 2
    assert kinds.count("summary") == 1 and kinds[-1] == "summary"
    for obj in objs:
        validator.validate(obj)
    fields = {o["error"].get("field") for o in objs if _kind(o) == "error"}
    assert "BodyPartExamined" in fields
    formats = sorted(o["image"]["format"] for o in objs if _kind(o) == "result")
    assert formats == ["dicom", "jpeg", "png", "png", "tiff"]


def test_run_level_errors_and_explain_validate(validator, tiny_bundle, tmp_path, capsys):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), (np.random.default_rng(1).random((200, 200)) * 255).astype(np.uint8))
    bad_model = tmp_path / "m.onnx"
    bad_model.write_bytes(b"nope")
    (tmp_path / "blocker").write_text("x")
    runs = [
        (["predict", str(img), "--json", "--model", str(bad_model)], 4),
        (["predict", str(img), "--json", "--model", str(tiny_bundle), "--cam-dir", str(tmp_path / "cams"),
          "--cam-label", "nope"], 2),
        (["predict", str(img), "--json", "--model", str(tiny_bundle), "--cam-label", "all"], 2),
        (["predict", str(img), "--json", "--model", str(tiny_bundle), "--cam-dir", str(tmp_path / "blocker")], 5),
        (["predict", str(tmp_path / "empty_dir_missing.png"), "--json", "--model", str(tiny_bundle)], 3),
        (["explain", str(img), "--label", "label_1", "--out", str(tmp_path / "o.png"), "--json",
          "--model", str(tiny_bundle)], 0),
    ]
    for argv, expected in runs:
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == expected, (argv, err)
        objs = _lines(out) + _lines(err)
        assert objs, argv
        for obj in objs:
            validator.validate(obj)
    explain = _lines(out)[0]
    assert explain["label"] == "label_1" and set(explain["cam"]) == {"label_1"} and "label_1" in explain["cam_empty"]


def test_schema_rejects_drift(validator):
    """The schema is strict: an unknown top-level field or a missing one is a contract change."""
    ok = {"schema_version": 2, "source": "x", "ok": False, "skipped": True, "reason": "r"}
    validator.validate(ok)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**ok, "surprise": 1})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({k: v for k, v in ok.items() if k != "schema_version"})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**ok, "schema_version": 1})


@pytest.mark.parametrize("flags, expected", [([], 6), (["--out-of-scope", "refuse"], 3), (["--no-scope-gate"], 0)])
def test_scope_gate_outputs_validate(validator, scoped_bundle, tmp_path, capsys, flags, expected):
    from conftest import sample_chest

    chest, blank = tmp_path / "chest.png", tmp_path / "blank.png"
    cv2.imwrite(str(chest), (sample_chest() * 255).astype(np.uint8))
    cv2.imwrite(str(blank), np.full((200, 200), 128, np.uint8))
    code = main(["predict", str(chest), str(blank), "--json", "--model", str(scoped_bundle), *flags])
    out, err = capsys.readouterr()
    assert code == expected, err
    objs = _lines(out) + _lines(err)
    for obj in objs:
        validator.validate(obj)
    results = [o for o in objs if "probabilities" in o]
    assert {o["in_scope"] for o in results} == ({True, False} if not flags else {True} if expected == 3 else {None})
