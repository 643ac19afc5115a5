"""Width tables ``[layers, experts]``: keep ratios, budget weights, and the fit-to-budget rule.

The keep ratio of a table is measured in the spec's metric:

- ``params``: fraction of routed-expert parameters kept, i.e. each expert weighs by its size;
- ``flops``: fraction of routed-expert FLOPs per token kept, i.e. each expert weighs by its
  size times its routing load (share of the layer's token-slots, from calibration).

Both are linear in the widths: ``keep(T) = sum_le weight[l, e] * T[l, e] / I_l``, with weights
summing to 1.
"""

from __future__ import annotations

import torch


def expert_weights(groups, metric: str, routing_counts: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, E]`` weights (summing to 1) of each expert's width in the keep ratio."""
    sizes = torch.stack([torch.full((g.num_experts,), float(g.routed_params) / g.num_experts) for g in groups])
    if metric == "params":
        w = sizes
    elif metric == "flops":
        if routing_counts is None:
            raise ValueError("the 'flops' budget metric needs routing statistics: run rank_channels first")
        load = routing_counts.double() / routing_counts.double().sum(dim=1, keepdim=True).clamp_min(1)
        w = sizes.double() * load[:, : sizes.shape[1]]
    else:
        raise ValueError(f"unknown budget metric {metric!r}; expected 'params' or 'flops'")
    return (w / w.sum()).float()


def keep_ratio(table: torch.Tensor, full: torch.Tensor, weights: torch.Tensor) -> float:
    """Keep ratio of a ``[L, E]`` width table (``full[l]`` = layer l's intermediate size)."""
    return float((weights * table.float() / full.float()[:, None]).sum())


def per_layer_keep(table: torch.Tensor, full: torch.Tensor) -> list[float]:
    """Parameter keep ratio of each layer."""
    return (table.float() / full.float()[:, None]).mean(dim=1).tolist()


def fit_to_budget(levels: torch.Tensor, level_widths: torch.Tensor, target: float, full: torch.Tensor,
                  weights: torch.Tensor, preference: torch.Tensor,
                  upper: torch.Tensor | None = None) -> torch.Tensor:
    """Move experts one level at a time until the keep ratio is as close to ``target`` as one step allows.

    ``levels [L, E]`` are action indices into ``level_widths [L, A]`` (ascending widths);
    ``preference [L, E, A]`` are action log-probabilities: an expert steps down where the lower
    level loses the least log-probability, and up where the higher level gains the most.
    ``upper [L, E]`` caps levels (the previous budget's table), which keeps tables nested.
    The result never exceeds ``target``'s closest reachable value by more than one step of
    one expert.
    """
    levels = levels.clone()
    if upper is not None:
        levels = torch.minimum(levels, upper)
    num_levels = level_widths.shape[1]
    rows = torch.arange(levels.shape[0])[:, None]

    def widths_of(lv):
        return level_widths[rows, lv]

    def keep(lv):
        return keep_ratio(widths_of(lv), full, weights)

    current = keep(levels)
    # Step down while above the target.
    while current > target + 1e-12:
        down_ok = levels > 0
        if not down_ok.any():
            break
        lower = (levels - 1).clamp_min(0)
        cost = preference.gather(2, levels[..., None]).squeeze(-1) - preference.gather(2, lower[..., None]).squeeze(-1)
        cost = torch.where(down_ok, cost, torch.full_like(cost, float("inf")))
        flat = int(torch.argmin(cost))
        l, e = divmod(flat, levels.shape[1])
        levels[l, e] -= 1
        current = keep(levels)
    # Step up while a step still lands at or below the target.
    cap = upper if upper is not None else torch.full_like(levels, num_levels - 1)
    while True:
        up_ok = levels < cap
        if not up_ok.any():
            break
        higher = (levels + 1).clamp_max(num_levels - 1)
        gain = preference.gather(2, higher[..., None]).squeeze(-1) - preference.gather(2, levels[..., None]).squeeze(-1)
        step = weights * (widths_of(higher) - widths_of(levels)).float() / full.float()[:, None]
        fits = up_ok & (current + step <= target + 1e-12)
        if not fits.any():
            break
        gain = torch.where(fits, gain, torch.full_like(gain, float("-inf")))
        flat = int(torch.argmax(gain))
        l, e = divmod(flat, levels.shape[1])
        levels[l, e] += 1
        current = keep(levels)
    return levels
