"""The IR: the canonical expert op, family adapters, lowering to a FlexGraph.

The family adapters load eagerly (no torch); the rest on first use: importing torch and
transformers' modeling code takes seconds that ``flexc inspect --families`` or
``flexc validate`` should not pay.
"""

import sys
import types

from flexc.ir.families import (
    FamilyAdapter,
    NotMoEError,
    UnsupportedFamilyError,
    UnsupportedModelError,
    detect_family,
    supported_families,
)

# name -> submodule that defines it
_LAZY = {
    "FlexGraph": "graph",
    "ExpertGroup": "groups",
    "find_expert_groups": "groups",
    "lower": "lower",
    "run_experts": "op",
    "ExpertWeights": "op",
    "moe_experts_reference": "op",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule flexc.ir.lower binds it here as ``lower``: keep the function.
        if name == "lower" and isinstance(value, types.ModuleType):
            value = value.lower
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "ExpertGroup",
    "FamilyAdapter",
    "FlexGraph",
    "NotMoEError",
    "UnsupportedFamilyError",
    "UnsupportedModelError",
    "ExpertWeights",
    "run_experts",
    "detect_family",
    "find_expert_groups",
    "lower",
    "moe_experts_reference",
    "supported_families",
]
