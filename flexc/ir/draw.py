"""Readable dumps of a FlexGraph: Python code, a Graphviz ``.dot`` file and an SVG drawing.

Parameters and buffers are left out of the drawing (they would dominate it); flexc expert
nodes are filled, and nodes a pass changed are outlined in red. The SVG comes from Graphviz's
``dot`` when it is installed, otherwise from a layered matplotlib drawing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import networkx as nx
from torch import fx

from flexc.ir.graph import is_expert_node
from flexc.utils.atomic import atomic_path, atomic_write_text


def _label(node: fx.Node) -> str:
    if node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target))
        return f"{node.name}\\n{target}"
    return f"{node.name}\\n({node.op})"


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's computation nodes (no parameter/buffer placeholders) as a DiGraph."""
    param_names = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    skip = {n for n in gm.graph.nodes if n.op == "get_attr" or (n.op == "placeholder" and n.target in param_names)}
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        if node in skip:
            continue
        graph.add_node(node.name, label=_label(node), expert=is_expert_node(node), op=node.op)
        for src in node.all_input_nodes:
            if src not in skip:
                graph.add_edge(src.name, node.name)
    return graph


def to_dot(gm: fx.GraphModule, highlight: Iterable[str] = ()) -> str:
    highlight = set(highlight)
    graph = to_networkx(gm)
    lines = ["digraph flexgraph {", '  node [shape=box, fontname="Helvetica", fontsize=9];']
    for name, data in graph.nodes(data=True):
        style = ['style="filled"', 'fillcolor="#ffd27f"'] if data["expert"] else []
        if name in highlight:
            style += ['color="red"', "penwidth=3"]
        lines.append(f'  "{name}" [label="{data["label"]}" {" ".join(style)}];')
    for a, b in graph.edges:
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _svg_with_matplotlib(gm: fx.GraphModule, target: Path, highlight: set[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = to_networkx(gm)
    pos = {}
    for depth, generation in enumerate(nx.topological_generations(graph)):
        for i, name in enumerate(sorted(generation)):
            pos[name] = (i - (len(generation) - 1) / 2, -depth)
    height = max(4.0, 0.35 * (1 - min((y for _, y in pos.values()), default=0)))
    width = max(6.0, 1.6 * max((abs(x) for x, _ in pos.values()), default=1) * 2)
    fig, ax = plt.subplots(figsize=(min(width, 60), min(height, 400)))
    colors = ["#ffd27f" if graph.nodes[n]["expert"] else "#dde6f5" for n in graph.nodes]
    edges = ["red" if n in highlight else "#555555" for n in graph.nodes]
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=False, width=0.5, edge_color="#999999")
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colors, edgecolors=edges, node_size=120, linewidths=1.0)
    labels = {n: graph.nodes[n]["label"].replace("\\n", "\n") for n in graph.nodes}
    nx.draw_networkx_labels(graph, pos, labels=labels, ax=ax, font_size=5)
    ax.set_axis_off()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight")
    plt.close(fig)


def write_svg(gm: fx.GraphModule, target: str | Path, highlight: Iterable[str] = ()) -> Path:
    target = Path(target)
    highlight = set(highlight)
    dot = shutil.which("dot")
    if dot:
        with atomic_path(target) as tmp:
            subprocess.run([dot, "-Tsvg", "-o", str(tmp)], input=to_dot(gm, highlight), text=True, check=True)
    else:
        _svg_with_matplotlib(gm, target, highlight)
    return target


def dump_graph(graph, prefix: str | Path, highlight: Iterable[str] = ()) -> list[Path]:
    """Write ``prefix.py`` (readable code), ``prefix.dot`` and ``prefix.svg`` for a FlexGraph."""
    prefix = Path(prefix)
    gm = graph.module
    code_path, dot_path = prefix.with_suffix(".py"), prefix.with_suffix(".dot")
    header = "".join(
        f"# layer {g.layer}: node {g.node} <- {g.path} (E={g.num_experts}, H={g.hidden_size}, "
        f"I={g.intermediate_size}, top-{g.top_k}, {g.activation})\n"
        for g in graph.groups
    )
    atomic_write_text(code_path, header + gm.code)
    atomic_write_text(dot_path, to_dot(gm, highlight))
    return [code_path, dot_path, write_svg(gm, prefix.with_suffix(".svg"), highlight)]
