"""Calibration for explicit (Q/DQ) INT8/FP8 quantization. Arrives with the TensorRT issue; empty for now."""
