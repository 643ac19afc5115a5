"""A channel ranking's files and hand-off, shared by ``rank_channels`` in memory and streamed.

A stage folder holds ``channel_scores.safetensors`` (per MoE layer: ``layer{i}.scores`` in the
sorted order and ``layer{i}.perm``: ``new[:, j] = old[:, perm[j]]``), ``routing_stats.safetensors``
and ``channel_scores.png``; the compile state gets the sorted scores and the routing statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexc.passes.base import PassContext
from flexc.passes.calibrate import RoutingStats
from flexc.utils.atomic import atomic_path

SCORES_FILE = "channel_scores.safetensors"
ROUTING_FILE = "routing_stats.safetensors"
PLOT_FILE = "channel_scores.png"


def save_routing(stats: RoutingStats, directory: Path) -> None:
    with atomic_path(directory / ROUTING_FILE) as tmp:
        save_file({"counts": stats.counts, "weight_sums": stats.weight_sums}, str(tmp))


def load_routing(directory: Path) -> RoutingStats | None:
    f = directory / ROUTING_FILE
    if not f.is_file():
        return None
    t = load_file(str(f))
    return RoutingStats(counts=t["counts"], weight_sums=t["weight_sums"])


def plot_scores(scores: list[torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(scores)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for i, s in enumerate(scores):
        ax = axes[i // cols][i % cols]
        norm = s / s.sum(dim=1, keepdim=True).clamp_min(1e-30)  # each expert's scores sum to 1
        x = torch.arange(1, s.shape[1] + 1)
        for e in range(s.shape[0]):
            ax.plot(x, norm[e].clamp_min(1e-12), color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(x, norm.median(dim=0).values.clamp_min(1e-12), color="black", linewidth=1.5, label="median expert")
        ax.set_yscale("log")
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("channel rank")
        ax.set_ylabel("share of expert's score")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_axis_off()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def sort_channels(scores: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the permutation putting each expert's channels in descending score order, and
    the scores in that order (a stable sort: ties keep their index order)."""
    perms = [torch.argsort(s, dim=1, descending=True, stable=True) for s in scores]
    return perms, [torch.gather(s, 1, p) for s, p in zip(scores, perms)]


def load_ranking(src: Path, num_layers: int, logger) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """The permutations, sorted scores and routing statistics a previous ranking saved (``from``)."""
    src_dir = src if src.is_dir() else src.parent
    saved = load_file(str(src_dir / SCORES_FILE))
    perms = [saved[f"layer{i}.perm"] for i in range(num_layers)]
    sorted_scores = [saved[f"layer{i}.scores"] for i in range(num_layers)]
    logger.info("rank_channels: reusing scores and permutation from %s", src_dir)
    return perms, sorted_scores, load_routing(src_dir)


def record_ranking(ctx: PassContext, workdir: Path, options, perms, sorted_scores, stats) -> None:
    """Save a ranking in the stage folder (scores, permutation, routing statistics, plot) and hand
    the scores and statistics on in the compile state."""
    tensors = {}
    for i, (s, p) in enumerate(zip(sorted_scores, perms)):
        tensors[f"layer{i}.scores"] = s.contiguous()
        tensors[f"layer{i}.perm"] = p.contiguous()
    with atomic_path(workdir / SCORES_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"score": options.score})
    if stats is not None:
        save_routing(stats, workdir)
        ctx.state.routing_counts = stats.counts
        ctx.state.routing_weight_sums = stats.weight_sums
    if options.plot:
        plot_scores(sorted_scores, workdir / PLOT_FILE)
    ctx.state.channel_scores = torch.stack(sorted_scores)  # [layers, E, I], channels in ranked order
