"""Export toolchain: a trained PyTorch CAM model -> verified cxr-edge bundle (fp32 or INT8, optional bytes-in variant).

Run ``python -m export --help``. One module per job:
  source         where an export starts (a models.train run dir, or checkpoint + config/flags)
  images         real images + labels, read with the runtime's own read_image/preprocess
  onnx_export    torch -> ONNX (logits + features), checker, offline optimisation, parity with torch
  calibration    CalibrationDataReader over real preprocessed images
  quantize       quant_pre_process -> quantize_static (QDQ, per-channel, float CAM head) -> qdq_loss_debug
  verify         the INT8-vs-fp32 gate (AUC drop, CAM agreement)
  thresholds     per-label decision thresholds from validation data
  manifest_build the full Manifest (CAM weights, provenance, tool versions)
  ingraph        PNG/JPEG bytes -> decode + preprocess inside the graph, and its input guard
  build_bundle   the pipeline; quant_bench  INT8 preset measurements; toy  test/benchmark models
Needs torch, onnx and onnxruntime-extensions; the runtime package ``cxr_edge`` never imports this.
"""
