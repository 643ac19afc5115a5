"""CPU inference path of the expert op when every expert hit has the same width.

The reference (:func:`flexc.ir.op.moe_experts_reference`) runs its GEMMs expert by expert
from Python, which at decode sizes costs more than the GEMMs themselves. When the experts a
call hits share one width (full width, uniform tables), the (token, slot) pairs sorted by
expert run as one ``torch._grouped_mm`` for gate/up and one for down, over strided views of
the weights (no copies; bytes read still scale with the width). Same result as the reference
up to float rounding; no autograd, no forward observers.

`python benchmarks/experts_cpu.py --model small` (E=16, H=I=256, top-4, 2 threads; stock
transformers' time over this one, >1 is faster): at full width the op runs at 1.00–1.12x
stock from 1 to 2,048 tokens, where the reference loop ran at 0.73–1.06x; uniform half width
at 1.07–1.58x. A learned table's mixed widths still take the loop (0.83–0.88x at 1–8 tokens,
1.02–1.43x from 64 as the widths shrink the GEMMs). :func:`shared_width` picks the calls
this path serves; the op registers it as its CPU path (``flexc.ir.op._cpu_forward``).
"""

from __future__ import annotations

import torch

from flexc.ir.layout import apply_activation, gate_up_rows
from flexc.ir.routing import route_by_expert


def _grouped_operand(t: torch.Tensor) -> bool:
    # grouped_mm reads operands with a unit stride in one of the last two dims and every other
    # stride a multiple of 16 bytes.
    unit = t.stride(-1) == 1 or t.stride(-2) == 1
    return unit and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)


def shared_width(hidden: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 widths: torch.Tensor | None, interleaved: bool) -> int | None:
    """The width every expert hit shares, where the grouped path runs and pays; else None."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (
            hidden.dtype == gate_up.dtype == down.dtype):
        return None
    intermediate = down.shape[2]
    if widths is None:
        width = intermediate
    else:
        hit = torch.unique(widths[torch.unique(topk_ids)])
        if hit.numel() != 1:
            return None
        width = min(max(int(hit), 0), intermediate)
    size = gate_up.element_size()
    if width * size % 16 or hidden.shape[1] * size % 16:  # activations are [n, width] and [n, H]
        return None
    gate = gate_up_rows(gate_up.transpose(0, 1), interleaved, 0).transpose(0, 1)
    if not (_grouped_operand(gate.transpose(1, 2)) and _grouped_operand(down.transpose(1, 2))):
        return None
    return width


def moe_experts_grouped(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, width: int,
                        activation="silu", interleaved=False, alpha=1.702, limit=7.0) -> torch.Tensor:
    """The op's forward with every expert hit at ``width`` (from :func:`shared_width`); inference only."""
    num_tokens, hidden_size = hidden.shape
    num_experts, _, intermediate = down.shape
    if width == 0:  # removed experts contribute nothing, bias included
        return hidden.new_zeros(num_tokens, hidden_size)
    routing = route_by_expert(topk_ids, num_experts)
    offs = torch.cumsum(routing.count_tensor, 0).to(torch.int32)
    x = hidden[routing.token]
    if interleaved or width == intermediate:  # gate and up rows form one block: one GEMM
        both = torch._grouped_mm(x, gate_up[:, : 2 * width].transpose(1, 2), offs=offs)
        gate, up = (both[:, 0::2], both[:, 1::2]) if interleaved else (both[:, :width], both[:, width:])
    else:
        gate_rows = gate_up_rows(gate_up.transpose(0, 1), False, 0).transpose(0, 1)
        up_rows = gate_up_rows(gate_up.transpose(0, 1), False, 1).transpose(0, 1)
        gate = torch._grouped_mm(x, gate_rows[:, :width].transpose(1, 2), offs=offs)
        up = torch._grouped_mm(x, up_rows[:, :width].transpose(1, 2), offs=offs)
    if gate_up_bias is not None:
        bias = gate_up_bias[routing.sorted_experts]
        gate = gate + gate_up_rows(bias.t(), interleaved, 0).t()[:, :width]
        up = up + gate_up_rows(bias.t(), interleaved, 1).t()[:, :width]
    out = torch._grouped_mm(apply_activation(gate, up, activation, alpha, limit),
                            down[:, :, :width].transpose(1, 2), offs=offs)
    if down_bias is not None:
        out = out + down_bias[routing.sorted_experts]
    y = (out.to(topk_weights.dtype) * routing.sorted_weights(topk_weights)[:, None]).to(hidden.dtype)
    return routing.combine(y, num_tokens)  # deterministic reduction over the k slots, as in the reference
