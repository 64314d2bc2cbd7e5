from golden._quant_blocks import wide_chain as build  # noqa: F401
