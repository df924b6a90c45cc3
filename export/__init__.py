"""Export toolchain: trained PyTorch student -> verified cxr-edge bundle (fp32 or INT8, optional in-graph preprocessing).

Run ``python -m export --help``. Modules: onnx_export (torch -> ONNX + parity), calibration and quantize
(static INT8), verify (INT8-vs-fp32 gate), thresholds, manifest_build, ingraph (bytes-in variant),
build_bundle (the whole pipeline), quant_bench (U8U8 vs U8S8 measurements). Needs torch; the runtime
package cxr_edge never imports this.
"""
