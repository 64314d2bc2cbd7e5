"""The one compiled part of irtool: the histogram binning kernel (irtool/calibration/_binning.c).

Everything else is configured in pyproject.toml. The extension is optional: where no C compiler is available
the build goes on without it and irtool.calibration.observers bins with numpy (same counts, ~3x slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("irtool.calibration._binning", ["irtool/calibration/_binning.c"], optional=True)])
