import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import need_shared
from cxr_edge.cli import EXIT_INPUT_FAILED, EXIT_MODEL, EXIT_OK, EXIT_USAGE, iter_inputs, main


def _png(path, seed=0, size=200):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((size, size)) * 255).astype(np.uint8), (0, 0), 3)
    cv2.imwrite(str(path), img)
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_one_object_per_input(tiny_bundle, tmp_path, capsys):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", seed=1)
    code, out, err = _run(capsys, "predict", str(a), str(b), "--json", "--model", str(tiny_bundle), "--threads", "1")
    assert code == EXIT_OK
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["source"] for o in objs] == [str(a), str(b)]
    assert all(o["ok"] and set(o["probabilities"]) == {"label_0", "label_1", "label_2"} for o in objs)
    assert objs[0]["model"]["sha256"] and "not a medical device" in objs[0]["model"]["notice"]


def test_folder_is_walked_and_failures_reported_with_exit_3(tiny_bundle, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "notes.txt").write_text("ignored in folders")
    code, out, err = _run(capsys, "predict", str(tmp_path), "--json", "--model", str(tiny_bundle))
    assert code == EXIT_INPUT_FAILED
    assert len(out.splitlines()) == 1 and json.loads(out)["source"].endswith("good.png")
    error = json.loads(err.strip().splitlines()[-1])
    assert error["ok"] is False and error["source"].endswith("bad.png") and error["error"]["type"] == "CorruptImageError"


def test_missing_file_counts_as_failed_input(tiny_bundle, tmp_path, capsys):
    good = _png(tmp_path / "g.png")
    code, out, err = _run(capsys, "predict", str(tmp_path / "missing.png"), str(good), "--json", "--model", str(tiny_bundle))
    assert code == EXIT_INPUT_FAILED and len(out.splitlines()) == 1


def test_model_load_failure_is_exit_4(tmp_path, capsys):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"nope")
    code, out, err = _run(capsys, "predict", str(_png(tmp_path / "x.png")), "--json", "--model", str(bad))
    assert code == EXIT_MODEL and json.loads(err)["error"]["type"] == "BundleError"


def test_usage_errors_are_exit_2(tiny_bundle, capsys):
    assert _run(capsys, "predict")[0] == EXIT_USAGE
    assert _run(capsys, "frobnicate")[0] == EXIT_USAGE
    assert _run(capsys, "predict", "x.png", "--threads", "0")[0] == EXIT_USAGE
    assert _run(capsys, "explain", "x.png", "--label", "nope", "--out", "o.png", "--model", str(tiny_bundle))[0] == EXIT_USAGE


def test_cam_dir_writes_overlays(tiny_bundle, tmp_path, capsys):
    img = _png(tmp_path / "img.png", size=256)
    cams = tmp_path / "cams"
    code, out, _ = _run(capsys, "predict", str(img), "--json", "--model", str(tiny_bundle), "--cam-dir", str(cams),
                        "--cam-label", "all")
    assert code == EXIT_OK
    written = json.loads(out)["cam"]
    assert set(written) == {"label_0", "label_1", "label_2"}
    for path in written.values():
        assert cv2.imread(path).shape == (256, 256, 3)


def test_explain_and_info(tiny_bundle, tmp_path, capsys):
    img = _png(tmp_path / "img.png")
    out_png = tmp_path / "ov.png"
    code, out, _ = _run(capsys, "explain", str(img), "--label", "label_2", "--out", str(out_png), "--model", str(tiny_bundle))
    assert code == EXIT_OK and out_png.exists() and "label_2" in out
    code, out, _ = _run(capsys, "info", "--model", str(tiny_bundle), "--json")
    info = json.loads(out)
    assert code == EXIT_OK and info["labels"] == ["label_0", "label_1", "label_2"] and len(info["model_sha256"]) == 64
    code, out, _ = _run(capsys, "info", "--model", str(tiny_bundle))
    assert "sha256" in out and "label_1" in out


def test_human_output_lists_probabilities(tiny_bundle, tmp_path, capsys):
    code, out, err = _run(capsys, "predict", str(_png(tmp_path / "h.png")), "--model", str(tiny_bundle))
    assert code == EXIT_OK and "label_0" in out and "threshold" in out and "1 of 1" in err


def test_iter_inputs_takes_suffixless_files_in_folders(tmp_path):
    (tmp_path / "IM0001").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "a.DCM").write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")
    names = sorted(p.rsplit("/", 1)[-1] for p in iter_inputs([str(tmp_path)]))
    assert names == ["IM0001", "a.DCM"]


def test_no_patient_data_in_dicom_outputs(tiny_bundle, tmp_path, capsys):
    src = need_shared("data", "dicom", "test1.dcm")
    import pydicom

    ds = pydicom.dcmread(src)
    secret = "Doe^Sentinel"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = secret, "PID-SENTINEL-123", "19010101"
    ds.InstitutionName = "SENTINEL HOSPITAL"
    path = tmp_path / "phi.dcm"
    ds.save_as(path)
    cams = tmp_path / "cams"
    code, out, err = _run(capsys, "predict", str(path), "--json", "--model", str(tiny_bundle), "--cam-dir", str(cams),
                          "--cam-label", "all")
    assert code == EXIT_OK
    ds.Modality = "CT"
    ds.save_as(tmp_path / "phi_ct.dcm")
    code2, out2, err2 = _run(capsys, "predict", str(tmp_path / "phi_ct.dcm"), "--json", "--model", str(tiny_bundle))
    assert code2 == EXIT_INPUT_FAILED
    blob = out + err + out2 + err2
    for png in cams.iterdir():
        blob += png.read_bytes().decode("latin-1")
    for needle in (secret, "Sentinel", "PID-SENTINEL", "19010101", "SENTINEL HOSPITAL"):
        assert needle not in blob


def test_console_script_runs_as_a_subprocess(tiny_bundle, tmp_path):
    img = _png(tmp_path / "s.png")
    proc = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", str(img), "--json", "--model", str(tiny_bundle)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
