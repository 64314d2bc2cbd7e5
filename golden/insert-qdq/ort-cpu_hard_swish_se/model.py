from golden._quant_blocks import hard_swish_se as build  # noqa: F401
