"""Typed errors: every refusal the runtime makes is one of these, never a bare exception.

The CLI maps each family to an exit code and a JSON error object; messages never contain
patient attributes (DICOM names, IDs, dates), only the field *name* that caused a refusal.
"""
from __future__ import annotations


class CxrEdgeError(Exception):
    """Base class of every error cxr_edge raises on purpose."""

    code = "cxr_edge_error"


class ImageError(CxrEdgeError):
    """The input could not be turned into a radiograph (unreadable, corrupt, wrong kind)."""

    code = "image_error"


class UnsupportedFormatError(ImageError):
    """The bytes are not a format the runtime reads (PNG, JPEG, DICOM)."""

    code = "unsupported_format"


class CorruptImageError(ImageError):
    """The format was recognised but the pixels could not be decoded (truncated, damaged)."""

    code = "corrupt_image"


class InvalidImageError(ImageError):
    """Decoded pixels are unusable: too small, too large, NaN/inf, wrong dtype or shape."""

    code = "invalid_image"


class DicomRefusedError(ImageError):
    """A readable DICOM that a chest radiograph classifier must not run on.

    ``field`` names the DICOM attribute that caused the refusal (never its patient value
    unless the value itself is not identifying, like a Modality code).
    """

    code = "dicom_refused"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class OutOfScopeError(ImageError):
    """The image is not like the frontal adult chest radiographs the model was trained on (the input
    scope gate, :mod:`cxr_edge.scope`), and the classifier was asked to refuse such inputs
    (``Classifier(scope="refuse")``, ``--out-of-scope refuse``).

    ``scope`` is the gate's verdict (a :class:`~cxr_edge.scope.ScopeResult`: score, threshold, reasons).
    """

    code = "out_of_scope"

    def __init__(self, message: str, scope=None) -> None:
        super().__init__(message)
        self.scope = scope


class BundleError(CxrEdgeError):
    """The model bundle is missing, malformed, tampered with, or inconsistent with its graph."""

    code = "bundle_error"


class ChecksumMismatchError(BundleError):
    """The model's bytes do not match the SHA-256 recorded in its manifest."""

    code = "checksum_mismatch"


class ManifestError(BundleError):
    """The manifest is absent, unparsable, of an unknown version, or disagrees with the graph."""

    code = "manifest_error"


class NoDefaultModelError(BundleError):
    """No embedded default bundle ships with this installation."""

    code = "no_default_model"


class InvalidArgumentError(CxrEdgeError, ValueError):
    """A caller passed an argument the API cannot honour (unknown label, bad thread count...)."""

    code = "invalid_argument"


class InferenceError(CxrEdgeError):
    """The model ran but produced unusable numbers (NaN/inf): refuse rather than answer wrongly."""

    code = "inference_error"


class OutputError(CxrEdgeError, OSError):
    """An output (overlay PNG, ``--cam-dir``, a recalibrated bundle) could not be written."""

    code = "output_error"


class InternalError(CxrEdgeError):
    """An unexpected failure inside cxr_edge (a bug): reported as a typed error, never a traceback."""

    code = "internal_error"


class ServeError(CxrEdgeError):
    """Base class of the errors only ``cxr-edge serve`` replies with."""

    code = "serve_error"


class BusyError(ServeError):
    """The server's request queue is full: retry later (nothing was done for this request)."""

    code = "busy"


class InvalidRequestError(ServeError, ValueError):
    """A serve request that is not a JSON object of the documented shape."""

    code = "invalid_request"


class RequestTooLargeError(InvalidRequestError):
    """A serve request line longer than the server's ``--max-request-bytes``."""

    code = "request_too_large"


class ShuttingDownError(ServeError):
    """The server is shutting down and takes no new requests."""

    code = "shutting_down"
