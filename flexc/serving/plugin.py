"""flexc's vLLM plugin (entry point group ``vllm.general_plugins``, name ``flexc``).

vLLM calls :func:`register` in every process it starts (the front end, the engine core, each
worker). It registers flexc's model classes with vLLM's ``ModelRegistry`` -- under the stock
architecture names of the families flexc serves (a flexc class behaves exactly like vLLM's own
for a checkpoint that is not a flexc artifact) and under the ``FlexcSliced*`` names of sliced
checkpoints -- and gives vLLM's workers the ``flexc_budget`` method that
:func:`flexc.serving.set_budget` and the HTTP endpoint call through ``collective_rpc``.

Set ``VLLM_PLUGINS`` to a list without ``flexc`` to turn the plugin off.
"""

from __future__ import annotations

from flexc.serving.families import FAMILIES

MODELS_MODULE = "flexc.serving.models"
SLICED_PREFIX = "FlexcSliced"  # flexc.export.remote.modeling_flexc_sliced.CLASS_PREFIX
# Sliced checkpoints of MoE families flexc compiles but does not serve in vLLM: refused clearly.
UNSERVED_SLICED = ("OlmoeForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM")
WORKER_METHOD = "flexc_budget"


def _worker_flexc_budget(self, keep: float | None = None, adaptive: bool = False) -> dict:
    """Worker side of a budget query or switch: ``keep`` None reads, a keep ratio switches (``adaptive``: onto
    the artifact's token-adaptive policy)."""
    from flexc.serving.families import ServingError

    model = self.get_model()
    control = getattr(model, "flexc", None)
    if control is None:
        raise ServingError(f"the served model ({type(model).__name__}) is not a flexc artifact: it has no budgets")
    seconds = None if keep is None else control.set(keep, adaptive)
    state = control.state()
    state["switch_s"] = seconds
    return state


def register() -> None:
    """Register flexc's model classes and the worker's budget method with vLLM (idempotent)."""
    from vllm import ModelRegistry
    from vllm.v1.worker.worker_base import WorkerBase

    for family in FAMILIES.values():
        target = f"{MODELS_MODULE}:Flexc{family.architecture}"
        ModelRegistry.register_model(family.architecture, target)
        ModelRegistry.register_model(SLICED_PREFIX + family.architecture, target)
    for arch in UNSERVED_SLICED:
        ModelRegistry.register_model(SLICED_PREFIX + arch, f"{MODELS_MODULE}:FlexcUnservedSliced")
    if getattr(WorkerBase, WORKER_METHOD, None) is not _worker_flexc_budget:
        setattr(WorkerBase, WORKER_METHOD, _worker_flexc_budget)
