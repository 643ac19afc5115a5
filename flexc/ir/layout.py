"""The expert weights' layout and gated activation: what the op's ``activation, interleaved,
alpha, limit`` arguments mean, in one place.

``gate_up [E, 2I, H]`` holds gate rows then up rows (``interleaved=False``) or alternating
gate/up rows (``interleaved=True``, GPT-OSS); ``activation`` is one of :data:`ACTIVATIONS`
and ``alpha``/``limit`` parametrise GPT-OSS's ``swiglu_clamped``. :class:`ExpertLayout` is that
argument group as one record; the registered op keeps the four scalar arguments (a custom op's
schema takes no records), and Python code passes ``*layout`` where it forwards them.
"""

from __future__ import annotations

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
