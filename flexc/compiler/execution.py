"""How a compile holds the model: the interface the stage loop (:mod:`flexc.compiler.stages`)
drives, and its in-memory implementation. The layer-streamed one is
:class:`flexc.compiler.streamed.LayerStreamed` (``execution: {stream: layers}``).

An execution loads the model, gives the passes their graph (a lowered
:class:`~flexc.ir.graph.FlexGraph`, or the layer model's groups), saves what a resume needs
and writes the exports; the stage loop decides what runs, records it and resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexc.compiler.artifacts import STATE_DIR, RunDir

if TYPE_CHECKING:
    from flexc.compiler.spec import Spec
    from flexc.ir.state import CompileState
    from flexc.passes.manager import PassRunner

log = logging.getLogger("flexc")


class Execution:
    """One way to hold the model through a compile. Subclasses implement the methods that raise
    ``NotImplementedError`` (``write_checkpoint`` and ``lower`` only where they apply) and override the
    rest where they differ."""

    title = ""  # for the compile's first log line
    lowers = False  # runs a ``lower`` stage (a whole-model graph) before the passes
    state_meta: dict[str, Any] = {}  # recorded in ``state/stage.json``
    tokenizer: Any = None

    def __init__(self, spec: "Spec", out: Path, *, quiet: bool = False, dump_graphs: bool = False):
        self.spec, self.out, self.quiet, self.dump_graphs = spec, out, quiet, dump_graphs
        self.runner: PassRunner | None = None
        if quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    @property
    def report_graph(self) -> Any:
        """The graph the exports and the report read, where there is one (after the passes)."""
        return None

    def manifest_entries(self, manifest: dict) -> dict[str, Any]:
        """What this execution adds to the manifest when a compile starts."""
        return {}

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load the model: ``(the load stage's info, the manifest's model record)``."""
        raise NotImplementedError

    def write_checkpoint(self, folder: Path) -> None:
        """An empty pipeline's output: the model as loaded."""
        raise NotImplementedError

    def lower(self) -> dict[str, Any]:
        """The ``lower`` stage (``lowers`` executions): its info."""
        raise NotImplementedError

    def build_passes(self, spec: "Spec") -> list:
        """The pipeline's passes in the form this execution runs them."""
        return [entry.build() for entry in spec.pipeline]

    def pass_runner(self, run: RunDir, done: dict[str, Any]) -> "PassRunner":
        """The runner of the passes, on this execution's graph, with the state the passes ``done``
        (stage name → pass, already run) left restored from ``state/``."""
        raise NotImplementedError

    def stage_info(self, runner: "PassRunner", result) -> dict[str, Any]:
        """A pass stage's manifest info."""
        return {}

    def save_state(self, runner: "PassRunner", folder: Path) -> None:
        """Write what a resume after this pass needs into ``folder`` (``state/``)."""
        runner.state.save(folder)

    def after_stage(self, run: RunDir, name: str, runner: "PassRunner", result) -> dict[str, Any]:
        """After a pass stage's state is saved (rank 0): more manifest info."""
        return {}

    def export(self, fmt: str, folder: Path, state: "CompileState | None") -> dict[str, Any]:
        """Write the ``fmt`` export into ``folder``; its extra manifest info."""
        raise NotImplementedError

    def context(self, workdir: Path, device: str):
        """The passes' :class:`~flexc.passes.base.PassContext`."""
        from flexc.passes.base import PassContext

        return PassContext(workdir=workdir, spec=self.spec, seed=self.spec.seed, device=device, logger=log,
                           quiet=self.quiet, tokenizer=self.tokenizer)


class InMemory(Execution):
    """The whole model in memory, lowered to a FlexGraph that passes rewrite (the default)."""

    lowers = True

    def load(self):
        from flexc import models

        self.loaded = models.load_model(self.spec.model, progress=not self.quiet)
        self.tokenizer = self.loaded.tokenizer
        model = self.loaded.model
        n_params = sum(p.numel() for p in model.parameters())
        info = {"directory": str(self.loaded.directory), "family": self.loaded.family, "parameters": n_params}
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return info, {"directory": info["directory"], "family": info["family"], "dtype": dtype, "parameters": n_params}

    def write_checkpoint(self, folder: Path) -> None:
        self.loaded.model.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        else:
            log.warning("the model has no tokenizer; %s holds the weights and config only", folder.name)

    def lower(self) -> dict[str, Any]:
        from flexc.ir import lower

        self.graph = lower(self.loaded.model)  # a small random batch: shapes are dynamic, values do not matter
        self._dump("lower", self.graph)
        return {"moe_layers": len(self.graph.groups)}

    def pass_runner(self, run: RunDir, done: dict[str, Any]) -> "PassRunner":
        from flexc.compiler.data_parallel import stages_dir
        from flexc.compiler.stages import load_saved_state
        from flexc.ir.state import CompileState
        from flexc.passes.manager import PassRunner, replayer
        from flexc.utils import distributed

        state = CompileState()
        if done:
            state = load_saved_state(run, self.graph.groups, lambda: self.graph.load_state(
                run.path / STATE_DIR / "graph", replay=replayer(done),
                # the other ranks replay into their scratch folder: rank 0 alone writes the run's
                replay_dir=None if distributed.is_writer() else stages_dir(run) / "replay"))
        device = str(next(self.loaded.model.parameters()).device)
        self.runner = PassRunner(self.graph, self.context(stages_dir(run), device), stages_dir(run), state=state,
                                 done=[p.name for p in done.values()])
        return self.runner

    @property
    def report_graph(self):
        return self.runner.graph if self.runner is not None else None

    def stage_info(self, runner, result) -> dict[str, Any]:
        return {"modified": bool(result.modified), "properties": sorted(runner.graph.properties)}

    def save_state(self, runner, folder: Path) -> None:
        runner.graph.save_state(folder / "graph")
        runner.state.save(folder)

    def after_stage(self, run, name, runner, result) -> dict[str, Any]:
        self._dump(name, runner.graph, result.changed_nodes)
        return {}

    def export(self, fmt: str, folder: Path, state) -> dict[str, Any]:
        from flexc.export.context import ExportContext
        from flexc.export.registry import get_exporter

        get_exporter(fmt)(ExportContext(target=folder, spec=self.spec, graph=self.report_graph, model=self.loaded.model,
                                        tokenizer=self.tokenizer, state=state, run_dir=self.out, logger=log))
        return {}

    def _dump(self, stage: str, graph, changed=()) -> None:
        from flexc.utils import distributed

        if self.dump_graphs and distributed.is_writer():
            from flexc.ir.draw import dump_graph

            dump_graph(graph, self.out / "graphs" / stage, highlight=changed)
