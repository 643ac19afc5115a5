"""Zero-shot tasks through lm-eval-harness (the ``eval`` extra) on flexc-loaded models.

The model is any transformers causal LM already in memory: a base model, a nested artifact
loaded with :func:`flexc.load` (switch budgets with ``model.set_budget`` between calls; the
harness keeps no state across calls) or a sliced checkpoint. Tasks are lm-eval task names
(from its registry, or from ``include_path``) or local task files: a task YAML whose
``dataset_kwargs.data_files`` may be relative to the YAML's own directory, so a task defined
from a JSONL file beside it runs offline from anywhere.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flexc.errors import FlexcError

INSTALL_HINT = "zero-shot tasks need lm-eval-harness: pip install 'flexc[eval]'"
TASK_FILE_SUFFIXES = (".yaml", ".yml")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise FlexcError(f"{INSTALL_HINT} ({exc})") from None
    return lm_eval, HFLM, TaskManager


def is_task_file(task: str) -> bool:
    return task.endswith(TASK_FILE_SUFFIXES)


def load_task_file(path: str | Path) -> dict:
    """A local task YAML as an lm-eval task config, with relative data files made absolute."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FlexcError(f"task file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FlexcError(f"{path}: not valid YAML for a plain task file ({exc}); tasks using lm-eval's "
                         "'!function' tags go in a directory passed with --include-path") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise FlexcError(f"{path}: a task file is a mapping with a 'task' name (lm-eval's task YAML format)")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise FlexcError(f"{path}: dataset_kwargs must be a mapping (of datasets.load_dataset arguments)")
    files = kwargs.get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _resolve_files(files, path.parent, path)
    return config


def _resolve_files(files, base: Path, source: Path):
    if isinstance(files, dict):
        return {split: _resolve_files(f, base, source) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_files(f, base, source) for f in files]
    given = Path(str(files)).expanduser()
    resolved = given if given.is_absolute() else base / given
    if not resolved.is_file():
        raise FlexcError(f"{source}: data file {files!r} not found (looked for {resolved})")
    return str(resolved)


def _set_log_level(quiet: bool) -> None:
    # lm-eval warns on every wrapper built around a model object (intended here) and logs its
    # progress at INFO; keep that out unless asked for.
    logging.getLogger("lm_eval").setLevel(logging.ERROR if quiet else logging.INFO)


def harness_model(model, tokenizer, *, batch_size: int = 8, quiet: bool = True):
    """lm-eval's Hugging Face model wrapper around an in-memory model (no reload, no copy)."""
    _, HFLM, _ = _lm_eval()
    _set_log_level(quiet)
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@dataclass
class TaskSet:
    """Tasks checked and indexed once, to run at any number of budgets."""

    specs: list  # registry names and task configs (from task files)
    manager: Any  # lm-eval's TaskManager


def task_set(tasks: list[str], *, include_path: str | None = None) -> TaskSet:
    """Check ``tasks`` (registry names or task YAML files) before any model is loaded."""
    _, _, TaskManager = _lm_eval()
    specs = [load_task_file(t) if is_task_file(t) else t for t in tasks]
    if not specs:
        raise FlexcError("no tasks given")
    if include_path is not None and not Path(include_path).is_dir():
        raise FlexcError(f"--include-path {include_path} is not a directory")
    # Indexing lm-eval's own registry takes most of a minute; local task files do not need it.
    registry = include_path is not None or any(isinstance(t, str) for t in specs)
    manager = TaskManager(include_path=include_path, include_defaults=registry)
    unknown = [t for t in specs if isinstance(t, str) and not manager.match_tasks([t])]
    if unknown:
        raise FlexcError(f"unknown lm-eval task(s) {', '.join(unknown)}: name tasks from lm-eval's registry "
                         "(`lm-eval ls tasks`), pass a task YAML file, or add --include-path DIR")
    return TaskSet(specs, manager)


def run_tasks(lm, tasks: TaskSet | list[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
              seed: int = 0, quiet: bool = True) -> list[dict]:
    """Run ``tasks`` on ``lm`` (from :func:`harness_model`); one row per task and metric.

    Rows: ``{"task", "metric", "value", "stderr"}`` (``stderr`` is None where lm-eval gives none).
    """
    lm_eval, _, _ = _lm_eval()
    if not isinstance(tasks, TaskSet):
        tasks = task_set(tasks)
    if limit is not None:
        if limit <= 0:
            raise FlexcError(f"--limit must be positive (documents per task, or a fraction below 1); found {limit}")
        limit = int(limit) if limit >= 1 else float(limit)
    _set_log_level(quiet)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks.specs, task_manager=tasks.manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                  bootstrap_iters=1000)
    return _metric_rows(out["results"])


def _metric_rows(results: dict) -> list[dict]:
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")  # metrics are keyed "name,filter"
            if not comma or not isinstance(value, (int, float)) or name.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"task": task, "metric": name if filt in ("", "none") else f"{name} ({filt})",
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr)
                         else None})
    return rows
