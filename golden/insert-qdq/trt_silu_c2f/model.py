from golden._quant_blocks import silu_c2f as build  # noqa: F401
