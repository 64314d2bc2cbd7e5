"""Built-in passes, shipped as `irtool.passes`. Each module registers through the `irtool.passes`
entry-point group in pyproject.toml, exactly as a third-party plugin would."""
