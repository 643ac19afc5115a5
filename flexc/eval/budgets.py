"""Put a lowered graph at one budget of a compile's state (widths, and router masks if any)."""

from __future__ import annotations

from flexc.ir.state import CompileState


def apply_budget(graph, state: CompileState | dict, budget: float | None) -> None:
    """Switch ``graph`` in place to ``budget`` (a keep ratio of the state's tables); None or 1.0: full model.

    Sets every layer's widths and, for whole-expert pruning (the state's ``expert_masks``),
    the router masks that renormalise routing over the remaining experts.
    """
    from flexc.ir.graph import set_expert_mask

    if isinstance(state, dict):  # the dict form of older callers
        state = CompileState.from_mapping(state, graph.groups)
    if budget is None or (abs(budget - 1.0) < 1e-9 and state.width_tables is None):
        graph.set_widths(None)
        set_expert_mask(graph, None)
        return
    tables = state.checked_width_tables(allow_expert_masks=True)
    graph.set_widths(tables.table(budget))
    masks = state.expert_masks
    exported = any(abs(b - budget) < 1e-6 for b in tables.budgets)
    # keep 1.0 without an exported table is the full model: nothing masked
    set_expert_mask(graph, masks[tables.index(budget)] if masks is not None and exported else None)
