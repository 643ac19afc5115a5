"""``rank_channels``: score every routed expert's intermediate channels and sort them.

Each expert's channels are permuted in descending score — gate rows, up rows (and their
biases) and down columns together, through the family's layout (concatenated or interleaved,
transposed storage) — so that any width ``w`` keeps the ``w`` most important channels. A
permutation of intermediate channels changes no output (``preserves_computation``).

Writes ``channel_scores.safetensors`` (per layer: ``scores`` in the new, sorted order, and
``perm``: ``new[:, j] = old[:, perm[j]]``), ``routing_stats.safetensors`` and
``channel_scores.png``. ``from: DIR`` reuses the permutation (and routing statistics) of an
earlier run instead of calibrating.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.passes.calibrate import RoutingStats, calibrate
from flexc.passes.registry import register_pass
from flexc.passes.scores import ChannelScore, available_scores, resolve_score
from flexc.utils.atomic import atomic_path
from flexc.utils.distributed import shard

SCORES_FILE = "channel_scores.safetensors"
ROUTING_FILE = "routing_stats.safetensors"
PLOT_FILE = "channel_scores.png"


class RankChannelsOptions(PassOptions):
    score: str = Field("taylor", description=f"Channel score: {', '.join(available_scores())}, or 'module:Class'.")
    from_: Path | None = Field(None, alias="from", description="Reuse scores and permutation from an earlier run's "
                               "rank_channels output directory (or its channel_scores.safetensors).")
    plot: bool = Field(True, description="Write a PNG of score distributions per layer.")

    model_config = {"populate_by_name": True, "extra": "forbid"}

    @field_validator("score")
    @classmethod
    def _known(cls, v: str) -> str:
        if ":" not in v and v not in available_scores():
            raise ValueError(f"unknown score {v!r}; expected one of {', '.join(available_scores())} or 'module:Class'")
        if ":" in v:  # import a custom score now, not after the model has loaded
            try:
                score = resolve_score(v)
            except Exception as exc:  # noqa: BLE001 - any import failure is the spec's problem
                raise ValueError(f"cannot import score {v!r}: {type(exc).__name__}: {exc}; expected "
                                 "'package.module:ClassName' importable from the working directory or PYTHONPATH") from None
            if not (isinstance(score, type) and issubclass(score, ChannelScore)):
                raise ValueError(f"score {v!r} is not a flexc.passes.scores.ChannelScore subclass; expected a class "
                                 "deriving from it")
        return v

    @field_validator("from_")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None:
            f = v / SCORES_FILE if v.is_dir() else v
            if not f.is_file():
                raise ValueError(f"no {SCORES_FILE} at {v}")
        return v

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        return self.from_ is None  # `from:` reuses an earlier run's scores


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


@register_pass
class RankChannels(Pass):
    """Score and sort every routed expert's intermediate channels (function-preserving)."""

    name = "rank_channels"
    streams = True  # run_streamed: one decoder layer at a time (rank_channels_streamed.py)
    reads_source_weights = True
    Options = RankChannelsOptions
    requires = frozenset({"lowered"})
    guarantees = frozenset({"channels_ranked", "routing_stats"})
    preserves_computation = True

    def compute_scores(self, graph, ctx: PassContext) -> tuple[list[torch.Tensor], RoutingStats]:
        score_cls = resolve_score(self.options.score)
        layers = {i: (g.num_experts, g.hidden_size, g.intermediate_size) for i, g in enumerate(graph.groups)}
        score = score_cls(layers, {i: g.interleaved for i, g in enumerate(graph.groups)})
        stats = calibrate(
            graph, shard(ctx.calibration_batches()),  # this rank's batches; the sums are reduced below
            on_forward=score.on_forward, on_backward=score.on_backward, end_batch=score.end_batch,
            backward=score_cls.needs_backward, description=f"rank_channels ({score_cls.name})", quiet=ctx.quiet,
        ).all_reduce()
        score.all_reduce()
        weights = {i: graph.expert_weights(g) for i, g in enumerate(graph.groups)}
        result = score.result(weights)
        return [result[i] for i in range(len(graph.groups))], stats

    def run_streamed(self, model, ctx: PassContext) -> None:
        from flexc.passes.rank_channels_streamed import rank_channels_streamed

        rank_channels_streamed(self, model, ctx)

    def run(self, graph, ctx: PassContext) -> PassResult:
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if self.options.from_ is not None:
            perms, sorted_scores, stats = load_ranking(self.options.from_, len(graph.groups), ctx.logger)
        else:
            scores, stats = self.compute_scores(graph, ctx)
            perms, sorted_scores = sort_channels(scores)
        for i, p in enumerate(perms):
            graph.permute_channels(i, p)  # recorded: a resumed compile re-derives these weights
        record_ranking(ctx, workdir, self.options, perms, sorted_scores, stats)
        return PassResult(graph=graph, modified=True, changed_nodes={g.node for g in graph.groups})


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
