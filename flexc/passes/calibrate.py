"""One streaming pass of calibration batches through a FlexGraph, with observers attached.

Routing statistics (per layer and expert: routed token-slot count and summed router weight)
are always collected on the same pass over the data. With ``backward=True`` each batch's
next-token loss is back-propagated with every model weight frozen: only a few norm weights
are made to require grad (so activations carry gradients), and the expert op hands each
expert's weight gradients to observers one expert at a time, so no full-size gradient buffer
for expert weights is ever allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexc.ir.experts_impl import canonical_weights
from flexc.ir.op import observe_expert_forward, observe_expert_grads
from flexc.utils.distributed import all_reduce_sum
from flexc.utils.progress import progress_bar


@dataclass
class RoutingStats:
    """``counts[l, e]``: token-slots routed to expert e of MoE layer l; ``weight_sums``: their router weights."""

    counts: torch.Tensor
    weight_sums: torch.Tensor

    def all_reduce(self) -> "RoutingStats":
        """Sum the statistics over ranks, in place (a no-op in one process)."""
        all_reduce_sum(self.counts, "the routing counts")
        all_reduce_sum(self.weight_sums, "the routing weight sums")
        return self

    @property
    def load(self) -> torch.Tensor:
        """Fraction of each layer's routed token-slots that went to each expert."""
        return self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1)


def layer_keys(graph) -> dict[int, int]:
    """Map an expert op's ``gate_up`` data pointer to the index of its layer in ``graph.groups``."""
    return {canonical_weights(graph.experts_module(g))[0].data_ptr(): i for i, g in enumerate(graph.groups)}


@contextlib.contextmanager
def _activations_carry_grad(model):
    """Make the few 1-D norm weights require grad so the loss back-propagates to every layer."""
    touched = []
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name and not p.requires_grad:
            p.requires_grad_(True)
            touched.append(p)
    try:
        yield
    finally:
        for p in touched:
            p.requires_grad_(False)
            p.grad = None


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def calibrate(graph, batches: Iterable[torch.Tensor], *,
              on_forward: Callable[[int, dict], None] | None = None,
              on_backward: Callable[[int, dict], None] | None = None,
              end_batch: Callable[[], None] | None = None,
              backward: bool = False, description: str = "calibrating", quiet: bool = False) -> RoutingStats:
    """Run ``batches`` through ``graph`` with observers; return routing statistics."""
    keys = layer_keys(graph)
    num_layers, num_experts = len(graph.groups), max(g.num_experts for g in graph.groups)
    counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    weight_sums = torch.zeros(num_layers, num_experts, dtype=torch.float64)

    def forward_observer(info):
        layer = keys[info["gate_up"].data_ptr()]
        if info["event"] == "routing":
            ids = info["topk_ids"].reshape(-1).cpu()
            counts[layer, : info["num_experts"]] += torch.bincount(ids, minlength=info["num_experts"]).double()
            weight_sums[layer].index_add_(0, ids, info["topk_weights"].reshape(-1).detach().double().cpu())
        if on_forward is not None:
            on_forward(layer, info)

    def backward_observer(info):
        on_backward(keys[info["gate_up"].data_ptr()], info)

    model = graph.model
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        with observe_expert_forward(forward_observer), contextlib.ExitStack() as stack:
            if backward:
                stack.enter_context(observe_expert_grads(backward_observer if on_backward else (lambda info: None)))
                stack.enter_context(_activations_carry_grad(model))
            else:
                stack.enter_context(torch.no_grad())
            for ids in progress_bar(batches, total=total, description=description, disable=quiet):
                ids = ids.to(next(model.parameters()).device)
                logits = graph.logits(ids)
                if backward:
                    next_token_loss(logits, ids).backward()
                del logits
                if end_batch is not None:
                    end_batch()
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return RoutingStats(counts=counts, weight_sums=weight_sums)
