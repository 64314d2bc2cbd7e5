"""Backends: ONNX Runtime (ort.py, the embedded default) and TensorRT (tensorrt.py, lazy import)."""
