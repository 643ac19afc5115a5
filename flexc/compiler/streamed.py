"""The streamed compile (``execution: {stream: layers}``): one decoder layer in memory at a time.

The model is built on the ``meta`` device (:class:`flexc.ir.streaming.LayerModel`); its weights
stay in their safetensors shards. Stages, in the same output directory layout as the in-memory
compile (``manifest.json``, ``stages/NN-<pass>/``, ``state/``, one folder per export):

- ``load``: config, tokenizer, expert groups (no weights);
- ``NN-rank_channels``: the calibration batches are embedded once (layer-0 inputs kept in host
  memory), then for each decoder layer: load it, run every batch through it with the expert
  op's observers (:func:`flexc.passes.calibrate.calibrate`, unchanged: routing statistics and
  the pass's activation score), keep its outputs as the next layer's inputs, sort the
  channels by score, free the layer. The pass's files and hand-off state are those of
  :class:`~flexc.passes.rank_channels.RankChannels`, plus ``channel_perms`` (the permutation
  the exports apply: the ranked weights are never written to a stage folder);
- ``NN-uniform`` / ``NN-coverage``: the passes themselves (they read the hand-off state only);
- ``NN-fold_masks``: checks the width tables (no gates to fold: streamed pipelines have none);
- ``export:nested`` / ``export:sliced``: each decoder layer loaded, permuted, (sliced,) written
  as a shard of its own and freed (:mod:`flexc.export.streamed`).

After every pass the hand-off state (scores, statistics, tables, permutations: no weights) is
saved to ``state/``, and a re-run resumes after the last completed pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from flexc.compiler import artifacts
from flexc.compiler.artifacts import STATE_DIR, RunDir
from flexc.utils import distributed

log = logging.getLogger("flexc")

#: Passes a streamed compile runs, and why the others cannot run there (yet).
STREAMABLE_PASSES = ("rank_channels", "uniform", "coverage", "fold_masks")
STREAMABLE_EXPORTS = ("nested", "sliced")
_WHY = {
    "anneal": "it trains action logits through the model's loss, whose gradient needs a backward pass through "
              "every layer (layer-recomputing backward is not implemented yet)",
    "recover": "it fine-tunes LoRA adapters through the model's loss (needs a backward pass through every layer)",
    "insert_action_gates": "the action gates exist for anneal, which streamed execution cannot run yet",
    "expert_prune": "it rewrites the in-memory graph's routers",
    "insert_router_masks": "it rewrites the in-memory graph's routers",
    "lower_kernels": "it rewrites the in-memory graph",
}


def streaming_problems(spec) -> list[tuple[tuple, str]]:
    """Why ``spec`` cannot compile with ``execution.stream: layers``: ``(spec location, message)`` pairs."""
    from flexc.passes.scores import resolve_score

    problems: list[tuple[tuple, str]] = []
    runs = ", ".join(STREAMABLE_PASSES)
    if not spec.pipeline:
        problems.append((("execution", "stream"), "execution.stream: layers needs a pipeline (rank_channels with an "
                         "activation score, a width pass, fold_masks); an empty pipeline just copies the model"))
    for i, entry in enumerate(spec.pipeline):
        if entry.name not in STREAMABLE_PASSES:
            why = _WHY.get(entry.name, "streamed execution runs only the passes it knows to be layer-local")
            problems.append((("pipeline", i), f"pass {entry.name!r} cannot run with execution.stream: layers: {why}; "
                             f"a streamed compile runs {runs} (see docs/scale.md), or set execution.stream: off"))
        elif entry.name == "rank_channels":
            score = entry.options.get("score", "taylor")
            try:
                needs_backward = resolve_score(score).needs_backward
            except Exception:  # noqa: BLE001 -- the pass's own options check reports a bad score
                continue
            if needs_backward:
                problems.append((("pipeline", i), f"pass 'rank_channels' with score {score!r} cannot run with "
                                 "execution.stream: layers: the score needs the model's loss gradient (a backward "
                                 "pass through every layer); use score: activation or weight_activation, or set "
                                 "execution.stream: off"))
    for j, fmt in enumerate(spec.export.formats):
        if fmt not in STREAMABLE_EXPORTS:
            problems.append((("export", "formats", j), f"export {fmt!r} cannot be written with execution.stream: "
                             f"layers; a streamed compile writes {' and '.join(STREAMABLE_EXPORTS)}"))
    return problems


# --------------------------------------------------------------------------- passes, streamed


def rank_channels_streamed(p, lm, ctx) -> None:
    """``rank_channels`` one decoder layer at a time: the same files and hand-off state as
    :meth:`RankChannels.run`, plus ``channel_perms [L, E, I]``; no weight is changed or written."""
    from flexc.ir.streaming import LayerGraph
    from flexc.passes.calibrate import RoutingStats, calibrate
    from flexc.passes.rank_channels import load_ranking, record_ranking, sort_channels
    from flexc.passes.scores import resolve_score

    workdir = Path(ctx.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    num = len(lm.groups)
    if p.options.from_ is not None:
        perms, sorted_scores, stats = load_ranking(p.options.from_, num, ctx.logger)
    else:
        score_cls = resolve_score(p.options.score)
        hidden, kwargs = lm.layer_inputs(distributed.shard(ctx.calibration_batches()))  # each rank carries its own batches
        max_experts = max(g.num_experts for g in lm.groups)
        scores, counts, sums = [], [], []
        for i in range(lm.num_layers):
            module = lm.materialise(i)
            group = lm.group_at(i)
            graph = LayerGraph(module, lm, group, kwargs, index=i)
            if group is None:  # a dense layer: only its outputs are needed
                with torch.no_grad():
                    for h in hidden:
                        graph.logits(h.to(lm.device))
            else:
                score = score_cls({0: (group.num_experts, group.hidden_size, group.intermediate_size)},
                                  {0: group.interleaved})
                stats = calibrate(graph, hidden, on_forward=score.on_forward, on_backward=score.on_backward,
                                  end_batch=score.end_batch, backward=False, quiet=ctx.quiet,
                                  description=f"rank_channels ({score_cls.name}) layer {i + 1}/{lm.num_layers}"
                                  ).all_reduce()
                score.all_reduce()
                scores.append(score.result({0: graph.expert_weights(group)})[0])
                counts.append(torch.nn.functional.pad(stats.counts[0], (0, max_experts - group.num_experts)))
                sums.append(torch.nn.functional.pad(stats.weight_sums[0], (0, max_experts - group.num_experts)))
            hidden = graph.outputs
            lm.free(i)
        del hidden
        perms, sorted_scores = sort_channels(scores)
        stats = RoutingStats(counts=torch.stack(counts), weight_sums=torch.stack(sums))
    record_ranking(ctx, workdir, p.options, perms, sorted_scores, stats)
    ctx.state.channel_perms = torch.stack(perms)


def fold_masks_streamed(lm, ctx) -> None:
    """``fold_masks`` without a graph: check the tables (shape, nesting); there are no gates to remove."""
    tables = ctx.state.checked_width_tables()  # shape and nesting were checked when they were built
    ctx.logger.info("fold_masks (streamed): %d budgets over %d MoE layers (%s)", len(tables.budgets), len(lm.groups),
                    ", ".join(f"keep {b:g}" for b in tables.budgets))


def permuter(lm, perms: torch.Tensor):
    """The exports' per-layer transform: apply ``rank_channels``' permutation to a loaded layer."""
    from flexc.passes.rank_channels import permute_expert_channels

    index = {g.layer: i for i, g in enumerate(lm.groups)}

    def transform(layer: int, graph) -> None:
        if graph.groups:
            permute_expert_channels(graph, 0, perms[index[layer]])

    return transform


def _disk_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


# --------------------------------------------------------------------------- the compile


def compile_streamed(spec, source: Path | None, run: RunDir, *, quiet: bool = False):
    """The streamed counterpart of the driver's ``_compile`` (same stages, manifest and resume rules)."""
    from flexc import models
    from flexc.compiler import driver
    from flexc.compiler.data_parallel import stages_dir
    from flexc.export.streamed import export_sliced_streamed, write_nested_streamed
    from flexc.ir.streaming import LayerModel
    from flexc.ir.state import CompileState
    from flexc.passes.base import PassContext

    out = run.path
    pass_names = [f"{i:02d}-{e.name.replace(':', '.')}" for i, e in enumerate(spec.pipeline, 1)]
    names = ["load", *pass_names, *[f"export:{fmt}" for fmt in spec.export.formats]]
    result = driver.CompileResult(out, spec, run.manifest)
    if run.resumed:
        driver._clean_temporaries(out)
        saved = driver._saved_stage(out)
        if saved is not None and saved in names[1:] and not run.done(saved):
            run.record(saved, status="done")
        if all(run.done(n) for n in names[1:]) and run.manifest.get("status") == "complete":
            log.info("%s is up to date with this spec: nothing to do (use --force to start over)", out)
            result.skipped = names
            return result
    started = time.perf_counter()
    run.manifest.update(
        status="running", runs=run.manifest.get("runs", 0) + 1, versions=artifacts.library_versions(),
        seed=spec.seed, spec_file=str(source) if source else None, execution={"stream": spec.execution.stream},
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

    state = CompileState()
    first = 0
    saved = driver._saved_stage(out)
    if run.resumed and saved in pass_names and run.done(saved):
        first = pass_names.index(saved) + 1
        state = CompileState.load(out / STATE_DIR, lm.groups)
        log.info("resuming after stage %s", saved)
    for name in pass_names[first:]:
        if run.done(name):
            run.record(name, status="pending")

    for i, (name, entry) in enumerate(zip(pass_names, spec.pipeline)):
        if i < first:
            result.skipped.append(name)
            next(step)
            continue
        driver._seed_everything(spec.seed)
        workdir = stages_dir(run) / name
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = PassContext(workdir=workdir, spec=spec, seed=spec.seed, device=str(lm.device), state=state, logger=log,
                          quiet=quiet, tokenizer=tokenizer)
        with stage(name) as st:
            p = entry.build()
            if entry.name == "rank_channels":
                rank_channels_streamed(p, lm, ctx)
            elif entry.name == "fold_masks":
                fold_masks_streamed(lm, ctx)
            else:  # the width passes read the groups and the hand-off state only
                p.run(SimpleNamespace(groups=lm.groups), ctx)
            state = ctx.state
            distributed.barrier(f"the end of stage {name}")  # every rank finished it before it counts as done
            if distributed.is_writer():
                with artifacts.atomic_dir(out / STATE_DIR) as tmp:
                    state.save(tmp)
                    artifacts.write_json(tmp / "stage.json", {"stage": name, "execution": "layers"})
            st.info = {"pass": entry.name, "streamed": True, "disk_bytes": _disk_bytes(workdir, out / STATE_DIR),
                       "peak_live_layers": lm.peak_live}
        result.ran.append(name)
    run.manifest["outputs"]["state"] = STATE_DIR
    if not distributed.is_writer():  # under torchrun, rank 0 alone exports and reports
        return result

    def write(fmt: str, tmp: Path) -> dict:
        tables = state.checked_width_tables()
        transform = permuter(lm, state.channel_perms)
        provenance = {"spec": spec.to_yaml(), "seed": spec.seed, "versions": artifacts.library_versions()}
        if fmt == "nested":
            m = write_nested_streamed(tmp, lm, tables, transform=transform, tokenizer=tokenizer,
                                      provenance=provenance)
            written = m.pop("_bytes_written")
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
