from golden._quant_blocks import concat as build  # noqa: F401
