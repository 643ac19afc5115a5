"""Channel importance scores for ``rank_channels``, and their registry.

A score accumulates statistics while calibration batches run through the graph, from the
expert op's forward observers (inputs, gated activations) and, if ``needs_backward``, its
backward observers (per-expert weight gradients, one expert at a time), then returns a
``[E, I]`` score per MoE layer. Register your own with :func:`register_score`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from flexc.ir.op import gate_up_rows

_SCORES: dict[str, type["ChannelScore"]] = {}


def register_score(cls: type["ChannelScore"]) -> type["ChannelScore"]:
    _SCORES[cls.name] = cls
    return cls


def available_scores() -> list[str]:
    return sorted(_SCORES)


def resolve_score(name: str) -> type["ChannelScore"]:
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    if name not in _SCORES:
        raise ValueError(f"unknown channel score {name!r}; known: {', '.join(available_scores())}")
    return _SCORES[name]


class ChannelScore:
    """Base class. ``layers`` maps a layer key to ``(num_experts, hidden, intermediate)``."""

    name: ClassVar[str] = ""
    needs_backward: ClassVar[bool] = False
    #: The accumulators (``{layer: tensor}`` attributes) that are sums over batches, so that a
    #: data-parallel compile (torchrun) adds them up over ranks before :meth:`result`. None:
    #: not declared, and such a score is refused under torchrun.
    summed: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, layers: dict[int, tuple[int, int, int]], interleaved: dict[int, bool]):
        self.layers = layers
        self.interleaved = interleaved
        self.batches = 0

    def on_forward(self, layer: int, info: dict) -> None:
        pass

    def on_backward(self, layer: int, info: dict) -> None:
        pass

    def end_batch(self) -> None:
        self.batches += 1

    def all_reduce(self) -> None:
        """Sum the batch count and the ``summed`` accumulators over ranks (a no-op in one process)."""
        from flexc.utils.distributed import all_reduce_sum

        for attr in self.summed or ():
            for layer, acc in getattr(self, attr).items():
                all_reduce_sum(acc, f"the {self.name} score's {attr} (layer {layer})")
        self.batches = int(all_reduce_sum(torch.tensor(self.batches), "the calibration batch count"))

    def result(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """``[E, I]`` scores per layer; ``weights`` gives each layer's canonical (gate_up, down)."""
        raise NotImplementedError


def _zeros(layers, which: str) -> dict[int, torch.Tensor]:
    index = {"intermediate": 2, "hidden": 1}[which]
    return {k: torch.zeros(v[0], v[index], dtype=torch.float64) for k, v in layers.items()}


def _add(acc: dict[int, torch.Tensor], layer: int, index, value: torch.Tensor) -> None:
    """``acc[layer][index] += value`` in float64, the accumulator moving to ``value``'s device on
    first use (a CUDA calibration accumulates on the GPU; results come back to the CPU)."""
    if acc[layer].device != value.device:
        acc[layer] = acc[layer].to(value.device)
    acc[layer][index] += value.detach().double()


@register_score
class TaylorScore(ChannelScore):
    """First-order Taylor saliency: per channel, the sum over its parameters (gate row, up row,
    down column, and their biases) of ``(theta * dL/dtheta)^2``, averaged over batches."""

    name = "taylor"
    needs_backward = True
    summed = ("acc",)

    def __init__(self, layers, interleaved):
        super().__init__(layers, interleaved)
        self.acc = _zeros(layers, "intermediate")

    def on_backward(self, layer, info):
        e, w, inter = info["expert"], info["width"], self.interleaved[layer]
        gate_up, down = info["gate_up"][e], info["down"][e]
        gate_w = gate_up_rows(gate_up, inter, 0)[:w]
        up_w = gate_up_rows(gate_up, inter, 1)[:w]
        s = ((gate_w * info["grad_gate"]) ** 2).sum(1) + ((up_w * info["grad_up"]) ** 2).sum(1)
        s = s + ((down[:, :w] * info["grad_down"]) ** 2).sum(0)
        if "gate_up_bias" in info:
            bias = info["gate_up_bias"][e]
            s = s + (gate_up_rows(bias, inter, 0)[:w] * info["grad_gate_bias"]) ** 2
            s = s + (gate_up_rows(bias, inter, 1)[:w] * info["grad_up_bias"]) ** 2
        _add(self.acc, layer, (e, slice(0, w)), s)

    def result(self, weights):
        return {k: (v / max(self.batches, 1)).float().cpu() for k, v in self.acc.items()}


@register_score
class ActivationScore(ChannelScore):
    """L2 norm, over the tokens routed to the expert, of the channel's gated activation."""

    name = "activation"
    summed = ("sumsq",)

    def __init__(self, layers, interleaved):
        super().__init__(layers, interleaved)
        self.sumsq = _zeros(layers, "intermediate")

    def on_forward(self, layer, info):
        if info["event"] == "expert":
            inner = info["inner"]
            _add(self.sumsq, layer, (info["expert"], slice(0, inner.shape[1])), (inner.double() ** 2).sum(0))

    def result(self, weights):
        return {k: v.sqrt().float().cpu() for k, v in self.sumsq.items()}


@register_score
class WeightActivationScore(ActivationScore):
    """Wanda-like: per channel, sum over its weights of ``|W|`` times the norm of the input
    feature the weight multiplies (token inputs for gate/up rows, the channel's gated
    activation for the down column)."""

    name = "weight_activation"
    summed = ("sumsq", "x_sumsq")

    def __init__(self, layers, interleaved):
        super().__init__(layers, interleaved)
        self.x_sumsq = _zeros(layers, "hidden")

    def on_forward(self, layer, info):
        super().on_forward(layer, info)
        if info["event"] == "expert":
            _add(self.x_sumsq, layer, info["expert"], (info["x"].double() ** 2).sum(0))

    def result(self, weights):
        out = {}
        for k in self.layers:
            gate_up, down = weights[k]
            inter = self.interleaved[k]
            x_norm = self.x_sumsq[k].sqrt().float().to(gate_up.device)  # [E, H]
            a_norm = self.sumsq[k].sqrt().float().to(gate_up.device)  # [E, I]
            gate = gate_up_rows(gate_up.transpose(0, 1), inter, 0).transpose(0, 1).detach().abs()  # [E, I, H]
            up = gate_up_rows(gate_up.transpose(0, 1), inter, 1).transpose(0, 1).detach().abs()
            s = ((gate + up) * x_norm[:, None, :]).sum(-1) + down.detach().abs().sum(1) * a_norm
            out[k] = s.cpu()
        return out
