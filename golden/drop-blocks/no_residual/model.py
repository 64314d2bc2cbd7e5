from golden._quant_blocks import conv as build  # noqa: F401
