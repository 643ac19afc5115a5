"""Baseline width choosers: ``uniform`` and ``coverage`` (``expert_prune`` lives in its own module).

Each baseline hands on what ``anneal`` does — the compile state's ``width_tables`` (one
:class:`~flexc.ir.tables.WidthTables`: keep ratios descending, ``[B, L, E]`` widths, the
metric) — plus ``width_method``, so every later stage (export, evaluation) works on any of
them, and writes a ``width_tables.json`` report in its workdir.

Budget rule shared by both: widths are multiples of ``granule`` channels (or the full width),
at least one granule. A table is first chosen by the method's own rule at or below the
budget, then topped up one granule at a time (experts in the method's priority order, never
above the previous budget's table) while the keep ratio stays at or below the budget. So a
table's keep ratio is at most the budget and short of it by less than one granule of one
expert (in the ``params`` metric, where every granule weighs the same), and tables are
nested: for every expert, widths never grow as the budget falls.

Then the spec's width grid and bucket bound (``budgets: {grid, max_buckets}``,
:mod:`flexc.ir.buckets`) project each table, within its budget and the previous table, so that
a sliced checkpoint runs on a serving engine's fused-MoE kernels; with a bound the shortfall can
exceed one granule (experts move between their layer's few widths only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field, field_validator

from flexc.passes.base import Pass, PassContext, PassOptions, PassResult, check_granule, check_keep_ratios
from flexc.ir.buckets import BucketBound, bucket_table, count_buckets
from flexc.ir.tables import WidthTables, expert_weights, keep_ratio, per_layer_keep
from flexc.utils.atomic import atomic_write_text

REPORT_FILE = "width_tables.json"


class BaselineOptions(PassOptions):
    budgets: list[float] | None = Field(None, description="Keep ratios (default: the spec's budgets).")
    metric: str | None = Field(None, description="Budget metric, 'params' or 'flops' (default: the spec's).")
    granule: int = Field(16, ge=1, description="Widths are multiples of this many channels (kernel tiles): a "
                                               "power of two.")
    _granule = field_validator("granule")(classmethod(lambda cls, v: check_granule(v)))

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v not in ("params", "flops"):
            raise ValueError(f"metric must be 'params' or 'flops'; found {v!r}")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, v: list[float] | None) -> list[float] | None:
        return check_keep_ratios(v)


def budgets_and_metric(options, ctx: PassContext) -> tuple[list[float], str]:
    """Requested keep ratios (descending, deduplicated) and the budget metric."""
    spec_budgets = getattr(ctx.spec, "budgets", None)
    keep = options.budgets if options.budgets is not None else getattr(spec_budgets, "keep_ratios", None)
    metric = options.metric or getattr(spec_budgets, "metric", None) or "params"
    if not keep:
        raise ValueError("this pass needs budgets: set budgets in the spec or the pass's 'budgets' option")
    bad = [b for b in keep if not 0 < b <= 1]
    if bad:
        raise ValueError(f"keep ratios must lie in (0, 1]; found {bad}")
    return sorted({float(b) for b in keep}, reverse=True), metric


def bucket_bound(ctx: PassContext) -> BucketBound:
    """The spec's width grid and bucket bound (``budgets: {grid, max_buckets}``); no spec: none."""
    spec_budgets = getattr(ctx.spec, "budgets", None)
    return BucketBound(grid=getattr(spec_budgets, "grid", None), max_buckets=getattr(spec_budgets, "max_buckets", None))


def bucketed(table: torch.Tensor, bound: BucketBound, granule: int, target: float, full: torch.Tensor,
             weights: torch.Tensor, upper: torch.Tensor | None) -> torch.Tensor:
    """``table`` on the spec's grid with at most its bucket bound of widths per layer (see
    :mod:`flexc.ir.buckets`), within the budget and ``upper``; unchanged if no bound is set."""
    if not bound.active:
        return table
    grids = bound.grids(full.tolist(), granule)
    return bucket_table(table, full, weights, target, grids, bound.max_buckets, upper)


def granules(groups, granule: int) -> torch.Tensor:
    """Per layer, the granule actually used (a layer narrower than the granule has one step: full width)."""
    return torch.tensor([min(granule, g.intermediate_size) for g in groups])


def top_up(table: torch.Tensor, order: torch.Tensor, step: torch.Tensor, target: float, full: torch.Tensor,
           weights: torch.Tensor, upper: torch.Tensor | None) -> torch.Tensor:
    """Raise experts by one step at a time, in ``order`` (flat indices, repeated passes), while keep <= target.

    ``step [L]`` is each layer's granule; no width exceeds ``upper`` (or the full width).
    """
    table = table.clone()
    cap = full[:, None].expand_as(table) if upper is None else upper
    num_experts = table.shape[1]
    current = keep_ratio(table, full, weights)
    while True:
        raised = False
        for flat in order.tolist():
            l, e = divmod(flat, num_experts)
            new = min(int(table[l, e]) + int(step[l]), int(cap[l, e]))
            if new <= table[l, e]:
                continue
            gain = float(weights[l, e]) * (new - int(table[l, e])) / float(full[l])
            if current + gain <= target + 1e-12:
                table[l, e] = new
                current += gain
                raised = True
        if not raised:
            return table


def write_report(workdir: Path, method: str, budgets, tables, metric, groups, full, weights, extra=None) -> None:
    params_w = expert_weights(groups, "params")
    report = {
        "method": method,
        "metric": metric,
        "budgets": [
            {
                "keep_target": b,
                "keep_achieved": keep_ratio(t, full, weights),
                "params_keep_achieved": keep_ratio(t, full, params_w),
                "per_layer_keep": per_layer_keep(t, full),
                "widths_per_layer": count_buckets(t),
            }
            for b, t in zip(budgets, tables)
        ],
        **(extra or {}),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / REPORT_FILE, json.dumps(report, indent=2))


def hand_off(ctx: PassContext, groups, method: str, budgets, tables: torch.Tensor, metric: str) -> None:
    """Hand the tables on as ``anneal`` does (the compile state's ``width_tables``)."""
    ctx.state.width_tables = WidthTables(budgets, tables, metric, layers=[g.layer for g in groups],
                                         full=[g.intermediate_size for g in groups])
    ctx.state.width_method = method
    ctx.state.expert_masks = None  # only expert_prune masks router logits


def spread_order(num_layers: int, num_experts: int) -> torch.Tensor:
    """Flat ``[L, E]`` indices expert-major ((e0, l0), (e0, l1), …): extra granules spread over layers."""
    l, e = torch.meshgrid(torch.arange(num_layers), torch.arange(num_experts), indexing="ij")
    return (l * num_experts + e).T.reshape(-1)


class _WidthBaseline(Pass):
    """Shared driver: choose one table per budget, high to low, each capped by the previous one."""

    streams = True  # reads the groups and the hand-off state only

    requires = frozenset({"channels_ranked"})
    guarantees = frozenset({"width_tables"})
    preserves_computation = True  # only state is written; the graph stays at full width

    @classmethod
    def keep_floor(cls, options, shape, metric: str) -> tuple[float, str]:
        inter = shape.intermediate_size
        narrowest = min(options.granule, inter)
        return narrowest / inter, (f"{cls.name} (granule {options.granule}) keeps at least {narrowest} of each "
                                   f"expert's {inter} channels; use a larger budget or a smaller granule")

    def choose(self, graph, ctx, target, full, weights, step, upper) -> torch.Tensor:
        raise NotImplementedError

    def report_extra(self) -> dict:
        return {}

    def run(self, graph, ctx: PassContext) -> PassResult:
        budgets, metric = budgets_and_metric(self.options, ctx)
        groups = graph.groups
        full = torch.tensor([g.intermediate_size for g in groups])
        weights = expert_weights(groups, metric, ctx.state.routing_counts)
        step = granules(groups, self.options.granule)
        bound = bucket_bound(ctx)
        if bound.active:  # the narrowest kept width is one grid step
            step_floor = torch.maximum(step, torch.tensor(bound.grids(full.tolist(), self.options.granule)))
        else:
            step_floor = step
        floor = keep_ratio(step_floor[:, None].expand(len(groups), weights.shape[1]), full, weights)
        if budgets[-1] < floor - 1e-9:
            raise ValueError(f"{self.name}: keep {budgets[-1]:g} is below {floor:.4g}, the keep ratio with every "
                             "expert at its narrowest width (one granule, or one step of the spec's budgets.grid); use a "
                             "smaller granule or grid, or a larger budget")
        tables, upper = [], None
        for b in budgets:
            table = self.choose(graph, ctx, b, full, weights, step, upper)
            table = bucketed(table, bound, self.options.granule, b, full, weights, upper)
            tables.append(table)
            upper = table
        tables = torch.stack(tables).to(torch.int32)
        write_report(Path(ctx.workdir), self.name, budgets, tables, metric, groups, full, weights, self.report_extra())
        hand_off(ctx, groups, self.name, budgets, tables, metric)
        return PassResult(graph=graph, modified=False)


class Uniform(_WidthBaseline):
    """The same keep ratio in every expert, on ranked channels.

    Every expert keeps ``floor(keep * I / granule) * granule`` channels (at least one granule);
    the budget left over is filled one granule per expert, spread over layers in expert-major
    order, so the widths of any two experts differ by at most one granule.
    """

    name = "uniform"
    Options = BaselineOptions

    def choose(self, graph, ctx, target, full, weights, step, upper):
        base = (torch.floor(target * full / step + 1e-9) * step).clamp(min=step, max=full)
        table = base[:, None].expand(len(full), weights.shape[1]).clone()
        if upper is not None:
            table = torch.minimum(table, upper)
        return top_up(table, spread_order(*table.shape), step, target, full, weights, upper)


class CoverageOptions(BaselineOptions):
    importance: str = Field("score", description="Expert importance scaling the coverage target: 'score' "
                            "(expert's summed channel score), 'load' (routed token share) or 'none'.")
    exponent: float = Field(0.5, ge=0, description="Importance enters the target as importance**exponent.")
    iterations: int = Field(50, ge=8, le=200, description="Binary-search iterations on the coverage target.")

    @field_validator("importance")
    @classmethod
    def _importance(cls, v: str) -> str:
        if v not in ("score", "load", "none"):
            raise ValueError(f"importance must be 'score', 'load' or 'none'; found {v!r}")
        return v


class Coverage(_WidthBaseline):
    """Per-expert widths from a channel-score coverage target, binary-searched to the budget.

    Expert ``e`` keeps the smallest prefix of its ranked channels whose cumulative score
    reaches ``min(1, t * s_e)`` of its total, rounded up to the granule, where ``s_e`` is its
    importance normalised to mean 1 over all experts, raised to ``exponent``. The global
    target ``t`` is the largest (binary search) whose table stays within the budget; the
    remainder is topped up by the highest next-granule score first.
    """

    name = "coverage"
    Options = CoverageOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._targets: list[float] = []  # the coverage target found per budget, for the report

    def _prepare(self, graph, ctx):
        scores = ctx.state.channel_scores
        if scores is None:
            raise ValueError("coverage needs channel scores: run rank_channels first in the pipeline")
        scores = scores.double().clamp_min(0)  # [L, E, I], ranked (descending) order
        total = scores.sum(-1)
        share = scores.cumsum(-1) / total.clamp_min(1e-30)[..., None]
        kind = self.options.importance
        if kind == "score":
            importance = total
        elif kind == "load":
            counts = ctx.state.routing_counts
            if counts is None:
                raise ValueError("coverage importance 'load' needs routing statistics: run rank_channels first")
            importance = counts.double()[:, : scores.shape[1]]
        else:
            importance = torch.ones_like(total)
        importance = (importance / importance.mean().clamp_min(1e-30)) ** self.options.exponent
        return scores, share, importance

    def run(self, graph, ctx: PassContext) -> PassResult:
        self._targets = []
        return super().run(graph, ctx)

    def choose(self, graph, ctx, target, full, weights, step, upper):
        scores, share, importance = self._prepare(graph, ctx)
        cap = full[:, None].expand(importance.shape) if upper is None else upper

        def table_at(t: float) -> torch.Tensor:
            goal = (t * importance).clamp(max=1.0)
            # channels needed: the prefix shares strictly below the goal, plus the one reaching it
            need = (share < goal[..., None] - 1e-12).sum(-1) + 1
            widths = torch.ceil(need / step[:, None]) * step[:, None]
            widths = torch.minimum(widths.clamp(min=step[:, None]), full[:, None])
            return torch.minimum(widths.long(), cap)

        lo, hi = 0.0, 1.0 / float(importance.min().clamp_min(1e-12))  # at hi every expert is full
        for _ in range(self.options.iterations):
            mid = (lo + hi) / 2
            if keep_ratio(table_at(mid), full, weights) <= target + 1e-12:
                lo = mid
            else:
                hi = mid
        table = table_at(lo)
        self._targets.append(lo)
        # Top-up priority: the score the next granule would add, highest first.
        cum = torch.nn.functional.pad(scores.cumsum(-1), (1, 0))  # cum[..., w] = score of the first w channels
        nxt = torch.minimum(table + step[:, None], full[:, None])
        gain = cum.gather(-1, nxt[..., None]).squeeze(-1) - cum.gather(-1, table[..., None]).squeeze(-1)
        order = torch.argsort(gain.reshape(-1), descending=True, stable=True)
        return top_up(table, order, step, target, full, weights, upper)

    def report_extra(self) -> dict:
        return {"coverage_targets": list(self._targets), "importance": self.options.importance}
