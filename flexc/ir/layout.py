"""The expert weights' layout and gated activation: what the op's ``activation, interleaved,
alpha, limit`` arguments mean, in one place.

``gate_up [E, 2I, H]`` holds gate rows then up rows (``interleaved=False``) or alternating
gate/up rows (``interleaved=True``, GPT-OSS); ``activation`` is one of :data:`ACTIVATIONS`
and ``alpha``/``limit`` parametrise GPT-OSS's ``swiglu_clamped``. :class:`ExpertLayout` is that
argument group as one record, and :class:`ExpertWeights` one layer's weights with their layout:
the value every path takes. The registered op and the graph nodes that stand in for it keep the
flat arguments (a custom op's schema takes no records): they convert once, with
:meth:`ExpertWeights.of` and :meth:`ExpertWeights.op_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped")


class ExpertLayout(NamedTuple):
    """The op's ``activation, interleaved, alpha, limit`` arguments (in that order)."""

    activation: str = "silu"
    interleaved: bool = False
    alpha: float = 1.702
    limit: float = 7.0

    def rows(self, t: torch.Tensor, which: int) -> torch.Tensor:
        """Gate (``which=0``) or up (``which=1``) rows of ``t`` (see :func:`gate_up_rows`)."""
        return gate_up_rows(t, self.interleaved, which)

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` (see :func:`apply_activation`)."""
        return apply_activation(gate, up, self.activation, self.alpha, self.limit)


class QuantScales(NamedTuple):
    """Group scales of quantized expert weights: ``gate_up [E, 2I, H/group]``, ``down [E, H, I/group]``."""

    gate_up: torch.Tensor
    down: torch.Tensor
    group: int


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """One MoE layer's routed-expert weights in the op's canonical form, and how they apply: the one
    value the op's backends, the kernels, the masked training function and the serving layers take.

    ``gate_up [E, 2I, H]`` (gate rows then up rows, or alternating with ``layout.interleaved``; may be
    a transposed view), ``down [E, H, I]``, ``gate_up_bias [E, 2I]`` and ``down_bias [E, H]`` where the
    family has biases. Holds views, never copies.

    With ``scales`` (a quantized layer, see :mod:`flexc.ir.quant`) ``gate_up`` and ``down`` hold int8
    integer codes and each weight is ``code * scale`` of its group; :meth:`expert` dequantizes one
    expert's kept prefix. Only the reference path (inference) runs quantized weights.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    layout: ExpertLayout = ExpertLayout()
    scales: QuantScales | None = None

    def expert(self, e: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s ``gate_up`` and ``down`` for a width of ``width`` channels: views of the stored
        weights, or (quantized) only the kept rows and columns, dequantized to ``dtype``, in the same
        layout (``[2w, H]`` gate/up rows, ``[H, w]``)."""
        if self.scales is None:
            return self.gate_up[e], self.down[e]
        from flexc.ir.quant.nested import dequantize

        group, rows = self.scales.group, self.layout.rows
        gate = dequantize(rows(self.gate_up[e], 0)[:width], rows(self.scales.gate_up[e], 0)[:width], group, dtype)
        up = dequantize(rows(self.gate_up[e], 1)[:width], rows(self.scales.gate_up[e], 1)[:width], group, dtype)
        gate_up = torch.stack([gate, up], dim=1).flatten(0, 1) if self.layout.interleaved else torch.cat([gate, up])
        cols = -(-width // group)
        down = dequantize(self.down[e][:, : cols * group], self.scales.down[e][:, :cols], group, dtype)
        return gate_up, down[:, :width]

    @classmethod
    def of(cls, gate_up, down, gate_up_bias, down_bias, activation, interleaved, alpha, limit) -> "ExpertWeights":
        """From the op's flat arguments (the custom op and the graph nodes that stand in for it)."""
        return cls(gate_up, down, gate_up_bias, down_bias, ExpertLayout(activation, interleaved, float(alpha),
                                                                        float(limit)))

    def op_args(self, widths: torch.Tensor | None) -> tuple:
        """The op's arguments after ``hidden, topk_ids, topk_weights``, ``widths`` among them."""
        if self.scales is not None:
            raise ValueError("quantized expert weights run on the reference path only (inference); the op, its "
                             "kernels, exports and training take dequantized weights")
        activation, interleaved, alpha, limit = self.layout
        return (self.gate_up, self.down, self.gate_up_bias, self.down_bias, widths, activation, bool(interleaved),
                float(alpha), float(limit))  # the op's schema: exact Python types

    @property
    def num_experts(self) -> int:
        return self.down.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if t is not None)


def apply_activation(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """The gated activation ``act(gate) * up`` of each family (GPT-OSS's clamped SwiGLU included)."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "relu":
        return F.relu(gate) * up
    if activation == "swiglu_clamped":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown expert activation {activation!r}; expected one of {ACTIVATIONS}")


def gate_up_rows(t: torch.Tensor, interleaved: bool, which: int) -> torch.Tensor:
    """View of the gate (``which=0``) or up (``which=1``) rows of ``t`` along dim 0.

    ``t`` is one expert's ``[2I, H]`` weight or ``[2I]`` bias; concatenated layouts keep gate
    rows first, interleaved layouts alternate gate and up rows.
    """
    if interleaved:
        return t[which::2]
    half = t.shape[0] // 2
    return t[which * half : (which + 1) * half]
