"""Frontends: models that are not ONNX files yet (PyTorch modules, irtool.frontends.torch)."""
