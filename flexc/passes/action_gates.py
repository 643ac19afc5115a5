"""``insert_action_gates``: learnable per-expert width actions on every routed-experts node.

Each expert gets logits over a discrete set of keep ratios (default 1/8 … 8/8), each rounded
to a width granule (default 16 channels: Triton kernels tile the intermediate dimension in
multiples of 16, so other widths would waste a partial tile and bytes read would not shrink
with them). An action keeps a prefix of the ranked channels.

Every flexc op node is rewritten to call a :class:`GatedExperts` submodule of the graph, with
the same arguments. Its mode decides what it computes:

- ``"full"``: the original op at full width (the distillation teacher);
- ``"sample"``: a straight-through Gumbel-softmax sample of actions at temperature ``tau``:
  the forward pass is exactly the sampled width, the backward pass reaches the logits through
  the soft sample;
- ``"deploy"``: the argmax action of each expert, through the width-aware op;
- ``"table"``: a fixed width table (evaluation of an exported budget).

Model weights are frozen (``requires_grad=False``): no gradient buffers exist for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from flexc.ir.graph import is_expert_node
from flexc.ir.layout import ExpertWeights
from flexc.ir.op import run_experts
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult, check_granule
from flexc.passes.masked_experts import masked_experts

GATE_PREFIX = "flexc_gates_"
STREAMED_GATES = "action_gates"  # the state entry of a streamed compile's gate options


MAX_LEVELS = 64


def level_widths(intermediate: int, levels: int | None, granule: int) -> torch.Tensor:
    """Widths of the ``levels`` keep ratios ``1/levels … 1``, rounded to ``granule`` (ascending, ≥ 1 granule).

    ``levels=None``: one action per granule (every multiple of ``granule``), at most
    ``MAX_LEVELS`` of them.
    """
    if levels is None:
        levels = min(max(intermediate // granule, 1), MAX_LEVELS)
    ratios = torch.arange(1, levels + 1, dtype=torch.float64) / levels
    widths = (ratios * intermediate / granule).round() * granule
    widths = widths.clamp(min=min(granule, intermediate), max=intermediate).to(torch.int64)
    widths[-1] = intermediate
    if (widths[1:] < widths[:-1]).any():
        raise ValueError(f"level widths not ascending: {widths.tolist()}")
    return widths


class GatedExperts(nn.Module):
    """Action logits of one MoE layer's experts, and the node's computation in each mode."""

    def __init__(self, num_experts: int, intermediate: int, levels: torch.Tensor, init_margin: float):
        super().__init__()
        self.intermediate = intermediate
        self.register_buffer("level_widths", levels.clone(), persistent=True)
        logits = torch.zeros(num_experts, len(levels))
        logits[:, -1] = init_margin  # start biased toward full width
        self.logits = nn.Parameter(logits)
        self.mode = "full"
        self.tau = 1.0
        self.noise: torch.Tensor | None = None  # Gumbel noise [E, A] for the next "sample" forward
        self.table: torch.Tensor | None = None  # widths [E] for "table" mode
        self.max_levels: torch.Tensor | None = None  # [E]: actions above are excluded (nesting under a budget)
        self.price: torch.Tensor | None = None  # [E, A]: subtracted from the logits (the budget's price of each action)

    def masked_logits(self) -> torch.Tensor:
        """The logits less the actions' ``price``, with the actions above ``max_levels`` excluded."""
        logits = self.logits if self.price is None else self.logits - self.price
        if self.max_levels is None:
            return logits
        allowed = torch.arange(self.logits.shape[1], device=self.logits.device)[None, :] <= self.max_levels[:, None]
        return logits.masked_fill(~allowed, float("-inf"))

    def probs(self) -> torch.Tensor:
        return F.softmax(self.masked_logits(), dim=-1)

    def deployed_levels(self) -> torch.Tensor:
        return self.masked_logits().detach().argmax(dim=-1)

    def sample(self) -> torch.Tensor:
        """Straight-through Gumbel-softmax one-hot ``[E, A]`` (hard forward, soft gradient)."""
        noise = self.noise if self.noise is not None else torch.zeros_like(self.logits)
        soft = F.softmax((self.masked_logits() + noise) / self.tau, dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
        return hard - soft.detach() + soft

    def channel_mask(self, actions: torch.Tensor) -> torch.Tensor:
        """``[E, I]`` mask: sum over actions of the action weight times its prefix indicator."""
        channels = torch.arange(self.intermediate, device=actions.device)
        prefix = (channels[None, :] < self.level_widths[:, None].to(actions.device)).to(actions.dtype)  # [A, I]
        return actions @ prefix

    def forward(self, hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                activation, interleaved, alpha, limit):
        # The op's flat arguments: this module stands in for the op in the graph (and, through
        # experts_impl.override_op, on a streamed layer).
        weights = ExpertWeights.of(gate_up, down, gate_up_bias, down_bias, activation, interleaved, alpha, limit)
        # The gates stay on the CPU (their state is tiny and the anneal's bookkeeping is CPU
        # tensors); what reaches the experts moves to the activations' device.
        if self.mode == "sample":
            actions = self.sample()
            mask = self.channel_mask(actions).to(device=hidden.device, dtype=hidden.dtype)
            # The mask is a prefix: zero from the sampled width on, and only the allowed actions'
            # widths can take its gradient anywhere (masked_experts computes no more than that).
            sampled = self.level_widths[actions.detach().argmax(dim=-1)]
            upper = (self.level_widths[self.max_levels] if self.max_levels is not None
                     else torch.full_like(sampled, self.intermediate))
            return masked_experts(hidden, topk_ids, topk_weights, weights, mask, upper.tolist(), sampled.tolist())
        if self.mode == "deploy":
            widths = self.level_widths[self.deployed_levels()].to(device=hidden.device, dtype=torch.int32)
        elif self.mode == "table":
            widths = None if self.table is None else self.table.to(hidden.device)
        elif self.mode != "full":
            raise ValueError(f"unknown gate mode {self.mode!r}")
        return run_experts(hidden, topk_ids, topk_weights, weights, widths)


def gates_of(graph) -> list[GatedExperts]:
    """The gate module of every MoE layer, in ``graph.groups`` order."""
    return [graph.module.get_submodule(GATE_PREFIX + str(g.layer)) for g in graph.groups]


def set_gate_mode(graph, mode: str, tau: float | None = None) -> None:
    set_modes(gates_of(graph), mode, tau)


def set_modes(gates: list[GatedExperts], mode: str, tau: float | None = None) -> None:
    """Put every gate in ``mode`` (and at temperature ``tau`` if given)."""
    for gate in gates:
        gate.mode = mode
        if tau is not None:
            gate.tau = tau


class InsertActionGatesOptions(PassOptions):
    levels: int | None = Field(None, ge=2, le=64, description="Number of keep ratios per expert: 1/levels … "
                               "levels/levels (default: one per granule, i.e. every multiple of the granule, "
                               "at most 64).")
    granule: int = Field(16, ge=1, description="Widths are rounded to multiples of this many channels.")
    init_margin: float = Field(3.0, ge=0, le=50, description="Initial logit advantage of the full-width action "
                                                           "(at most 50: softmax saturates long before).")

    _granule = field_validator("granule")(classmethod(lambda cls, v: check_granule(v)))


class InsertActionGates(Pass):
    """Give every routed expert learnable width-action logits; freeze the model weights."""

    name = "insert_action_gates"
    streams = True  # run_streamed: the options recorded, anneal builds the gates
    Options = InsertActionGatesOptions
    requires = frozenset({"channels_ranked"})
    guarantees = frozenset({"action_gates"})
    preserves_computation = True  # gates start in "full" mode

    @classmethod
    def check_spec(cls, options, site) -> list:
        inter = getattr(site.shape, "intermediate_size", None)
        if inter is not None and inter < options.granule:
            return [(site.loc, f"insert_action_gates: granule {options.granule} is wider than the experts ({inter} "
                     f"channels, {site.shape.config_file}); use a granule of at most {inter}")]
        return []

    @classmethod
    def keep_floor(cls, options, shape, metric: str) -> tuple[float, str] | None:
        inter = shape.intermediate_size
        if inter < options.granule:
            return None  # check_spec reports it
        narrowest = int(level_widths(inter, options.levels, options.granule)[0])
        return narrowest / inter, (
            f"insert_action_gates (levels {options.levels or 'one per granule'}, granule {options.granule}) cannot "
            f"make an expert of {inter} channels ({shape.config_file}) narrower than {narrowest}; use a larger "
            "budget, or more levels or a smaller granule")

    def run_streamed(self, model, ctx: PassContext) -> None:
        insert_action_gates_streamed(self, model, ctx)

    def run(self, graph, ctx: PassContext) -> PassResult:
        for p in graph.model.parameters():
            p.requires_grad_(False)
        gates = dict(zip((g.node for g in graph.groups), build_gates(graph.groups, self.options)))
        by_node = {g.node: g for g in graph.groups}
        changed = set()
        for node in list(graph.module.graph.nodes):
            if not is_expert_node(node):
                continue
            group = by_node[node.name]
            new = graph.replace_expert_node(node, group, GATE_PREFIX + str(group.layer), submodule=gates[node.name])
            changed.add(new.name)
        graph.record_rewrite(self.name, self.options.model_dump(mode="json"))
        return PassResult(graph=graph, modified=True, changed_nodes=changed)


def build_gates(groups, options: InsertActionGatesOptions) -> list[GatedExperts]:
    """A fresh gate module (logits favouring full width) for each MoE layer of ``groups``, in order."""
    gates = []
    for group in groups:
        if group.intermediate_size < options.granule:
            raise ValueError(f"layer {group.layer}: intermediate size {group.intermediate_size} is smaller "
                             f"than the granule {options.granule}")
        widths = level_widths(group.intermediate_size, options.levels, options.granule)
        gates.append(GatedExperts(group.num_experts, group.intermediate_size, widths, options.init_margin))
    return gates


def insert_action_gates_streamed(p: InsertActionGates, lm, ctx: PassContext) -> None:
    """``insert_action_gates`` without a graph: the gates are a function of the layers and the options
    (fresh logits), so the options are recorded in the state and ``anneal`` builds the gates from them."""
    build_gates(lm.groups, p.options)  # the same checks as in a graph
    ctx.state.extras[STREAMED_GATES] = p.options.model_dump(mode="json")


def streamed_gates(groups, state) -> list[GatedExperts]:
    """The gates a streamed ``insert_action_gates`` recorded in ``state``, built afresh."""
    options = state.extras.get(STREAMED_GATES)
    if options is None:
        raise ValueError("the streamed compile has no action gates: run insert_action_gates before anneal")
    return build_gates(groups, InsertActionGatesOptions(**options))
