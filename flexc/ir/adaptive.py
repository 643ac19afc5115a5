"""Token-adaptive widths: each routed (token, expert) pair runs at one of two nested widths, chosen by
its routing weight.

Nested weights make a width per routed pair free: every budget is a prefix of the same rows, and the
op takes ``widths [T, k]``. An adaptive policy gives, per budget and MoE layer, a routing-weight
threshold and two **levels** of the artifact (full width, key 1.0, or one budget's table): a pair whose
routing weight is at or above the threshold runs at its expert's width in the upper level, the others
at the lower level's (MoSE, arXiv 2602.06154: slimmable experts whose width follows the router's
confidence).

A second kind of rule, ``scores``, gives each pair its own width from the channel scores the ranking
measured: a pair with routing weight ``p`` to expert ``e`` keeps channel ``c`` when ``p * s_e[c] / p_e``
reaches the layer's ``scale`` (``p_e``: the expert's mean routing weight on the calibration text), so
every routed pair keeps the channels whose weighted importance clears one bar: confident pairs run
wide, and each expert keeps its own ranked importance. Widths stay on the compile's grid.

Each threshold (or scale) is calibrated on calibration text so that the layer's **active keep** (the mean, over
its routed pairs, of the pair's width over the full width: the expert FLOPs and bytes a token
actually uses) equals a target: the static table's own active keep at that budget (``target: table``,
the same compute per token as the table, so the two compare at equal cost), or the budget itself
(``target: budget``). A static table's active keep is not its budget: routing favours the experts the
table keeps wide.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexc.ir.experts_impl import ADAPTIVE, set_adaptive
from flexc.ir.tables import BudgetError

POLICY_FILE = "flexc_adaptive.json"
POLICY_FORMAT = 1
RULES = ("scores", "adjacent", "extreme")
LEVEL_RULES = ("adjacent", "extreme")
TARGETS = ("table", "budget")
FULL = 1.0  # the level key of full width


@dataclass(frozen=True)
class LayerRule:
    """One MoE layer at one budget: pairs with routing weight ``>= threshold`` run at level ``upper``'s
    widths, the others at level ``lower``'s (levels are keys: 1.0 for full width, else a budget); or, with
    ``scale`` set (the ``scores`` rule), each pair at the width its channel scores give (:class:`ScoredLayer`)."""

    threshold: float = math.inf
    upper: float = FULL
    lower: float = FULL
    scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.scale is not None:
            return {"scale": self.scale}
        return {"threshold": None if math.isinf(self.threshold) else self.threshold, "upper": self.upper,
                "lower": self.lower}


@dataclass
class ChannelScores:
    """What the ``scores`` rule reads, per MoE layer: each expert's mean routing weight on the calibration text
    (``mean_weight [E]``) and the ranked score of the last channel of each grid step (``bounds [E, I/granule]``,
    descending along the channels)."""

    granule: int
    mean_weight: list[torch.Tensor]
    bounds: list[torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return {"granule": self.granule, "layers": [{"mean_weight": m.tolist(), "bounds": b.tolist()}
                                                     for m, b in zip(self.mean_weight, self.bounds)]}

    @classmethod
    def from_dict(cls, data: Any, tables, bad) -> "ChannelScores":
        try:
            granule, layers = int(data["granule"]), data["layers"]
            mean = [torch.tensor(x["mean_weight"], dtype=torch.float64) for x in layers]
            bounds = [torch.tensor(x["bounds"], dtype=torch.float64) for x in layers]
        except (KeyError, TypeError, ValueError):
            raise bad("its channel scores lack granule / layers of mean_weight and bounds") from None
        shapes = [(len(m), tuple(b.shape)) for m, b in zip(mean, bounds)]
        expected = [(int(tables.tables.shape[2]), (int(tables.tables.shape[2]), full // granule))
                    for full in tables.full]
        if granule < 1 or shapes != expected:
            raise bad(f"its channel scores have shapes {shapes}; the width tables need {expected}")
        return cls(granule, mean, bounds)


@dataclass
class AdaptivePolicy:
    """Per budget, one :class:`LayerRule` per MoE layer (in the width tables' layer order), and what the
    calibration measured (``report``: per budget its target, calibration and held-out active keep, ...)."""

    rule: str
    target: str
    budgets: dict[float, list[LayerRule]]
    report: dict[str, Any] = field(default_factory=dict)
    channels: ChannelScores | None = None  # what rules with a scale read

    def rules(self, budget: float) -> list[LayerRule] | None:
        for b, rules in self.budgets.items():
            if abs(b - budget) < 1e-6:
                return rules
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "rule": self.rule, "target": self.target,
                "budgets": [{"keep": b, "layers": [r.to_dict() for r in rules]} for b, rules in self.budgets.items()],
                "channels": None if self.channels is None else self.channels.to_dict(), "report": self.report}

    @classmethod
    def from_dict(cls, data: Any, tables, where: str) -> "AdaptivePolicy":
        """The policy in ``data`` (what :meth:`to_dict` wrote), checked against the artifact's ``tables``;
        a ``ValueError`` naming ``where`` and what was expected otherwise."""
        def bad(what: str) -> ValueError:
            return ValueError(f"{where}: {what}; expected the adaptive policy the export wrote: re-export the artifact")

        if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
            raise bad(f"not an adaptive policy of format {POLICY_FORMAT}")
        if data.get("rule") not in ("auto", *RULES) or data.get("target") not in TARGETS:
            raise bad(f"rule {data.get('rule')!r} / target {data.get('target')!r} (expected one of auto, {RULES} / "
                      f"{TARGETS})")
        levels = [FULL, *tables.budgets]
        budgets: dict[float, list[LayerRule]] = {}
        for entry in data.get("budgets") or []:
            keep = entry.get("keep") if isinstance(entry, dict) else None
            layers = entry.get("layers") if isinstance(entry, dict) else None
            if not any(isinstance(keep, (int, float)) and abs(keep - b) < 1e-6 for b in tables.budgets):
                raise bad(f"budget {keep!r} is not one of the width tables' budgets {tables.budgets}")
            if not isinstance(layers, list) or len(layers) != len(tables.layers):
                raise bad(f"budget {keep}: expected one rule per MoE layer ({len(tables.layers)})")
            rules = []
            for r in layers:
                if isinstance(r, dict) and "scale" in r:
                    if not isinstance(r["scale"], (int, float)) or isinstance(r["scale"], bool) or r["scale"] <= 0:
                        raise bad(f"budget {keep}: a scores rule's scale must be a positive number; found {r['scale']!r}")
                    rules.append(LayerRule(scale=float(r["scale"])))
                    continue
                try:
                    threshold = math.inf if r["threshold"] is None else float(r["threshold"])
                    upper, lower = float(r["upper"]), float(r["lower"])
                except (KeyError, TypeError, ValueError):
                    raise bad(f"budget {keep}: a layer rule {r!r} lacks threshold/upper/lower numbers") from None
                if not all(any(abs(x - lv) < 1e-6 for lv in levels) for x in (upper, lower)):
                    raise bad(f"budget {keep}: levels {upper}/{lower} are not 1.0 or a budget of the tables")
                rules.append(LayerRule(threshold, upper, lower))
            budgets[float(keep)] = rules
        scored = any(r.scale is not None for rules in budgets.values() for r in rules)
        channels = data.get("channels")
        if scored and channels is None:
            raise bad("it has scores rules but no channel scores")
        channels = None if channels is None else ChannelScores.from_dict(channels, tables, bad)
        return cls(data["rule"], data["target"], budgets, data.get("report") or {}, channels)

    @classmethod
    def load(cls, path: str | Path, tables) -> "AdaptivePolicy":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the adaptive policy ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(data, tables, str(path))


def level_row(tables, key: float, layer_index: int) -> torch.Tensor:
    """Level ``key``'s widths ``[E]`` of MoE layer ``layer_index`` (1.0: full width)."""
    if abs(key - FULL) < 1e-6:
        return tables.full_table()[layer_index]
    return tables.table(key)[layer_index]


class AdaptiveLayer:
    """What one experts module runs with while adaptive: per-pair widths from its routing weights (two levels
    split by a threshold)."""

    def __init__(self, threshold: float, upper: torch.Tensor, lower: torch.Tensor, full: int):
        self.threshold = threshold
        self.upper, self.lower = upper.to(torch.int32), lower.to(torch.int32)
        self.full = full
        self.meter: list[float] | None = None  # [summed keep, pairs] while measured

    def widths(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return torch.where(topk_weights >= self.threshold, self.upper[topk_ids], self.lower[topk_ids])

    def pair_widths(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        widths = self.widths(topk_ids, topk_weights)
        if self.meter is not None:
            self.meter[0] += widths.sum().item() / self.full
            self.meter[1] += widths.numel()
        return widths


class ScoredLayer(AdaptiveLayer):
    """The ``scores`` rule: a pair (weight ``p``, expert ``e``) keeps the grid steps whose last channel's score
    ``b`` satisfies ``p * b / mean_weight[e] >= scale``."""

    def __init__(self, scale: float, mean_weight: torch.Tensor, bounds: torch.Tensor, granule: int, full: int):
        self.scale, self.granule, self.full = scale, granule, full
        self.mean_weight, self.bounds = mean_weight.to(torch.float64), bounds.to(torch.float64)
        self.meter = None

    def widths(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        need = self.scale * self.mean_weight[topk_ids] / topk_weights.to(torch.float64).clamp_min(1e-12)
        steps = (self.bounds[topk_ids] >= need.unsqueeze(-1)).sum(-1)
        return (steps * self.granule).to(torch.int32)


def policy_layers(policy: AdaptivePolicy, tables, budget: float, device=None) -> list[AdaptiveLayer]:
    """Each MoE layer's :class:`AdaptiveLayer` of ``policy`` at ``budget`` (rows on ``device``)."""
    rules = policy.rules(budget)
    if rules is None:
        raise BudgetError(f"the adaptive policy has no rule for budget {budget:g}; it covers "
                          f"{', '.join(f'{b:g}' for b in policy.budgets)}")
    channels = policy.channels
    return [ScoredLayer(r.scale, channels.mean_weight[i].to(device), channels.bounds[i].to(device), channels.granule,
                        int(tables.full[i])) if r.scale is not None else
            AdaptiveLayer(r.threshold, level_row(tables, r.upper, i).to(device),
                          level_row(tables, r.lower, i).to(device), int(tables.full[i]))
            for i, r in enumerate(rules)]


def static_layers(tables, budget: float, device=None) -> list[AdaptiveLayer]:
    """Layers that run ``budget``'s static table (1.0: full width) as per-pair widths: metered like a policy."""
    return [AdaptiveLayer(math.inf, row.to(device), row.to(device), int(full))
            for row, full in zip(level_rows(tables, budget), tables.full)]


def level_rows(tables, key: float) -> list[torch.Tensor]:
    return [level_row(tables, key, i) for i in range(len(tables.layers))]


@contextlib.contextmanager
def running(modules, layers: list[AdaptiveLayer]):
    """Run each experts module of ``modules`` with its layer of ``layers``, metered; yields a function giving
    the realised active keep so far (mean over every routed pair of its width over the full width; after the
    block, its final value). What the modules ran before is put back afterwards."""
    previous = [module.__dict__.get(ADAPTIVE) for module in modules]
    for module, layer in zip(modules, layers):
        layer.meter = [0.0, 0]
        set_adaptive(module, layer)
    final: list[float] = []  # the value when the block ended: the function still answers after it

    def keep() -> float:
        if final:
            return final[0]
        return sum(layer.meter[0] for layer in layers) / max(1, sum(layer.meter[1] for layer in layers))

    try:
        yield keep
    finally:
        final.append(keep())
        for module, layer, before in zip(modules, layers, previous):
            set_adaptive(module, before)
            layer.meter = None


# ---- calibration ------------------------------------------------------------------------


def active_keep(row: torch.Tensor, ids: torch.Tensor, full: int) -> float:
    """Mean, over the routed pairs ``ids``, of their expert's width in ``row`` over ``full``."""
    return float(row[ids].double().mean()) / full if ids.numel() else 0.0


def choose_levels(keeps: list[float], target: float, rule: str) -> tuple[int, int]:
    """Indices (into ``keeps``: each level's active keep, widest first) of the upper and lower level for a
    layer whose target active keep is ``target``: the levels just above and below it (``adjacent``) or the
    widest and narrowest (``extreme``); one level twice where the target lies outside their range."""
    eps = 1e-9
    above = [j for j, k in enumerate(keeps) if k > target + eps]
    below = [j for j, k in enumerate(keeps) if k < target - eps]
    if not above:
        return 0, 0
    if not below:
        last = len(keeps) - 1
        return last, last
    if rule == "extreme":
        return 0, len(keeps) - 1
    if rule == "adjacent":
        return above[-1], below[0]
    raise ValueError(f"unknown adaptive rule {rule!r}; expected one of {RULES}")


def calibrate_threshold(weights: torch.Tensor, ids: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor,
                        full: int, target: float) -> float:
    """The routing-weight threshold whose pairs at or above it run at ``upper`` (the rest at ``lower``) giving
    the most active keep, over the recorded pairs (``weights``, ``ids``), that stays at or below ``target``."""
    if not ids.numel():
        return math.inf
    up, lo = upper[ids].double() / full, lower[ids].double() / full
    order = torch.argsort(weights, descending=True, stable=True)
    kept = lo.sum() + torch.cumsum((up - lo)[order], 0)  # total keep with the top n pairs at upper
    n = int((kept <= target * ids.numel() + 1e-6).sum())
    return float(weights[order][n - 1]) if n > 0 else math.inf


def channel_scores(tables, routing: list[tuple[torch.Tensor, torch.Tensor]], scores: torch.Tensor) -> ChannelScores:
    """The ``scores`` rule's inputs: ``scores [L, E, I]`` (the ranking's, ranked order) cut at the compile's grid
    (the largest step every table width is a multiple of), and each expert's mean calibration routing weight."""
    granule = math.gcd(*[int(w) for w in tables.tables.flatten().tolist()], *[int(f) for f in tables.full])
    mean, bounds = [], []
    for i, (weights, ids) in enumerate(routing):
        num_experts, full = int(tables.tables.shape[2]), int(tables.full[i])
        total = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, ids, weights.double())
        count = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, ids, torch.ones_like(weights, dtype=torch.float64))
        mean.append(total / count.clamp_min(1))
        layer = scores[i, :num_experts, :full].double()
        bounds.append(layer[:, granule - 1::granule])
    return ChannelScores(granule, mean, bounds)


def calibrate_scale(weights: torch.Tensor, ids: torch.Tensor, mean_weight: torch.Tensor, bounds: torch.Tensor,
                    granule: int, full: int, target: float) -> float:
    """The smallest ``scores`` scale whose active keep over the recorded pairs stays at or below ``target``
    (bisection in log scale: the keep falls as the scale grows)."""
    def keep(scale: float) -> float:
        return float(ScoredLayer(scale, mean_weight, bounds, granule, full).widths(ids, weights).double().mean()) / full

    if not ids.numel() or not bool((bounds > 0).any()):
        return math.inf
    ratio = weights.double().clamp_min(1e-12) / mean_weight[ids].clamp_min(1e-12)  # p / p_e per pair
    reach = bounds[ids] * ratio[:, None]  # the scale at which each pair would just keep each grid step
    positive = reach[reach > 0]
    lo, hi = float(positive.min()) / 2, float(reach.max()) * 2
    if keep(lo) <= target:
        return lo
    for _ in range(100):  # lo keeps too much, hi at most the target
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if keep(mid) > target else (lo, mid)
    return hi


def calibrate_policy(tables, routing: list[tuple[torch.Tensor, torch.Tensor]], *, rule: str = "adjacent",
                     target: str = "table", scores: torch.Tensor | None = None) -> AdaptivePolicy:
    """An :class:`AdaptivePolicy` for every budget of ``tables`` from the routing recorded on calibration text
    at full width (``routing[i]``: the routing weights and expert ids of MoE layer i's pairs, flat); the
    ``scores`` rule reads the ranking's channel scores ``scores [L, E, I]``. :func:`recalibrate` then fits it
    again on the routing the policy itself leads to."""
    if rule == "scores" and scores is None:
        raise ValueError("the scores rule needs the ranking's channel scores (rank_channels in this compile)")
    if rule not in RULES:
        raise ValueError(f"unknown adaptive rule {rule!r}; expected one of {RULES}")
    if target not in TARGETS:
        raise ValueError(f"unknown adaptive target {target!r}; expected one of {TARGETS}")
    levels = [FULL, *tables.budgets]
    channels = channel_scores(tables, routing, scores) if rule == "scores" else None
    budgets, report = {}, {}
    for budget in tables.budgets:
        rules, targets, achieved = [], [], []
        for i, (weights, ids) in enumerate(routing):
            full = int(tables.full[i])
            keeps = [active_keep(level_row(tables, key, i), ids, full) for key in levels]
            goal = keeps[levels.index(budget)] if target == "table" else budget
            if channels is not None:
                kind = LayerRule(scale=1.0)
            else:
                up, lo = choose_levels(keeps, goal, rule)
                kind = LayerRule(math.inf, levels[up], levels[lo])
            fitted, keep = fit_layer(kind, tables, i, weights, ids, goal, channels)
            rules.append(fitted)
            targets.append(goal)
            achieved.append(keep)
        budgets[budget] = rules
        report[f"{budget:g}"] = {"target_keep": _mean(targets), "calibration_keep": _mean(achieved)}
    return AdaptivePolicy(rule, target, budgets, {"budgets": report}, channels)


def fit_layer(rule: LayerRule, tables, index: int, weights: torch.Tensor, ids: torch.Tensor, goal: float,
              channels: ChannelScores | None) -> tuple[LayerRule, float]:
    """``rule`` (its kind: a scale, or two levels) for MoE layer ``index`` with its scale or threshold calibrated on
    the pairs (``weights``, ``ids``) so that their active keep meets ``goal``; and the keep it realises on them."""
    full = int(tables.full[index])
    if rule.scale is not None:
        mean, bounds = channels.mean_weight[index], channels.bounds[index]
        scale = calibrate_scale(weights, ids, mean, bounds, channels.granule, full, goal)
        fitted = LayerRule(scale=scale)
        pair = ScoredLayer(scale, mean, bounds, channels.granule, full).widths(ids, weights)
    else:
        upper, lower = level_row(tables, rule.upper, index), level_row(tables, rule.lower, index)
        same = abs(rule.upper - rule.lower) < 1e-9
        threshold = math.inf if same else calibrate_threshold(weights, ids, upper, lower, full, goal)
        fitted = LayerRule(threshold, rule.upper, rule.lower)
        pair = torch.where(weights >= threshold, upper[ids], lower[ids])
    return fitted, (float(pair.double().mean()) / full if ids.numel() else 0.0)


def recalibrate(policy: AdaptivePolicy, tables, routing: dict[float, list[tuple[torch.Tensor, torch.Tensor]]],
                goals: dict[float, list[float]]) -> AdaptivePolicy:
    """``policy`` with each budget's layers in ``routing`` fitted again (:func:`fit_layer`) on that routing, to the
    per-layer active keeps ``goals[budget]``; rule kinds, levels and channel scores stay.

    Calibration records the routing at full width, but a policy prunes every layer, which moves the routing of the
    layers after it: fitted again on the routing the policy leads to (the pass records it), the layers meet their
    targets as the policy really runs. With ``goals`` the static table's keeps on some text, the policy spends the
    table's compute there (the held-out check compares the two at equal cost this way)."""
    budgets, report = dict(policy.budgets), {k: dict(v) for k, v in policy.report.get("budgets", {}).items()}
    for budget, layers in routing.items():
        rules, achieved = [], []
        for i, (rule, (weights, ids)) in enumerate(zip(policy.rules(budget), layers)):
            fitted, keep = fit_layer(rule, tables, i, weights, ids, goals[budget][i], policy.channels)
            rules.append(fitted)
            achieved.append(keep)
        budgets[budget] = rules
        report[f"{budget:g}"] = {**report.get(f"{budget:g}", {}), "target_keep": _mean(goals[budget]),
                                 "calibration_keep": _mean(achieved)}
    return AdaptivePolicy(policy.rule, policy.target, budgets, {**policy.report, "budgets": report}, policy.channels)


def layer_keeps(tables, key: float, routing: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Each MoE layer's active keep at level ``key`` (1.0 or a budget's static table) over ``routing``."""
    return [active_keep(level_row(tables, key, i), ids, int(tables.full[i])) for i, (_, ids) in enumerate(routing)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
