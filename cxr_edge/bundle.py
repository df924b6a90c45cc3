"""Model bundle: one ONNX file whose metadata carries the manifest, verified before use.

Why a hand-written protobuf walk: devices install onnxruntime but not the ``onnx`` package, and
the checksum must cover the weights and graph while the manifest (which holds the checksum)
lives in the same file. The walk splits the top-level ``ModelProto`` fields into
``metadata_props`` (field 14) and everything else; the SHA-256 covers everything else, in order.
Writing a bundle appends one ``metadata_props`` entry the same way, so no ``onnx`` is needed
to read or write bundles. Besides the manifest, exactly one other entry has a meaning: an optional
ed25519 signature of ``bundle_sha256`` (:mod:`cxr_edge.signature`), verified when a public key is given.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .errors import BundleError, ChecksumMismatchError, InvalidArgumentError, ManifestError, NoDefaultModelError
from .manifest import MANIFEST_KEY, Manifest
from .signature import SIGNATURE_KEY, KeySource, SignatureStatus, check_signature, sign_digest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

METADATA_PROPS_FIELD = 14
DEFAULT_BUNDLE = "default.onnx"
MAX_THREADS = 64  # more intra-op threads than this only costs memory and start-up time on any device we target


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleError("not an ONNX model: truncated protobuf varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (field_number, wire_type, start, payload_start, end) for each top-level field."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise BundleError("not an ONNX model: invalid protobuf field number 0")
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            payload = pos
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 2:
            length, payload = _read_varint(buf, pos)
            pos = payload + length
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise BundleError(f"not an ONNX model: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise BundleError("not an ONNX model: truncated protobuf field")
        yield number, wire, start, payload, pos


def _string_entry(payload: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wire, _, p, end in _fields(payload):
        if wire == 2 and number in (1, 2):
            text = payload[p:end].decode("utf-8", errors="strict")
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def split_model(model_bytes: bytes) -> tuple[bytes, dict[str, str]]:
    """Return (bytes of all non-metadata fields in order, metadata_props as a dict)."""
    view = memoryview(model_bytes)
    kept: list[memoryview] = []  # slices, joined once: a 14 MB bundle is copied once, not three times
    metadata: dict[str, str] = {}
    try:
        for number, wire, start, payload, end in _fields(model_bytes):
            if number == METADATA_PROPS_FIELD and wire == 2:
                key, value = _string_entry(model_bytes[payload:end])
                if key in metadata:  # readers disagree on which copy wins (onnx: first, a dict: last)
                    raise BundleError(f"the model has two metadata entries named {key!r}; refusing to guess "
                                      "which one is meant")
                metadata[key] = value
            else:
                kept.append(view[start:end])
    except UnicodeDecodeError:
        raise BundleError("not an ONNX model: metadata is not UTF-8") from None
    body = b"".join(kept)
    if not body:
        raise BundleError("not an ONNX model: empty file")
    return body, metadata


def model_sha256(model_bytes: bytes) -> str:
    """SHA-256 of the graph, weights and opsets: every top-level field except metadata_props."""
    return hashlib.sha256(split_model(model_bytes)[0]).hexdigest()


# ModelProto.graph = 7; GraphProto: node = 1, initializer = 5, sparse_initializer = 15; NodeProto.attribute = 5;
# AttributeProto: t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23;
# SparseTensorProto: values = 1, indices = 2; TensorProto: external_data = 13, data_location = 14 (1 = EXTERNAL).
_GRAPH_TENSORS = {5: "tensor", 15: "sparse"}


def _check_tensor(buf: bytes, where: str) -> None:
    for number, wire, start, _, end in _fields(buf):
        # a varint field's payload offset points past its value: read it again from after the tag
        if number == 13 and wire == 2 or number == 14 and wire == 0 and _read_varint(
                buf, _read_varint(buf, start)[1])[0] == 1:
            raise BundleError(f"{where} stores its data in an external file: a bundle must hold every weight "
                              "itself (the checksum could not cover a side file)")


def _check_sparse(buf: bytes, where: str) -> None:
    for number, wire, _, p, end in _fields(buf):
        if number in (1, 2) and wire == 2:
            _check_tensor(buf[p:end], where)


def _check_graph_data(buf: bytes, depth: int = 0) -> None:
    if depth > 32:
        raise BundleError("the model's subgraphs are nested too deeply")
    for number, wire, _, p, end in _fields(buf):
        if wire != 2:
            continue
        if number == 5:
            _check_tensor(buf[p:end], "an initializer")
        elif number == 15:
            _check_sparse(buf[p:end], "a sparse initializer")
        elif number == 1:
            for n2, w2, _, p2, e2 in _fields(buf[p:end]):
                if n2 == 5 and w2 == 2:
                    attr = buf[p:end][p2:e2]
                    for n3, w3, _, p3, e3 in _fields(attr):
                        if w3 != 2:
                            continue
                        if n3 in (5, 10):
                            _check_tensor(attr[p3:e3], "a Constant/attribute tensor")
                        elif n3 in (22, 23):
                            _check_sparse(attr[p3:e3], "a sparse attribute tensor")
                        elif n3 in (6, 11):
                            _check_graph_data(attr[p3:e3], depth + 1)


def check_no_external_data(model_bytes: bytes) -> None:
    """Refuse any tensor whose data lives outside the file (initializers, Constant attributes, sparse
    tensors, subgraphs): onnxruntime would resolve the side file relative to the working directory."""
    for number, wire, _, p, end in _fields(model_bytes):
        if number == 7 and wire == 2:
            _check_graph_data(model_bytes[p:end])


def _manifest_digest(body_hash: "hashlib._Hash", blank_manifest_json: str) -> str:
    """SHA-256 over the graph bytes and the manifest JSON with ``bundle_sha256`` blank. ``body_hash`` is
    the SHA-256 already fed the graph bytes (``model_sha256``'s), continued on a copy: one pass over the
    weights gives both checksums."""
    h = body_hash.copy()
    h.update(b"\x00cxr-edge-manifest\x00")
    h.update(blank_manifest_json.encode("utf-8"))
    return h.hexdigest()


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint((number << 3) | 2) + _encode_varint(len(payload)) + payload


def _assemble(body: bytes, metadata: dict[str, str]) -> bytes:
    """ONNX bytes: the non-metadata fields as they were, then one metadata_props entry per key."""
    out = bytearray(body)
    for key, value in metadata.items():
        entry = _len_field(1, key.encode("utf-8")) + _len_field(2, value.encode("utf-8"))
        out += _len_field(METADATA_PROPS_FIELD, entry)
    return bytes(out)


def embed_manifest(model_bytes: bytes, manifest: Manifest) -> bytes:
    """Return ONNX bytes with ``manifest`` (checksum filled in) as a metadata_props entry.

    Other metadata entries are kept; an older manifest entry is replaced. A signature entry is
    dropped: it signed the old digest, and a new manifest is a new digest (sign again, see
    :func:`sign_bundle`).
    """
    body, metadata = split_model(model_bytes)
    check_no_external_data(body)
    body_hash = hashlib.sha256(body)
    manifest = replace(manifest, model_sha256=body_hash.hexdigest(), bundle_sha256="")
    manifest.validate()
    manifest = replace(manifest, bundle_sha256=_manifest_digest(body_hash, manifest.to_json()))
    metadata.pop(SIGNATURE_KEY, None)
    metadata[MANIFEST_KEY] = manifest.to_json()
    return _assemble(body, metadata)


def sign_bundle(model_bytes: bytes, private_key: "Ed25519PrivateKey") -> bytes:
    """Return the bundle with an ed25519 signature (``private_key``: an ``Ed25519PrivateKey``) of its
    verified digest under :data:`~cxr_edge.signature.SIGNATURE_KEY`; an earlier signature is replaced.

    The bundle is verified first (checksums, no external data): a damaged bundle is never signed.
    """
    body, metadata = split_model(model_bytes)
    manifest = _verified_manifest(body, metadata, verify_checksum=True)
    metadata[SIGNATURE_KEY] = sign_digest(private_key, manifest.bundle_sha256).to_json()
    return _assemble(body, metadata)


def write_bundle(model_bytes: bytes, manifest: Manifest, path: str | os.PathLike) -> str:
    """Write a bundle file and return its model SHA-256."""
    data = embed_manifest(model_bytes, manifest)
    Path(path).write_bytes(data)
    return model_sha256(data)


def read_manifest(model_bytes: bytes, verify_checksum: bool = True) -> Manifest:
    """Parse and validate the manifest; refuse when the checksum does not match the model."""
    body, metadata = split_model(model_bytes)
    return _verified_manifest(body, metadata, verify_checksum)


#: the metadata entries of this runtime's namespace it knows; any other ``cxr_edge.*`` entry (a newer format's)
#: is refused rather than ignored. Entries outside the namespace are never read, so they change nothing.
KNOWN_METADATA_KEYS = frozenset({MANIFEST_KEY, SIGNATURE_KEY})


def _verified_manifest(body: bytes, metadata: dict[str, str], verify_checksum: bool) -> Manifest:
    unknown = sorted(k for k in metadata if k.startswith("cxr_edge") and k not in KNOWN_METADATA_KEYS)
    if unknown:
        raise ManifestError(f"the bundle has metadata entries {unknown} this runtime does not know (a newer format?): "
                            "upgrade cxr-edge")
    if MANIFEST_KEY not in metadata:
        raise ManifestError(f"this ONNX file has no cxr-edge manifest (metadata key {MANIFEST_KEY!r}); "
                            "export it with the toolchain or embed one with cxr_edge.bundle.write_bundle")
    text = metadata[MANIFEST_KEY]
    manifest = Manifest.from_json(text)
    if verify_checksum:
        check_no_external_data(body)
        body_hash = hashlib.sha256(body)
        actual = body_hash.hexdigest()
        if actual != manifest.model_sha256:
            raise ChecksumMismatchError(
                f"model checksum mismatch: manifest says {manifest.model_sha256[:16]}..., file has "
                f"{actual[:16]}...; the weights were altered or the file is damaged")
        if not manifest.bundle_sha256:
            raise ChecksumMismatchError("the manifest carries no bundle_sha256 (written by an older toolchain): "
                                        "its thresholds and preprocessing are not covered; re-export the bundle")
        # the digest is over the manifest exactly as stored, with its own value blanked
        stored = f'"bundle_sha256": "{manifest.bundle_sha256}"'
        if text.count(stored) != 1:
            raise ChecksumMismatchError("the manifest's bundle_sha256 entry is malformed")
        if _manifest_digest(body_hash, text.replace(stored, '"bundle_sha256": ""')) != manifest.bundle_sha256:
            raise ChecksumMismatchError("manifest checksum mismatch: the manifest (thresholds, labels, preprocessing, "
                                        "scope, notice, ...) was altered after export")
    return manifest


def verify_bundle_bytes(model_bytes: bytes, public_key: KeySource | None = None,
                        require_signature: bool = False) -> tuple[Manifest, SignatureStatus]:
    """Checksums, manifest and signature of a bundle's bytes, without opening an onnxruntime session."""
    body, metadata = split_model(model_bytes)
    manifest = _verified_manifest(body, metadata, verify_checksum=True)
    return manifest, check_signature(metadata, manifest.bundle_sha256, public_key, require_signature)


def default_bundle_path() -> Path:
    """Path of the embedded default bundle, or NoDefaultModelError when none ships."""
    ref = resources.files("cxr_edge") / "data" / DEFAULT_BUNDLE
    path = Path(str(ref))
    if not path.is_file():
        raise NoDefaultModelError("no default model is embedded in this installation; pass a bundle path, "
                                  "e.g. Classifier('model.onnx') or --model model.onnx")
    return path


@dataclass
class Bundle:
    """A verified bundle: its manifest, an onnxruntime session, and where it came from."""

    path: str
    manifest: Manifest
    session: "object"
    size_bytes: int
    threads: int
    providers: tuple[str, ...]
    #: signed or not, by which key fingerprint, verified against a given public key or not
    signature: SignatureStatus = SignatureStatus(signed=False)


def session_options(threads: int):
    import onnxruntime as ort

    if hasattr(ort, "disable_telemetry_events"):  # onnxruntime's own telemetry switch (ETW on Windows)
        ort.disable_telemetry_events()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not providers:
        return ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    if missing:
        raise InvalidArgumentError(f"execution provider(s) {missing} not available in this onnxruntime "
                                   f"build; available: {available}")
    return list(providers)


def load_bundle(path: str | os.PathLike | None = None, threads: int | None = None,
                providers: Sequence[str] | None = None, self_check: bool = True, *,
                public_key: KeySource | None = None, require_signature: bool = False) -> Bundle:
    """Load, verify (checksum, manifest, signature, graph wiring, head weights) and open a bundle.

    ``public_key`` (a PEM path or PEM bytes): a signed bundle must verify against it
    (:class:`~cxr_edge.signature.BundleSignatureError` otherwise). ``require_signature``: an unsigned
    bundle is refused too, and a key is needed. See :func:`cxr_edge.signature.check_signature`.
    """
    import onnxruntime as ort

    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS):
        raise InvalidArgumentError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    resolved = Path(path) if path is not None else default_bundle_path()
    try:
        model_bytes = resolved.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read model file {str(resolved)!r}: {exc.strerror or exc}") from None
    manifest, signature = verify_bundle_bytes(model_bytes, public_key, require_signature)
    n_threads = threads or min(4, os.cpu_count() or 1)
    provider_list = resolve_providers(providers)
    try:
        session = ort.InferenceSession(model_bytes, sess_options=session_options(n_threads),
                                       providers=provider_list)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        if "DecodeImage" in str(exc) or "ai.onnx.contrib" in str(exc):
            raise BundleError("this is an in-graph preprocessing bundle (its input is the encoded PNG/JPEG bytes, "
                              "decoded by onnxruntime-extensions' DecodeImage op): open it with "
                              "export.ingraph.ingraph_session / run_ingraph, which registers onnxruntime-extensions; "
                              "the Classifier and the cxr-edge CLI take pixel-input bundles") from None
        raise BundleError(f"onnxruntime could not load the model: {exc}") from None
    check_graph(manifest, session)
    if self_check and manifest.cam.method == "weights":
        check_head(manifest, session)
    return Bundle(path=str(resolved), manifest=manifest, session=session, size_bytes=len(model_bytes),
                  threads=n_threads, providers=tuple(provider_list), signature=signature)


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def check_graph(manifest: Manifest, session) -> None:
    """The manifest must describe this graph: input name/shape, logits width, feature channels."""
    spec = manifest.preprocessing
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if spec.input_name not in inputs or len(inputs) != 1:
        raise ManifestError(f"graph inputs {sorted(inputs)} do not match manifest input {spec.input_name!r}")
    shape = inputs[spec.input_name].shape
    expected = (spec.channels, *spec.input_size)
    if len(shape) != 4 or any(_static(s) not in (None, e) for s, e in zip(shape[1:], expected)):
        raise ManifestError(f"graph input shape {shape} does not match manifest N x {expected}")
    if manifest.logits_output not in outputs:
        raise ManifestError(f"graph has no output {manifest.logits_output!r} (outputs: {sorted(outputs)})")
    lshape = outputs[manifest.logits_output].shape
    if len(lshape) != 2 or _static(lshape[1]) not in (None, len(manifest.labels)):
        raise ManifestError(f"logits output shape {lshape} does not match {len(manifest.labels)} labels")
    if manifest.cam.method == "weights":
        name = manifest.cam.features_output
        if name not in outputs:
            raise ManifestError(f"graph has no features output {name!r} for the CAM")
        fshape = outputs[name].shape
        channels = manifest.cam.weights.shape[1]
        if len(fshape) != 4 or _static(fshape[1]) not in (None, channels):
            raise ManifestError(f"features output shape {fshape} does not match CAM weights with {channels} channels")


def check_head(manifest: Manifest, session) -> None:
    """Run one probe input and check GAP(features) @ W.T + b == logits: the CAM weights are real."""
    spec = manifest.preprocessing
    h, w = spec.input_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    probe = (0.5 + 0.25 * np.sin(xx / 7.0) * np.cos(yy / 11.0))[None, None]
    probe = np.repeat(probe, spec.channels, axis=1).astype(np.float32)
    logits, features = session.run([manifest.logits_output, manifest.cam.features_output],
                                   {spec.input_name: probe})
    bias = manifest.cam.bias if manifest.cam.bias is not None else 0.0
    recon = features.mean(axis=(2, 3)) @ manifest.cam.weights.T + bias
    err = float(np.max(np.abs(recon - logits)))
    if not np.isfinite(err) or err > manifest.cam.head_check_atol:
        raise ManifestError(f"CAM weights in the manifest do not reproduce the graph's logits "
                            f"(max abs error {err:.3g} > {manifest.cam.head_check_atol}); the CAM would be wrong")
