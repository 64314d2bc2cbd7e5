"""The MLP of quant-dynamic/mlp_matmul, under another pipeline."""

from golden.quant_dynamic_mlp import build  # noqa: F401
