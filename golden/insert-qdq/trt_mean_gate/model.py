from golden._quant_blocks import mean_gate as build  # noqa: F401
