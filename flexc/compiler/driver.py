"""The compile driver: validate → load → lower → passes → exports, as resumable stages.

Stages and what a re-run of the same spec does with them:

- ``load``: resolve and load the model (always runs; nothing to persist).
- ``checkpoint`` (empty pipeline only): ``base/`` = ``save_pretrained`` + tokenizer.
- ``lower``: the model to a FlexGraph on a small example batch (always runs when there are
  passes; it is cheap next to the passes and holds no state of its own).
- ``NN-<pass>``: one per pipeline entry, run by :class:`flexc.passes.manager.PassRunner`.
  After each, the graph state and the compile state (``ctx.state``, a
  :class:`flexc.ir.state.CompileState`) are saved to ``state/``; a re-run restores them and
  continues after the last completed pass.
- ``export:<format>``: one per export format, each built in a temporary directory.

Every random generator is seeded with the spec's seed before each stage, so a resumed run
computes what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
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
from flexc.compiler.spec import Spec, issues_from_errors, parse_spec, read_spec_text
from flexc.utils import distributed

if TYPE_CHECKING:
    from flexc.ir.state import CompileState

log = logging.getLogger("flexc")


@dataclass
class CompileResult:
    """What :func:`compile` did."""

    out_dir: Path
    spec: Spec
    manifest: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return not self.ran


# --------------------------------------------------------------------------- spec + overrides


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split("__")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def prepare_spec(spec_or_path: Any, overrides: dict[str, Any] | None = None) -> tuple[Spec, Path | None]:
    """A validated, checked spec with ``overrides`` applied (``export__dir=...`` sets ``export.dir``)."""
    from pydantic import ValidationError

    from flexc.compiler import checks

    if not overrides:
        return checks.load(spec_or_path)
    source: Path | None = None
    if isinstance(spec_or_path, Spec):
        data = spec_or_path.to_dict()
    elif isinstance(spec_or_path, dict):
        data = dict(spec_or_path)
    else:
        source = Path(spec_or_path)
        data = parse_spec(read_spec_text(source), str(source))[0].to_dict()
    for key, value in overrides.items():
        _set_path(data, key, value)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(issues_from_errors(exc.errors(), None), str(source) if source else "overrides") from None
    return checks.validate_spec(spec, str(source) if source else None), source


def output_dir(spec: Spec, source: Path | None, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out).expanduser()  # as export.dir: a quoted --out '~/runs' is not a folder named '~'
    if spec.export.dir is not None:
        return Path(spec.export.dir).expanduser()
    return Path("runs") / (source.stem if source is not None else "flexc")


# --------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _stage_names(spec: Spec) -> list[str]:
    names = ["load"]
    if spec.pipeline:
        names.append("lower")
        names += [f"{i:02d}-{e.name.replace(':', '.')}" for i, e in enumerate(spec.pipeline, 1)]
    else:
        names.append("checkpoint")
    names += [f"export:{fmt}" for fmt in spec.export.formats]
    return names


class _Stage:
    """Times a stage and records it in the manifest (done, failed or interrupted)."""

    def __init__(self, run: RunDir, name: str, index: int, total: int):
        self.run, self.name, self.index, self.total = run, name, index, total
        self.info: dict[str, Any] = {}

    def __enter__(self) -> "_Stage":
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


def _dump_graph(out: Path, stage: str, graph: Any, changed: Any = ()) -> None:
    from flexc.ir.draw import dump_graph

    dump_graph(graph, out / "graphs" / stage, highlight=changed)


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


def _saved_stage(out: Path) -> str | None:
    try:
        return json.loads((out / STATE_DIR / "stage.json").read_text())["stage"]
    except (OSError, ValueError, KeyError):
        return None


def resumed_up_to_date(run: RunDir, resumable: list[str]) -> bool:
    """On a resume: tidy what a killed run left, and whether every stage is done (verified: the
    files they wrote are as the manifest recorded them)."""
    out = run.path
    _clean_temporaries(out)
    saved = _saved_stage(out)
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


# --------------------------------------------------------------------------- compile


def compile(
    spec_or_path: Any,
    *,
    out: str | Path | None = None,
    force: bool = False,
    dump_graphs: bool = False,
    quiet: bool = False,
    **overrides: Any,
) -> CompileResult:
    """Compile a spec (a :class:`Spec`, a mapping, or a YAML path) into its output directory.

    ``overrides`` replace spec fields before validation: ``seed=1``, ``export__dir="out"``
    (double underscores reach into sections). Raises :class:`FlexcError` for user errors.
    """
    from flexc.compiler.data_parallel import check_data_parallel, open_run

    spec, source = prepare_spec(spec_or_path, overrides)
    out_dir = output_dir(spec, source, out)
    with distributed.session(spec.model.device):  # under torchrun: one rank of several
        check_data_parallel(spec)
        run = open_run(out_dir, spec.fingerprint(), force=force, protected=_protected_paths(spec, source))
        try:
            with artifacts_logging(out_dir) if distributed.is_writer() else contextlib.nullcontext():
                if stream_mode(spec, run, quiet) == "layers":  # one decoder layer in memory at a time (docs/scale.md)
                    from flexc.compiler.streamed import compile_streamed

                    return compile_streamed(spec, source, run, quiet=quiet)
                return _compile(spec, source, run, dump_graphs=dump_graphs, quiet=quiet)
        except BaseException:
            if distributed.is_writer() and not run.worth_keeping():
                run.discard()  # a failure before any stage finished leaves nothing behind to block the fixed spec
            raise
        finally:
            run.close()


def stream_mode(spec: Spec, run: RunDir, quiet: bool) -> str:
    """``off`` or ``layers``: the spec's ``execution.stream``, with ``auto`` decided from the model's
    size and the memory available (:mod:`flexc.compiler.memory`), once per output directory (a
    resumed run keeps its first decision: the two compiles save different state)."""
    if spec.execution.stream != "auto":
        return spec.execution.stream
    recorded = run.manifest.get("execution") or {}
    if run.resumed and recorded.get("chosen") in ("off", "layers"):
        return recorded["chosen"]
    from flexc import models
    from flexc.compiler import memory

    directory = models.resolve_directory(spec.model, progress=not quiet)
    choice = memory.choose(directory, spec.model.dtype, models.resolve_device(spec.model.device))
    if choice.mode == "layers":
        from flexc.compiler.streamed import streaming_problems

        problems = streaming_problems(spec)
        if problems:
            raise FlexcError(f"execution.stream: auto: {choice.describe()}, but this spec cannot stream: "
                             + "; ".join(message for _, message in problems))
    log.info("execution.stream: auto: %s", choice.describe())
    run.manifest["execution"] = choice.to_manifest()
    return choice.mode


def _protected_paths(spec: Spec, source: Path | None) -> dict[str, Path]:
    """What ``--force`` must never delete: where the user works and what the spec reads."""
    protected = {"working directory": Path.cwd()}
    if source is not None:
        protected["spec file"] = source
    kind, value = spec.model.source
    if kind == "path":
        protected["model directory"] = Path(value)
    elif kind == "zoo":
        from flexc.zoo.cache import cache_root

        protected["flexc cache"] = cache_root()
    else:
        from huggingface_hub.constants import HF_HUB_CACHE

        protected["Hugging Face cache"] = Path(HF_HUB_CACHE)
    for role in ("calibration", "evaluation"):
        files = getattr(getattr(spec.data, role, None), "files", None) or []
        for i, name in enumerate(files):
            protected[f"{role} data file {i}"] = Path(name)
    return protected


def artifacts_logging(out_dir: Path):
    from flexc.compiler.logs import log_file

    return log_file(out_dir / LOG_FILE)


def _compile(spec: Spec, source: Path | None, run: RunDir, *, dump_graphs: bool, quiet: bool) -> CompileResult:
    out = run.path
    names = _stage_names(spec)
    resumable = [n for n in names if n not in ("load", "lower")]
    result = CompileResult(out, spec, run.manifest)
    if run.resumed and resumed_up_to_date(run, resumable):
        result.skipped = names
        return result
    started = time.perf_counter()
    run.manifest.update(
        status="running",
        runs=run.manifest.get("runs", 0) + 1,
        versions=artifacts.library_versions(),
        seed=spec.seed,
        spec_file=str(source) if source else None,
        budgets=(
            {"keep": list(spec.budgets.keep_ratios), "metric": spec.budgets.metric} if spec.budgets else None
        ),
    )
    run.set_plan(names)
    if distributed.is_writer():
        artifacts.write_text(out / SPEC_FILE, spec.to_yaml())
    log.info("flexc compile → %s%s", out, " (resuming)" if run.resumed else "")
    log.debug("spec:\n%s", spec.to_yaml())

    total = len(names)
    step = iter(range(1, total + 1))

    def stage(name: str) -> _Stage:
        return _Stage(run, name, next(step), total)

    # ---- load
    from flexc import models

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    _seed_everything(spec.seed)
    with stage("load") as st:
        loaded = models.load_model(spec.model, progress=not quiet)
        n_params = sum(p.numel() for p in loaded.model.parameters())
        st.info = {"directory": str(loaded.directory), "family": loaded.family, "parameters": n_params}
        run.manifest["model"] = {
            "source": dict([spec.model.source]),
            "directory": str(loaded.directory),
            "family": loaded.family,
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "parameters": n_params,
        }
    result.ran.append("load")

    from flexc.ir.state import CompileState

    graph = None
    state = CompileState()
    if not spec.pipeline:
        if run.done("checkpoint"):
            integrity.verify_stages(out, run.manifest, ["checkpoint"])
            result.skipped.append("checkpoint")
            next(step)
        else:
            with stage("checkpoint") as st:
                with artifacts.atomic_dir(out / BASE_DIR) as tmp:
                    loaded.model.save_pretrained(tmp)
                    if loaded.tokenizer is not None:
                        loaded.tokenizer.save_pretrained(tmp)
                    else:
                        log.warning("the model has no tokenizer; %s/ holds the weights and config only", BASE_DIR)
                st.info = {"outputs": [BASE_DIR], "files": integrity.digests(out / BASE_DIR, out)}
            run.manifest["outputs"]["base"] = BASE_DIR
            result.ran.append("checkpoint")
    else:
        graph, state = _run_passes(spec, run, loaded, stage, step, result, dump_graphs=dump_graphs, quiet=quiet)
        if not distributed.is_writer():  # under torchrun, rank 0 alone exports and reports
            return result

    # ---- exports
    from flexc.compiler.exporters import ExportContext, get_exporter

    def write(fmt: str, tmp: Path) -> dict:
        get_exporter(fmt)(ExportContext(target=tmp, spec=spec, graph=graph, model=loaded.model,
                                        tokenizer=loaded.tokenizer, state=state, run_dir=out, logger=log))
        return {}

    run_export_stages(spec, run, stage, step, result, out, write)

    run.manifest["outputs"].update({"spec": SPEC_FILE, "log": LOG_FILE, "report": REPORT_FILE})
    _write_report(out, run, spec, graph, state, loaded.tokenizer)
    run.manifest["status"] = "complete"
    run.manifest["seconds_this_run"] = round(time.perf_counter() - started, 3)
    run.save()
    log.info("done: %s (manifest: %s)", out, out / artifacts.MANIFEST)
    return result


def run_export_stages(spec: Spec, run: RunDir, stage, step, result: CompileResult, out: Path,
                      write: Callable[[str, Path], dict]) -> None:
    """Each of the spec's export formats as a resumable stage: ``write(fmt, tmp)`` fills a
    temporary folder that replaces ``out/fmt`` atomically, and returns extra manifest info."""
    for fmt in spec.export.formats:
        name = f"export:{fmt}"
        if run.done(name):
            integrity.verify_stages(out, run.manifest, [name])
            result.skipped.append(name)
            next(step)
            continue
        _seed_everything(spec.seed)
        with stage(name) as st:
            with artifacts.atomic_dir(out / fmt) as tmp:
                info = write(fmt, tmp)
            st.info = {"outputs": [fmt], **info, "files": integrity.digests(out / fmt, out)}
        run.manifest["outputs"][fmt] = fmt
        result.ran.append(name)


def _write_report(out: Path, run: RunDir, spec: Spec, graph, state, tokenizer) -> None:
    from flexc.compiler.report import write_report

    started = time.perf_counter()
    run.save()  # the report reads stage times from the manifest
    path = write_report(out, run.manifest, spec, graph, state, tokenizer)
    log.info("report: %s (%.1fs)", path, time.perf_counter() - started)


def _run_passes(spec, run, loaded, stage, step, result, *, dump_graphs: bool, quiet: bool):
    from flexc.compiler.data_parallel import stages_dir
    from flexc.ir import lower
    from flexc.ir.state import CompileState
    from flexc.passes.base import PassContext
    from flexc.passes.manager import PassRunner, replayer

    out = run.path
    pass_names = _stage_names(spec)[2 : 2 + len(spec.pipeline)]
    passes = [entry.build() for entry in spec.pipeline]

    _seed_everything(spec.seed)
    with stage("lower") as st:
        graph = lower(loaded.model)  # a small random batch: shapes are dynamic, values do not matter
        st.info = {"moe_layers": len(graph.groups)}
        if dump_graphs and distributed.is_writer():
            _dump_graph(out, "lower", graph)
    result.ran.append("lower")

    state = CompileState()
    first = resume_point(run, pass_names)
    if first:
        state = load_saved_state(run, graph.groups, lambda: graph.load_state(
            out / STATE_DIR / "graph", replay=replayer(dict(zip(pass_names[:first], passes[:first]))),
            # the other ranks replay into their scratch folder: rank 0 alone writes the run's
            replay_dir=None if distributed.is_writer() else stages_dir(run) / "replay"))

    device = str(next(loaded.model.parameters()).device)
    context = PassContext(workdir=stages_dir(run), spec=spec, seed=spec.seed, device=device, logger=log, quiet=quiet,
                          tokenizer=loaded.tokenizer)
    runner = PassRunner(graph, context, stages_dir(run), state=state, done=[p.name for p in passes[:first]])

    def saved(name: str, entry, res) -> dict:
        info = {"pass": entry.name, "modified": bool(res.modified), "properties": sorted(runner.graph.properties)}
        if distributed.is_writer():  # under torchrun, rank 0 alone writes the run's files
            save_state(run, name, lambda tmp: (runner.graph.save_state(tmp / "graph"), runner.state.save(tmp)))
            info["files"] = stage_files(run, name)
            if dump_graphs:
                _dump_graph(out, name, runner.graph, res.changed_nodes)
        return info

    run_pass_stages(spec, run, stage, step, result, runner, list(zip(pass_names, spec.pipeline, passes)), first, saved)
    return runner.graph, runner.state


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
    saved = _saved_stage(run.path)
    if run.resumed and saved in pass_names and run.done(saved):
        first = pass_names.index(saved) + 1
        integrity.verify_state(run.path, run.manifest, saved)
        integrity.verify_stages(run.path, run.manifest, pass_names[:first])
        log.info("resuming after stage %s", saved)
    for name in pass_names[first:]:
        if run.done(name):
            run.record(name, status="pending")
    return first


def run_pass_stages(spec: Spec, run: RunDir, stage, step, result: CompileResult, runner, steps: list[tuple],
                    first: int, saved: Callable[..., dict]) -> None:
    """The pipeline's passes as resumable stages, shared by the in-memory and the streamed compile.

    ``steps`` are ``(stage name, spec entry, pass)``; the first ``first`` ran before (a resume).
    The rest are order-checked, then each runs seeded, in its stage, through ``runner``
    (:class:`~flexc.passes.manager.PassRunner`), and ``saved(name, entry, result)`` saves the
    state and returns the stage's manifest info.
    """
    try:
        runner.check([p for _, _, p in steps[first:]])
    except ValueError as exc:
        raise FlexcError(f"the pipeline cannot run in this order: {exc}") from None
    for i, (name, entry, p) in enumerate(steps):
        if i < first:
            result.skipped.append(name)
            next(step)
            continue
        _seed_everything(spec.seed)
        with stage(name) as st:
            res = runner.run(name, p)
            distributed.barrier(f"the end of stage {name}")  # every rank finished it before it counts as done
            st.info = saved(name, entry, res)
        result.ran.append(name)
    run.manifest["outputs"]["state"] = STATE_DIR
