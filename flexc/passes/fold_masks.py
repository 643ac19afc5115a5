"""``fold_masks``: turn the trained action masks into the nested model.

After ranking, every expert's channels are sorted by importance, so each budget's mask is a
prefix: expert ``e`` of layer ``l`` keeps its first ``tables[b, l, e]`` channels. Folding
therefore needs no arithmetic on the weights: the permuted weights *are* the nested weights,
and the width table per budget is all that distinguishes one budget from another. The pass

- checks the width tables (one per budget, widths within range, nested: an expert's width
  never grows as the budget falls);
- rewrites every gated expert node back into the plain width-aware op, reading the layer's
  width buffer, and drops the action-gate modules (their logits have served their purpose);
- leaves the graph at full width, computing exactly what the ranked model computes.

The graph is then what the ``nested`` export writes and what :func:`flexc.load` serves:
changing the width buffers switches the budget.
"""

from __future__ import annotations

import torch

from flexc.ir.experts_impl import WIDTHS_BUFFER
from flexc.passes.action_gates import GATE_PREFIX, GatedExperts
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult


class FoldMasks(Pass):
    """Replace action gates by per-budget width tables over the ranked weights."""

    name = "fold_masks"
    streams = True  # run_streamed: a streamed compile has no gates to fold
    Options = PassOptions
    requires = frozenset({"channels_ranked", "width_tables"})
    guarantees = frozenset({"nested"})
    invalidates = frozenset({"action_gates"})
    # The folded graph runs at full width: the same as the ranked model, not as the gates'
    # last mode. Tests compare it with the ranked model instead.
    preserves_computation = False

    def run_streamed(self, model, ctx: PassContext) -> None:
        """Without a graph: check the tables (shape, nesting); there are no gates to remove."""
        tables = ctx.state.checked_width_tables()  # shape and nesting were checked when they were built
        ctx.logger.info("fold_masks (streamed): %d budgets over %d MoE layers (%s)", len(tables.budgets),
                        len(model.groups), ", ".join(f"keep {b:g}" for b in tables.budgets))

    def run(self, graph, ctx: PassContext) -> PassResult:
        tables = ctx.state.checked_width_tables()  # shape and nesting were checked when they were built
        changed = self._remove_gates(graph)
        ctx.logger.info("fold_masks: %d budgets over %d MoE layers (%s)", len(tables.budgets), len(graph.groups),
                        ", ".join(f"keep {b:g}" for b in tables.budgets))
        return PassResult(graph=graph, modified=True, changed_nodes=changed)

    def replay(self, graph, workdir) -> None:
        self._remove_gates(graph)

    def _remove_gates(self, graph) -> set[str]:
        changed = set()
        op = torch.ops.flexc.moe_experts.default
        by_node = {g.node: g for g in graph.groups}
        for node in list(graph.module.graph.nodes):
            if node.op != "call_module" or not isinstance(graph.module.get_submodule(node.target), GatedExperts):
                continue
            group = by_node[node.name]
            args = list(node.args)
            # The gate received the op's arguments unchanged; its ``widths`` argument (index 7)
            # is the layer's width buffer, which the plain op reads from now on.
            if args[7] is None:
                with graph.module.graph.inserting_before(node):
                    args[7] = graph.module.graph.get_attr(f"{group.path}.{WIDTHS_BUFFER}")
            gates = node.target
            changed.add(graph.replace_expert_node(node, group, op, args=tuple(args)).name)
            graph.module.delete_submodule(gates)
        leftover = [name for name, _ in graph.module.named_children() if name.startswith(GATE_PREFIX)]
        for name in leftover:
            graph.module.delete_submodule(name)
        graph.module.graph.eliminate_dead_code()
        graph.record_rewrite(self.name, self.options.model_dump(mode="json"))
        graph.set_widths(None)
        return changed
