"""Calibration for explicit (Q/DQ) INT8/FP8 quantization of an artifact's graphs (`prunert calibrate`).

dataset.py   BUILTIN_PROMPTS, load_calibration_set(images_dir, prompts_file, max_samples) -> CalibrationSet,
             collect_feeds(pipe, calibration_set) -> {"vision": [...], "decoder": [...]} (exact fp32 feeds)
quantize.py  quantize_graph(src, dst, feeds, config, exclude) -> QuantizationSummary (ONNX Runtime's static
             QDQ quantizer; symmetric int8 or FP8 E4M3FN, per-channel weights, selection op kept fp32),
             calibrate_artifact(directory, calibration_set, config) -> (Manifest, DriftReport)
drift.py     drift_report(directory, precision, calibration_set) -> DriftReport (quantized vs fp32 in ONNX
             Runtime CPU: kept-index overlap, kept-token cosine, logits KL, greedy-token agreement)

Nothing here imports torch: calibration needs onnx, onnxruntime and the runtime pipeline only.
"""
