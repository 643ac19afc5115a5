"""Token-slot pairs grouped by expert: the sort every expert forward starts from.

A MoE layer routes each token to ``k`` experts (``topk_ids [T, k]``). Every implementation of
the experts (the reference op, its grouped-GEMM CPU path, the action gates' masked forward,
calibration statistics, the zoo trainer) sorts the ``T * k`` (token, slot) pairs by expert
with a *stable* sort, runs each expert on its contiguous segment, and sums the ``k`` slots of
each token back in a fixed order. :func:`route_by_expert` is that sort, once.
"""

from __future__ import annotations

from functools import cached_property

import torch


class ExpertRouting:
    """The (token, slot) pairs of one call sorted by expert (stable: ties keep token order).

    ``order[i]`` is the flat index ``token * k + slot`` of sorted position ``i``; expert ``e``'s
    pairs are the sorted positions :meth:`segment` ``(e)``.
    """

    def __init__(self, topk_ids: torch.Tensor, num_experts: int):
        self.k = topk_ids.shape[1]
        self.num_experts = num_experts
        self.flat = topk_ids.reshape(-1)
        self.order = torch.argsort(self.flat, stable=True)

    @cached_property
    def token(self) -> torch.Tensor:
        """Sorted position -> token index."""
        return torch.div(self.order, self.k, rounding_mode="floor")

    @cached_property
    def sorted_experts(self) -> torch.Tensor:
        """Sorted position -> expert."""
        return self.flat[self.order]

    @cached_property
    def count_tensor(self) -> torch.Tensor:
        """``[E]`` pairs routed to each expert (on the ids' device)."""
        return torch.bincount(self.flat, minlength=self.num_experts)

    @cached_property
    def counts(self) -> list[int]:
        return self.count_tensor.tolist()

    @cached_property
    def offsets(self) -> list[int]:
        """``offsets[e]`` is the first sorted position of expert ``e`` (``offsets[E]`` the total)."""
        out = [0]
        for c in self.counts:
            out.append(out[-1] + c)
        return out

    def segment(self, e: int) -> slice:
        return slice(self.offsets[e], self.offsets[e + 1])

    def sorted_weights(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """Routing weight of each sorted position."""
        return topk_weights.reshape(-1)[self.order]

    def unsort(self, y_sorted: torch.Tensor) -> torch.Tensor:
        """Rows of ``y_sorted`` back in flat (token, slot) order."""
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return y_sorted[inverse]

    def combine(self, y_sorted: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``[T, H]``: each token's ``k`` slot outputs summed in slot order (deterministic, no scatter-add)."""
        return self.unsort(y_sorted).view(num_tokens, self.k, y_sorted.shape[-1]).sum(dim=1)


def route_by_expert(topk_ids: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Sort the (token, slot) pairs of ``topk_ids [T, k]`` by expert (see :class:`ExpertRouting`)."""
    return ExpertRouting(topk_ids, num_experts)
