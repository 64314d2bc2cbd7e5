"""irtool: a model-optimization compiler for edge deployment.

Importing irtool is cheap; the IR, pass manager and backends load on first use so that
`irtool --help` and plugin discovery stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Model": ("irtool.ir.model", "Model"),
    "Pass": ("irtool.passmanager", "Pass"),
    "PassResult": ("irtool.passmanager", "PassResult"),
    "PassContext": ("irtool.passmanager", "PassContext"),
    "PassManager": ("irtool.passmanager", "PassManager"),
    "Analysis": ("irtool.passmanager", "Analysis"),
    "register_pass": ("irtool.registry", "register_pass"),
    "register_pipeline": ("irtool.registry", "register_pipeline"),
    "parse_pipeline": ("irtool.pipeline", "parse_pipeline"),
    "format_pipeline": ("irtool.pipeline", "format_pipeline"),
    "optimize": ("irtool.api", "optimize"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'irtool' has no attribute {name!r}")
