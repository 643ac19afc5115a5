"""The streamed compile (``execution: {stream: layers}``): one decoder layer in memory at a time.

The model is built on the ``meta`` device (:class:`flexc.ir.streaming.LayerModel`); its weights
stay in their safetensors shards. Stages, in the same output directory layout as the in-memory
compile (``manifest.json``, ``stages/NN-<pass>/``, ``state/``, one folder per export):

- ``load``: config, tokenizer, expert groups (no weights);
- ``NN-rank_channels``: the calibration batches are embedded once (layer-0 inputs kept in host
  memory), then for each decoder layer: load it, run every batch through it with the expert
  op's observers (:func:`flexc.passes.calibrate.calibrate`, unchanged: routing statistics and
  an activation score), keep its outputs as the next layer's inputs, free the layer. A score
  that needs the loss gradient (``taylor``, the default) keeps every layer's inputs, takes each
  batch's gradient at the last layer's output from the final norm and LM head, and walks back
  from the last layer to the first, reloading and recomputing each one to back-propagate
  through it (two loads per layer). The channels are then sorted by score. The pass's files
  and hand-off state are those of
  :class:`~flexc.passes.rank_channels.RankChannels`, plus ``channel_perms`` (the permutation
  the exports apply: the ranked weights are never written to a stage folder);
- ``NN-uniform`` / ``NN-coverage``: the passes themselves (they read the hand-off state only);
- ``NN-insert_action_gates``: records its options in the state (the gates are a function of
  the layers and the options; nothing is rewritten);
- ``NN-anneal``: the pass itself, training the gates through the layer-streamed model
  (:class:`flexc.passes.gated_model.StreamedGatedModel`: every step a forward sweep keeping the
  boundary states and a backward sweep reloading and recomputing each layer);
- ``NN-fold_masks``: checks the width tables (no gates to fold: a streamed compile's gates
  never enter the layers' weights);
- ``NN-recover``: the pass itself, training its LoRA adapters through the layer-streamed model
  (:mod:`flexc.passes.recover_streamed`); the adapters go into the state, not the weights;
- ``export:nested`` / ``export:sliced`` / ``export:hf``: each decoder layer loaded, permuted,
  a streamed ``recover``'s adapters merged (:func:`export_transform`), (sliced,) written as a
  shard of its own and freed (:mod:`flexc.export.streamed`).

The passes run through the same :class:`~flexc.passes.manager.PassRunner` and stage loop
(:func:`flexc.compiler.driver.run_pass_stages`) as the in-memory compile, on a
:class:`StreamedGraph` (the layer model's groups; no graph); ``rank_channels`` and ``fold_masks``
run in their layer-by-layer form (:func:`streamed_pass`). After every pass the hand-off state
(scores, statistics, tables, permutations, LoRA factors: no weights) is saved to ``state/``, and a re-run
resumes after the last completed pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flexc.compiler import artifacts
from flexc.compiler.artifacts import STATE_DIR, RunDir
from flexc.utils import distributed
from flexc.utils.progress import progress_bar

if TYPE_CHECKING:
    from flexc.ir.streaming import LayerModel

log = logging.getLogger("flexc")

#: Passes a streamed compile runs, and why the others cannot run there (yet).
STREAMABLE_PASSES = ("rank_channels", "uniform", "coverage", "insert_action_gates", "anneal", "fold_masks", "recover")
# Passes that read the layers' weights as the source has them (permuted on load, nothing else): after a
# streamed recover, whose adapters are merged by the exports alone, they would miss the fine-tune.
_READ_SOURCE_WEIGHTS = ("rank_channels", "anneal", "recover")
STREAMABLE_EXPORTS = ("nested", "sliced", "hf")
_WHY = {
    "expert_prune": "it rewrites the in-memory graph's routers",
    "insert_router_masks": "it rewrites the in-memory graph's routers",
    "lower_kernels": "it rewrites the in-memory graph",
}


def streaming_problems(spec) -> list[tuple[tuple, str]]:
    """Why ``spec`` cannot compile with ``execution.stream: layers``: ``(spec location, message)`` pairs."""
    problems: list[tuple[tuple, str]] = []
    runs = ", ".join(STREAMABLE_PASSES)
    if not spec.pipeline:
        problems.append((("execution", "stream"), "execution.stream: layers needs a pipeline (rank_channels, a width "
                         "pass, fold_masks); an empty pipeline just copies the model"))
    recovered = False
    for i, entry in enumerate(spec.pipeline):
        if entry.name not in STREAMABLE_PASSES:
            why = _WHY.get(entry.name, "streamed execution runs only the passes it knows to be layer-local")
            problems.append((("pipeline", i), f"pass {entry.name!r} cannot run with execution.stream: layers: {why}; "
                             f"a streamed compile runs {runs} (see docs/scale.md), or set execution.stream: off"))
        elif recovered and entry.name in _READ_SOURCE_WEIGHTS:
            problems.append((("pipeline", i), f"pass {entry.name!r} cannot run after recover with execution.stream: "
                             "layers: a streamed recover's adapters are merged into the weights by the exports, so "
                             f"{entry.name} would not see them; run it before recover, or set execution.stream: off"))
        recovered = recovered or entry.name == "recover"
    for j, fmt in enumerate(spec.export.formats):
        if fmt not in STREAMABLE_EXPORTS:
            problems.append((("export", "formats", j), f"export {fmt!r} cannot be written with execution.stream: "
                             f"layers (it traces the whole model); a streamed compile writes "
                             f"{', '.join(STREAMABLE_EXPORTS)}"))
    return problems


# --------------------------------------------------------------------------- passes, streamed


def rank_channels_streamed(p, lm, ctx) -> None:
    """``rank_channels`` one decoder layer at a time: the same files and hand-off state as
    :meth:`RankChannels.run`, plus ``channel_perms [L, E, I]``; no weight is changed or written."""
    from flexc.passes.calibrate import RoutingStats
    from flexc.passes.rank_channels import load_ranking, record_ranking, sort_channels
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


def fold_masks_streamed(p, lm, ctx) -> None:
    """``fold_masks`` without a graph: check the tables (shape, nesting); there are no gates to remove."""
    tables = ctx.state.checked_width_tables()  # shape and nesting were checked when they were built
    ctx.logger.info("fold_masks (streamed): %d budgets over %d MoE layers (%s)", len(tables.budgets), len(lm.groups),
                    ", ".join(f"keep {b:g}" for b in tables.budgets))


def _disk_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


@dataclass
class StreamedGraph:
    """What a streamed compile's passes run on, in place of a FlexGraph: the layer model, its expert
    groups (all the width passes read) and the properties that hold. Nothing is rewritten."""

    model: LayerModel
    properties: set[str]
    rewrites: list = field(default_factory=list)  # PassRunner reads it; streamed passes rewrite nothing

    @property
    def groups(self):
        return self.model.groups


class StreamedPass:
    """A pass whose streamed form is a function of (pass, layer model, context), run by PassRunner as
    the pass itself: same name, options and properties, so order checks and failure notes read alike."""

    def __init__(self, inner, run_streamed):
        self.inner, self.run_streamed = inner, run_streamed
        self.name, self.options = inner.name, inner.options
        self.requires, self.guarantees, self.invalidates = inner.requires, inner.guarantees, inner.invalidates

    def __call__(self, graph: StreamedGraph, ctx):
        from flexc.passes.base import PassResult

        self.run_streamed(self.inner, graph.model, ctx)
        return PassResult(graph=graph, modified=False)


def streamed_pass(p):
    """``p`` as a streamed compile runs it: the layer-by-layer form of ``rank_channels``,
    ``insert_action_gates`` and ``fold_masks``; the width passes, ``anneal`` and ``recover`` as they are
    (they read the groups and the hand-off state; the training passes train through the layer model,
    see gated_model and recover_streamed)."""
    from flexc.passes.action_gates import insert_action_gates_streamed

    streamed = {"rank_channels": rank_channels_streamed, "insert_action_gates": insert_action_gates_streamed,
                "fold_masks": fold_masks_streamed}.get(p.name)
    return p if streamed is None else StreamedPass(p, streamed)


def export_transform(lm, state):
    """What the exports do to each loaded decoder layer: the ranking's permutation, then a streamed
    ``recover``'s adapters merged (the order the in-memory compile applied them in)."""
    from flexc.ir.permute import layer_permuter
    from flexc.passes.recover_streamed import layer_merger

    permute = layer_permuter(lm.groups, state.channel_perms)
    merge = layer_merger(lm, state)
    if merge is None:
        return permute

    def transform(layer: int, graph) -> None:
        permute(layer, graph)
        merge(layer, graph)

    return transform


# --------------------------------------------------------------------------- the compile


def compile_streamed(spec, source: Path | None, run: RunDir, *, quiet: bool = False):
    """The streamed counterpart of the driver's ``_compile`` (same stages, manifest and resume rules)."""
    from flexc import models
    from flexc.compiler import driver
    from flexc.compiler.data_parallel import stages_dir
    from flexc.export.streamed import export_sliced_streamed, write_checkpoint_streamed, write_nested_streamed
    from flexc.ir.streaming import LayerModel
    from flexc.ir.state import CompileState
    from flexc.passes.base import PassContext
    from flexc.passes.manager import PassRunner, check_pipeline

    out = run.path
    pass_names = [f"{i:02d}-{e.name.replace(':', '.')}" for i, e in enumerate(spec.pipeline, 1)]
    names = ["load", *pass_names, *[f"export:{fmt}" for fmt in spec.export.formats]]
    result = driver.CompileResult(out, spec, run.manifest)
    if run.resumed and driver.resumed_up_to_date(run, names[1:]):
        result.skipped = names
        return result
    started = time.perf_counter()
    run.manifest.update(
        status="running", runs=run.manifest.get("runs", 0) + 1, versions=artifacts.library_versions(),
        seed=spec.seed, spec_file=str(source) if source else None, execution=run.manifest.get("execution") or {"stream": "layers"},
        budgets=({"keep": list(spec.budgets.keep_ratios), "metric": spec.budgets.metric} if spec.budgets else None),
    )
    run.set_plan(names)
    if distributed.is_writer():
        artifacts.write_text(out / artifacts.SPEC_FILE, spec.to_yaml())
    log.info("flexc compile (streamed, one decoder layer at a time) → %s%s", out, " (resuming)" if run.resumed else "")
    step = iter(range(1, len(names) + 1))

    def stage(name: str):
        return driver._Stage(run, name, next(step), len(names))

    driver._seed_everything(spec.seed)
    with stage("load") as st:
        directory = models.resolve_directory(spec.model, progress=not quiet)
        family = models.check_moe_config(directory)
        device = models.resolve_device(spec.model.device)
        dtype = None if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype)
        lm = LayerModel(directory, dtype, device)
        tokenizer = models.load_tokenizer(directory)
        n_params = lm.parameter_count()
        st.info = {"directory": str(directory), "family": family, "parameters": n_params,
                   "decoder_layers": lm.num_layers, "moe_layers": len(lm.groups)}
        run.manifest["model"] = {"source": dict([spec.model.source]), "directory": str(directory), "family": family,
                                 "dtype": str(lm.dtype).removeprefix("torch."), "parameters": n_params}
    result.ran.append("load")

    passes = [streamed_pass(entry.build()) for entry in spec.pipeline]
    state = CompileState()
    first = driver.resume_point(run, pass_names)
    if first:
        state = driver.load_saved_state(run, lm.groups)
    context = PassContext(workdir=stages_dir(run), spec=spec, seed=spec.seed, device=str(lm.device), logger=log,
                          quiet=quiet, tokenizer=tokenizer)
    graph = StreamedGraph(lm, check_pipeline(passes[:first]))  # what the passes that ran guarantee
    runner = PassRunner(graph, context, stages_dir(run), state=state, done=[p.name for p in passes[:first]])

    def saved(name: str, entry, res) -> dict:
        info = {"pass": entry.name, "streamed": True, "peak_live_layers": lm.peak_live}
        if distributed.is_writer():  # under torchrun, rank 0 alone writes the run's files
            driver.save_state(run, name, runner.state.save, execution="layers")
            info["files"] = driver.stage_files(run, name)
        info["disk_bytes"] = _disk_bytes(stages_dir(run) / name, out / STATE_DIR)
        return info

    driver.run_pass_stages(spec, run, stage, step, result, runner, list(zip(pass_names, spec.pipeline, passes)), first,
                           saved)
    state = runner.state
    if not distributed.is_writer():  # under torchrun, rank 0 alone exports and reports
        return result

    def write(fmt: str, tmp: Path) -> dict:
        tables = state.checked_width_tables()
        transform = export_transform(lm, state)
        provenance = {"spec": spec.to_yaml(), "seed": spec.seed, "versions": artifacts.library_versions()}
        if fmt == "nested":
            m = write_nested_streamed(tmp, lm, tables, transform=transform, tokenizer=tokenizer,
                                      provenance=provenance)
            written = m.pop("_bytes_written")
        elif fmt == "hf":  # the ranked full-width checkpoint: budgets are in nested and sliced
            written = write_checkpoint_streamed(tmp, lm, transform=transform, tokenizer=tokenizer)
        else:
            written = export_sliced_streamed(tmp, lm, tables, transform=transform, tokenizer=tokenizer,
                                             provenance=provenance, logger=log)
        return {"disk_bytes": _disk_bytes(tmp), "weights_bytes": written, "peak_live_layers": lm.peak_live}

    driver.run_export_stages(spec, run, stage, step, result, out, write)

    run.manifest["outputs"].update({"spec": artifacts.SPEC_FILE, "log": artifacts.LOG_FILE,
                                    "report": artifacts.REPORT_FILE})
    driver._write_report(out, run, spec, None, state, tokenizer)
    run.manifest["status"] = "complete"
    run.manifest["seconds_this_run"] = round(time.perf_counter() - started, 3)
    run.save()
    log.info("done: %s (manifest: %s)", out, out / artifacts.MANIFEST)
    return result
