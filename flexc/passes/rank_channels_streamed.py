"""``rank_channels`` in a layer-streamed compile (``execution.stream: layers``, docs/scale.md).

The calibration batches are embedded once (layer-0 inputs kept in host memory) and pushed through
the decoder layers one materialised layer at a time, each MoE layer's channels scored by the
expert op's observers as it passes; a score that needs the loss gradient (``taylor``) walks back
from the last layer, reloading each one. The same files and hand-off state as
:meth:`~flexc.passes.rank_channels.RankChannels.run`, plus ``channel_perms [L, E, I]`` (the weights
are not permuted here: the exports permute each layer as they load it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexc.utils import distributed
from flexc.utils.progress import progress_bar


def rank_channels_streamed(p, lm, ctx) -> None:
    """``rank_channels`` one decoder layer at a time: the same files and hand-off state as
    :meth:`RankChannels.run`, plus ``channel_perms [L, E, I]``; no weight is changed or written."""
    from flexc.passes.calibrate import RoutingStats
    from flexc.passes.ranking import load_ranking, record_ranking, sort_channels
    from flexc.passes.scores import resolve_score

    workdir = Path(ctx.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    num = len(lm.groups)
    if p.options.from_ is not None:
        perms, sorted_scores, stats = load_ranking(p.options.from_, num, ctx.logger)
    else:
        score_cls = resolve_score(p.options.score)
        batches = list(distributed.shard(ctx.calibration_batches()))  # each rank carries its own batches
        if score_cls.needs_backward:
            scores, counts, sums = _scores_with_backward(lm, batches, score_cls, ctx)
        else:
            scores, counts, sums = _forward_sweep(lm, batches, score_cls, ctx)[:3]
        perms, sorted_scores = sort_channels(scores)
        stats = RoutingStats(counts=_padded(counts, lm.groups), weight_sums=_padded(sums, lm.groups))
    record_ranking(ctx, workdir, p.options, perms, sorted_scores, stats)
    ctx.state.channel_perms = torch.stack(perms)


def _layer_score(score_cls, group):
    """A channel score for one MoE layer (key 0: the streamed compile scores a layer at a time)."""
    return score_cls({0: (group.num_experts, group.hidden_size, group.intermediate_size)}, {0: group.interleaved})


def _padded(rows: list[torch.Tensor], groups) -> torch.Tensor:
    """Per-layer ``[E]`` statistics stacked to ``[layers, max E]`` (zeros past a layer's experts)."""
    width = max(g.num_experts for g in groups)
    return torch.stack([torch.nn.functional.pad(r, (0, width - g.num_experts)) for r, g in zip(rows, groups)])


def _forward_sweep(lm, batches, score_cls, ctx, *, keep_inputs: bool = False):
    """The calibration batches through the decoder layers, one materialised at a time, with the
    expert op's forward observers: per MoE layer the score's result (None when the score needs
    the backward), routing counts and router-weight sums; the last layer's outputs; and, with
    ``keep_inputs``, every layer's inputs (host memory: the boundary states a backward recomputes from)."""
    from flexc.ir.streaming import LayerGraph
    from flexc.passes.calibrate import calibrate

    hidden, kwargs = lm.layer_inputs(batches)
    scores, counts, sums, inputs = [], [], [], []
    for i in range(lm.num_layers):
        inputs.append(hidden if keep_inputs else None)
        module = lm.materialise(i)
        group = lm.group_at(i)
        graph = LayerGraph(module, lm, group, kwargs, index=i)
        if group is None:  # a dense layer: only its outputs are needed
            with torch.no_grad():
                for h in hidden:
                    graph.logits(h.to(lm.device))
        else:
            score = None if score_cls.needs_backward else _layer_score(score_cls, group)
            stats = calibrate(graph, hidden, on_forward=score and score.on_forward, end_batch=score and score.end_batch,
                              backward=False, quiet=ctx.quiet,
                              description=f"rank_channels ({score_cls.name}) layer {i + 1}/{lm.num_layers}"
                              ).all_reduce()
            if score is not None:
                score.all_reduce()
            scores.append(None if score is None else score.result({0: graph.expert_weights(group)})[0])
            counts.append(stats.counts[0])
            sums.append(stats.weight_sums[0])
        hidden = graph.outputs
        lm.free(i)
    return scores, counts, sums, hidden, inputs, kwargs


def _scores_with_backward(lm, batches, score_cls, ctx):
    """A score that needs the loss gradient (``taylor``), streamed: a forward sweep keeps each
    layer's input (the boundary states, in host memory); the final norm and LM head give each
    batch's gradient at the last layer's output; then, from the last layer to the first, each
    layer is loaded again, recomputed from its inputs and back-propagated, batch by batch, its
    expert weight gradients going to the score's observers, the gradient at its input going on
    to the layer below. The same per-batch gradients as one backward through the whole model."""
    from flexc.ir.op import observe_expert_grads
    from flexc.passes.calibrate import next_token_loss

    _, counts, sums, last, inputs, kwargs = _forward_sweep(lm, batches, score_cls, ctx, keep_inputs=True)
    grads = lm.head_gradients(last, batches, next_token_loss)
    del last
    scores = [None] * len(lm.groups)
    for i in reversed(range(lm.num_layers)):
        graph = lm.frozen_layer(i, kwargs)
        group = lm.group_at(i)
        score = None if group is None else _layer_score(score_cls, group)
        observer = (lambda info: score.on_backward(0, info)) if score is not None else (lambda info: None)
        with observe_expert_grads(observer):
            for b in progress_bar(range(len(batches)), total=len(batches), disable=ctx.quiet,
                                  description=f"rank_channels ({score_cls.name}) backward, layer {i + 1}"):
                grads[b] = graph.backward(inputs[i][b], grads[b])
                if score is not None:
                    score.end_batch()
        if score is not None:
            score.all_reduce()
            scores[lm.groups.index(group)] = score.result({0: graph.expert_weights(group)})[0]
        inputs[i] = None  # this layer's boundary states are no longer needed
        lm.free(i)
    return scores, counts, sums
