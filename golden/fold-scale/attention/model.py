"""One self-attention head (golden/_quant_blocks.attention): the scores' Mul by 1/sqrt(8) goes into q's weight."""

from golden._quant_blocks import attention as build  # noqa: F401
