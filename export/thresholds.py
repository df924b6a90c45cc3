"""Per-label operating points chosen on a calibration set (neither training nor reporting images).

The implementation lives in the runtime, :mod:`cxr_edge.operating_points` (numpy only), so export
and the device-side ``cxr-edge calibrate`` share ONE set of rules; this module re-exports it under
its historical names. Rules (``method``): ``breakeven`` (default: flag rate = prevalence, i.e.
precision = recall), ``f1``, ``youden``, ``specificity`` / ``sensitivity`` (with ``target``) and
``fixed`` (0.5). A label gets **no decision** (threshold None: "undetermined") when the calibration
set holds fewer than ``min_positive_patients`` distinct positive patients, or when the lower end of
its AUC's 95% patient-bootstrap interval is not above 0.5. See :mod:`cxr_edge.operating_points`.
"""
from __future__ import annotations

from cxr_edge.operating_points import (  # noqa: F401  (re-exported API)
    _EPS, DEFAULT_THRESHOLD, METHODS, _pick, choose_thresholds, operating_point, pick_threshold,
)

__all__ = ["DEFAULT_THRESHOLD", "METHODS", "choose_thresholds", "operating_point", "pick_threshold"]
