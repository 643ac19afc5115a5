"""Choosing between the Triton kernels and the reference op, and loading the kernels.

``backend``:

- ``"auto"``: Triton on CUDA tensors, the torch reference elsewhere;
- ``"triton"``: the Triton kernels; on a machine without CUDA this is an error unless
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
- ``"reference"``: the op's torch reference.

:func:`triton_forward` is the kernels with the expert op's positional signature. The kernels
are a leaf layer: plugging them into the op (its backend registry) is
:mod:`flexc.ir.backends`' job, and every transformers model reaches them through the one
flexc experts implementation (:mod:`flexc.ir.experts_impl`).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 -- any import failure means "not available"
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device``; raises on impossible requests."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package, which is not importable here")
    if device.type == "cuda":
        return "triton"
    if interpret_mode():
        return "triton"
    raise RuntimeError(
        f"backend 'triton' needs CUDA tensors, got tensors on {device}"
        + ("" if torch.cuda.is_available() else " and no CUDA device is present")
        + ". Use backend 'auto' or 'reference', or set TRITON_INTERPRET=1 to run the kernels in "
        "Triton's (slow) interpreter."
    )


def _interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover -- older triton
        return False
    return isinstance(fn, InterpretedFunction)


def kernels_module() -> ModuleType:
    """``flexc.kernels.triton_experts``, loaded in the mode ``TRITON_INTERPRET`` asks for.

    Triton fixes compiled vs. interpreted when a kernel is defined, its own library included:
    ``TRITON_INTERPRET=1`` must be set before anything imports triton. If only this module was
    imported in the other mode, it is reloaded; if triton itself was, that is a clear error.
    """
    import triton.language.standard as tl_standard

    from flexc.kernels import triton_experts as mod

    want = interpret_mode()
    if _interpreted(tl_standard.sum) != want:
        raise RuntimeError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} changed after triton was imported; "
            "set it before anything imports triton (e.g. at the very top of the script or test module)"
        )
    if _interpreted(mod._gate_up_kernel) != want:
        mod = importlib.reload(mod)
    return mod


def triton_forward(hidden, topk_ids, topk_weights, weights, widths=None, config=None):
    """The Triton path with a backend's signature (``weights``: an ``ExpertWeights``); picks the block
    config by shape and batch."""
    mod = kernels_module()
    if config is None:
        from flexc.kernels.tuning import lookup_config

        config = lookup_config(weights.num_experts, hidden.shape[1], weights.intermediate_size, topk_ids.shape[1],
                               weights.gate_up.dtype, hidden.device, hidden.shape[0])
    return mod.moe_forward(hidden, topk_ids, topk_weights, *weights.op_args(widths), config=config)


__all__ = ["BACKENDS", "interpret_mode", "kernels_module", "resolve_backend", "triton_available", "triton_forward"]
