"""A transformer-style MLP (shared with the excluded and per_tensor cases)."""

from golden.quant_dynamic_mlp import build  # noqa: F401
