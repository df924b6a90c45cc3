"""Typed refusals of the export toolchain: every failure carries the numbers that caused it."""
from __future__ import annotations

from typing import Any, Mapping

from cxr_edge.errors import CxrEdgeError


class ExportError(CxrEdgeError):
    """The model could not be turned into a verified bundle."""

    code = "export_error"


class ParityError(ExportError):
    """The exported ONNX graph does not reproduce the PyTorch model within tolerance."""

    code = "export_parity"

    def __init__(self, message: str, numbers: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.numbers = dict(numbers or {})


class QuantizationGateError(ExportError):
    """The INT8 model lost too much against fp32 (AUC drop or CAM agreement); no bundle is written."""

    code = "quantization_gate"

    def __init__(self, message: str, numbers: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.numbers = dict(numbers or {})
