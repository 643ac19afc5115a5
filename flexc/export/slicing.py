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

from flexc.ir.experts_impl import module_weights


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
    weights = module_weights(experts)
    rows = weights.layout.rows
    widths = [int(w) for w in torch.as_tensor(widths).tolist()]
    if len(widths) != weights.num_experts:
        raise ValueError(f"{len(widths)} widths for {weights.num_experts} experts")
    out = []
    with torch.no_grad():
        for e, w in enumerate(widths):
            piece = ExpertSlice(
                gate=rows(weights.gate_up[e], 0)[:w].contiguous().clone(),
                up=rows(weights.gate_up[e], 1)[:w].contiguous().clone(),
                down=weights.down[e][:, :w].contiguous().clone(),
            )
            if weights.gate_up_bias is not None:
                piece.gate_bias = rows(weights.gate_up_bias[e], 0)[:w].contiguous().clone()
                piece.up_bias = rows(weights.gate_up_bias[e], 1)[:w].contiguous().clone()
                piece.down_bias = weights.down_bias[e].detach().contiguous().clone()
            out.append(piece)
    activation, _, alpha, limit = weights.layout
    return LayerSlices(out, activation, float(alpha), float(limit))


def slice_scales(experts: nn.Module, gate_up_scales: torch.Tensor, down_scales: torch.Tensor, widths: list[int],
                 group: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantization scales cut like :func:`slice_experts` cuts the weights: per expert, ``gate_up [2w, H/group]``
    (its gate rows then its up rows) and ``down [H, w/group]`` (``gate_up_scales [E, 2I, H/group]`` and
    ``down_scales [E, H, I/group]`` in the module's layout; each width a multiple of ``group``)."""
    rows = module_weights(experts).layout.rows
    return [(torch.cat([rows(gate_up_scales[e], 0)[:w], rows(gate_up_scales[e], 1)[:w]]),
             down_scales[e][:, : w // group].contiguous()) for e, w in enumerate(int(w) for w in widths)]
