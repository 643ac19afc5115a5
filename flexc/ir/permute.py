"""Channel permutations of expert weights: the one weight transform the ranking applies.

Used by ``rank_channels`` (through :meth:`flexc.ir.graph.FlexGraph.permute_channels`, which
records it so that a resumed compile re-derives the permuted weights from the source instead of
storing them) and, in a streamed compile, to each loaded layer (:func:`layer_permuter`: the
anneal's layers and the exports).
"""

from __future__ import annotations

import torch

from flexc.ir.op import gate_up_rows


def check_permutations(perms: torch.Tensor, experts: int, channels: int, what: str) -> None:
    """``perms`` is ``[experts, channels]`` and each row a permutation of ``range(channels)`` (else ValueError)."""
    if not isinstance(perms, torch.Tensor) or tuple(perms.shape) != (experts, channels):
        shape = tuple(perms.shape) if isinstance(perms, torch.Tensor) else type(perms).__name__
        raise ValueError(f"{what}: expected a [{experts}, {channels}] channel permutation per expert; found {shape}")
    if perms.dtype.is_floating_point or perms.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer channel indices; found {perms.dtype}")
    ok = perms.sort(dim=-1).values.cpu() == torch.arange(channels)
    if not bool(ok.all()):
        e = int((~ok).any(dim=-1).nonzero()[0])
        raise ValueError(f"{what}: expert {e}'s channel order is not a permutation of 0..{channels - 1}")


def permute_expert_channels(graph, layer_index: int, perms: torch.Tensor) -> None:
    """Apply ``perms[e]`` (new position j takes old channel ``perms[e, j]``) to one layer, in place."""
    group = graph.groups[layer_index]
    experts = graph.experts_module(group)
    gate_up, down = graph.expert_weights(group)
    bias = experts.gate_up_proj_bias if group.has_bias else None
    with torch.no_grad():
        for e in range(group.num_experts):
            p = perms[e].to(gate_up.device)
            for which in (0, 1):
                rows = gate_up_rows(gate_up[e], group.interleaved, which)
                rows.copy_(rows[p].clone())
                if bias is not None:
                    b = gate_up_rows(bias[e], group.interleaved, which)
                    b.copy_(b[p].clone())
            cols = down[e]
            cols.copy_(cols[:, p].clone())


def layer_permuter(groups, perms: torch.Tensor):
    """A streamed compile's per-layer transform ``(layer, layer graph)``: apply ``rank_channels``'
    permutation ``perms [MoE layers, E, I]`` (in ``groups`` order) to a loaded decoder layer."""
    index = {g.layer: i for i, g in enumerate(groups)}

    def transform(layer: int, graph) -> None:
        if graph.groups:
            permute_expert_channels(graph, 0, perms[index[layer]])

    return transform
