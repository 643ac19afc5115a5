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
  weight changes a pass left to the exports merged (:func:`flexc.passes.streamed.export_transform`), (sliced,) written
  as a shard of its own and freed (:mod:`flexc.export.streamed`).

The passes run through the same :class:`~flexc.passes.manager.PassRunner` and stage loop
(:mod:`flexc.compiler.stages`) as the in-memory compile. After every pass the
hand-off state (scores, statistics, tables, permutations, LoRA factors: no weights) is saved to
``state/``, and a re-run resumes after the last completed pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from flexc.compiler.artifacts import STATE_DIR, RunDir
from flexc.compiler.execution import Execution

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


# --------------------------------------------------------------------------- the execution


class LayerStreamed(Execution):
    """The model on the ``meta`` device, one decoder layer loaded at a time (see the module docstring)."""

    title = " (streamed, one decoder layer at a time)"
    state_meta = {"execution": "layers"}

    def manifest_entries(self, manifest: dict) -> dict:
        return {"execution": manifest.get("execution") or {"stream": "layers"}}

    def load(self):
        from flexc import models
        from flexc.ir.streaming import LayerModel

        spec = self.spec
        directory = models.resolve_directory(spec.model, progress=not self.quiet)
        family = models.check_moe_config(directory)
        device = models.spec_device(spec.model)
        dtype = None if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype)
        self.lm = LayerModel(directory, dtype, device)
        self.tokenizer = models.load_tokenizer(directory)
        n_params = self.lm.parameter_count()
        info = {"directory": str(directory), "family": family, "parameters": n_params,
                "decoder_layers": self.lm.num_layers, "moe_layers": len(self.lm.groups)}
        return info, {"directory": str(directory), "family": family,
                      "dtype": str(self.lm.dtype).removeprefix("torch."), "parameters": n_params}

    def build_passes(self, spec) -> list:
        from flexc.passes.streamed import streamed_form

        return [streamed_form(entry.build()) for entry in spec.pipeline]

    def pass_runner(self, run: RunDir, done: dict):
        from flexc.compiler.data_parallel import stages_dir
        from flexc.compiler.stages import load_saved_state
        from flexc.ir.state import CompileState
        from flexc.passes.manager import PassRunner, check_pipeline
        from flexc.passes.streamed import StreamedGraph

        passes = list(done.values())
        state = load_saved_state(run, self.lm.groups) if done else CompileState()
        graph = StreamedGraph(self.lm, check_pipeline(passes))  # what the passes that ran guarantee
        self.runner = PassRunner(graph, self.context(stages_dir(run), str(self.lm.device)), stages_dir(run), state=state,
                                 done=[p.name for p in passes])
        return self.runner

    def stage_info(self, runner, result) -> dict:
        return {"streamed": True, "peak_live_layers": self.lm.peak_live}

    def after_stage(self, run: RunDir, name: str, runner, result) -> dict:
        from flexc.compiler.data_parallel import stages_dir

        return {"disk_bytes": _disk_bytes(stages_dir(run) / name, run.path / STATE_DIR)}

    def export(self, fmt: str, folder: Path, state) -> dict:
        from flexc.export.context import provenance as export_provenance
        from flexc.export.streamed import export_sliced_streamed, write_checkpoint_streamed, write_nested_streamed
        from flexc.passes.streamed import export_transform

        lm, spec = self.lm, self.spec
        tables = state.checked_width_tables()
        transform = export_transform(lm, state, [e.pass_class for e in spec.pipeline])
        provenance = export_provenance(spec)
        if fmt == "nested":
            m = write_nested_streamed(folder, lm, tables, transform=transform, tokenizer=self.tokenizer,
                                      provenance=provenance, quantization=state.quantization)
            written = m.pop("_bytes_written")
        elif fmt == "hf":  # the ranked full-width checkpoint: budgets are in nested and sliced
            written = write_checkpoint_streamed(folder, lm, transform=transform, tokenizer=self.tokenizer)
        else:
            written = export_sliced_streamed(folder, lm, tables, transform=transform, tokenizer=self.tokenizer,
                                             provenance=provenance, logger=log, quantization=state.quantization)
        return {"disk_bytes": _disk_bytes(folder), "weights_bytes": written, "peak_live_layers": lm.peak_live}
