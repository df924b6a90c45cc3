"""``python -m export.sign``: ed25519 keys for device makers, and signing a built bundle.

    python -m export.sign keygen --out-dir keys/            # keys/cxr-edge.private.pem (0600) + .public.pem
    python -m export.sign model.onnx --key keys/cxr-edge.private.pem [--out model.signed.onnx]

The signature covers the bundle's ``bundle_sha256`` (graph, weights and manifest as stored) and is
stored in the ONNX metadata under ``cxr_edge.signature`` with the public key's fingerprint
(:mod:`cxr_edge.signature`). Devices verify it with ``cxr-edge ... --public-key cxr-edge.public.pem``
(or ``CXR_EDGE_PUBLIC_KEY``) and ``--require-signature``. Keep the private key off the devices.
Needs ``cryptography`` (``pip install cxr-edge[sign]``); no torch.

Exit codes: 0 done; 2 bad arguments; 4 the bundle or key was refused (damaged bundle, wrong key
type); 5 a file could not be written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from cxr_edge.bundle import sign_bundle, verify_bundle_bytes
from cxr_edge.cam import write_bytes_atomic
from cxr_edge.errors import BundleError, CxrEdgeError, OutputError
from cxr_edge.signature import (BundleSignatureError, SignatureStatus, crypto_modules, load_private_key,
                                public_key_fingerprint, public_key_pem)

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_OUTPUT = 0, 2, 4, 5
DEFAULT_NAME = "cxr-edge"


def keygen(out_dir: str | os.PathLike, name: str = DEFAULT_NAME, force: bool = False) -> tuple[Path, Path, str]:
    """Write ``<name>.private.pem`` (PKCS#8, unencrypted, mode 0600) and ``<name>.public.pem`` in ``out_dir``.

    Returns (private path, public path, fingerprint). Existing files are not overwritten unless
    ``force``: replacing a signing key silently would orphan every device that trusts the old one.
    """
    ed25519, serialization = crypto_modules()
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out-dir {str(folder)!r} ({exc.strerror or type(exc).__name__})") from None
    private_path, public_path = folder / f"{name}.private.pem", folder / f"{name}.public.pem"
    if not force and (private_path.exists() or public_path.exists()):
        raise OutputError(f"{private_path} or {public_path} exists; pass --force to replace the key pair")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    try:
        if force and private_path.exists():
            private_path.unlink()
        # created 0600 from the start (never briefly world-readable); fchmod: the umask cannot widen it
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(private_pem)
    except OSError as exc:
        raise OutputError(f"cannot write {private_path} ({exc.strerror or type(exc).__name__})") from None
    write_bytes_atomic(public_path, public_key_pem(key), "public key")
    return private_path, public_path, public_key_fingerprint(key.public_key())


def sign_bundle_file(path: str | os.PathLike, key_path: str | os.PathLike,
                     out: str | os.PathLike | None = None) -> SignatureStatus:
    """Sign the bundle at ``path`` with the ed25519 private key at ``key_path``; write it to ``out``
    (default: ``path`` itself, replaced atomically). The bundle is verified before signing (a damaged
    one is refused) and the written file is verified against the key's public half.
    Returns the signature status of the written bundle."""
    key = load_private_key(key_path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {os.fspath(path)!r}: {exc.strerror or type(exc).__name__}") from None
    signed = sign_bundle(data, key)
    _, status = verify_bundle_bytes(signed, public_key_pem(key), require_signature=True)
    write_bytes_atomic(out if out is not None else path, signed, "signed bundle")
    return status


def build_parser(keygen_mode: bool) -> argparse.ArgumentParser:
    if keygen_mode:
        p = argparse.ArgumentParser(prog="python -m export.sign keygen",
                                    description="write a new ed25519 signing key pair")
        p.add_argument("--out-dir", required=True, help="folder for <name>.private.pem (0600) and <name>.public.pem")
        p.add_argument("--name", default=DEFAULT_NAME, help=f"file name stem (default {DEFAULT_NAME})")
        p.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
        return p
    p = argparse.ArgumentParser(prog="python -m export.sign", description=__doc__.split("\n")[0],
                                epilog="python -m export.sign keygen --help: make a key pair",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="the bundle (.onnx) to sign")
    p.add_argument("--key", required=True, help="ed25519 private key PEM (python -m export.sign keygen)")
    p.add_argument("--out", default=None, help="write the signed bundle here (default: sign BUNDLE in place)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keygen_mode = bool(argv) and argv[0] == "keygen"
    parser = build_parser(keygen_mode)
    try:
        args = parser.parse_args(argv[1:] if keygen_mode else argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        if keygen_mode:
            private_path, public_path, fp = keygen(args.out_dir, args.name, args.force)
            print(f"wrote {private_path} (private: keep it off devices, mode 0600) and {public_path}\n"
                  f"key fingerprint {fp}")
        else:
            status = sign_bundle_file(args.bundle, args.key, args.out)
            print(f"signed {args.out or args.bundle} (ed25519, key fingerprint {status.key_fingerprint}); "
                  f"verify on a device with: cxr-edge info --model BUNDLE --public-key PUBLIC.pem --require-signature")
    except OutputError as exc:
        print(f"export.sign: error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except (BundleError, BundleSignatureError) as exc:
        print(f"export.sign: error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except CxrEdgeError as exc:
        print(f"export.sign: error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
