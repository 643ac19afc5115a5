"""The streamed compile (``execution: {stream: layers}``): one decoder layer in memory at a time.

The model is built on the ``meta`` device (:class:`flexc.ir.streaming.LayerModel`); its weights
stay in their safetensors shards. Stages, in the same output directory layout as the in-memory
compile (``manifest.json``, ``stages/NN-<pass>/``, ``state/``, one folder per export):

- ``load``: config, tokenizer, expert groups (no weights);
- ``NN-<pass>``: each pass in the form it declares (:attr:`flexc.passes.base.Pass.streams`): its
  :meth:`~flexc.passes.base.Pass.run_streamed` where it has one (``rank_channels`` scores one
  decoder layer at a time), else its ``run`` on a :class:`~flexc.passes.streamed.StreamedGraph`
  (the layer model's groups; no graph); what each built-in pass does there is in docs/scale.md;
- ``export:nested`` / ``export:sliced`` / ``export:hf``: each decoder layer loaded, permuted,
  weight changes a pass left to the exports merged (:func:`export_transform`), (sliced,) written
  as a shard of its own and freed (:mod:`flexc.export.streamed`).

The passes run through the same :class:`~flexc.passes.manager.PassRunner` and stage loop
(:func:`flexc.compiler.driver.run_pass_stages`) as the in-memory compile. After every pass the
hand-off state (scores, statistics, tables, permutations, LoRA factors: no weights) is saved to
``state/``, and a re-run resumes after the last completed pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from flexc.compiler import artifacts
from flexc.compiler.artifacts import STATE_DIR, RunDir
from flexc.utils import distributed

log = logging.getLogger("flexc")

STREAMABLE_EXPORTS = ("nested", "sliced", "hf")


def streaming_problems(spec) -> list[tuple[tuple, str]]:
    """Why ``spec`` cannot compile with ``execution.stream: layers``: ``(spec location, message)`` pairs.
    Each pass says whether and how it streams (:attr:`flexc.passes.base.Pass.streams`)."""
    from flexc.passes.registry import available_passes, resolve_pass

    problems: list[tuple[tuple, str]] = []
    if not spec.pipeline:
        problems.append((("execution", "stream"), "execution.stream: layers needs a pipeline (rank_channels, a width "
                         "pass, fold_masks); an empty pipeline just copies the model"))
    merged_at_export = None  # the earlier pass whose weight changes only the exports apply
    for i, entry in enumerate(spec.pipeline):
        cls = resolve_pass(entry.name)
        if not cls.streams:
            runs = ", ".join(n for n in available_passes() if getattr(resolve_pass(n), "streams", False))
            problems.append((("pipeline", i), f"pass {entry.name!r} cannot run with execution.stream: layers: "
                             f"{cls.not_streamed_because}; a streamed compile runs {runs} (see docs/scale.md), or "
                             "set execution.stream: off"))
        elif merged_at_export is not None and cls.reads_source_weights:
            problems.append((("pipeline", i), f"pass {entry.name!r} cannot run after {merged_at_export} with "
                             f"execution.stream: layers: a streamed {merged_at_export}'s weight changes are merged by "
                             f"the exports, so {entry.name} would not see them; run it before {merged_at_export}, or "
                             "set execution.stream: off"))
        if cls.merges_at_export:
            merged_at_export = entry.name
    for j, fmt in enumerate(spec.export.formats):
        if fmt not in STREAMABLE_EXPORTS:
            problems.append((("export", "formats", j), f"export {fmt!r} cannot be written with execution.stream: "
                             f"layers (it traces the whole model); a streamed compile writes "
                             f"{', '.join(STREAMABLE_EXPORTS)}"))
    return problems


# --------------------------------------------------------------------------- passes, streamed


def _disk_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def export_transform(lm, state, pass_classes):
    """What the exports do to each loaded decoder layer: the ranking's permutation, then the weight
    changes of the passes (``pass_classes``) that leave them to the exports (:meth:`flexc.passes.base.Pass.export_merger`,
    e.g. a streamed ``recover``'s adapters), in pipeline order as the in-memory compile applied them."""
    from flexc.ir.permute import layer_permuter

    steps = [layer_permuter(lm.groups, state.channel_perms)]
    steps += [m for cls in pass_classes if cls.merges_at_export and (m := cls.export_merger(lm, state)) is not None]
    if len(steps) == 1:
        return steps[0]

    def transform(layer: int, graph) -> None:
        for step in steps:
            step(layer, graph)

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
    from flexc.passes.streamed import StreamedGraph, streamed_form

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

    passes = [streamed_form(entry.build()) for entry in spec.pipeline]
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
        transform = export_transform(lm, state, [e.pass_class for e in spec.pipeline])
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
