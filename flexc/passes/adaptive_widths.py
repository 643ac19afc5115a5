"""``adaptive_widths``: a token-adaptive width policy for the nested artifact (:mod:`flexc.ir.adaptive`).

Runs after the widths are final (a width pass, ``fold_masks``, ``recover``, ``quantize``). It records
every MoE layer's routing on the calibration text at full width and calibrates, per budget, layer
and candidate rule, the scale of the ``scores`` rule (a pair keeps the channels whose score times its
routing weight clears it) or the routing-weight threshold between two levels of the artifact, so that
the layer's active keep meets its target. Each candidate is then fitted again on the routing it leads to
as it runs (pruning a layer moves the routing of the layers after it), to the keep the static table
realises as it runs. It then runs the held-out text that follows the calibration set (documents no
calibration window touched) with each budget's static table and with each candidate, fitted once more to
the table's keep on that text so the two compare at equal compute, and reports every loss and realised
active keep (``adaptive_widths.json``). Each budget runs the candidate (``rule: auto``: ``scores`` where the
compile ranked channels, else the first of ``adjacent``, ``extreme``) that wins there, or its static table
where none does (``fallback``). The policy goes to
``state.adaptive_policy``; the nested export stores it and ``flexc.load(..., adaptive=True)`` /
``model.set_budget(b, adaptive=True)`` run it. Weights and tables are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from flexc.ir.adaptive import (LEVEL_RULES, RULES, TARGETS, AdaptivePolicy, LayerRule, calibrate_policy, layer_keeps,
                               policy_layers, recalibrate, running, static_layers)
from flexc.ir.op import observe_expert_forward
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.passes.calibrate import layer_keys, next_token_loss
from flexc.utils.atomic import atomic_write_text
from flexc.utils.progress import progress_bar

REPORT = "adaptive_widths.json"
# How close a rule's fit to the static table's keep on the held-out text must come for its loss there to count.
KEEP_SLACK = 0.01
# Passes that change weights or widths: after adaptive_widths they would leave its thresholds calibrated on
# another model.
_CHANGES_AFTER = ("rank_channels", "anneal", "uniform", "coverage", "expert_prune", "recover", "quantize")


class AdaptiveWidthsOptions(PassOptions):
    rule: Literal[("auto", *RULES)] = Field("auto", description="How a pair's width follows its routing weight: "
                                            "its channels whose score times weight clears a bar (scores), or a "
                                            "threshold between the levels just above and below the target (adjacent) "
                                            "or between full width and the narrowest table (extreme); auto: scores "
                                            "where the compile ranked channels, else per budget the first level rule "
                                            "that beats the static table on held-out text at its keep.")
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
        if not hasattr(calibration, "__len__"):  # batches given as a stream: this pass reads them several times
            calibration = list(calibration)
        routing = _run(graph, calibration, None, ctx, "adaptive_widths: routing", scored=False)["routing"]
        following = getattr(calibration, "following", None)
        held = following(opts.held_out, strict=False) if opts.held_out and following is not None else []
        scores = ctx.state.channel_scores
        if opts.rule == "scores" and scores is None:
            raise ValueError("adaptive_widths: rule 'scores' needs the ranking's channel scores, which this compile "
                             "does not have; use rule adjacent or extreme")
        # auto: the scores rule where the compile ranked channels (docs/adaptive.md has the comparison), else the
        # level rules, the first that wins on held-out text
        rules = ((opts.rule,) if opts.rule != "auto" else ("scores",) if scores is not None else
                 LEVEL_RULES if held else LEVEL_RULES[:1])
        candidates = {r: calibrate_policy(tables, routing, rule=r, target=opts.target, scores=scores) for r in rules}
        candidates = _as_run(graph, tables, candidates, calibration, opts.target, ctx)
        policy = candidates[rules[0]]
        if held:
            comparison = _compare_on(graph, tables, candidates, held, opts.target, ctx)
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
                            "held-out loss at the static table's keep %.4f vs %.4f: runs %s", budget,
                            row["adaptive_keep"], row["static_keep"], policy.report["budgets"][budget]["target_keep"],
                            row["adaptive_loss"], row["static_loss"], row["policy"])
        return PassResult(graph=graph, modified=False, changed_nodes=set())


def _goals(tables, budget: float, target: str, static_routing) -> list[float]:
    """Each layer's target active keep at ``budget``: the static table's own on ``static_routing`` (the routing the
    table leads to), or the budget itself."""
    return layer_keeps(tables, budget, static_routing) if target == "table" else [budget] * len(static_routing)


def _as_run(graph, tables, candidates: dict[str, AdaptivePolicy], batches, target: str,
            ctx: PassContext) -> dict[str, AdaptivePolicy]:
    """Each candidate fitted again (:func:`~flexc.ir.adaptive.recalibrate`) on the calibration routing it leads to,
    to the keep the static table realises as it runs: pruning a layer moves the routing of the layers after it, so a
    policy calibrated at full width would not spend its table's compute."""
    routing: dict[str, dict[float, list]] = {r: {} for r in candidates}
    goals: dict[float, list[float]] = {}
    for budget in progress_bar(tables.budgets, description="adaptive_widths: calibration as run", disable=ctx.quiet):
        static = _run(graph, batches, static_layers(tables, budget, _device(graph)), ctx, scored=False)["routing"]
        goals[budget] = _goals(tables, budget, target, static)
        for r, policy in candidates.items():
            layers = policy_layers(policy, tables, budget, _device(graph))
            routing[r][budget] = _run(graph, batches, layers, ctx, scored=False)["routing"]
    return {r: recalibrate(policy, tables, routing[r], goals) for r, policy in candidates.items()}


def _choose(candidates: dict[str, AdaptivePolicy], comparison: dict, opts, layers: int) -> AdaptivePolicy:
    """Per budget, the first candidate (in the order given) that beats the static table on held-out text at the
    table's keep (``matched_loss``: the rule fitted to spend, on that text, what the table spends there, so no rule
    wins by spending more; a fit that did not come within :data:`KEEP_SLACK` of it does not count). Where none
    wins, the static table (``fallback``), else the candidate with the lowest matched loss. The report gives every
    candidate's loss and keep as deployed and as matched, and what runs."""
    first = next(iter(candidates.values()))
    budgets, held = {}, {}
    for key in first.budgets:
        row = comparison[f"{key:g}"]
        rules = row["rules"]
        within = [r for r in candidates if rules[r]["matched_keep"] <= row["static_keep"] + KEEP_SLACK]
        winners = [r for r in within if rules[r]["matched_loss"] < row["static_loss"]]
        best = (winners[0] if winners else min(within, key=lambda r: rules[r]["matched_loss"]) if within else
                min(candidates, key=lambda r: rules[r]["matched_keep"]))
        budgets[key] = candidates[best].budgets[key]
        row.update({"policy": best, "adaptive_loss": rules[best]["matched_loss"], "adaptive_keep": rules[best]["keep"],
                    "deployed_loss": rules[best]["loss"], "matched_keep": rules[best]["matched_keep"]})
        increase = row["static_loss"] - row["full_loss"]
        row["increase_ratio"] = (row["adaptive_loss"] - row["full_loss"]) / increase if increase > 0 else None
        if opts.fallback and not winners:
            budgets[key] = [LayerRule(math.inf, key, key)] * layers
            row["policy"] = ("static (every adaptive rule lost on held-out text at the table's keep)" if within else
                             "static (no adaptive rule could be fitted to the table's keep on held-out text)")
        held[f"{key:g}"] = row
    report = {**first.report, "budgets": {b: {**v, "calibration_keep_by_rule": {
        r: c.report["budgets"][b]["calibration_keep"] for r, c in candidates.items()}}
        for b, v in first.report["budgets"].items()}, "held_out": held}
    channels = next((c.channels for c in candidates.values() if c.channels is not None), None)
    return AdaptivePolicy(first.rule, first.target, budgets, report, channels)


def _run(graph, batches, layers, ctx: PassContext, description: str | None = None, scored: bool = True) -> dict:
    """The model over ``batches`` with its MoE layers running ``layers`` (:class:`~flexc.ir.adaptive.AdaptiveLayer`
    each; None: full width): each layer's routing (weights and expert ids, flat), the next-token loss (``scored``;
    else 0: the vocabulary-wide normalisation is skipped where only the routing is wanted) and the realised active
    keep (None at full width)."""
    keys = layer_keys(graph)
    weights: list[list[torch.Tensor]] = [[] for _ in graph.groups]
    ids: list[list[torch.Tensor]] = [[] for _ in graph.groups]

    def observe(info: dict) -> None:
        if info["event"] == "routing":
            layer = keys[info["gate_up"].data_ptr()]
            weights[layer].append(info["topk_weights"].detach().reshape(-1).float().cpu())
            ids[layer].append(info["topk_ids"].reshape(-1).cpu())

    modules = [graph.experts_module(g) for g in graph.groups]
    device = _device(graph)
    widths = graph.widths()
    total, tokens, keep = 0.0, 0, None
    if layers is None:
        graph.set_widths(None)
    try:
        with torch.no_grad(), observe_expert_forward(observe), \
                (running(modules, layers) if layers else contextlib.nullcontext()) as kept:
            for batch in progress_bar(batches, total=len(batches), description=description,
                                      disable=ctx.quiet or description is None):
                batch = batch.to(device)
                logits = _logits(graph, batch)
                if scored:
                    total += float(next_token_loss(logits, batch)) * batch[:, 1:].numel()
                    tokens += batch[:, 1:].numel()
        keep = kept() if layers else None
    finally:
        graph.set_widths(widths)
    routing = [(torch.cat(w) if w else torch.zeros(0), torch.cat(i) if i else torch.zeros(0, dtype=torch.long))
               for w, i in zip(weights, ids)]
    return {"routing": routing, "loss": total / max(1, tokens), "keep": keep}


def _device(graph) -> torch.device:
    return next(graph.model.parameters()).device


def _logits(graph, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits as the nested artifact runs it (the Hugging Face model on the flexc op: no
    training-time gates a graph may still hold)."""
    ids = ids.to(_device(graph))
    return graph.model(input_ids=ids, use_cache=False).logits


def _compare_on(graph, tables, candidates: dict[str, AdaptivePolicy], held: list[torch.Tensor], target: str,
                ctx: PassContext) -> dict:
    """Per budget, on ``held``: full width's loss, the static table's loss and realised active keep, and each
    candidate policy's (``rules``) as deployed (``loss``, ``keep``) and fitted again to the table's keep on this
    text (``matched_loss``, ``matched_keep``)."""
    full = _run(graph, held, None, ctx)
    out = {}
    for budget in progress_bar(tables.budgets, description="adaptive_widths: held-out check", disable=ctx.quiet):
        static = _run(graph, held, static_layers(tables, budget, _device(graph)), ctx)
        goals = {budget: _goals(tables, budget, target, static["routing"])}
        rules = {}
        for r, policy in candidates.items():
            deployed = _run(graph, held, policy_layers(policy, tables, budget, _device(graph)), ctx)
            matched = recalibrate(policy, tables, {budget: deployed["routing"]}, goals)
            fitted = _run(graph, held, policy_layers(matched, tables, budget, _device(graph)), ctx)
            rules[r] = {"loss": deployed["loss"], "keep": deployed["keep"], "matched_loss": fitted["loss"],
                        "matched_keep": fitted["keep"]}
        out[f"{budget:g}"] = {"full_loss": full["loss"], "static_loss": static["loss"], "static_keep": static["keep"],
                              "rules": rules, "sequences": sum(len(b) for b in held)}
    return out
