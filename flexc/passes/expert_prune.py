"""``expert_prune``: remove whole experts, the router renormalised over the ones that remain.

A removed expert must not merely output zero (width 0): its router slots would still be
spent on it and the kept experts' weights would not be renormalised. So removal masks the
expert's router *logit* to ``-inf`` before the router's own normalisation: softmax-then-top-k
routers (Qwen-MoE, Mixtral, OLMoE) then choose top-k among the remaining experts and the
softmax (and ``norm_topk_prob``) renormalises over them; top-k-then-softmax routers
(GPT-OSS) never select a masked expert. That is exactly the model with those experts
deleted from the checkpoint.

The mask is a structural rewrite (``insert_router_masks``): an ``add`` of a per-layer buffer
``flexc_router_mask_<layer> [E]`` after the router's linear node, recorded in
``FlexGraph.rewrites`` so a resumed compile replays it. The buffer is all zeros (no change)
until :func:`set_expert_mask` writes a budget's mask, so budgets switch in place. The pass
hands off ``expert_masks [B, L, E]`` (bool, True = removed) with the width tables, where a
removed expert has width 0 and a kept one full width.

Expert scores (``criterion``), over calibration tokens routed to the expert:
``frequency`` (routed token-slots), ``router_weight`` (summed router weight), ``man`` (mean
L2 norm of the expert's output), ``msan`` (mean squared norm), ``reap`` (mean of router weight
times output norm). Experts are removed lowest score first, one at a time from the layer that
keeps the most experts (ties: the lowest score relative to its layer's mean), until the keep
ratio is at or below the budget: achieved keep is within one expert of the budget, tables are
nested, and every layer keeps at least ``top_k`` experts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, field_validator
from torch import fx

from flexc.ir.graph import MASK_PREFIX, has_router_masks, module_path_of, set_expert_mask  # noqa: F401
from flexc.ir.routing import route_by_expert
from flexc.ir.tables import expert_weights, keep_ratio
from flexc.passes.base import Pass, PassContext, PassResult
from flexc.passes.baselines import BaselineOptions, budgets_and_metric, hand_off, write_report
from flexc.passes.calibrate import calibrate
from flexc.utils.distributed import all_reduce_sum, shard

CRITERIA = ("frequency", "router_weight", "man", "msan", "reap")
# Families whose router normalises after its linear layer, so a -inf logit removes the expert exactly.
_MASKABLE = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"}


def _router_linear(graph, group) -> fx.Node:
    block = group.path.rsplit(".", 1)[0]
    paths = {f"{block}.gate", f"{block}.router"}
    for node in graph.module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default and \
                module_path_of(node) in paths:
            return node
    raise ValueError(f"layer {group.layer}: no router linear node found under {block} in the lowered graph")


class InsertRouterMasks(Pass):
    """Add a switchable additive mask on every MoE layer's router logits (zeros: no change)."""

    name = "insert_router_masks"
    not_streamed_because = "it rewrites the in-memory graph's routers"
    requires = frozenset({"lowered"})
    guarantees = frozenset({"router_masks"})
    preserves_computation = True

    def run(self, graph, ctx: PassContext) -> PassResult:
        if graph.family.family not in _MASKABLE:
            raise ValueError(f"expert pruning is not supported for {graph.family.display_name}: its router "
                             f"({graph.family.router}) does not normalise after a maskable logit")
        if has_router_masks(graph):
            return PassResult(graph=graph, modified=False)
        changed = set()
        for group in graph.groups:
            linear = _router_linear(graph, group)
            weight = graph.model.get_submodule(module_path_of(linear)).weight
            name = MASK_PREFIX + str(group.layer)
            graph.module.register_buffer(name, torch.zeros(group.num_experts, dtype=weight.dtype,
                                                           device=weight.device))
            with graph.module.graph.inserting_after(linear):
                attr = graph.module.graph.get_attr(name)
            with graph.module.graph.inserting_after(attr):
                masked = graph.module.graph.call_function(torch.ops.aten.add.Tensor, (linear, attr))
            masked.meta = dict(linear.meta)
            linear.replace_all_uses_with(masked, delete_user_cb=lambda n, m=masked: n is not m)
            changed.add(masked.name)
        graph.module.graph.lint()
        graph.module.recompile()
        graph.rewrites.append({"pass": self.name, "options": {}})
        return PassResult(graph=graph, modified=True, changed_nodes=changed)


class ExpertStats:
    """Per layer and expert: routed slots, summed router weight, summed output norm, its square, weighted norm."""

    def __init__(self, graph):
        self.graph = graph
        shape = (len(graph.groups), max(g.num_experts for g in graph.groups))
        self.norm = torch.zeros(shape, dtype=torch.float64)
        self.sq_norm = torch.zeros(shape, dtype=torch.float64)
        self.weighted_norm = torch.zeros(shape, dtype=torch.float64)
        self._slot_weights: dict[int, list[torch.Tensor]] = {}

    def on_forward(self, layer: int, info: dict) -> None:
        if info["event"] == "routing":
            # The op groups token-slots by a stable sort on expert id: keep each expert's weights in that order.
            routing = route_by_expert(info["topk_ids"], info["num_experts"])
            self._slot_weights[layer] = list(routing.sorted_weights(info["topk_weights"].detach()).split(routing.counts))
            return
        e = info["expert"]
        _, down = self.graph.expert_weights(self.graph.groups[layer])
        inner = info["inner"]
        out = inner @ down[e][:, : inner.shape[1]].t()
        norm = out.double().norm(dim=-1)
        self.norm[layer, e] += norm.sum()
        self.sq_norm[layer, e] += (norm ** 2).sum()
        self.weighted_norm[layer, e] += (norm * self._slot_weights[layer][e].double()).sum()

    def all_reduce(self) -> None:
        """Sum the norms over ranks (each saw its own calibration batches; a no-op in one process)."""
        for name in ("norm", "sq_norm", "weighted_norm"):
            all_reduce_sum(getattr(self, name), f"expert_prune's expert {name}")


def expert_scores(criterion: str, counts: torch.Tensor, weight_sums: torch.Tensor,
                  stats: ExpertStats | None) -> torch.Tensor:
    """``[L, E]`` scores (higher = more important) of one criterion."""
    if criterion == "frequency":
        return counts.double()
    if criterion == "router_weight":
        return weight_sums.double()
    per_token = counts.double().clamp_min(1)  # an unused expert scores 0
    if criterion == "man":
        return stats.norm / per_token
    if criterion == "msan":
        return stats.sq_norm / per_token
    if criterion == "reap":
        return stats.weighted_norm / per_token
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")


def removal_order(scores: torch.Tensor, top_k: list[int]) -> list[tuple[int, int]]:
    """Experts in removal order: from the layer keeping the most, its lowest scorer (scores relative to the layer mean)."""
    rel = scores / scores.mean(dim=1, keepdim=True).clamp_min(1e-30)
    kept = [sorted(range(scores.shape[1]), key=lambda e: (float(rel[l, e]), e)) for l in range(scores.shape[0])]
    order = []
    while True:
        candidates = [l for l in range(len(kept)) if len(kept[l]) > top_k[l]]
        if not candidates:
            return order
        l = min(candidates, key=lambda i: (-len(kept[i]), float(rel[i, kept[i][0]]), i))
        order.append((l, kept[l].pop(0)))


class ExpertPruneOptions(BaselineOptions):
    criterion: str = Field("frequency", description=f"Expert score: {', '.join(CRITERIA)}.")

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        if v not in CRITERIA:
            raise ValueError(f"unknown criterion {v!r}; expected one of {', '.join(CRITERIA)}")
        return v

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        # frequency/router_weight reuse rank_channels' routing statistics when an earlier pass has them
        return self.criterion in ("man", "msan", "reap") or "routing_stats" not in earlier


class ExpertPrune(Pass):
    """Whole-expert pruning with router renormalisation, one mask per budget."""

    name = "expert_prune"
    not_streamed_because = "it rewrites the in-memory graph's routers"
    prunes_whole_experts = True
    Options = ExpertPruneOptions
    requires = frozenset({"lowered"})
    guarantees = frozenset({"width_tables", "router_masks"})
    preserves_computation = True  # masks are left at zero

    @classmethod
    def keep_floor(cls, options, shape, metric: str) -> tuple[float, str] | None:
        if metric != "params":  # the flops floor depends on routing
            return None
        return shape.top_k / shape.num_experts, (
            f"expert_prune must keep top_k={shape.top_k} of the {shape.num_experts} experts of each layer "
            f"({shape.config_file}); use a larger budget")

    def run(self, graph, ctx: PassContext) -> PassResult:
        budgets, metric = budgets_and_metric(self.options, ctx)
        criterion = self.options.criterion
        InsertRouterMasks()(graph, ctx)
        stats = None
        counts, weight_sums = ctx.state.routing_counts, ctx.state.routing_weight_sums
        if criterion in ("man", "msan", "reap") or counts is None:
            stats = ExpertStats(graph)
            routing = calibrate(graph, shard(ctx.calibration_batches()), on_forward=stats.on_forward,
                                description=f"expert_prune ({criterion})", quiet=ctx.quiet).all_reduce()
            stats.all_reduce()
            counts, weight_sums = routing.counts, routing.weight_sums
            if ctx.state.routing_counts is None:
                ctx.state.routing_counts, ctx.state.routing_weight_sums = counts, weight_sums
        scores = expert_scores(criterion, counts, weight_sums, stats)
        full = torch.tensor([g.intermediate_size for g in graph.groups])
        weights = expert_weights(graph.groups, metric, counts)
        order = removal_order(scores, [g.top_k for g in graph.groups])

        removed = torch.zeros(scores.shape, dtype=torch.bool)
        masks, position = [], 0
        for b in budgets:
            while keep_ratio(self._table(removed, full), full, weights) > b + 1e-12:
                if position == len(order):
                    floor = keep_ratio(self._table(removed, full), full, weights)
                    raise ValueError(f"expert_prune: keep {b:g} needs fewer experts than top_k per layer allows "
                                     f"(lowest reachable keep {floor:.4g})")
                l, e = order[position]
                removed[l, e] = True
                position += 1
            masks.append(removed.clone())
        masks = torch.stack(masks)
        tables = torch.stack([self._table(m, full) for m in masks]).to(torch.int32)
        write_report(Path(ctx.workdir), f"{self.name}:{criterion}", budgets, tables, metric, graph.groups, full, weights,
                     {"criterion": criterion, "scores": scores.tolist(),
                      "experts_kept": [(~m).sum(dim=1).tolist() for m in masks]})
        hand_off(ctx, graph.groups, f"{self.name}:{criterion}", budgets, tables, metric)
        ctx.state.expert_masks = masks
        return PassResult(graph=graph, modified=True)

    @staticmethod
    def _table(removed: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return torch.where(removed, 0, full[:, None].expand(removed.shape))
