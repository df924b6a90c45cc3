"""The input scope gate's cost per image: the pixel rules (before the model) and the feature score (after it).

Why a measurement of its own: the gate runs on every image, and its two halves scale with different
things. The pixel rules scale with the decoded image (a strided sample and one area resize); the
feature score scales with the feature channels and k. The end-to-end split shows their sum as the
``scope`` stage. This entry times each half alone, on the same image, with the same calls the
:class:`~cxr_edge.Classifier` makes: ``ScopeGate.check_pixels`` on the decoded pixels and
``ScopeGate.assess(None, feature_maps)`` on this image's C x h x w features from the bundle's own session.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .timing import measure


def scope_cost(bundle, image: str | os.PathLike, runs: int | None, warmup: int) -> dict[str, Any]:
    """``{"available": False, "reason"}`` for a bundle without a scope block (the Classifier then runs no gate),
    else the median/percentile milliseconds of each half, their total and the image's own verdict."""
    from ..imaging import read_image
    from ..preprocess import preprocess
    from ..scope import ScopeGate

    manifest = bundle.manifest
    gate = ScopeGate.from_manifest(manifest)
    if not gate.has_features:
        return {"available": False, "reason": "the manifest has no scope block, so the Classifier runs no scope gate"}
    spec = manifest.preprocessing
    img = read_image(image, min_side=spec.min_side, max_pixels=spec.max_pixels)
    pixels, colour = img.pixels, img.info.get("colour_fraction")
    (maps,) = bundle.session.run([gate.features_output], {spec.input_name: preprocess([pixels], spec)})
    features = np.ascontiguousarray(np.asarray(maps, dtype=np.float32)[0])
    pix = measure(lambda: gate.check_pixels(pixels, colour), runs, warmup)
    feat = measure(lambda: gate.assess(None, features), runs, warmup)
    verdict = gate.assess(pixels, features, colour)
    p, f = pix.summary(), feat.summary()
    return {
        "available": True, "image_hw": [int(pixels.shape[0]), int(pixels.shape[1])],
        "runs": {"pixel_rules": pix.runs, "feature_score": feat.runs}, "warmup": warmup,
        "pixel_rules_ms": p, "feature_score_ms": f, "total_ms": p["median"] + f["median"],
        "features_shape": list(features.shape), "k": gate.spec.k, "threshold": gate.threshold,
        "image_in_scope": bool(verdict.in_scope), "image_score": verdict.score,
        "method": "ScopeGate.check_pixels(decoded pixels) and ScopeGate.assess(None, C x h x w features), "
                  "each timed alone (batch 1, one thread of Python; the session run that makes the features is "
                  "not included)",
    }
