from golden._quant_blocks import residual as build  # noqa: F401
