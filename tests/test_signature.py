"""Bundle signatures (ed25519): export signs the digest, the runtime verifies against a given public key,
``require_signature`` refuses unsigned or foreign bundles, and a missing ``cryptography`` is a typed error."""
from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import stat
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("cryptography", reason="the [sign] extra (cryptography) is not installed")

from conftest import build_tiny_onnx, make_manifest  # noqa: E402
from cxr_edge.bundle import (METADATA_PROPS_FIELD, _len_field, embed_manifest, load_bundle, read_manifest,  # noqa: E402
                             sign_bundle, split_model, write_bundle)
from cxr_edge.classifier import Classifier  # noqa: E402
from cxr_edge.cli import main  # noqa: E402
from cxr_edge.errors import BundleError, ChecksumMismatchError, InvalidArgumentError, ManifestError  # noqa: E402
from cxr_edge.signature import (PUBLIC_KEY_ENV, SIGNATURE_KEY, BundleSignatureError,  # noqa: E402
                                SignatureSupportMissingError, load_private_key)
from export.sign import keygen, main as sign_main, sign_bundle_file  # noqa: E402


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: ``maker`` (signs) and ``other`` (a foreign key)."""
    out = {}
    for name in ("maker", "other"):
        private, public, fp = keygen(tmp_path / "keys", name)
        out[name] = {"private": private, "public": public, "fp": fp}
    return out


@pytest.fixture
def bundles(tmp_path, keys):
    """An unsigned tiny bundle and the same bundle signed by ``maker``."""
    model, w, b = build_tiny_onnx()
    unsigned = tmp_path / "unsigned.onnx"
    write_bundle(model, make_manifest(w, b), unsigned)
    signed = tmp_path / "signed.onnx"
    sign_bundle_file(unsigned, keys["maker"]["private"], signed)
    return {"unsigned": unsigned, "signed": signed}


def _with_metadata(data: bytes, extra: list[tuple[str, str]]) -> bytes:
    out = bytearray(data)
    for k, v in extra:
        out += _len_field(METADATA_PROPS_FIELD, _len_field(1, k.encode()) + _len_field(2, v.encode()))
    return bytes(out)


def _replace_entry(data: bytes, key: str, value: str) -> bytes:
    body, meta = split_model(data)
    meta[key] = value
    return _with_metadata(body, list(meta.items()))


# --------------------------------------------------------------------------- library

def test_keygen_writes_a_private_key_only_its_owner_can_read(keys, tmp_path):
    private = keys["maker"]["private"]
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in keys["maker"]["public"].read_bytes()
    assert keys["maker"]["fp"] != keys["other"]["fp"]
    with pytest.raises(Exception, match="exists"):  # never silently replaces a key devices trust
        keygen(tmp_path / "keys", "maker")


def test_sign_verify_round_trip(bundles, keys):
    signed = bundles["signed"].read_bytes()
    # the signature entry is outside the digest: graph, weights and manifest are untouched
    unsigned = bundles["unsigned"].read_bytes()
    assert read_manifest(signed).to_json() == read_manifest(unsigned).to_json()
    assert split_model(signed)[0] == split_model(unsigned)[0]
    clf = Classifier(bundles["signed"], threads=1, public_key=keys["maker"]["public"], require_signature=True)
    assert clf.signature.signed and clf.signature.verified and clf.signature.key_fingerprint == keys["maker"]["fp"]
    # PEM bytes work as well as a path
    clf = Classifier(bundles["signed"], threads=1, public_key=keys["maker"]["public"].read_bytes())
    assert clf.signature.verified
    # no key: loads, says who signed, but not verified
    clf = Classifier(bundles["signed"], threads=1)
    assert clf.signature.signed and not clf.signature.verified and clf.signature.key_fingerprint == keys["maker"]["fp"]
    assert not Classifier(bundles["unsigned"], threads=1).signature.signed


def test_manifest_tampered_after_signing_is_refused(bundles, keys):
    data = bundles["signed"].read_bytes()
    body, meta = split_model(data)
    manifest = read_manifest(data)
    # an attacker who rewrites the thresholds AND recomputes every digest (they are not secret) ...
    forged = embed_manifest(data, dataclasses.replace(manifest, thresholds=(1e-4,) * len(manifest.labels)))
    assert read_manifest(forged).thresholds[0] == pytest.approx(1e-4)  # ... passes the checksum ...
    forged = _with_metadata(forged, [(SIGNATURE_KEY, meta[SIGNATURE_KEY])])  # ... and keeps the old signature
    path = bundles["signed"].with_name("forged.onnx")
    path.write_bytes(forged)
    with pytest.raises(BundleSignatureError, match="does not verify"):
        load_bundle(path, threads=1, public_key=keys["maker"]["public"])
    # an edit that does not recompute the digest is refused earlier, by the checksum
    lazy = _replace_entry(data, "cxr_edge.manifest", meta["cxr_edge.manifest"].replace('"notice": "', '"notice": "X'))
    path.write_bytes(lazy)
    with pytest.raises(ChecksumMismatchError):
        load_bundle(path, threads=1, public_key=keys["maker"]["public"])


def test_foreign_key_is_refused(bundles, keys):
    with pytest.raises(BundleSignatureError, match="another key"):
        Classifier(bundles["signed"], threads=1, public_key=keys["other"]["public"])
    # a bundle re-signed by another key is refused by a device that trusts the maker
    resigned = bundles["signed"].with_name("resigned.onnx")
    sign_bundle_file(bundles["signed"], keys["other"]["private"], resigned)
    with pytest.raises(BundleSignatureError, match="another key"):
        Classifier(resigned, threads=1, public_key=keys["maker"]["public"], require_signature=True)


def test_unsigned_with_require_is_refused(bundles, keys):
    with pytest.raises(BundleSignatureError, match="unsigned"):
        Classifier(bundles["unsigned"], threads=1, public_key=keys["maker"]["public"], require_signature=True)
    with pytest.raises(InvalidArgumentError, match="public key"):
        Classifier(bundles["signed"], threads=1, require_signature=True)
    # given a key but not required: an unsigned bundle loads, and says it is unsigned
    assert not Classifier(bundles["unsigned"], threads=1, public_key=keys["maker"]["public"]).signature.signed


def test_duplicate_and_malformed_signature_entries_are_refused(bundles, keys, tmp_path):
    data = bundles["signed"].read_bytes()
    _, meta = split_model(data)
    path = tmp_path / "dup.onnx"
    path.write_bytes(_with_metadata(data, [(SIGNATURE_KEY, meta[SIGNATURE_KEY])]))
    for key in (None, keys["maker"]["public"]):  # refused whether or not a key is given
        with pytest.raises(BundleError, match="two metadata entries"):
            load_bundle(path, threads=1, public_key=key)
    entry = json.loads(meta[SIGNATURE_KEY])
    for bad in ({**entry, "signature": entry["signature"][:-8]}, {**entry, "algorithm": "rsa"},
                {**entry, "extra": 1}, {k: v for k, v in entry.items() if k != "key_fingerprint"}):
        path.write_bytes(_replace_entry(data, SIGNATURE_KEY, json.dumps(bad)))
        with pytest.raises(BundleSignatureError):
            load_bundle(path, threads=1)
    # a flipped signature bit
    raw = bytearray(base64.b64decode(entry["signature"]))
    raw[5] ^= 1
    path.write_bytes(_replace_entry(data, SIGNATURE_KEY, json.dumps({**entry, "signature": base64.b64encode(bytes(raw)).decode()})))
    with pytest.raises(BundleSignatureError, match="does not verify"):
        load_bundle(path, threads=1, public_key=keys["maker"]["public"])


def test_unknown_cxr_edge_metadata_is_refused_foreign_metadata_ignored(bundles, tmp_path):
    data = bundles["signed"].read_bytes()
    path = tmp_path / "meta.onnx"
    path.write_bytes(_with_metadata(data, [("cxr_edge.revocation", "{}")]))
    with pytest.raises(ManifestError, match="does not know"):
        load_bundle(path, threads=1)
    path.write_bytes(_with_metadata(data, [("producer.note", "hello")]))
    assert load_bundle(path, threads=1).signature.signed


def test_a_new_manifest_drops_the_old_signature(bundles, keys):
    data = bundles["signed"].read_bytes()
    rewritten = embed_manifest(data, read_manifest(data))
    assert SIGNATURE_KEY not in split_model(rewritten)[1]
    resigned = sign_bundle(rewritten, load_private_key(keys["maker"]["private"]))
    assert split_model(resigned)[1][SIGNATURE_KEY] == split_model(data)[1][SIGNATURE_KEY]  # ed25519 is deterministic


def test_missing_cryptography_is_a_typed_error(bundles, keys, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(SignatureSupportMissingError, match=r"pip install cxr-edge\[sign\]"):
        Classifier(bundles["signed"], threads=1, public_key=keys["maker"]["public"])
    with pytest.raises(SignatureSupportMissingError):
        load_private_key(keys["maker"]["private"])
    # without a key nothing needs the package: the signer is still reported
    assert Classifier(bundles["signed"], threads=1).signature.key_fingerprint == keys["maker"]["fp"]
    code = main(["info", "--model", str(bundles["signed"]), "--public-key", str(keys["maker"]["public"]), "--json"])
    err = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert code == 4 and err["error"]["code"] == "signature_support_missing" and "cxr-edge[sign]" in err["error"]["message"]
    assert sign_main([str(bundles["unsigned"]), "--key", str(keys["maker"]["private"])]) == 4


# --------------------------------------------------------------------------- command lines

def test_cli_exit_codes(bundles, keys, capsys, monkeypatch):
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    signed, unsigned = str(bundles["signed"]), str(bundles["unsigned"])
    maker, other = str(keys["maker"]["public"]), str(keys["other"]["public"])
    assert main(["info", "--model", signed]) == 0
    assert f"key fingerprint {keys['maker']['fp']} (not verified" in capsys.readouterr().out
    assert main(["info", "--model", signed, "--public-key", maker, "--require-signature", "--json"]) == 0
    sig = json.loads(capsys.readouterr().out)["signature"]
    assert sig == {"signed": True, "algorithm": "ed25519", "key_fingerprint": keys["maker"]["fp"], "verified": True}
    assert main(["info", "--model", signed, "--public-key", other]) == 4
    assert "another key" in capsys.readouterr().err
    assert main(["info", "--model", unsigned, "--public-key", maker, "--require-signature"]) == 4
    assert main(["info", "--model", unsigned, "--require-signature"]) == 2  # a key is needed
    assert main(["info", "--model", unsigned, "--public-key", maker]) == 0
    assert "unsigned" in capsys.readouterr().err  # the key checked nothing: said so
    assert main(["info", "--model", signed, "--public-key", str(bundles["unsigned"])]) == 4  # not a key
    monkeypatch.setenv(PUBLIC_KEY_ENV, other)  # the environment is read when no flag is given ...
    assert main(["info", "--model", signed]) == 4
    assert main(["info", "--model", signed, "--public-key", maker]) == 0  # ... and the flag wins
    monkeypatch.delenv(PUBLIC_KEY_ENV)
    capsys.readouterr()

    img = bundles["signed"].with_name("img.png")
    cv2.imwrite(str(img), cv2.GaussianBlur((np.random.default_rng(0).random((160, 160)) * 255).astype(np.uint8),
                                           (0, 0), 3))
    assert main(["predict", str(img), "--model", signed, "--public-key", maker, "--require-signature", "--json"]) == 0
    assert main(["predict", str(img), "--model", signed, "--public-key", other, "--json"]) == 4
    assert main(["predict", str(img), "--model", unsigned, "--public-key", maker, "--require-signature"]) == 4
    out = bundles["signed"].with_name("x.png")
    assert main(["explain", str(img), "--label", "label_0", "--out", str(out), "--model", signed,
                 "--public-key", other]) == 4
    assert main(["explain", str(img), "--label", "label_0", "--out", str(out), "--model", signed,
                 "--public-key", maker, "--require-signature"]) == 0
    assert main(["serve", "--stdio", "--model", unsigned, "--public-key", maker, "--require-signature"]) == 4


def test_export_sign_cli(bundles, keys, tmp_path, capsys):
    target = tmp_path / "inplace.onnx"
    target.write_bytes(bundles["unsigned"].read_bytes())
    assert sign_main([str(target), "--key", str(keys["maker"]["private"])]) == 0  # in place
    assert keys["maker"]["fp"] in capsys.readouterr().out
    assert load_bundle(target, threads=1, public_key=keys["maker"]["public"], require_signature=True).signature.verified
    damaged = tmp_path / "damaged.onnx"
    data = bytearray(bundles["unsigned"].read_bytes())
    data[200] ^= 0xFF  # inside the graph: the checksum no longer matches
    damaged.write_bytes(bytes(data))
    assert sign_main([str(damaged), "--key", str(keys["maker"]["private"])]) == 4  # a damaged bundle is never signed
    assert sign_main([str(target), "--key", str(keys["maker"]["public"])]) == 4  # a public key cannot sign
    assert sign_main(["keygen", "--out-dir", str(tmp_path / "keys"), "--name", "maker"]) == 5  # exists
    assert sign_main([str(target)]) == 2  # --key is required


def test_calibrate_drops_the_old_signature_or_signs_with_sign_key(bundles, keys, tmp_path, capsys):
    folder = tmp_path / "site"
    folder.mkdir()
    rows = []
    for i in range(16):
        img = cv2.GaussianBlur((np.random.default_rng(i).random((160, 160)) * 255).astype(np.uint8), (0, 0), 2 + i % 4)
        cv2.imwrite(str(folder / f"im{i:02d}.png"), img)
        rows.append({"image": f"im{i:02d}.png", "label_0": i % 2})
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label_0"])
        writer.writeheader()
        writer.writerows(rows)
    base = ["calibrate", str(folder), "--labels", str(labels), "--model", str(bundles["signed"]), "--n-boot", "100",
            "--min-positive-patients", "1", "--threads", "1", "--json", "--public-key", str(keys["maker"]["public"])]
    out = tmp_path / "recal.onnx"
    assert main([*base, "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    report = json.loads(stdout)
    assert report["source_signature_dropped"] is True and report["signature"]["signed"] is False
    assert "was dropped" in stderr and "export.sign" in stderr
    assert not load_bundle(out, threads=1).signature.signed
    signed_out = tmp_path / "recal_signed.onnx"
    assert main([*base, "--out", str(signed_out), "--sign-key", str(keys["maker"]["private"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signature"] == {"signed": True, "algorithm": "ed25519", "key_fingerprint": keys["maker"]["fp"],
                                   "verified": True}
    new = load_bundle(signed_out, threads=1, public_key=keys["maker"]["public"], require_signature=True)
    assert "recalibration" in new.manifest.provenance and new.signature.verified  # the new manifest is what is signed


def test_a_bad_key_is_refused_even_for_an_unsigned_bundle(bundles, tmp_path):
    with pytest.raises(BundleSignatureError, match="not a readable file"):
        Classifier(bundles["unsigned"], threads=1, public_key=tmp_path / "missing.pem")
    with pytest.raises(BundleSignatureError, match="not a PEM public key"):
        Classifier(bundles["unsigned"], threads=1, public_key=b"-----BEGIN PUBLIC KEY-----\nnope\n")
