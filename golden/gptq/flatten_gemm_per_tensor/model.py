from golden._quant_blocks import flatten_gemm as build  # noqa: F401
