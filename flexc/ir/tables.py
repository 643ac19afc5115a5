"""Width tables: one ``[layers, experts]`` table of widths per budget, and their math.

The one place both the passes that choose widths and everything that reads them (exporters,
the runtime, eval, the report) import from, so neither depends on the other.

Passes that choose widths (``anneal``, the baselines) build one :class:`WidthTables` (keep
ratios descending, ``[B, L, E]`` int32 widths, the metric, the nesting invariant checked) and
hand it on as the compile state's ``width_tables`` (:mod:`flexc.ir.state`). Its one file form,
:meth:`WidthTables.save`, is ``flexc_widths.safetensors`` in every artifact, the saved compile
state and the ``anneal`` stage's ``width_tables.safetensors``.

The keep ratio of a table is measured in the spec's metric:

- ``params``: fraction of routed-expert parameters kept, i.e. each expert weighs by its size;
- ``flops``: fraction of routed-expert FLOPs per token kept, i.e. each expert weighs by its
  size times its routing load (share of the layer's token-slots, from calibration).

Both are linear in the widths: ``keep(T) = sum_le weight[l, e] * T[l, e] / I_l``, with weights
summing to 1 (:func:`expert_weights`, :func:`keep_ratio`; :func:`fit_to_budget` moves a table
to a target keep ratio).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flexc.errors import FlexcError

WIDTHS_FILE = "flexc_widths.safetensors"


class BudgetError(FlexcError, KeyError):
    """A budget was asked for that the artifact does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


def budget_key(budget: float) -> str:
    """Directory/file-name form of a budget: ``keep_0.50``."""
    return f"keep_{budget:.2f}"


@dataclass
class WidthTables:
    """``tables[b]`` is the width table of keep ratio ``budgets[b]`` (budgets descending)."""

    budgets: list[float]
    tables: torch.Tensor  # [B, L, E] int32
    metric: str
    layers: list[int]  # decoder-layer index of each table row
    full: list[int]  # full intermediate size of each row's experts

    def __post_init__(self) -> None:
        # One budget dtype: Python floats, rounded away from float32 noise (0.30000001 -> 0.3).
        self.budgets = [round(float(b), 6) for b in self.budgets]
        self.tables = torch.as_tensor(self.tables).to(torch.int32)
        if self.tables.dim() != 3 or self.tables.shape[0] != len(self.budgets):
            raise ValueError(f"width tables must be [budgets={len(self.budgets)}, layers, experts]; "
                             f"found {tuple(self.tables.shape)}")
        if self.tables.shape[1] != len(self.layers) or len(self.full) != len(self.layers):
            raise ValueError("width tables: one layer index and one full width per table row expected")
        if any(a <= b for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"budgets must be strictly descending; found {self.budgets}")
        full = torch.tensor(self.full, dtype=torch.int32)[None, :, None]
        if int(self.tables.min()) < 0 or bool((self.tables > full).any()):
            raise ValueError("width tables: every width must lie in [0, full width]")
        grown = self.tables[1:] > self.tables[:-1]
        if bool(grown.any()):
            b, l, e = (int(i) for i in grown.nonzero()[0])
            raise ValueError(f"width tables are not nested: layer {self.layers[l]} expert {e} grows from "
                             f"{int(self.tables[b, l, e])} to {int(self.tables[b + 1, l, e])} channels when the "
                             f"budget falls from {self.budgets[b]} to {self.budgets[b + 1]}")

    # ---- lookup ----------------------------------------------------------------------
    def index(self, budget: float) -> int:
        for i, b in enumerate(self.budgets):
            if abs(b - budget) < 1e-6:
                return i
        raise BudgetError(f"no width table for budget {budget}; available budgets: "
                          f"{', '.join(f'{b:g}' for b in self.budgets)} (or 1.0 for full width)")

    def table(self, budget: float) -> torch.Tensor:
        """Widths ``[L, E]`` of ``budget``; 1.0 means full width even if not exported."""
        if abs(budget - 1.0) < 1e-6 and not any(abs(b - 1.0) < 1e-6 for b in self.budgets):
            return self.full_table()
        return self.tables[self.index(budget)].clone()

    def full_table(self) -> torch.Tensor:
        return torch.tensor(self.full, dtype=torch.int32)[:, None].expand(self.tables.shape[1:]).clone()

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from flexc.utils.atomic import atomic_path

        meta = {"metric": self.metric, "layers": json.dumps(self.layers), "full": json.dumps(self.full),
                "budgets": json.dumps(self.budgets)}
        with atomic_path(Path(path)) as tmp:
            save_file({"widths": self.tables.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "WidthTables":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tables = f.get_tensor("widths")
        return cls(budgets=json.loads(meta["budgets"]), tables=tables, metric=meta["metric"],
                   layers=json.loads(meta["layers"]), full=json.loads(meta["full"]))


# ---- keep ratios -------------------------------------------------------------------------
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


def _bisect_price(keep, target: float, iterations: int) -> tuple[float, float]:
    """``(low, high)`` around the price where ``keep(price)`` (non-increasing) crosses ``target``:
    ``keep(low) > target >= keep(high)`` where the prices tried reach both sides."""
    span = 1.0
    while keep(-span) <= target and span < 1e12:
        span *= 4
    low = -span
    span = 1.0
    while keep(span) > target and span < 1e12:
        span *= 4
    high = span
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if keep(mid) > target:
            low = mid
        else:
            high = mid
    return low, high


def budget_price(logits: torch.Tensor, cost: torch.Tensor, target: float, iterations: int = 80) -> float:
    """The smallest price ``mu`` at which the table ``argmax_a(logits - mu * cost)`` keeps at most ``target``.

    ``logits [L, E, A]`` score each expert's actions (``-inf``: not allowed); ``cost [L, E, A]`` is
    each action's share of the keep ratio (``weight[l, e] * width / I_l``). The keep of that table
    never rises as the price rises (a Lagrangian relaxation of the budget; a negative price pays
    for width), so bisection finds the price; at it the table is within the budget and above every
    cheaper price's table, i.e. short of the budget by at most the step of the experts that change
    action at that price (one expert unless several tie).
    """
    # No change of dtype: the table at the returned price is computed by the same operations in the
    # caller's dtype (``logits - mu * cost``), so a tie at the breakpoint resolves the same way.

    def keep(mu: float) -> float:
        levels = (logits - mu * cost).argmax(-1, keepdim=True)
        return float(cost.gather(-1, levels).double().sum())

    return _bisect_price(keep, target, iterations)[1]


def expected_price(logits: torch.Tensor, cost: torch.Tensor, target: float, iterations: int = 80) -> float:
    """The price ``mu`` (of either sign) at which ``softmax(logits - mu * cost)`` keeps ``target`` in
    expectation: the sampled tables' mean keep is the budget. ``logits`` and ``cost`` as in
    :func:`budget_price`; the expected keep falls continuously as ``mu`` rises, so bisection finds it
    (a target beyond what any price reaches gives the price nearest to it that was tried)."""

    def keep(mu: float) -> float:
        return float((torch.softmax(logits - mu * cost, dim=-1) * cost).nan_to_num().double().sum())

    return sum(_bisect_price(keep, target, iterations)) / 2
