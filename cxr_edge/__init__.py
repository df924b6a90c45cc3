"""cxr-edge runtime: on-device chest X-ray classification with class activation maps.

``from cxr_edge import Classifier`` — onnxruntime, numpy, OpenCV, Pillow and pydicom only; never torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BundleError, ChecksumMismatchError, CorruptImageError, CxrEdgeError, DicomRefusedError, ImageError,
    InferenceError, InvalidArgumentError, InvalidImageError, ManifestError, NoDefaultModelError,
    UnsupportedFormatError,
)
from .manifest import Manifest, PreprocessSpec, CamSpec  # noqa: E402


def __getattr__(name: str):
    """Lazy imports keep `import cxr_edge` cheap (cold start) and let errors/manifest load alone."""
    if name in ("Classifier", "Prediction"):
        from . import classifier

        return getattr(classifier, name)
    if name == "read_image":
        from .imaging import read_image

        return read_image
    if name == "load_bundle":
        from .bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'cxr_edge' has no attribute {name!r}")


__all__ = [
    "Classifier", "Prediction", "read_image", "load_bundle", "Manifest", "PreprocessSpec", "CamSpec",
    "CxrEdgeError", "ImageError", "UnsupportedFormatError", "CorruptImageError", "InvalidImageError",
    "DicomRefusedError", "BundleError", "ChecksumMismatchError", "ManifestError", "NoDefaultModelError",
    "InvalidArgumentError", "InferenceError", "__version__",
]
