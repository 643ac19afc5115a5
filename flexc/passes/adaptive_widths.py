"""``adaptive_widths``: a token-adaptive width policy for the nested artifact (:mod:`flexc.ir.adaptive`).

Runs after the widths are final (a width pass, ``fold_masks``, ``recover``, ``quantize``). It records
every MoE layer's routing on the calibration text at full width, then calibrates, per budget, layer
and candidate rule, the scale of the ``scores`` rule (a pair keeps the channels whose score times its
routing weight clears it) or the routing-weight threshold between two levels of the artifact, so that
the layer's active keep meets its target. It then runs
the held-out text that follows the calibration set (documents no calibration window touched) with
each budget's static table and with each candidate rule, and reports every loss and realised active
keep (``adaptive_widths.json``). Each budget runs the rule with the lowest held-out loss at no more
active keep than its table (``rule: auto``), or its static table where every rule loses there
(``fallback``). The policy goes to ``state.adaptive_policy``; the nested export stores it and
``flexc.load(..., adaptive=True)`` / ``model.set_budget(b, adaptive=True)`` run it.
Weights and tables are unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from flexc.ir.adaptive import (LEVEL_RULES, RULES, TARGETS, AdaptivePolicy, LayerRule, calibrate_policy, policy_layers, running,
                               static_layers)
from flexc.ir.op import observe_expert_forward
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.passes.calibrate import layer_keys, next_token_loss
from flexc.utils.atomic import atomic_write_text
from flexc.utils.progress import progress_bar

REPORT = "adaptive_widths.json"
# A rule may realise at most this much more active keep on the held-out text than its calibrated target: the
# choice compares rules at (nearly) their calibrated cost, not one that won by spending more on new text.
KEEP_SLACK = 0.01
# Passes that change weights or widths: after adaptive_widths they would leave its thresholds calibrated on
# another model.
_CHANGES_AFTER = ("rank_channels", "anneal", "uniform", "coverage", "expert_prune", "recover", "quantize")


class AdaptiveWidthsOptions(PassOptions):
    rule: Literal[("auto", *RULES)] = Field("auto", description="How a pair's width follows its routing weight: "
                                            "its channels whose score times weight clears a bar (scores), or a "
                                            "threshold between the levels just above and below the target (adjacent) "
                                            "or between full width and the narrowest table (extreme); auto: per budget "
                                            "the rule with the lowest held-out loss (scores without held-out text).")
    target: Literal[TARGETS] = Field("table", description="Each budget's active keep per routed pair: the static "
                                     "table's own on the calibration text (table: the same compute per token, better "
                                     "spent) or the budget itself (budget).")
    held_out: int = Field(64, ge=0, le=100_000, description="Sequences of held-out text (the documents after the "
                          "calibration set's) on which each policy is compared with its static table; 0 skips the "
                          "comparison.")
    fallback: bool = Field(True, description="A budget whose rules all have a higher held-out loss than its static "
                           "table, or all use more active keep there, runs the static table (the report says which).")

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        return True


class AdaptiveWidths(Pass):
    """Calibrate a token-adaptive width policy (routing weight → one of two nested widths) per budget."""

    name = "adaptive_widths"
    Options = AdaptiveWidthsOptions
    requires = frozenset({"channels_ranked", "width_tables"})
    guarantees = frozenset({"adaptive_policy"})
    preserves_computation = True  # it adds a policy; the static widths compute as before
    not_streamed_because = "it runs the whole model on calibration and held-out text; run it without execution.stream"

    @classmethod
    def check_spec(cls, options, site) -> list:
        """No pass after this one that changes weights or widths (the thresholds are calibrated on them)."""
        later = [e.name for e in site.spec.pipeline[site.index + 1:] if e.name in _CHANGES_AFTER]
        if later:
            return [(site.loc, f"adaptive_widths must come after every pass that changes weights or widths; move "
                     f"{', '.join(later)} before it")]
        return []

    def run(self, graph, ctx: PassContext) -> PassResult:
        opts = self.options
        tables = ctx.state.checked_width_tables()
        calibration = ctx.calibration_batches()
        routing = _full_width_routing(graph, calibration, ctx)
        following = getattr(calibration, "following", None)
        held = following(opts.held_out, strict=False) if opts.held_out and following is not None else []
        scores = ctx.state.channel_scores
        if opts.rule == "scores" and scores is None:
            raise ValueError("adaptive_widths: rule 'scores' needs the ranking's channel scores, which this compile "
                             "does not have; use rule adjacent or extreme")
        usable = RULES if scores is not None else LEVEL_RULES
        rules = (opts.rule,) if opts.rule != "auto" else usable if held else usable[:1]
        candidates = {r: calibrate_policy(tables, routing, rule=r, target=opts.target, scores=scores) for r in rules}
        policy = candidates[rules[0]]
        if held:
            comparison = _compare_on(graph, tables, candidates, held, ctx)
            policy = _choose(candidates, comparison, opts, len(graph.groups))
        elif opts.held_out:
            ctx.logger.warning("adaptive_widths: no held-out text after the calibration set (batches given directly, "
                               "or a source used up); the policy is not compared with the static tables")
        policy.rule = opts.rule
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        record = policy.to_dict()
        atomic_write_text(workdir / REPORT, json.dumps({**record, "options": opts.model_dump(mode="json")}, indent=2))
        ctx.state.adaptive_policy = record
        for budget, row in policy.report.get("held_out", {}).items():
            ctx.logger.info("adaptive_widths: keep %s: active keep %.3f adaptive vs %.3f static (target %.3f); "
                            "held-out loss %.4f vs %.4f: runs %s", budget, row["adaptive_keep"], row["static_keep"],
                            policy.report["budgets"][budget]["target_keep"], row["adaptive_loss"], row["static_loss"],
                            row["policy"])
        return PassResult(graph=graph, modified=False, changed_nodes=set())


def _choose(candidates: dict[str, AdaptivePolicy], comparison: dict, opts, layers: int) -> AdaptivePolicy:
    """Per budget, the candidate rule with the lowest held-out loss among those whose held-out active keep is at
    most :data:`KEEP_SLACK` above the calibrated target (else the one spending least); with ``fallback``, the static
    table where that loss is higher than the table's or no rule is within the slack. The report gives every
    candidate's loss and keep, and what runs."""
    first = next(iter(candidates.values()))
    budgets, held = {}, {}
    for key in first.budgets:
        row = comparison[f"{key:g}"]
        bound = first.report["budgets"][f"{key:g}"]["target_keep"] + KEEP_SLACK
        within = [r for r in candidates if row["rules"][r]["keep"] <= bound]
        best = (min(within, key=lambda r: row["rules"][r]["loss"]) if within else
                min(candidates, key=lambda r: row["rules"][r]["keep"]))
        budgets[key] = candidates[best].budgets[key]
        row.update({"policy": best, "adaptive_loss": row["rules"][best]["loss"],
                    "adaptive_keep": row["rules"][best]["keep"]})
        increase = row["static_loss"] - row["full_loss"]
        row["increase_ratio"] = (row["adaptive_loss"] - row["full_loss"]) / increase if increase > 0 else None
        if opts.fallback and (row["adaptive_loss"] > row["static_loss"] or not within):
            budgets[key] = [LayerRule(math.inf, key, key)] * layers
            row["policy"] = ("static (every adaptive rule lost on held-out text)" if within else
                             "static (every adaptive rule spent more active keep than its target on held-out text)")
        held[f"{key:g}"] = row
    report = {**first.report, "budgets": {b: {**v, "calibration_keep_by_rule": {
        r: c.report["budgets"][b]["calibration_keep"] for r, c in candidates.items()}}
        for b, v in first.report["budgets"].items()}, "held_out": held}
    channels = next((c.channels for c in candidates.values() if c.channels is not None), None)
    return AdaptivePolicy(first.rule, first.target, budgets, report, channels)


def _full_width_routing(graph, batches, ctx: PassContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each MoE layer's routing weights and expert ids over ``batches`` (flat), the model at full width."""
    keys = layer_keys(graph)
    weights: list[list[torch.Tensor]] = [[] for _ in graph.groups]
    ids: list[list[torch.Tensor]] = [[] for _ in graph.groups]

    def observe(info: dict) -> None:
        if info["event"] == "routing":
            layer = keys[info["gate_up"].data_ptr()]
            weights[layer].append(info["topk_weights"].detach().reshape(-1).float().cpu())
            ids[layer].append(info["topk_ids"].reshape(-1).cpu())

    widths = graph.widths()
    graph.set_widths(None)
    try:
        with torch.no_grad(), observe_expert_forward(observe):
            for batch in progress_bar(batches, total=len(batches) if hasattr(batches, "__len__") else None,
                                      description="adaptive_widths: routing", disable=ctx.quiet):
                _logits(graph, batch)
    finally:
        graph.set_widths(widths)
    return [(torch.cat(w) if w else torch.zeros(0), torch.cat(i) if i else torch.zeros(0, dtype=torch.long))
            for w, i in zip(weights, ids)]


def _logits(graph, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits as the nested artifact runs it (the Hugging Face model on the flexc op: no
    training-time gates a graph may still hold)."""
    ids = ids.to(next(graph.model.parameters()).device)
    return graph.model(input_ids=ids, use_cache=False).logits


def _compare_on(graph, tables, candidates: dict[str, AdaptivePolicy], held: list[torch.Tensor],
                ctx: PassContext) -> dict:
    """Per budget, on ``held``: the held-out loss and realised active keep of the static table and of each
    candidate policy (``rules``), beside full width's loss."""
    modules = [graph.experts_module(g) for g in graph.groups]
    device = next(graph.model.parameters()).device
    widths = graph.widths()

    def run(layers) -> dict:
        total, tokens = 0.0, 0
        with torch.no_grad(), running(modules, layers) as keep:
            for ids in held:
                ids = ids.to(device)
                total += float(next_token_loss(_logits(graph, ids), ids)) * ids[:, 1:].numel()
                tokens += ids[:, 1:].numel()
            return {"loss": total / max(1, tokens), "keep": keep()}

    out = {}
    try:
        full = run(static_layers(tables, 1.0, device))
        for budget in progress_bar(tables.budgets, description="adaptive_widths: held-out check", disable=ctx.quiet):
            static = run(static_layers(tables, budget, device))
            out[f"{budget:g}"] = {
                "full_loss": full["loss"], "static_loss": static["loss"], "static_keep": static["keep"],
                "rules": {r: run(policy_layers(c, tables, budget, device)) for r, c in candidates.items()},
                "sequences": sum(len(b) for b in held)}
    finally:
        graph.set_widths(widths)
    return out
