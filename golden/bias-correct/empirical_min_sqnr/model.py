from golden._quant_blocks import depthwise_chain as build  # noqa: F401
