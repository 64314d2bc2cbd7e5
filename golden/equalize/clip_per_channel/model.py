from golden._quant_blocks import clip_chain as build  # noqa: F401
