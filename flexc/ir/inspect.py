"""``flexc inspect``: a model's MoE structure and where its parameters are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flexc.ir.families import detect_family, supported_families

if TYPE_CHECKING:  # `inspect --families` must not pay for importing torch
    from torch import nn

    from flexc.ir.groups import ExpertGroup


@dataclass
class ModelSummary:
    family: str
    model_class: str
    num_layers: int
    groups: list[ExpertGroup]
    total_params: int
    routed_params: int
    shared_params: int
    router_params: int
    attention_params: int
    embedding_params: int
    other_params: int
    dense_mlp_params: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "family": self.family,
            "model_class": self.model_class,
            "num_layers": self.num_layers,
            "moe_layers": [g.layer for g in self.groups],
            "params": {
                "total": self.total_params,
                "routed_experts": self.routed_params,
                "shared_experts": self.shared_params,
                "routers": self.router_params,
                "attention": self.attention_params,
                "embeddings": self.embedding_params,
                "dense_mlp": self.dense_mlp_params,
                "other": self.other_params,
            },
        }


def _classify(name: str, routed: set[str], shared: list[str], routers: list[str]) -> str:
    owner = name.rsplit(".", 1)[0]
    if owner in routed:
        return "routed"
    if any(name.startswith(p + ".") for p in shared):
        return "shared"
    if any(name.startswith(p + ".") for p in routers):
        return "router"
    if "embed" in name or name.startswith("lm_head."):
        return "embedding"
    if ".self_attn." in name or ".attn." in name or ".attention." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    return "other"


def summarize(model: nn.Module) -> ModelSummary:
    """Count parameters by role, straight from the model's named parameters."""
    adapter = detect_family(model)
    from flexc.ir.groups import find_expert_groups

    groups = find_expert_groups(model, adapter)
    routed = {g.path for g in groups}
    shared = [p for g in groups for p in g.shared_paths]
    modules = dict(model.named_modules())
    routers = []
    for g in groups:
        block = g.path.rsplit(".", 1)[0]
        routers += [f"{block}.{n}" for n in ("gate", "router") if f"{block}.{n}" in modules]
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        kind = _classify(name, routed, shared, routers)
        counts[kind] = counts.get(kind, 0) + p.numel()
    config = model.config.get_text_config()
    return ModelSummary(
        family=adapter.display_name,
        model_class=type(model).__name__,
        num_layers=int(config.num_hidden_layers),
        groups=groups,
        total_params=sum(counts.values()),
        routed_params=counts.get("routed", 0),
        shared_params=counts.get("shared", 0),
        router_params=counts.get("router", 0),
        attention_params=counts.get("attention", 0),
        embedding_params=counts.get("embedding", 0),
        dense_mlp_params=counts.get("dense_mlp", 0),
        other_params=counts.get("other", 0),
    )


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def render_summary(summary: ModelSummary, console) -> None:
    """Print a summary with rich tables."""
    from rich.table import Table

    console.print(f"[bold]{summary.model_class}[/] — family [bold]{summary.family}[/], "
                  f"{summary.num_layers} layers, {len(summary.groups)} MoE layers")
    layers = Table(title="MoE layers", show_lines=False)
    for col in ("layer", "experts", "top-k", "hidden", "intermediate", "activation", "layout", "shared", "routed params"):
        layers.add_column(col, justify="right" if col not in ("activation", "layout", "shared") else "left")
    for g in summary.groups:
        layout = ", ".join(x for x, on in (("interleaved", g.interleaved), ("transposed", g.transposed),
                                            ("bias", g.has_bias)) if on) or "concatenated"
        layers.add_row(str(g.layer), str(g.num_experts), str(g.top_k), str(g.hidden_size), str(g.intermediate_size),
                       g.activation, layout, ", ".join(p.rsplit(".", 1)[-1] for p in g.shared_paths) or "-",
                       f"{g.routed_params:,}")
    console.print(layers)
    params = Table(title="Parameters")
    params.add_column("part")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    for label, n in (("routed experts", summary.routed_params), ("shared experts", summary.shared_params),
                     ("routers", summary.router_params), ("attention", summary.attention_params),
                     ("embeddings + head", summary.embedding_params), ("dense MLP layers", summary.dense_mlp_params),
                     ("other (norms, …)", summary.other_params), ("total", summary.total_params)):
        params.add_row(label, _fmt(n), f"{100 * n / max(summary.total_params, 1):.1f}%")
    console.print(params)


def render_families(console) -> None:
    from rich.table import Table

    table = Table(title="Supported MoE families")
    for col in ("model_type", "family", "router", "notes"):
        table.add_column(col)
    for a in supported_families():
        table.add_row(a.family, a.display_name, a.router, a.notes or "-")
    console.print(table)
