from golden._quant_blocks import box_decode as build  # noqa: F401
