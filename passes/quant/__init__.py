"""INT8 quantization: `calibrate`, `insert-qdq` (profiles trt, ort-cpu) and mixed precision."""
