from golden._quant_blocks import unbalanced_chain as build  # noqa: F401
