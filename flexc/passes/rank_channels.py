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

from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.passes.calibrate import RoutingStats, calibrate
from flexc.passes.ranking import SCORES_FILE, load_ranking, record_ranking, sort_channels
from flexc.passes.scores import ChannelScore, available_scores, resolve_score
from flexc.utils.distributed import shard



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


class RankChannels(Pass):
    """Score and sort every routed expert's intermediate channels (function-preserving)."""

    name = "rank_channels"
    streams = True  # run_streamed: one decoder layer at a time (rank_channels_streamed.py)
    reads_source_weights = True
    Options = RankChannelsOptions
    requires = frozenset({"lowered"})
    guarantees = frozenset({"channels_ranked", "routing_stats"})
    preserves_computation = True

    @classmethod
    def check_spec(cls, options, site) -> list:
        """``from:`` names a whole ranking of experts of this model's shape (its header only)."""
        from flexc.utils.weights import check_safetensors, read_safetensors_header

        if options.from_ is None:
            return []
        path = options.from_ / SCORES_FILE if options.from_.is_dir() else options.from_
        msg = check_safetensors(path)
        if msg is not None:
            return [(site.loc, f"rank_channels from: {msg}")]
        header = read_safetensors_header(path)
        perms = {k: v.get("shape") for k, v in header.items() if k.startswith("layer") and k.endswith(".perm")}
        if "layer0.perm" not in perms:
            return [(site.loc, f"rank_channels from: {path} holds no channel ranking (no layer0.perm); expected the "
                     f"{SCORES_FILE} of an earlier rank_channels stage")]
        shape = site.shape
        expected = [shape.num_experts, shape.intermediate_size] if shape is not None else None
        wrong = sorted(k for k, s in perms.items() if expected is not None and s != expected)
        if wrong:
            return [(site.loc, f"rank_channels from: {path} ranks experts of shape {perms[wrong[0]]} ({wrong[0]}), but "
                     f"this model's are {expected} (experts x channels, {shape.config_file}): scores of another "
                     f"model? Expected the {SCORES_FILE} of a rank_channels stage on this model")]
        return []

    @classmethod
    def data_parallel_problem(cls, options) -> str | None:
        if options.from_ is None and resolve_score(options.score).summed is None:
            return (f"rank_channels' score {options.score!r} does not declare which of its accumulators are sums "
                    "over batches (ChannelScore.summed), so its ranks' scores cannot be added up")
        return None

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
