"""``flexc.compile``: the spec checked (overrides applied), the output directory opened (created,
resumed or cleared; one rank of several under torchrun), the execution chosen (in memory, or
one decoder layer at a time: ``execution.stream``), then the stages run
(:func:`flexc.compiler.stages.run_compile`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from flexc.compiler.artifacts import LOG_FILE, RunDir
from flexc.compiler.errors import FlexcError, SpecError
from flexc.compiler.spec import Spec, issues_from_errors, parse_spec, read_spec_text
from flexc.compiler.stages import CompileResult, run_compile
from flexc.utils import distributed

log = logging.getLogger("flexc")


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
                    from flexc.compiler.streamed import LayerStreamed as execution
                else:
                    from flexc.compiler.execution import InMemory as execution
                return run_compile(spec, source, run, execution(spec, out_dir, quiet=quiet, dump_graphs=dump_graphs))
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
    choice = memory.choose(directory, spec.model.dtype, models.spec_device(spec.model))
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
