"""Serving flexc artifacts in vLLM (the ``vllm.general_plugins`` entry point ``flexc``).

With flexc installed beside vLLM, ``LLM(model="runs/x/nested")`` and ``vllm serve runs/x/nested``
serve a nested artifact on vLLM's own layers (attention, paged KV cache, continuous batching)
with flexc's experts op reading a per-expert width table on the device. The budget is chosen at
load with ``hf_overrides={"flexc_budget": 0.5}`` and switched on the running engine with
:func:`set_budget` (offline) or ``POST /flexc/budget`` (``vllm serve``, see docs/serving.md). A
sliced checkpoint is served at its one budget. Nothing here imports vLLM until it is used.
"""

from __future__ import annotations

from flexc.serving.artifact import BUDGET_KEY
from flexc.serving.control import get_budget, set_budget
from flexc.serving.families import FAMILIES, ServingError

__all__ = ["BUDGET_KEY", "FAMILIES", "ServingError", "get_budget", "set_budget"]
