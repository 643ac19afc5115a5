"""Choosing between the Triton kernels and the reference op, and plugging the kernels in.

``backend``:

- ``"auto"``: Triton on CUDA tensors, the torch reference elsewhere;
- ``"triton"``: the Triton kernels; on a machine without CUDA this is an error unless
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
- ``"reference"``: :func:`flexc.ir.op.moe_experts_reference`.

Plugging in:

- :func:`install_cuda_backend` makes ``torch.ops.flexc.moe_experts`` run the kernels on CUDA
  tensors (its autograd still uses the reference backward);
- :func:`register_transformers_experts` registers ``"flexc_triton"`` in transformers'
  ``ALL_EXPERTS_FUNCTIONS``, so ``model.set_experts_implementation("flexc_triton")`` works on a
  plain transformers model. A module's optional ``flexc_widths`` buffer (``[E]`` int) carries
  per-expert widths.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")
TRANSFORMERS_NAME = "flexc_triton"
WIDTHS_ATTR = "flexc_widths"


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


def triton_forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias=None, down_bias=None, widths=None,
                   activation="silu", interleaved=False, alpha=1.702, limit=7.0, config=None):
    """The Triton path with the op's positional signature; picks the block config by shape and batch."""
    mod = kernels_module()
    if config is None:
        from flexc.kernels.tuning import lookup_config

        config = lookup_config(gate_up.shape[0], hidden.shape[1], down.shape[2], topk_ids.shape[1], gate_up.dtype,
                               hidden.device, hidden.shape[0])
    return mod.moe_forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                           activation, interleaved, alpha, limit, config=config)


def moe_experts(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias=None, down_bias=None, widths=None,
                activation="silu", interleaved=False, alpha=1.702, limit=7.0, *, backend: str = "auto"):
    """The routed-experts forward through the chosen backend (forward only for ``"triton"``)."""
    if resolve_backend(backend, hidden.device) == "triton":
        return triton_forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                              activation, interleaved, alpha, limit)
    from flexc.ir.op import moe_experts_reference

    return moe_experts_reference(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                                 activation, interleaved, alpha, limit)


def _op_backend(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths, activation,
                interleaved, alpha, limit):
    return triton_forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                          activation, interleaved, alpha, limit)


def install_cuda_backend(enable: bool = True) -> None:
    """Route ``torch.ops.flexc.moe_experts`` on CUDA tensors to the kernels (``False`` undoes it)."""
    from flexc.ir.op import register_backend

    register_backend("cuda", _op_backend if enable else None)


# --------------------------------------------------------------------------------------------
# transformers experts implementation

def _activation_of(experts: torch.nn.Module) -> tuple[str, float, float] | None:
    """(activation, alpha, limit) of a transformers experts module, or None if not expressible."""
    cached = getattr(experts, "_flexc_triton_activation", None)
    if cached is not None:
        return cached or None
    found: tuple[str, float, float] | None = None
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover
        _default_apply_gate = None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate is not _default_apply_gate:
        # Families with their own gate: the clamped SwiGLU of GPT-OSS is the one we know.
        if hasattr(experts, "alpha") and hasattr(experts, "limit"):
            found = ("swiglu_clamped", float(experts.alpha), float(experts.limit))
    else:
        act = getattr(experts, "act_fn", None)
        name = type(act).__name__
        if isinstance(act, torch.nn.SiLU) or name == "SiLUActivation":
            found = ("silu", 1.702, 7.0)
        elif name == "GELUActivation" or isinstance(act, torch.nn.GELU) and act.approximate == "none":
            found = ("gelu", 1.702, 7.0)
        elif name in ("GELUTanh", "NewGELUActivation", "FastGELUActivation", "PytorchGELUTanh") or (
                isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
            found = ("gelu_tanh", 1.702, 7.0)
        elif isinstance(act, torch.nn.ReLU):
            found = ("relu", 1.702, 7.0)
    experts._flexc_triton_activation = found or ()
    return found


def _supported(experts: torch.nn.Module) -> bool:
    return (getattr(experts, "has_gate", True) and not getattr(experts, "has_post_expert_norm", False)
            and not getattr(experts, "_is_expert_parallel", False) and hasattr(experts, "gate_up_proj"))


def transformers_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                 top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ALL_EXPERTS_FUNCTIONS`` entry: the kernels on CUDA (or in the interpreter), else the reference.

    Falls back to transformers' ``grouped_mm`` forward for experts the op cannot express
    (no gate, post-expert norm, expert parallelism, unknown activation).
    """
    act = _activation_of(self) if _supported(self) else None
    if act is None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    activation, alpha, limit = act
    gate_up, down = self.gate_up_proj, self.down_proj
    if self.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    has_bias = getattr(self, "has_bias", False)
    args = (hidden_states, top_k_index, top_k_weights, gate_up, down,
            self.gate_up_proj_bias if has_bias else None, self.down_proj_bias if has_bias else None,
            getattr(self, WIDTHS_ATTR, None), activation, not self.is_concatenated, alpha, limit)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (args[0], args[2], args[3], args[4], args[5], args[6]))
    if needs_grad:
        # Differentiable path: the custom op (forward via its registered backend, reference backward).
        import flexc.ir.op  # noqa: F401 -- registers torch.ops.flexc.moe_experts

        return torch.ops.flexc.moe_experts(*args[:10], float(alpha), float(limit))
    return moe_experts(*args, backend="auto" if not interpret_mode() else "triton")


def register_transformers_experts(name: str = TRANSFORMERS_NAME) -> str:
    """Register the kernels as a transformers experts implementation; returns the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, transformers_experts_forward)
    return name


__all__ = [
    "BACKENDS", "TRANSFORMERS_NAME", "install_cuda_backend", "interpret_mode", "kernels_module", "moe_experts",
    "register_transformers_experts", "resolve_backend", "transformers_experts_forward", "triton_forward",
]
