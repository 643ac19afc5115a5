"""Per-expert weights cut to their widths, in one canonical layout (for sliced and ONNX exports).

Whatever the family's storage (gate/up concatenated or interleaved, transposed or not), an
expert of width ``w`` becomes ``gate [w, H]``, ``up [w, H]``, ``down [H, w]`` and, where the
family has biases, ``gate_bias [w]``, ``up_bias [w]``, ``down_bias [H]``. The tensors are
fresh contiguous copies: the pruned channels are physically gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flexc.ir.experts_impl import canonical_weights, expert_activation
from flexc.ir.op import gate_up_rows


@dataclass
class ExpertSlice:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.gate.shape[0]


@dataclass
class LayerSlices:
    """One MoE layer's experts at their widths, plus how to compute them."""

    experts: list[ExpertSlice]
    activation: str  # see flexc.ir.op.ACTIVATIONS
    alpha: float
    limit: float

    @property
    def widths(self) -> list[int]:
        return [e.width for e in self.experts]


def slice_experts(experts: nn.Module, widths: torch.Tensor | list[int]) -> LayerSlices:
    """Cut a Hugging Face experts module's weights to ``widths [E]`` (no change to the module)."""
    gate_up, down = canonical_weights(experts)
    interleaved = not experts.is_concatenated
    has_bias = bool(getattr(experts, "has_bias", False))
    widths = [int(w) for w in torch.as_tensor(widths).tolist()]
    if len(widths) != gate_up.shape[0]:
        raise ValueError(f"{len(widths)} widths for {gate_up.shape[0]} experts")
    out = []
    with torch.no_grad():
        for e, w in enumerate(widths):
            piece = ExpertSlice(
                gate=gate_up_rows(gate_up[e], interleaved, 0)[:w].contiguous().clone(),
                up=gate_up_rows(gate_up[e], interleaved, 1)[:w].contiguous().clone(),
                down=down[e][:, :w].contiguous().clone(),
            )
            if has_bias:
                piece.gate_bias = gate_up_rows(experts.gate_up_proj_bias[e], interleaved, 0)[:w].contiguous().clone()
                piece.up_bias = gate_up_rows(experts.gate_up_proj_bias[e], interleaved, 1)[:w].contiguous().clone()
                piece.down_bias = experts.down_proj_bias[e].detach().contiguous().clone()
            out.append(piece)
    activation, alpha, limit = expert_activation(experts)
    return LayerSlices(out, activation, float(alpha), float(limit))
