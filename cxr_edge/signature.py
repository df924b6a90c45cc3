"""Ed25519 bundle signatures: a device maker signs a bundle's digest, the runtime checks it against a public key.

Why: ``bundle_sha256`` detects damage, not tampering; anyone who can write a bundle can also write a
matching digest. A signature over that digest by the maker's private key can only be made by the
key's holder. The signature lives in the ONNX metadata under :data:`SIGNATURE_KEY`, which the digest
does not cover (it cannot cover itself); the signed message is a fixed context string followed by the
``bundle_sha256`` hex digest, which covers the graph, the weights and the manifest as stored.

``cryptography`` (an optional extra: ``pip install cxr-edge[sign]``) is imported only when a key is
used; a runtime that never verifies needs no extra package, and reading who signed a bundle
(:func:`read_signature`) needs none either. This module depends on :mod:`cxr_edge.errors` only, so
:mod:`cxr_edge.bundle` can call it without an import cycle.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

from .errors import BundleError, InvalidArgumentError

if TYPE_CHECKING:  # the optional extra; imported for real only when a key is used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: ONNX ``metadata_props`` key of the signature entry (not covered by the bundle digest)
SIGNATURE_KEY = "cxr_edge.signature"
SIGNATURE_FORMAT = "cxr-edge-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
#: environment variable the ``cxr-edge`` commands read a public key path from (``--public-key`` wins)
PUBLIC_KEY_ENV = "CXR_EDGE_PUBLIC_KEY"
INSTALL_HINT = "pip install cxr-edge[sign]"
_CONTEXT = b"cxr-edge bundle signature v1\x00"  # domain separation: this key signs nothing else by accident
_ENTRY_KEYS = frozenset({"format", "format_version", "algorithm", "key_fingerprint", "signed", "signature"})
_HEX64 = re.compile(r"[0-9a-f]{64}")

KeySource = Union[str, "os.PathLike[str]", bytes, bytearray]


class BundleSignatureError(BundleError):
    """The bundle's signature is missing where required, malformed, by another key, or does not verify."""

    code = "bundle_signature"


class SignatureSupportMissingError(BundleSignatureError):
    """A key was given but the optional ``cryptography`` package is not installed."""

    code = "signature_support_missing"


def crypto_modules():
    """The ``ed25519`` and ``serialization`` modules of ``cryptography``, or a typed error naming the extra."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureSupportMissingError(f"bundle signatures need the 'cryptography' package: {INSTALL_HINT}") from None
    return ed25519, serialization


def message(bundle_sha256: str) -> bytes:
    """The bytes an ed25519 signature of a bundle is made over."""
    if not isinstance(bundle_sha256, str) or not _HEX64.fullmatch(bundle_sha256):
        raise BundleSignatureError("the bundle has no valid bundle_sha256 to sign or verify")
    return _CONTEXT + bundle_sha256.encode("ascii")


@dataclass(frozen=True)
class Signature:
    """One signature entry: who signed (SHA-256 of the raw 32-byte public key) and the 64 signature bytes."""

    key_fingerprint: str
    signature: bytes
    algorithm: str = ALGORITHM

    def to_json(self) -> str:
        return json.dumps({"format": SIGNATURE_FORMAT, "format_version": SIGNATURE_VERSION,
                           "algorithm": self.algorithm, "key_fingerprint": self.key_fingerprint,
                           "signed": "bundle_sha256", "signature": base64.b64encode(self.signature).decode("ascii")},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Signature":
        """Parse strictly: a signature entry this runtime does not fully understand is refused, never skipped."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError):
            raise BundleSignatureError("the bundle's signature entry is not valid JSON") from None
        if not isinstance(d, dict) or set(d) != _ENTRY_KEYS:
            raise BundleSignatureError("the bundle's signature entry is malformed (unexpected or missing fields)")
        if d["format"] != SIGNATURE_FORMAT or d["format_version"] != SIGNATURE_VERSION or d["signed"] != "bundle_sha256":
            raise BundleSignatureError("the bundle's signature entry has a format this runtime does not read; "
                                       "upgrade cxr-edge")
        if d["algorithm"] != ALGORITHM:
            raise BundleSignatureError(f"the bundle is signed with {d['algorithm']!r}; this runtime verifies {ALGORITHM}")
        fp = d["key_fingerprint"]
        if not isinstance(fp, str) or not _HEX64.fullmatch(fp):
            raise BundleSignatureError("the bundle's signature entry has a malformed key fingerprint")
        try:
            raw = base64.b64decode(d["signature"], validate=True) if isinstance(d["signature"], str) else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 64:
            raise BundleSignatureError("the bundle's signature entry does not hold a 64-byte ed25519 signature")
        return cls(key_fingerprint=fp, signature=raw)


@dataclass(frozen=True)
class SignatureStatus:
    """What the loader established about a bundle's signature (``Classifier.signature``, ``cxr-edge info``)."""

    signed: bool
    key_fingerprint: str | None = None
    #: True only when the signature was checked against a public key the caller gave, and held
    verified: bool = False

    def describe(self) -> str:
        if not self.signed:
            return "unsigned"
        how = "verified against the given public key" if self.verified else "not verified: no public key given"
        return f"{ALGORITHM}, key fingerprint {self.key_fingerprint} ({how})"

    def to_dict(self) -> dict[str, Any]:
        return {"signed": self.signed, "algorithm": ALGORITHM if self.signed else None,
                "key_fingerprint": self.key_fingerprint, "verified": self.verified}


def read_signature(metadata: Mapping[str, str]) -> Signature | None:
    """The bundle's signature entry, or None when it is unsigned (no ``cryptography`` needed)."""
    text = metadata.get(SIGNATURE_KEY)
    return None if text is None else Signature.from_json(text)


def _pem_bytes(source: KeySource, what: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            data = Path(source).read_bytes() if Path(source).is_file() else None
        except OSError as exc:
            raise BundleSignatureError(f"cannot read the {what} file: {exc.strerror or type(exc).__name__}") from None
        if data is None:
            raise BundleSignatureError(f"the {what} {os.fspath(source)!r} is not a readable file")
        if len(data) > 64 << 10:
            raise BundleSignatureError(f"the {what} file is too large to be an ed25519 PEM key")
        return data
    raise InvalidArgumentError(f"a {what} is a path or PEM bytes, got {type(source).__name__}")


def load_public_key(source: KeySource) -> "Ed25519PublicKey":
    """An ``Ed25519PublicKey`` from a PEM file path or PEM bytes (typed errors: not a key, not ed25519)."""
    ed25519, serialization = crypto_modules()
    data = _pem_bytes(source, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise BundleSignatureError("the public key is not a PEM public key (expected the .public.pem file "
                                   "written by python -m export.sign keygen)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleSignatureError(f"the public key is a {type(key).__name__}, not an ed25519 key")
    return key


def load_private_key(source: KeySource) -> "Ed25519PrivateKey":
    """An ``Ed25519PrivateKey`` from an unencrypted PEM file path or PEM bytes."""
    ed25519, serialization = crypto_modules()
    data = _pem_bytes(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BundleSignatureError("the private key is encrypted; cxr-edge signs with an unencrypted PEM key "
                                   "(keep it on the signing machine only)") from None
    except ValueError:
        raise BundleSignatureError("the private key is not a PEM private key (expected the .private.pem file "
                                   "written by python -m export.sign keygen)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleSignatureError(f"the private key is a {type(key).__name__}, not an ed25519 key")
    return key


def public_key_fingerprint(public_key: "Ed25519PublicKey") -> str:
    """SHA-256 hex of the raw 32-byte ed25519 public key: what a signature entry names its signer by."""
    _, serialization = crypto_modules()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(key: "Ed25519PrivateKey | Ed25519PublicKey") -> bytes:
    """SubjectPublicKeyInfo PEM of an ed25519 public key (or of a private key's public half)."""
    _, serialization = crypto_modules()
    public = key.public_key() if hasattr(key, "private_bytes") else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_digest(private_key: "Ed25519PrivateKey", bundle_sha256: str) -> Signature:
    """The signature entry of a bundle whose (verified) digest is ``bundle_sha256``."""
    fp = public_key_fingerprint(private_key.public_key())
    return Signature(key_fingerprint=fp, signature=private_key.sign(message(bundle_sha256)))


def check_signature(metadata: Mapping[str, str], bundle_sha256: str, public_key: KeySource | None = None,
                    require_signature: bool = False) -> SignatureStatus:
    """Verify the bundle's signature against ``public_key`` (when given) and apply ``require_signature``.

    ``bundle_sha256`` must already be checked against the file's bytes (``read_manifest``). Without a
    key and not required: the signer's fingerprint is reported, unverified. With a key: a signature
    by another key, or one that does not verify, is refused. Required: an unsigned bundle is refused,
    and a key must be given.
    """
    if require_signature and public_key is None:
        raise InvalidArgumentError("require_signature needs a public key to verify against (public_key=..., "
                                   f"--public-key or {PUBLIC_KEY_ENV})")
    key = None if public_key is None else load_public_key(public_key)  # a bad key is refused even if unused
    entry = read_signature(metadata)
    if entry is None:
        if require_signature:
            raise BundleSignatureError("the bundle is unsigned and a signature is required; sign it with "
                                       "python -m export.sign BUNDLE --key PRIVATE.pem")
        return SignatureStatus(signed=False)
    if key is None:
        return SignatureStatus(signed=True, key_fingerprint=entry.key_fingerprint)
    expected = public_key_fingerprint(key)
    if entry.key_fingerprint != expected:
        raise BundleSignatureError(f"the bundle is signed by another key (fingerprint {entry.key_fingerprint[:16]}..., "
                                   f"the given public key is {expected[:16]}...); refusing it")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(entry.signature, message(bundle_sha256))
    except InvalidSignature:
        raise BundleSignatureError("the bundle's signature does not verify: the bundle (graph, weights or manifest) "
                                   "was changed after it was signed") from None
    return SignatureStatus(signed=True, key_fingerprint=expected, verified=True)
