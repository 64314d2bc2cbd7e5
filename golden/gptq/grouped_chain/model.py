from golden._quant_blocks import grouped_chain as build  # noqa: F401
