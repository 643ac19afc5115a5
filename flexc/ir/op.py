"""The canonical expert op: one MoE layer's routed experts, with optional per-expert or per-pair widths.

``torch.ops.flexc.moe_experts`` is the single node every lowered MoE layer becomes. Its torch
implementation here is the *reference*: every kernel (Triton, sliced export, ONNX) is checked
against it.

Canonical form (what family adapters map checkpoints to, as views, never copies):

- ``hidden``       ``[T, H]``   token activations
- ``topk_ids``     ``[T, k]``   int, routed expert of each (token, slot)
- ``topk_weights`` ``[T, k]``   routing weight of each (token, slot)
- ``gate_up``      ``[E, 2I, H]`` gate rows then up rows (``interleaved=False``) or
  gate/up alternating by row (``interleaved=True``, GPT-OSS); may be a transposed view
- ``down``         ``[E, H, I]``
- ``gate_up_bias`` ``[E, 2I]`` and ``down_bias`` ``[E, H]`` where the family has biases
- ``widths``       ``[E]`` int (optional): expert ``e`` uses only intermediate channels
  ``[0, widths[e])``. Width 0 removes the expert: it contributes nothing, bias included.
  Or ``[T, k]`` like ``topk_ids``: the width of each routed (token, slot) pair, so one call
  serves tokens at different budgets (nested weights: every width is a prefix of the same
  rows). Where every pair of an expert has one width the two forms compute the same thing.
- ``activation``   one of :data:`ACTIVATIONS`; ``alpha``/``limit`` parametrise ``swiglu_clamped``.

Expert ``e`` applied to a token ``x`` computes ``down_e[:, :w] @ act(gate_e[:w] x, up_e[:w] x)``
(plus biases), and the layer output is the routing-weighted sum over the ``k`` slots.

Python code holds a layer's weights and layout as one :class:`~flexc.ir.layout.ExpertWeights` and
calls :func:`run_experts` (the one public entry point); backends take ``(hidden, topk_ids,
topk_weights, weights, widths)``. Only the registered op, and the graph modules that stand in for
its nodes, carry the flat arguments above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flexc.ir.grouped import moe_experts_cpu
from flexc.ir.layout import (ACTIVATIONS, ExpertLayout, ExpertWeights, apply_activation,  # noqa: F401 -- re-exported
                             gate_up_rows)
from flexc.ir.routing import route_by_expert

_OP_NAME = "flexc::moe_experts"


def expert_ffn(
    x: torch.Tensor,
    gate_up_e: torch.Tensor,
    down_e: torch.Tensor,
    gate_up_bias_e: torch.Tensor | None,
    down_bias_e: torch.Tensor | None,
    width: int | torch.Tensor,
    layout: ExpertLayout,
    observe_inner: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One expert on its tokens ``x [n, H]``, using its first ``width`` channels, or (``width`` a
    tensor ``[n]``) each token its own first ``width[i]``: the channels past a token's width are
    zeroed before the down projection, and a token of width 0 gets nothing, bias included.
    Differentiable."""
    rows = width if isinstance(width, torch.Tensor) else None
    if rows is not None:
        width = int(rows.max())
    gate = x @ layout.rows(gate_up_e, 0)[:width].t()
    up = x @ layout.rows(gate_up_e, 1)[:width].t()
    if gate_up_bias_e is not None:
        gate = gate + layout.rows(gate_up_bias_e, 0)[:width]
        up = up + layout.rows(gate_up_bias_e, 1)[:width]
    inner = layout.act(gate, up)
    if rows is not None:
        inner = inner * (torch.arange(width, device=x.device) < rows[:, None]).to(inner.dtype)
    if observe_inner is not None:
        observe_inner(inner)
    out = inner @ down_e[:, :width].t()
    if down_bias_e is not None:
        out = out + down_bias_e
    if rows is not None:
        out = out * (rows > 0)[:, None].to(out.dtype)
    return out


def expert_widths(widths: torch.Tensor | None, routing, topk_ids: torch.Tensor, full: int) -> list:
    """Each expert's width as :func:`expert_ffn` takes it: an int where all its pairs share one
    (always, for ``widths`` ``[E]``), else its pairs' widths ``[n]`` in ``routing``'s sorted order."""
    num_experts = len(routing.counts)
    if widths is None:
        return [full] * num_experts
    if widths.dim() == 1:
        values = widths.tolist()
        if len(values) != num_experts or any(w < 0 or w > full for w in values):
            raise ValueError(f"widths must be {num_experts} integers in [0, {full}], got {values}")
        return values
    if tuple(widths.shape) != tuple(topk_ids.shape):
        raise ValueError(f"widths must be [E] = [{num_experts}] (per expert) or [T, k] = {list(topk_ids.shape)} "
                         f"like topk_ids (per routed pair); got {list(widths.shape)}")
    pairs = widths.reshape(-1)[routing.order]
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) > full):
        raise ValueError(f"widths must be in [0, {full}]; got values from {int(pairs.min())} to {int(pairs.max())}")
    out: list = []
    for e in range(num_experts):
        seg = pairs[routing.segment(e)]
        if seg.numel() == 0 or bool((seg == seg[0]).all()):
            out.append(int(seg[0]) if seg.numel() else full)
        else:
            out.append(seg.to(torch.long))
    return out


def _widest(width: int | torch.Tensor, full: int) -> int:
    """The most channels any pair of an expert uses (its width, or its pairs' largest)."""
    return int(width.max()) if isinstance(width, torch.Tensor) else min(int(width), full)


def _no_channels(width: int | torch.Tensor) -> bool:
    return not isinstance(width, torch.Tensor) and width == 0


def moe_experts_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          weights: ExpertWeights, widths: torch.Tensor | None = None) -> torch.Tensor:
    """Reference forward, batched by expert: one pair of GEMMs per expert hit, no per-token loop.

    Differentiable with plain autograd. Active forward observers (see
    :class:`observe_expert_forward`) see the routing and each expert's inputs and
    intermediate activations.
    """
    num_tokens, hidden_size = hidden.shape
    gate_up, down, gate_up_bias, down_bias, layout = (weights.gate_up, weights.down, weights.gate_up_bias,
                                                      weights.down_bias, weights.layout)
    num_experts, _, intermediate = down.shape
    routing = route_by_expert(topk_ids, num_experts)
    widths_ = expert_widths(widths, routing, topk_ids, intermediate)
    x_sorted = hidden[routing.token]
    w_sorted = routing.sorted_weights(topk_weights)
    observers = list(_FORWARD_OBSERVERS)
    for fn in observers:
        fn({"event": "routing", "gate_up": gate_up, "topk_ids": topk_ids, "topk_weights": topk_weights,
            "num_experts": num_experts})
    pieces = []
    for e in range(num_experts):
        seg = routing.segment(e)
        n = routing.counts[e]
        if n == 0:
            continue
        if _no_channels(widths_[e]):
            pieces.append(hidden.new_zeros(n, hidden_size))
            continue
        x_e = x_sorted[seg]
        observe_inner = None
        if observers:
            def observe_inner(inner, e=e, x_e=x_e):
                for fn in observers:
                    fn({"event": "expert", "gate_up": gate_up, "expert": e, "x": x_e, "inner": inner})
        gate_up_e, down_e = weights.expert(e, _widest(widths_[e], intermediate), hidden.dtype)
        y = expert_ffn(
            x_e,
            gate_up_e,
            down_e,
            None if gate_up_bias is None else gate_up_bias[e],
            None if down_bias is None else down_bias[e],
            widths_[e],
            layout,
            observe_inner,
        )
        pieces.append((y.to(w_sorted.dtype) * w_sorted[seg, None]).to(hidden.dtype))
    if not pieces:
        return hidden.new_zeros(num_tokens, hidden_size)
    return routing.combine(torch.cat(pieces), num_tokens)


# --------------------------------------------------------------------------------------------
# The registered custom op.


@torch.library.custom_op(_OP_NAME, mutates_args=())
def moe_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    widths: torch.Tensor | None,
    activation: str,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Routed experts of one MoE layer (see the module docstring for the canonical form)."""
    weights = ExpertWeights.of(gate_up, down, gate_up_bias, down_bias, activation, interleaved, alpha, limit)
    return _dispatch(hidden.device)(hidden, topk_ids, topk_weights, weights, widths)


# The op's backend registry: which forward runs on tensors of which device type. ``_DEFAULTS``
# holds the op's own paths (the grouped-GEMM CPU path below); ``register_backend`` installs
# others over them (flexc.ir.backends: the Triton kernels on CUDA). Anything unregistered runs
# the reference.
_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {}
_DEFAULTS: dict[str, Callable[..., torch.Tensor]] = {}


def register_backend(device_type: str, fn: Callable[..., torch.Tensor] | None) -> None:
    """Route the op's forward on ``device_type`` tensors to ``fn(hidden, topk_ids, topk_weights,
    weights: ExpertWeights, widths)``.

    None removes it: the op's own path for that device type (or the reference) runs again.
    """
    if fn is None:
        _BACKENDS.pop(device_type, None)
    else:
        _BACKENDS[device_type] = fn


def _dispatch(device: torch.device) -> Callable[..., torch.Tensor]:
    return _BACKENDS.get(device.type) or _DEFAULTS.get(device.type) or _reference


def _reference(hidden, topk_ids, topk_weights, weights: ExpertWeights, widths):
    with torch.no_grad():
        return moe_experts_reference(hidden, topk_ids, topk_weights, weights, widths)


def _cpu_forward(hidden, topk_ids, topk_weights, weights: ExpertWeights, widths):
    """The op's CPU path: grouped GEMMs (any widths, flexc.ir.grouped) where they apply, else the reference."""
    if not _FORWARD_OBSERVERS:  # observers see the reference only
        with torch.no_grad():
            out = moe_experts_cpu(hidden, topk_ids, topk_weights, weights, widths)
        if out is not None:
            return out
    return _reference(hidden, topk_ids, topk_weights, weights, widths)


_DEFAULTS["cpu"] = _cpu_forward


@moe_experts.register_fake
def _(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths, activation, interleaved,
      alpha, limit):
    return hidden.new_empty(hidden.shape)


# Names of the differentiable inputs, in the op's argument order.
_GRAD_INPUTS = ("hidden", "topk_weights", "gate_up", "down", "gate_up_bias", "down_bias")
_ARG_INDEX = {"hidden": 0, "topk_weights": 2, "gate_up": 3, "down": 4, "gate_up_bias": 5, "down_bias": 6}


def _setup_context(ctx, inputs, output):
    (hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
     activation, interleaved, alpha, limit) = inputs
    ctx.save_for_backward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths)
    ctx.layout = ExpertLayout(activation, interleaved, alpha, limit)


class _Observers:
    """A context manager that keeps ``fn`` in an observer list while active."""

    registry: list

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def __enter__(self):
        self.registry.append(self.fn)
        return self

    def __exit__(self, *exc):
        self.registry.remove(self.fn)


_FORWARD_OBSERVERS: list[Callable[[dict], None]] = []


class observe_expert_forward(_Observers):
    """Context manager: ``fn(info)`` sees the reference forward of every expert op call.

    Per call, ``info["event"] == "routing"`` with ``gate_up`` (identifies the layer),
    ``topk_ids``, ``topk_weights``; then per expert hit, ``"expert"`` events with ``expert``,
    ``x`` (its tokens' inputs ``[n, H]``) and ``inner`` (its gated activations ``[n, w]``).
    Only the torch reference reports; calibration runs on it.
    """

    registry = _FORWARD_OBSERVERS


# Observers of the backward pass (e.g. Taylor channel scores), called once per expert with
# that expert's local parameter gradients; lets callers accumulate statistics without
# materialising full-size gradient buffers.
GradObserver = Callable[[dict], None]
_GRAD_OBSERVERS: list[GradObserver] = []


class observe_expert_grads(_Observers):
    """Context manager: ``fn(info)`` sees each expert's weight gradients during backward.

    ``info`` holds ``gate_up`` (the layer's ``[E, 2I, H]`` weights as passed to the op; identifies
    the layer), ``expert``, ``width``, ``grad_gate`` / ``grad_up`` ``[w, H]``, ``grad_down``
    ``[H, w]``, and ``grad_gate_bias`` / ``grad_up_bias`` ``[w]`` where the family has biases.
    While an observer is active and the op's weight inputs do not require grad, no weight
    gradient buffer is allocated: gradients exist one expert at a time.
    """

    registry = _GRAD_OBSERVERS


def _backward(ctx, grad_out):
    hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths = ctx.saved_tensors
    layout = ctx.layout
    needs = {name: ctx.needs_input_grad[_ARG_INDEX[name]] for name in _GRAD_INPUTS}
    observe = bool(_GRAD_OBSERVERS)
    num_experts, _, intermediate = down.shape
    k = topk_ids.shape[1]
    routing = route_by_expert(topk_ids, num_experts)
    widths_ = expert_widths(widths, routing, topk_ids, intermediate)

    grad_hidden = torch.zeros_like(hidden) if needs["hidden"] else None
    grad_w_sorted = torch.zeros(routing.order.numel(), dtype=topk_weights.dtype, device=hidden.device)
    grad_gate_up = torch.zeros_like(gate_up) if needs["gate_up"] else None
    grad_down = torch.zeros_like(down) if needs["down"] else None
    grad_gub = torch.zeros_like(gate_up_bias) if needs["gate_up_bias"] and gate_up_bias is not None else None
    grad_db = torch.zeros_like(down_bias) if needs["down_bias"] and down_bias is not None else None

    go_sorted = grad_out.repeat_interleave(k, dim=0)[routing.order]  # grad for each sorted slot
    x_sorted = hidden[routing.token]
    w_sorted = routing.sorted_weights(topk_weights)
    want_weights = observe or any(needs[n] for n in ("gate_up", "down", "gate_up_bias", "down_bias"))

    for e in range(num_experts):
        n, width = routing.counts[e], widths_[e]
        if n == 0 or _no_channels(width):
            continue
        seg = routing.segment(e)
        with torch.enable_grad():
            x = x_sorted[seg].detach().requires_grad_(needs["hidden"])
            gu = gate_up[e].detach().requires_grad_(want_weights)
            dn = down[e].detach().requires_grad_(want_weights)
            gub = None if gate_up_bias is None else gate_up_bias[e].detach().requires_grad_(want_weights)
            db = None if down_bias is None else down_bias[e].detach().requires_grad_(want_weights)
            y = expert_ffn(x, gu, dn, gub, db, width, layout)
            go = go_sorted[seg]
            # d out / d routing weight = <grad_out, expert output>
            grad_w_sorted[seg] = (go.to(y.dtype) * y.detach()).sum(dim=-1).to(grad_w_sorted.dtype)
            scaled = (go.to(w_sorted.dtype) * w_sorted[seg, None]).to(y.dtype)
            leaves = [t for t in (x, gu, dn, gub, db) if t is not None and t.requires_grad]
            grads = dict(zip([id(t) for t in leaves], torch.autograd.grad(y, leaves, scaled))) if leaves else {}
        if grad_hidden is not None:
            grad_hidden.index_add_(0, routing.token[seg], grads[id(x)])
        if not want_weights:
            continue
        g_gu, g_dn = grads[id(gu)], grads[id(dn)]
        if grad_gate_up is not None:
            grad_gate_up[e] += g_gu
        if grad_down is not None:
            grad_down[e] += g_dn
        if grad_gub is not None:
            grad_gub[e] += grads[id(gub)]
        if grad_db is not None:
            grad_db[e] += grads[id(db)]
        if observe:
            width = int(width.max()) if isinstance(width, torch.Tensor) else width  # per pair: the widest
            info = {
                "expert": e,
                "width": width,
                "gate_up": gate_up,
                "down": down,
                "grad_gate": layout.rows(g_gu, 0)[:width],
                "grad_up": layout.rows(g_gu, 1)[:width],
                "grad_down": g_dn[:, :width],
                "num_tokens": n,
            }
            if gub is not None:
                info["gate_up_bias"] = gate_up_bias
                info["grad_gate_bias"] = layout.rows(grads[id(gub)], 0)[:width]
                info["grad_up_bias"] = layout.rows(grads[id(gub)], 1)[:width]
            for fn in list(_GRAD_OBSERVERS):
                fn(info)

    grad_topk_weights = None
    if needs["topk_weights"]:
        grad_topk_weights = routing.unsort(grad_w_sorted).view_as(topk_weights)
    return (grad_hidden, None, grad_topk_weights, grad_gate_up, grad_down, grad_gub, grad_db, None,
            None, None, None, None)


moe_experts.register_autograd(_backward, setup_context=_setup_context)


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: ExpertWeights,
                widths: torch.Tensor | None = None) -> torch.Tensor:
    """One MoE layer's routed experts: the public entry point to ``torch.ops.flexc.moe_experts``,
    on the backend registered for the tensors' device (differentiable, through the op where autograd
    or a compile needs it). :func:`flexc.ir.backends.backend_forward` gives one backend's forward."""
    if weights.layout.activation not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {weights.layout.activation!r}; expected one of {ACTIVATIONS}")
    if weights.scales is not None:  # int codes: each expert hit dequantizes its kept prefix
        if _needs_autograd(hidden, topk_weights) or torch.compiler.is_compiling():
            raise ValueError("quantized expert weights run in eager inference only (no autograd, no compile)")
        return moe_experts_reference(hidden, topk_ids, topk_weights, weights, widths)
    if not torch.compiler.is_compiling() and not _needs_autograd(hidden, topk_weights, *weights.tensors()):
        # Eager inference (generate, evaluation): the op's forward without the custom-op
        # dispatch, which costs more than a decode step's expert GEMMs on CPU. Exports,
        # compiles and training still go through the op.
        return _dispatch(hidden.device)(hidden, topk_ids, topk_weights, weights, widths)
    return torch.ops.flexc.moe_experts(hidden, topk_ids, topk_weights, *weights.op_args(widths))


def op_overloads() -> Sequence[object]:
    """The op overload(s) a lowered graph's expert nodes call."""
    return (torch.ops.flexc.moe_experts.default,)
