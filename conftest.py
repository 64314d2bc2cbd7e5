"""Root pytest configuration: options shared by every test folder."""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden/*/*/expected.ir and expected_outputs.npz from the current passes "
                          "(contracts are still checked); review the diff before committing")
