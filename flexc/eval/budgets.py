"""Put a lowered graph at one budget of a compile's hand-off state (widths, and router masks if any)."""

from __future__ import annotations

import torch

from flexc.ir.tables import WidthTables


def budget_tables(state: dict, groups) -> WidthTables:
    """The compile's width tables (nesting checked)."""
    return WidthTables.from_state(state, groups, allow_expert_masks=True)


def apply_budget(graph, state: dict, budget: float | None) -> None:
    """Switch ``graph`` in place to ``budget`` (a keep ratio of the state's tables); None or 1.0: full model.

    Sets every layer's widths and, for whole-expert pruning (``expert_masks`` in the state),
    the router masks that renormalise routing over the remaining experts.
    """
    from flexc.ir.graph import set_expert_mask

    if budget is None or (abs(budget - 1.0) < 1e-9 and "width_tables" not in state):
        graph.set_widths(None)
        set_expert_mask(graph, None)
        return
    tables = budget_tables(state, graph.groups)
    graph.set_widths(tables.table(budget))
    masks = state.get("expert_masks")
    exported = any(abs(b - budget) < 1e-6 for b in tables.budgets)
    # keep 1.0 without an exported table is the full model: nothing masked
    set_expert_mask(graph, torch.as_tensor(masks)[tables.index(budget)] if masks is not None and exported else None)
