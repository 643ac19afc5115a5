"""The compile as resumable stages: the one stage loop, over either execution.

Stages and what a re-run of the same spec does with them:

- ``load``: resolve and load the model (always runs; nothing to persist).
- ``checkpoint`` (empty pipeline only): ``base/`` = ``save_pretrained`` + tokenizer.
- ``lower`` (in-memory execution): the model to a FlexGraph on a small example batch (always
  runs when there are passes; it is cheap next to the passes and holds no state of its own).
- ``NN-<pass>``: one per pipeline entry, run by :class:`flexc.passes.manager.PassRunner`.
  After each, the compile state (``ctx.state``, a :class:`flexc.ir.state.CompileState`), and
  the graph's where there is one, is saved to ``state/``; a re-run restores them and continues
  after the last completed pass.
- ``export:<format>``: one per export format, each built in a temporary directory.

How the model is held (all of it in memory, or one decoder layer at a time) is the
:class:`~flexc.compiler.execution.Execution`'s business; this module owns the order, the
manifest, resume, seeding and the report. Every random generator is seeded with the spec's
seed before each stage, so a resumed run computes what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexc.compiler import artifacts, integrity
from flexc.compiler.artifacts import BASE_DIR, LOG_FILE, REPORT_FILE, SPEC_FILE, STATE_DIR, RunDir
from flexc.compiler.errors import FlexcError, SpecError
from flexc.utils import distributed

if TYPE_CHECKING:
    from flexc.compiler.execution import Execution
    from flexc.compiler.spec import Spec
    from flexc.ir.state import CompileState

log = logging.getLogger("flexc")


@dataclass
class CompileResult:
    """What :func:`flexc.compile` did."""

    out_dir: Path
    spec: "Spec"
    manifest: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return not self.ran


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def pass_stage_names(spec: "Spec") -> list[str]:
    return [f"{i:02d}-{e.name.replace(':', '.')}" for i, e in enumerate(spec.pipeline, 1)]


def stage_names(spec: "Spec", *, lowers: bool) -> list[str]:
    names = ["load"]
    if not spec.pipeline:
        names.append("checkpoint")
    elif lowers:
        names.append("lower")
    names += pass_stage_names(spec)
    return names + [f"export:{fmt}" for fmt in spec.export.formats]


class Stage:
    """Times a stage and records it in the manifest (done, failed or interrupted); ``info`` set in
    the ``with`` block is recorded with it."""

    def __init__(self, run: RunDir, name: str, index: int, total: int):
        self.run, self.name, self.index, self.total = run, name, index, total
        self.info: dict[str, Any] = {}

    def __enter__(self) -> "Stage":
        log.info("[%d/%d] %s ...", self.index, self.total, self.name)
        self.start = time.perf_counter()
        self.run.record(self.name, status="running", started=artifacts.now())
        return self

    def __exit__(self, etype, exc, tb) -> bool:
        seconds = round(time.perf_counter() - self.start, 3)
        if etype is None:
            self.run.record(self.name, status="done", seconds=seconds, finished=artifacts.now(), **self.info)
            log.info("[%d/%d] %s done in %.1fs", self.index, self.total, self.name, seconds)
        else:
            if isinstance(exc, FlexcError) and not isinstance(exc, SpecError) and not str(exc).startswith("stage "):
                exc.args = (f"stage {self.name}: {exc}",)  # the user learns where it stopped
            status = "interrupted" if issubclass(etype, KeyboardInterrupt) else "failed"
            self.run.record(self.name, status=status, seconds=seconds, error=f"{etype.__name__}: {exc}", **self.info)
            self.run.manifest["status"] = status
            self.run.save()
        return False


class Plan:
    """The stages of one compile, numbered in order: each is run (:meth:`stage`) or skipped."""

    def __init__(self, run: RunDir, names: list[str], result: CompileResult):
        self.run, self.names, self.result = run, names, result
        self._next = 0

    def stage(self, name: str) -> Stage:
        self._next += 1
        self.result.ran.append(name)
        return Stage(self.run, name, self._next, len(self.names))

    def skip(self, name: str) -> None:
        self._next += 1
        self.result.skipped.append(name)


# --------------------------------------------------------------------------- state and resume


def save_state(run: RunDir, stage: str, fill: Callable[[Path], None], **meta: Any) -> None:
    """Replace ``state/`` with what ``fill(folder)`` writes, after recording its digests and those of
    the stage's folder in the manifest (:mod:`flexc.compiler.integrity`)."""
    out = run.path
    with artifacts.atomic_dir(out / STATE_DIR) as tmp:
        fill(tmp)
        artifacts.write_json(tmp / "stage.json", {"stage": stage, **meta})
        files = integrity.digests(tmp, out, prefix=STATE_DIR)
        files.update(integrity.digests(out / "stages" / stage, out))
        integrity.record_state(run.manifest, stage, files)
        run.save()


def stage_files(run: RunDir, stage: str) -> dict[str, str]:
    """The digests of the files ``stage`` wrote in its stage folder, as its state save recorded them."""
    record = run.manifest.get("state") or {}
    prefix = f"stages/{stage}/"
    return {k: v for k, v in (record.get("files") or {}).items() if k.startswith(prefix)}


def saved_stage(out: Path) -> str | None:
    try:
        return json.loads((out / STATE_DIR / "stage.json").read_text())["stage"]
    except (OSError, ValueError, KeyError):
        return None


def resumed_up_to_date(run: RunDir, resumable: list[str]) -> bool:
    """On a resume: tidy what a killed run left, and whether every stage is done (verified: the
    files they wrote are as the manifest recorded them)."""
    out = run.path
    _clean_temporaries(out)
    saved = saved_stage(out)
    if saved is not None and saved in resumable and not run.done(saved):
        integrity.verify_state(out, run.manifest, saved)
        run.record(saved, status="done", files=stage_files(run, saved))  # the manifest update was cut short
    if all(run.done(n) for n in resumable) and run.manifest.get("status") == "complete":
        integrity.verify_stages(out, run.manifest, resumable)
        log.info("%s is up to date with this spec: nothing to do (use --force to start over)", out)
        return True
    return False


def _clean_temporaries(out: Path) -> None:
    if not distributed.is_writer():  # another rank's temporaries are rank 0's, maybe being written
        return
    for child in out.iterdir():
        if child.name.startswith(".") and (child.name.endswith(".tmp") or ".old-" in child.name):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def load_saved_state(run: RunDir, groups, restore_graph: Callable[[], None] | None = None) -> "CompileState":
    """The compile state in ``state/`` (after ``restore_graph()`` restores the graph's), checked
    against this model's MoE layers; a state that cannot be restored is an error naming it."""
    from safetensors import SafetensorError

    from flexc.ir.state import CompileState

    folder = run.path / STATE_DIR
    try:
        if restore_graph is not None:
            restore_graph()
        state = CompileState.load(folder, groups)
        state.check(groups, folder)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:
        why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise integrity.RunIntegrityError(f"{folder}: the saved state cannot be resumed: {why}; "
                                          f"{integrity.remedy(run.path)}") from None
    return state


def resume_point(run: RunDir, pass_names: list[str]) -> int:
    """How many pipeline stages a compile skips: on a resume, those up to the last one whose state
    was saved (``state/stage.json``). Later stages an older run recorded as done, without saved
    state, run again."""
    first = 0
    saved = saved_stage(run.path)
    if run.resumed and saved in pass_names and run.done(saved):
        first = pass_names.index(saved) + 1
        integrity.verify_state(run.path, run.manifest, saved)
        integrity.verify_stages(run.path, run.manifest, pass_names[:first])
        log.info("resuming after stage %s", saved)
    for name in pass_names[first:]:
        if run.done(name):
            run.record(name, status="pending")
    return first


# --------------------------------------------------------------------------- the compile


def run_compile(spec: "Spec", source: Path | None, run: RunDir, execution: "Execution") -> CompileResult:
    """Compile ``spec`` into ``run``'s directory, holding the model as ``execution`` does."""
    out = run.path
    names = stage_names(spec, lowers=execution.lowers)
    result = CompileResult(out, spec, run.manifest)
    if run.resumed and resumed_up_to_date(run, [n for n in names if n not in ("load", "lower")]):
        result.skipped = names
        return result
    started = time.perf_counter()
    run.manifest.update(
        status="running", runs=run.manifest.get("runs", 0) + 1, versions=artifacts.library_versions(),
        seed=spec.seed, spec_file=str(source) if source else None, **execution.manifest_entries(run.manifest),
        budgets=({"keep": list(spec.budgets.keep_ratios), "metric": spec.budgets.metric} if spec.budgets else None),
    )
    run.set_plan(names)
    if distributed.is_writer():
        artifacts.write_text(out / SPEC_FILE, spec.to_yaml())
    log.info("flexc compile%s → %s%s", execution.title, out, " (resuming)" if run.resumed else "")
    log.debug("spec:\n%s", spec.to_yaml())
    plan = Plan(run, names, result)

    seed_everything(spec.seed)
    with plan.stage("load") as st:
        st.info, run.manifest["model"] = execution.load()
        run.manifest["model"] = {"source": dict([spec.model.source]), **run.manifest["model"]}

    from flexc.ir.state import CompileState

    state = CompileState()
    if not spec.pipeline:
        _checkpoint_stage(run, plan, execution)
    else:
        state = _pass_stages(spec, run, plan, execution)
        if not distributed.is_writer():  # under torchrun, rank 0 alone exports and reports
            return result

    _export_stages(spec, run, plan, lambda fmt, tmp: execution.export(fmt, tmp, state))
    run.manifest["outputs"].update({"spec": SPEC_FILE, "log": LOG_FILE, "report": REPORT_FILE})
    _write_report(run, spec, execution.report_graph, state, execution.tokenizer)
    run.manifest["status"] = "complete"
    run.manifest["seconds_this_run"] = round(time.perf_counter() - started, 3)
    run.save()
    log.info("done: %s (manifest: %s)", out, out / artifacts.MANIFEST)
    return result


def _checkpoint_stage(run: RunDir, plan: Plan, execution: "Execution") -> None:
    """An empty pipeline: the model as loaded, in ``base/``."""
    if run.done("checkpoint"):
        integrity.verify_stages(run.path, run.manifest, ["checkpoint"])
        plan.skip("checkpoint")
        return
    with plan.stage("checkpoint") as st:
        with artifacts.atomic_dir(run.path / BASE_DIR) as tmp:
            execution.write_checkpoint(tmp)
        st.info = {"outputs": [BASE_DIR], "files": integrity.digests(run.path / BASE_DIR, run.path)}
    run.manifest["outputs"]["base"] = BASE_DIR


def _pass_stages(spec: "Spec", run: RunDir, plan: Plan, execution: "Execution") -> "CompileState":
    """The pipeline's passes as resumable stages: the resume point, the order check, then each pass
    seeded, in its stage, through the execution's :class:`~flexc.passes.manager.PassRunner`, its
    state saved after it. Returns the compile state the last pass left."""
    names = pass_stage_names(spec)
    passes = execution.build_passes(spec)
    if execution.lowers:
        seed_everything(spec.seed)
        with plan.stage("lower") as st:
            st.info = execution.lower()
    first = resume_point(run, names)
    runner = execution.pass_runner(run, dict(zip(names[:first], passes[:first])))
    try:
        runner.check(passes[first:])
    except ValueError as exc:
        raise FlexcError(f"the pipeline cannot run in this order: {exc}") from None
    for i, (name, entry, p) in enumerate(zip(names, spec.pipeline, passes)):
        if i < first:
            plan.skip(name)
            continue
        seed_everything(spec.seed)
        with plan.stage(name) as st:
            res = runner.run(name, p)
            distributed.barrier(f"the end of stage {name}")  # every rank finished it before it counts as done
            st.info = {"pass": entry.name, **execution.stage_info(runner, res)}
            if distributed.is_writer():  # under torchrun, rank 0 alone writes the run's files
                save_state(run, name, lambda tmp: execution.save_state(runner, tmp), **execution.state_meta)
                st.info["files"] = stage_files(run, name)
                st.info.update(execution.after_stage(run, name, runner, res))
    run.manifest["outputs"]["state"] = STATE_DIR
    return runner.state


def _export_stages(spec: "Spec", run: RunDir, plan: Plan, write: Callable[[str, Path], dict]) -> None:
    """Each of the spec's export formats as a resumable stage: ``write(fmt, tmp)`` fills a
    temporary folder that replaces ``out/fmt`` atomically, and returns extra manifest info."""
    out = run.path
    for fmt in spec.export.formats:
        name = f"export:{fmt}"
        if run.done(name):
            integrity.verify_stages(out, run.manifest, [name])
            plan.skip(name)
            continue
        seed_everything(spec.seed)
        with plan.stage(name) as st:
            with artifacts.atomic_dir(out / fmt) as tmp:
                info = write(fmt, tmp)
            st.info = {"outputs": [fmt], **info, "files": integrity.digests(out / fmt, out)}
        run.manifest["outputs"][fmt] = fmt


def _write_report(run: RunDir, spec: "Spec", graph, state, tokenizer) -> None:
    from flexc.compiler.report import write_report

    started = time.perf_counter()
    run.save()  # the report reads stage times from the manifest
    path = write_report(run.path, run.manifest, spec, graph, state, tokenizer)
    log.info("report: %s (%.1fs)", path, time.perf_counter() - started)
