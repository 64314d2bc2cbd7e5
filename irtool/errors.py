"""Typed errors. The CLI maps InputError/PipelineError to exit code 2 and everything else to 1."""

from __future__ import annotations


class IrtoolError(Exception):
    """Base class of every error irtool raises on purpose."""

    exit_code = 1


class InputError(IrtoolError):
    """The user gave a model, file, shape or option that cannot be used."""

    exit_code = 2


class PipelineError(IrtoolError):
    """A pipeline text or pass option is malformed or unknown."""

    exit_code = 2


class PassError(IrtoolError):
    """A pass failed while running; the message names the pass and the passes before it."""


class VerificationError(IrtoolError):
    """The IR violates an invariant (checker, names, producers, order, dangling uses, shapes)."""


class BackendUnavailable(IrtoolError):
    """A backend's runtime (e.g. TensorRT) is not installed or has no device here."""

    exit_code = 2


class PluginError(IrtoolError):
    """A pass plugin could not be loaded; the message names the plugin and its entry point."""
