from golden._quant_blocks import depthwise as build  # noqa: F401
