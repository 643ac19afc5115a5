"""User-facing error base classes, importable from every layer.

Everything a user can get wrong (a spec, a model directory, an output directory, a data file,
an artifact) raises a :class:`FlexcError`. The CLI prints its message, without a traceback, and
exits with status 2. This module imports nothing from flexc, so passes, exporters, the runtime
and eval raise these without depending on the compiler; the spec errors (with positions) stay
in :mod:`flexc.compiler.errors`, which re-exports these.
"""

from __future__ import annotations


class FlexcError(Exception):
    """A mistake the user can fix: printed as one clear message, exit status 2."""

    exit_code = 2


class ModelError(FlexcError):
    """The model cannot be resolved or loaded (missing directory, not a MoE model, ...)."""


class OutputDirError(FlexcError):
    """The output directory cannot be used (not a flexc run, a different spec, ...)."""
