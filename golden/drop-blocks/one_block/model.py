from golden._quant_blocks import residual_mlp as build  # noqa: F401
