"""The ``graph`` export: the final FlexGraph as readable code and a drawing.

``<out>/graph/graph.py`` (the fx code, one comment line per MoE layer naming its op node),
``graph.dot`` and ``graph.svg`` (Graphviz when installed, a matplotlib drawing otherwise).
Per-pass snapshots are ``flexc compile --dump-graphs``.
"""

from __future__ import annotations

from flexc.export.context import ExportContext


def export_graph(ctx: ExportContext) -> None:
    if ctx.graph is None:
        raise ValueError("the graph export needs a lowered graph: give the spec a pipeline (an empty pipeline "
                         "only loads the model)")
    from flexc.ir.draw import dump_graph

    for path in dump_graph(ctx.graph, ctx.target / "graph"):
        ctx.logger.info("graph: %s", path.name)
