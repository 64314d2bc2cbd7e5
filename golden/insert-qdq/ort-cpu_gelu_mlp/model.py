from golden._quant_blocks import gelu_mlp as build  # noqa: F401
