from golden.fp16.conv_pool_gemm.model import build  # noqa: F401
