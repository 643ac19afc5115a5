"""Compiler passes: the pass interface, the registry and the pipeline runner."""

from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.passes.registry import UnknownPassError, available_passes, register_pass, resolve_pass

__all__ = [
    "Pass",
    "PassContext",
    "PassOptions",
    "PassResult",
    "UnknownPassError",
    "available_passes",
    "register_pass",
    "resolve_pass",
]
