"""Budget control of a running vLLM engine serving a flexc nested artifact.

Offline (``vllm.LLM``)::

    from flexc.serving import set_budget, get_budget
    llm = LLM(model="runs/x/nested", hf_overrides={"flexc_budget": 0.75})
    set_budget(llm, 0.5)        # every worker's width table switched; no weight moves
    set_budget(llm, 0.5, adaptive=True)   # the artifact's token-adaptive policy at keep 0.5

A switch copies one small int row per MoE layer on each worker (``collective_rpc`` of the
``flexc_budget`` worker method the plugin installs), then resets vLLM's prefix cache with
running requests preempted: KV blocks computed at the old budget are never reused for new
tokens, and requests in flight are recomputed at the new budget -- none is dropped.
"""

from __future__ import annotations

import time
from typing import Any

from flexc.serving.plugin import WORKER_METHOD


def _one(states: list[dict[str, Any]]) -> dict[str, Any]:
    first = states[0]
    for other in states[1:]:
        if other["budget"] != first["budget"]:
            raise RuntimeError(f"workers disagree on the budget: {[s['budget'] for s in states]}")
    out = dict(first)
    out["switch_s"] = max((s["switch_s"] or 0.0) for s in states) if first.get("switch_s") is not None else None
    return out


def get_budget(llm) -> dict[str, Any]:
    """The engine's budget state: ``kind``, ``budget``, ``budgets``, ``widths`` (per MoE layer)."""
    return _one(llm.collective_rpc(WORKER_METHOD))


def set_budget(llm, keep: float, adaptive: bool = False) -> dict[str, Any]:
    """Switch a running ``vllm.LLM`` to budget ``keep`` (``adaptive``: on the nested artifact's token-adaptive
    policy, docs/adaptive.md); the state, with ``switch_s`` (the workers' width copy) and ``total_s``
    (round trip, prefix-cache reset included)."""
    start = time.perf_counter()
    state = _one(llm.collective_rpc(WORKER_METHOD, args=(float(keep), bool(adaptive))))
    llm.reset_prefix_cache(reset_running_requests=True)
    state["total_s"] = time.perf_counter() - start
    return state


async def set_budget_async(engine_client, keep: float, adaptive: bool = False) -> dict[str, Any]:
    """:func:`set_budget` for an async engine client (``vllm serve``'s ``EngineClient``).

    The scheduler is paused (requests in flight kept) around the switch, so that no step runs
    with the new widths over KV computed at the old ones: the widths change, running requests are
    preempted (their KV freed and recomputed at the new budget), then scheduling resumes.
    """
    start = time.perf_counter()
    await engine_client.pause_generation(mode="keep", clear_cache=False)
    try:
        state = _one(await engine_client.collective_rpc(WORKER_METHOD, args=(float(keep), bool(adaptive))))
        await engine_client.reset_prefix_cache(reset_running_requests=True)
    finally:
        await engine_client.resume_generation()
    state["total_s"] = time.perf_counter() - start
    return state


async def get_budget_async(engine_client) -> dict[str, Any]:
    return _one(await engine_client.collective_rpc(WORKER_METHOD))
