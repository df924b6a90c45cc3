import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import need_shared
from cxr_edge.cli import EXIT_INPUT_FAILED, EXIT_MODEL, EXIT_OK, EXIT_USAGE, main
from cxr_edge.cli_support import iter_inputs


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
    records = [json.loads(line) for line in err.strip().splitlines()]  # every stderr line is a JSON object
    (error,) = [r for r in records if r.get("error")]
    assert error["ok"] is False and error["source"].endswith("bad.png") and error["error"]["type"] == "CorruptImageError"
    skipped = sorted(r["source"].rsplit("/", 1)[-1] for r in records if r.get("skipped") is True)
    assert skipped == ["notes.txt", "tiny.onnx"]  # not attempted, but accounted for
    summary = records[-1]
    assert summary["summary"] is True and (summary["attempted"], summary["classified"], summary["failed"],
                                           summary["skipped"]) == (2, 1, 1, 2)


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
    obj = json.loads(out)
    written = obj["cam"]
    assert set(written) == {"label_0", "label_1", "label_2"} and set(obj["cam_empty"]) == set(written)
    for path in written.values():  # the image's own 256 x 256 grid on top, the legend panel below
        h, w = cv2.imread(path).shape[:2]
        assert h > 256 and w == 640


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


# --------------------------------------------------------------------------- contract (schema 1) and misuse

def test_json_output_carries_schema_version_margins_and_bit_depth(tiny_bundle_factory, tmp_path, capsys):
    bundle = tiny_bundle_factory(thresholds=(0.5, None, 0.2))
    code, out, _ = _run(capsys, "predict", str(_png(tmp_path / "a.png")), "--json", "--model", str(bundle))
    assert code == EXIT_OK
    obj = json.loads(out)
    assert obj["schema_version"] == 2
    for name, p in obj["probabilities"].items():
        t = obj["thresholds"][name]
        assert obj["margins"][name] is None if t is None else abs(obj["margins"][name] - (p - t)) < 2e-6
    assert obj["decisions"]["label_1"] == "undetermined" and obj["undetermined"] == ["label_1"]
    probs = [obj["probabilities"][n] for n in obj["positive"]]
    assert probs == sorted(probs, reverse=True)
    assert obj["image"]["bit_depth"] == 8 and obj["image"]["bit_depth_source"] == "container"
    assert obj["override_used"] is False and obj["out_of_scope"] is False
    assert obj["in_scope"] is None and obj["scope"] is None  # tiny bundles have no scope block


def test_hidden_files_and_folders_are_accounted_for(tiny_bundle, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / ".git").mkdir(parents=True)
    (imgs / ".git" / "x.png").write_bytes(b"x")
    _png(imgs / "a.png")
    (imgs / ".DS_Store").write_bytes(b"x")
    (imgs / "scan.TIF").write_bytes(b"II*\x00 not really")  # a TIFF suffix is attempted (and fails here)
    code, out, err = _run(capsys, "predict", str(imgs), "--model", str(tiny_bundle))
    assert code == EXIT_INPUT_FAILED
    assert ".DS_Store: skipped (hidden file)" in err and ".git: skipped (hidden folder" in err
    assert "1 of 2 images classified; 1 failed; 2 skipped" in err


def test_cam_label_without_cam_dir_is_a_usage_error(tiny_bundle, tmp_path, capsys):
    img = str(_png(tmp_path / "a.png"))
    for how in ("all", "top", "label_0"):
        code, out, err = _run(capsys, "predict", img, "--model", str(tiny_bundle), "--cam-label", how)
        assert code == EXIT_USAGE and "--cam-label" in err and "--cam-dir" in err and not out


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_unusable_cam_dir_is_exit_5_without_traceback(tiny_bundle, tmp_path, capsys, monkeypatch, case):
    img = str(_png(tmp_path / "a.png"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    cam_dir = {"file": blocker, "under_file": blocker / "sub", "read_only": tmp_path / "ro"}[case]
    if case == "read_only":
        import tempfile

        (tmp_path / "ro").mkdir()

        def refuse(*a, **k):  # root ignores chmod, so a read-only folder is simulated at the syscall
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, out, err = _run(capsys, "predict", img, "--model", str(tiny_bundle), "--cam-dir", str(cam_dir), "--json")
    assert code == 5 and not out and "Traceback" not in err
    obj = json.loads(err.strip().splitlines()[-1])
    assert obj["error"]["type"] == "OutputError" and "--cam-dir" in obj["error"]["message"]


def test_explain_out_folder_is_created_and_a_missing_extension_refused(tiny_bundle, tmp_path, capsys):
    img = str(_png(tmp_path / "a.png"))
    out_png = tmp_path / "new" / "deeper" / "ov.png"
    code, out, _ = _run(capsys, "explain", img, "--label", "label_0", "--out", str(out_png), "--model", str(tiny_bundle))
    assert code == EXIT_OK and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = _run(capsys, "explain", img, "--label", "label_0", "--out", str(tmp_path / "noext"),
                          "--model", str(tiny_bundle))
    assert code == EXIT_USAGE and ".png" in err and not (tmp_path / "noext").exists()
    (tmp_path / "f").write_text("x")
    code, out, err = _run(capsys, "explain", img, "--label", "label_0", "--out", str(tmp_path / "f" / "o.png"),
                          "--model", str(tiny_bundle))
    assert code == 5 and "Traceback" not in err


def test_non_utf8_file_name_with_json_and_cam_dir(tiny_bundle, tmp_path):
    raw_dir = os.fsencode(str(tmp_path))
    name = raw_dir + b"/caf\xe9-\xff.png"
    data = cv2.imencode(".png", (np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8))[1].tobytes()
    with open(name, "wb") as fh:
        fh.write(data)
    cams = tmp_path / "cams"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", name, "--json", "--model", str(tiny_bundle),
                           "--cam-dir", str(cams), "--cam-label", "all"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout.decode("ascii"))  # strict JSON, ASCII, no lone surrogates
    assert obj["source"].endswith("caf\\xe9-\\xff.png")
    assert len(list(cams.iterdir())) == 3 and all(p.suffix == ".png" for p in cams.iterdir())
    human = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", name, "--model", str(tiny_bundle)],
                           capture_output=True, timeout=120)
    assert human.returncode == 0 and b"Traceback" not in human.stderr


def test_label_with_path_separator_and_label_spellings(tiny_bundle_factory, tmp_path, capsys):
    bundle = tiny_bundle_factory(labels=("Pleural_Thickening", "a/b", "..\\evil"))
    img = str(_png(tmp_path / "a.png"))
    cams = tmp_path / "cams"
    code, out, err = _run(capsys, "predict", img, "--json", "--model", str(bundle), "--cam-dir", str(cams),
                          "--cam-label", "all")
    assert code == EXIT_OK, err
    written = json.loads(out)["cam"]
    assert all(os.path.dirname(p) == str(cams) for p in written.values())  # no sub-folders, no escapes
    assert sorted(p.name for p in cams.iterdir()) == sorted(os.path.basename(p) for p in written.values())
    for spelling in ("pleural thickening", "PLEURAL-THICKENING", "pleural_thickening"):
        code, out, _ = _run(capsys, "explain", img, "--label", spelling, "--out", str(tmp_path / "o.png"),
                            "--model", str(bundle))
        assert code == EXIT_OK and out.startswith("Pleural_Thickening:")
    code, out, err = _run(capsys, "explain", img, "--label", "pleural thickenin", "--out", str(tmp_path / "o.png"),
                          "--model", str(bundle))
    assert code == EXIT_USAGE and "did you mean 'Pleural_Thickening'?" in err


def test_messages_name_cli_flags_and_out_of_scope_is_flagged(tiny_bundle, tmp_path, capsys):
    from tests.test_dicom import chest_pixels, write

    hand = write(tmp_path, chest_pixels(200, 200), "hand.dcm", body_part="HAND")
    chest = write(tmp_path, chest_pixels(200, 200), "chest.dcm")
    code, out, err = _run(capsys, "predict", str(hand), "--json", "--model", str(tiny_bundle))
    assert code == EXIT_INPUT_FAILED
    msg = json.loads(err.splitlines()[0])["error"]["message"]
    assert "--allow-any-body-part" in msg and "allow_any_body_part=True" not in msg
    code, out, err = _run(capsys, "predict", str(hand), str(chest), "--json", "--model", str(tiny_bundle),
                          "--allow-any-body-part")
    assert code == EXIT_OK
    a, b = [json.loads(line) for line in out.splitlines()]
    assert (a["override_used"], a["out_of_scope"]) == (True, True)
    assert (b["override_used"], b["out_of_scope"]) == (True, False)
    code, out, err = _run(capsys, "predict", str(hand), "--model", str(tiny_bundle), "--allow-any-body-part")
    assert "OUT OF SCOPE" in out


def test_keyboard_interrupt_is_exit_130_without_traceback(tiny_bundle, tmp_path, capsys, monkeypatch):
    from cxr_edge.engine import Engine

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(Engine, "run", interrupted)
    img = str(_png(tmp_path / "a.png"))
    code, out, err = _run(capsys, "predict", img, "--model", str(tiny_bundle))
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    code, out, err = _run(capsys, "predict", img, "--model", str(tiny_bundle), "--json")
    assert code == 130 and json.loads(err.strip().splitlines()[-1])["error"]["code"] == "interrupted"


def test_sigint_in_a_real_process_is_exit_130(tiny_bundle, tmp_path):
    import signal
    import time

    img = str(_png(tmp_path / "a.png"))
    # a shell that starts a job in the background (nohup, `&`, some CI runners) leaves SIGINT ignored and
    # Python then installs no KeyboardInterrupt handler: restore the terminal's default in the child
    child = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "from cxr_edge.classifier import Classifier\n"
             "def slow(self, *a, **k):\n    print('ready', file=sys.stderr, flush=True)\n    time.sleep(60)\n"
             "Classifier._results = slow\n"  # the inference stage, while the decode pool may be running
             "from cxr_edge.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", child, "predict", img, "--model", str(tiny_bundle)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, (proc.returncode, err[-2000:])


def test_broken_pipe_is_exit_141_without_traceback(tiny_bundle, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    data = cv2.imencode(".png", (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))[1].tobytes()
    for i in range(150):
        (folder / f"{i:04d}.png").write_bytes(data)
    proc = subprocess.Popen([sys.executable, "-m", "cxr_edge.cli", "predict", str(folder), "--model", str(tiny_bundle),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first and proc.returncode == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


def test_internal_errors_are_typed_and_exit_1(tiny_bundle, tmp_path, capsys, monkeypatch):
    from cxr_edge.engine import Engine

    def broken(self, *a, **k):
        raise RuntimeError("simulated bug")
        yield  # pragma: no cover

    monkeypatch.setattr(Engine, "run", broken)
    code, out, err = _run(capsys, "predict", str(_png(tmp_path / "a.png")), "--model", str(tiny_bundle), "--json")
    assert code == 1 and "Traceback" not in err
    assert json.loads(err.strip().splitlines()[-1])["error"]["type"] == "InternalError"


def test_info_card_prints_only_the_card(tiny_bundle, capsys, monkeypatch):
    import cxr_edge.cli as cli

    code, out, err = _run(capsys, "info", "--card", "--model", str(tiny_bundle))
    assert code == EXIT_INPUT_FAILED and out == "" and "no model card" in err
    monkeypatch.setattr(cli, "model_card_text", lambda model_id: "# Card of tiny\n\nbody\n")
    code, out, err = _run(capsys, "info", "--card", "--model", str(tiny_bundle))
    assert code == EXIT_OK and out == "# Card of tiny\n\nbody\n"
    code, out, _ = _run(capsys, "info", "--card", "--json", "--model", str(tiny_bundle))
    assert json.loads(out) == {"model_id": "tiny-test", "model_card": "# Card of tiny\n\nbody\n"}


def test_progress_bar_never_shares_a_line_with_results(tiny_bundle, tmp_path, monkeypatch):
    import io

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        _png(folder / f"img{i}.png", seed=i)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()  # stdout and stderr on one terminal
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["predict", str(folder), "--model", str(tiny_bundle)]) == EXIT_OK
    text = term.getvalue()
    assert "[" in text and "7/7" in text  # the bar was shown
    results = [line for line in text.split("\n") if str(folder) in line and ".png" in line]
    assert len(results) == 7  # one result line per image: the check below runs on every one
    for line in results:
        before = line[:line.index(str(folder))]
        assert before == "" or before.endswith("\r\x1b[K"), repr(line)


# --------------------------------------------------------------------------- input scope gate

def _scope_pngs(tmp_path):
    from conftest import sample_chest

    chest, blank = tmp_path / "chest.png", tmp_path / "blank.png"
    cv2.imwrite(str(chest), (sample_chest() * 255).astype(np.uint8))
    cv2.imwrite(str(blank), np.full((200, 200), 128, np.uint8))
    return chest, blank


def test_flagged_input_exits_6_with_no_decisions(scoped_bundle, tmp_path, capsys):
    from cxr_edge.cli import EXIT_OUT_OF_SCOPE

    assert EXIT_OUT_OF_SCOPE == 6
    chest, blank = _scope_pngs(tmp_path)
    code, out, err = _run(capsys, "predict", str(chest), "--json", "--model", str(scoped_bundle))
    assert code == EXIT_OK and json.loads(out)["in_scope"] is True
    code, out, err = _run(capsys, "predict", str(chest), str(blank), "--json", "--model", str(scoped_bundle))
    assert code == EXIT_OUT_OF_SCOPE
    a, b = [json.loads(line) for line in out.splitlines()]
    assert a["in_scope"] is True and all(v != "undetermined" for v in a["decisions"].values())
    assert b["in_scope"] is False and set(b["decisions"].values()) == {"undetermined"} and b["positive"] == []
    assert b["scope"]["reasons"] and b["scope"]["score"] > b["scope"]["threshold"]
    summary = json.loads(err.splitlines()[-1])
    assert summary["out_of_scope"] == 1 and summary["classified"] == 2 and summary["failed"] == 0
    code, out, err = _run(capsys, "predict", str(blank), "--model", str(scoped_bundle))  # human output
    assert code == EXIT_OUT_OF_SCOPE
    line = next(ln for ln in out.splitlines() if "OUT OF SCOPE" in ln)
    assert "near-constant" in line and "> threshold" in line and line.endswith(": no decisions")
    assert "undetermined (out of scope)" in out and "POSITIVE" not in out
    assert "1 out of scope (no decisions)" in err


def test_failures_take_precedence_over_out_of_scope(scoped_bundle, tmp_path, capsys):
    _, blank = _scope_pngs(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, _ = _run(capsys, "predict", str(blank), str(tmp_path / "bad.png"), "--json", "--model", str(scoped_bundle))
    assert code == EXIT_INPUT_FAILED


def test_refuse_mode_is_a_failed_input_with_a_json_error(scoped_bundle, tmp_path, capsys):
    chest, blank = _scope_pngs(tmp_path)
    code, out, err = _run(capsys, "predict", str(chest), str(blank), "--json", "--model", str(scoped_bundle),
                          "--out-of-scope", "refuse", "--batch-size", "2")
    assert code == EXIT_INPUT_FAILED
    assert [json.loads(line)["source"] for line in out.splitlines()] == [str(chest)]
    errors = [json.loads(line) for line in err.splitlines() if '"error"' in line]
    assert len(errors) == 1 and errors[0]["source"] == str(blank)
    assert errors[0]["error"]["type"] == "OutOfScopeError" and errors[0]["error"]["code"] == "out_of_scope"
    assert "near-constant" in errors[0]["error"]["message"]


def test_no_scope_gate_gives_decisions_again_with_a_warning(scoped_bundle, tmp_path, capsys):
    _, blank = _scope_pngs(tmp_path)
    code, out, err = _run(capsys, "predict", str(blank), "--json", "--model", str(scoped_bundle), "--no-scope-gate")
    assert code == EXIT_OK
    obj = json.loads(out)
    assert obj["in_scope"] is None and obj["scope"] is None and "undetermined" not in obj["decisions"].values()
    warnings = [json.loads(line) for line in err.splitlines() if '"warning"' in line]
    assert len(warnings) == 1 and warnings[0]["code"] == "scope_gate_off"
    code, _, err = _run(capsys, "predict", str(blank), "--model", str(scoped_bundle), "--no-scope-gate")
    assert code == EXIT_OK and err.count("warning: --no-scope-gate") == 1
    code, _, _ = _run(capsys, "predict", str(blank), "--model", str(scoped_bundle), "--no-scope-gate",
                      "--out-of-scope", "refuse")
    assert code == EXIT_USAGE
    code, _, _ = _run(capsys, "predict", str(blank), "--model", str(scoped_bundle), "--out-of-scope", "maybe")
    assert code == EXIT_USAGE


def test_bundle_without_scope_block_is_not_gated(tiny_bundle, tmp_path, capsys):
    _, blank = _scope_pngs(tmp_path)
    code, out, _ = _run(capsys, "predict", str(blank), "--json", "--model", str(tiny_bundle))
    assert code == EXIT_OK and json.loads(out)["in_scope"] is None


def test_info_prints_the_scope_gate_line(scoped_bundle, tiny_bundle, capsys):
    code, out, _ = _run(capsys, "info", "--model", str(scoped_bundle))
    line = next(ln for ln in out.splitlines() if ln.startswith("scope "))
    assert code == EXIT_OK and "pca-mahalanobis" in line and "k 3" in line and "threshold" in line
    assert "rule: split conformal" in out
    code, out, _ = _run(capsys, "info", "--model", str(tiny_bundle))
    assert next(ln for ln in out.splitlines() if ln.startswith("scope ")).split(None, 1)[1].startswith("none")


def test_explain_of_a_flagged_image(scoped_bundle, tmp_path, capsys):
    _, blank = _scope_pngs(tmp_path)
    code, out, _ = _run(capsys, "explain", str(blank), "--label", "label_0", "--out", str(tmp_path / "o.png"),
                        "--model", str(scoped_bundle))
    assert code == 6 and "OUT OF SCOPE" in out and "(undetermined)" in out and (tmp_path / "o.png").is_file()
