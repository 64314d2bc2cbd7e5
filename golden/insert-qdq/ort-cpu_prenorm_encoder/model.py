from golden._quant_blocks import prenorm_encoder as build  # noqa: F401
