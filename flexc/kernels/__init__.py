"""Expert kernels: Triton kernels with per-expert widths, their dispatch, configs and specialisation.

- :mod:`flexc.kernels.triton_experts`: the kernels and their host wrapper ``moe_forward``;
- :mod:`flexc.kernels.dispatch`: ``backend`` resolution (auto | triton | reference) and
  :func:`triton_forward` (the kernels with the op's signature; :mod:`flexc.ir.backends`
  installs it as the op's CUDA backend);
- :mod:`flexc.kernels.tuning`: block-config tables, lookup and autotuning;
- :mod:`flexc.kernels.specialize`: :func:`specialize` -> :class:`KernelPlan` (``.write(dir)``).

Attributes load lazily, so importing this package does not import Triton. Kernels import
nothing from the rest of flexc.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BACKENDS": "dispatch",
    "interpret_mode": "dispatch",
    "resolve_backend": "dispatch",
    "triton_forward": "dispatch",
    "KernelConfig": "triton_experts",
    "autotune": "tuning",
    "lookup_config": "tuning",
    "KernelPlan": "specialize",
    "kernel_source_for": "specialize",
    "load_plan_module": "specialize",
    "specialize": "specialize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"flexc.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'flexc.kernels' has no attribute {name!r}")
