from golden._quant_blocks import attention as build  # noqa: F401
