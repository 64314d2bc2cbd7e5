"""Root pytest configuration: options shared by every test folder."""

from __future__ import annotations

from hypothesis import settings

# The property tests draw the same examples on every run (derandomize): CI must not pass or fail by the draw.
# A random search finds new failing examples, so run one now and then with HYPOTHESIS_PROFILE=explore.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden/*/*/expected.ir and expected_outputs.npz from the current passes "
                          "(contracts are still checked); review the diff before committing")


def pytest_configure(config):
    import os

    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
