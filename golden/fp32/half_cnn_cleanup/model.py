from golden.fp32.half_cnn.model import build  # noqa: F401
