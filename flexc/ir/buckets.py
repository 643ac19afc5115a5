"""Width buckets: at most a few distinct expert widths per layer, on a grid serving kernels like.

A serving engine's fused-MoE kernel takes one intermediate size per call (vLLM's ``FusedMoE``:
one per layer). A layer whose experts take few distinct widths runs as a few such calls, one per
**bucket** (the experts of one width), each on the engine's own tuned kernels. Two bounds make
that cheap:

- the **grid**: every width is a multiple of it (or the full width). vLLM's CPU fused-MoE kernel
  pads the intermediate size to a multiple of 32; its Marlin / NVFP4 GPU kernels want multiples of
  64 per tensor-parallel shard. :func:`auto_grid` picks the largest of 64 and 32 that still leaves
  at least :data:`MIN_GRID_STEPS` widths per expert, else the width-choosing pass's own granule.
- **max_buckets**: at most this many distinct nonzero widths per layer (a removed expert,
  width 0, needs no kernel call and is not a bucket).

:func:`bucket_table` projects one budget's ``[L, E]`` table onto both bounds without leaving the
budget or the nesting: each layer's widths are clustered into at most ``max_buckets`` levels
(optimal 1-D clustering of the grid-snapped widths, weighted by each expert's share of the keep
ratio, each level at most every member's cap), then experts move between their layer's levels,
the smallest damage per unit of keep first, until the keep ratio is at or below the target and
as close to it as such moves allow. ``anneal`` and every baseline call it on the tables they
choose, so the quality cost of the bound is part of what they measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexc.ir.tables import keep_ratio

#: Fewest width steps per expert an automatic grid leaves (a coarser grid would cost quality).
MIN_GRID_STEPS = 8
#: Grids :func:`auto_grid` tries, coarsest first (vLLM: Marlin/NVFP4 on GPU want 64, its CPU kernel 32).
SERVING_GRIDS = (64, 32)


@dataclass(frozen=True)
class BucketBound:
    """The spec's width bounds: ``grid`` (None: the pass's granule; "auto": :func:`auto_grid`) and
    ``max_buckets`` (None: unbounded)."""

    grid: int | str | None = "auto"
    max_buckets: int | None = None

    def grids(self, intermediate_sizes: list[int], granule: int) -> list[int]:
        """The grid of each layer."""
        if self.grid == "auto":
            return [auto_grid(size, granule) for size in intermediate_sizes]
        grid = granule if self.grid is None else int(self.grid)
        return [min(grid, size) for size in intermediate_sizes]

    @property
    def active(self) -> bool:
        return self.grid is not None or self.max_buckets is not None


def auto_grid(intermediate: int, granule: int) -> int:
    """The coarsest serving grid leaving at least :data:`MIN_GRID_STEPS` widths, else ``granule``."""
    for grid in SERVING_GRIDS:
        if grid % granule == 0 and intermediate // grid >= MIN_GRID_STEPS:
            return grid
    return min(granule, intermediate)


def count_buckets(table: torch.Tensor) -> list[int]:
    """Distinct nonzero widths of each row of a ``[L, E]`` table."""
    return [len(set(row.tolist()) - {0}) for row in table]


def _snap(widths: torch.Tensor, grid: int, full: int, cap: torch.Tensor) -> torch.Tensor:
    """Nearest grid multiple (the full width counts as one), never 0 for a kept expert, at most ``cap``."""
    snapped = (widths.double() / grid).round().long() * grid
    snapped = torch.where(widths >= full - grid / 2, torch.full_like(snapped, full), snapped)
    snapped = snapped.clamp(min=min(grid, full), max=full)
    snapped = torch.minimum(snapped, cap)
    return torch.where(widths > 0, snapped, torch.zeros_like(snapped))


def _cluster_levels(values: list[int], mass: list[float], caps: list[int], k: int, grid: int,
                    full: int) -> list[int]:
    """At most ``k`` levels for the sorted distinct ``values`` (``mass``: their weight, ``caps``: the
    lowest cap among experts at each value): contiguous groups minimising the weighted squared
    distance to their level, each level on the grid and at most its group's lowest cap."""
    n = len(values)

    def level(i: int, j: int) -> int:  # group values[i:j]
        total = sum(mass[i:j]) or 1.0
        mean = sum(v * m for v, m in zip(values[i:j], mass[i:j])) / total
        snapped = full if mean >= full - grid / 2 else max(grid, round(mean / grid) * grid)
        return min(snapped, min(caps[i:j]), full)

    def cost(i: int, j: int) -> float:
        c = level(i, j)
        return sum(m * (v - c) ** 2 for v, m in zip(values[i:j], mass[i:j]))

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                c = best[g - 1][i] + cost(i, j)
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, k + 1), key=lambda g: best[g][n])
    levels, j = [], n
    while g > 0:
        i = cut[g][j]
        levels.append(level(i, j))
        j, g = i, g - 1
    return sorted(set(levels))


def _assign(row: torch.Tensor, levels: list[int], cap: torch.Tensor) -> torch.Tensor:
    """Each kept expert at the nearest level not above its cap (0 stays 0)."""
    lv = torch.tensor(levels, dtype=torch.long)
    allowed = lv[None, :] <= cap[:, None]
    dist = (lv[None, :] - row[:, None]).abs().double()
    dist = torch.where(allowed, dist, torch.full_like(dist, float("inf")))
    choice = lv[dist.argmin(dim=1)]
    none_fits = ~allowed.any(dim=1)
    choice = torch.where(none_fits, cap.clamp_max(int(lv.min())), choice)
    return torch.where(row > 0, choice, torch.zeros_like(row))


def bucket_table(table: torch.Tensor, full: torch.Tensor, weights: torch.Tensor, target: float,
                 grids: list[int], max_buckets: int | None, upper: torch.Tensor | None = None) -> torch.Tensor:
    """``table [L, E]`` on the grid with at most ``max_buckets`` distinct nonzero widths per layer,
    its keep ratio at most ``target`` (as close as moves between the levels allow), every width at
    most ``upper`` (the previous budget's table: nesting). Removed experts (0) stay removed."""
    original = table.long()
    caps = full.long()[:, None].expand_as(original) if upper is None else upper.long()
    out = torch.empty_like(original)
    level_sets: list[list[int]] = []
    for l, row in enumerate(original):
        f, g = int(full[l]), int(grids[l])
        snapped = _snap(row, g, f, caps[l])
        kept = snapped > 0
        values = sorted(set(snapped[kept].tolist()))
        if max_buckets is not None and len(values) > max_buckets:
            mass = [float(weights[l][kept & (snapped == v)].sum()) + 1e-12 for v in values]
            low_caps = [int(caps[l][kept & (snapped == v)].min()) for v in values]
            values = _cluster_levels(values, mass, low_caps, max_buckets, g, f)
            snapped = _assign(snapped, values, caps[l])
        out[l] = snapped
        level_sets.append(values)
    return _fit(out, original, full, weights, target, level_sets, caps)


def _fit(table: torch.Tensor, original: torch.Tensor, full: torch.Tensor, weights: torch.Tensor, target: float,
         level_sets: list[list[int]], caps: torch.Tensor) -> torch.Tensor:
    """Move kept experts between their layer's levels: down while above ``target`` (least added
    squared distance from ``original`` per unit of keep first), then up while a move still fits."""
    table = table.clone()
    scale = weights.double() / full.double()[:, None]  # keep per channel of each expert
    dist = original.double()

    # Each layer's levels, padded to one [L, A] tensor: -1 below every width, "none" above every cap.
    none = 1 << 30
    most = max((len(levels) for levels in level_sets), default=0)
    if most == 0:  # every expert removed: nothing to move
        return table.to(torch.int32)
    below_pad = torch.full((table.shape[0], most), -1, dtype=torch.long)
    above_pad = torch.full((table.shape[0], most), none, dtype=torch.long)
    for l, levels in enumerate(level_sets):
        below_pad[l, : len(levels)] = above_pad[l, : len(levels)] = torch.tensor(levels, dtype=torch.long)

    def neighbours(direction: int) -> torch.Tensor:
        """Each expert's next level down (-1) or up (+1) in its layer, or its own width if none."""
        row = table[:, :, None]
        if direction < 0:
            lower = torch.where(below_pad[:, None, :] < row, below_pad[:, None, :], -1).max(dim=2).values
            return torch.where((lower > 0) & (table > 0), lower, table)
        fits = (above_pad[:, None, :] > row) & (above_pad[:, None, :] <= caps[:, :, None])
        higher = torch.where(fits, above_pad[:, None, :], none).min(dim=2).values
        return torch.where((higher < none) & (table > 0), higher, table)

    current = keep_ratio(table, full, weights)
    while current > target + 1e-12:
        lower = neighbours(-1)
        moved = lower != table
        if not moved.any():
            break
        damage = (lower.double() - dist) ** 2 - (table.double() - dist) ** 2
        saved = (table - lower).double() * scale
        score = torch.where(moved, damage / saved.clamp_min(1e-30), torch.full_like(damage, float("inf")))
        l, e = divmod(int(score.argmin()), table.shape[1])
        table[l, e] = lower[l, e]
        current = keep_ratio(table, full, weights)
    while True:
        higher = neighbours(+1)
        gain = (higher - table).double() * scale
        fits = (higher != table) & (current + gain <= target + 1e-12)
        if not fits.any():
            break
        benefit = (table.double() - dist) ** 2 - (higher.double() - dist) ** 2
        score = torch.where(fits, benefit / gain.clamp_min(1e-30), torch.full_like(benefit, float("-inf")))
        l, e = divmod(int(score.argmax()), table.shape[1])
        table[l, e] = higher[l, e]
        current = keep_ratio(table, full, weights)
    return table.to(torch.int32)
