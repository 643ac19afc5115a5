"""Per-request budgets: each request names its keep ratio, requests of different budgets share a batch.

A request asks for a budget in its sampling parameters' ``extra_args`` (offline:
``SamplingParams(extra_args={"flexc_budget": 0.5})``; through the OpenAI server:
``extra_body={"vllm_xargs": {"flexc_budget": 0.5}}``); a request that names none runs at the
engine's budget (chosen at load, switched with :func:`flexc.serving.set_budget`). ``"flexc_adaptive":
true`` (or false) runs the request on the artifact's token-adaptive policy at its budget (or its
static table); a request that does not say runs as the engine does.

:class:`FlexcBudgets` is the vLLM logits processor that carries those budgets from the requests
to the model (enabled with ``logits_processors=["flexc.serving.requests:FlexcBudgets"]``;
``flexc serve --per-request-budgets`` adds it). It never changes a logit; vLLM gives it what
the model needs: each request's parameters when it joins the running batch and its index in the
batch as requests come and go (``update_state``, before every forward pass), and it checks each
request's budget on admission (``validate_params``: a keep ratio in (0, 1]; one of the served
artifact's budgets when ``FLEXC_SERVED_BUDGETS`` lists them, as ``flexc serve`` does). In the
forward pass the model reads the batch's tokens per request from vLLM's attention metadata
(``query_start_loc``) and each MoE block runs the flexc op once over the whole batch, each routed
pair at the width its token's budget gives its expert (per-pair widths:
:meth:`flexc.serving.models.BudgetControl.pair_widths`, :meth:`FlexcMoeBlock.forward`).

KV blocks are computed at one budget and must never serve a request of another: per-request
budgets need prefix caching off (``enable_prefix_caching=False``), which the processor checks
at start. Compiled engines on CPU group a pass's tokens by budget as eager ones do: the routed
experts run as an opaque op (:func:`flexc.serving.moe.compiled_op_name`); under CUDA graphs (not
run yet) the processor asks for eager mode. A budget the artifact did
not export runs at the largest exported budget below it (the smallest one if none is), with a
warning in the engine's log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger("flexc.serving")

EXTRA_ARG = "flexc_budget"
ADAPTIVE_ARG = "flexc_adaptive"
BUDGETS_ENV = "FLEXC_SERVED_BUDGETS"  # comma-separated keep ratios the front end accepts
ADAPTIVE_ENV = "FLEXC_SERVED_ADAPTIVE"  # "0": the served artifact has no adaptive policy (the front end refuses it)
PROCESSOR = "flexc.serving.requests:FlexcBudgets"

_ACTIVE: list["FlexcBudgets"] = []  # the processor of this worker process's engine


def requested_budget(params) -> tuple[float | None, bool | None] | None:
    """What a request's sampling parameters ask for: its keep ratio and whether it runs the adaptive policy
    (each None where it does not say), or None where it says neither."""
    extra = getattr(params, "extra_args", None) or {}
    keep, adaptive = extra.get(EXTRA_ARG), extra.get(ADAPTIVE_ARG)
    if keep is None and adaptive is None:
        return None
    return None if keep is None else float(keep), None if adaptive is None else bool(adaptive)


def check_budget(value: Any, served: list[float] | None) -> float:
    """``value`` as a keep ratio in (0, 1] (one of ``served`` if given), or a ValueError saying what is expected."""
    try:
        keep = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{EXTRA_ARG} must be a keep ratio (a number in (0, 1]); got {value!r}") from None
    if not 0 < keep <= 1:
        raise ValueError(f"{EXTRA_ARG} must be a keep ratio in (0, 1]; got {keep:g}")
    if served and not any(abs(keep - b) < 1e-6 for b in served):
        raise ValueError(f"{EXTRA_ARG} {keep:g} is not a budget of the served artifact; available: "
                         f"{', '.join(f'{b:g}' for b in served)}")
    return keep


def check_adaptive(value: Any, available: bool) -> bool:
    """``value`` as the request's choice of the adaptive policy, or a ValueError saying what is expected."""
    if not isinstance(value, bool):
        raise ValueError(f"{ADAPTIVE_ARG} must be true or false; got {value!r}")
    if value and not available:
        raise ValueError(f"{ADAPTIVE_ARG}: the served artifact has no token-adaptive policy (compile it with the "
                         "adaptive_widths pass, docs/adaptive.md)")
    return value


def _served_budgets() -> list[float] | None:
    text = os.environ.get(BUDGETS_ENV, "").strip()
    return [float(b) for b in text.split(",") if b.strip()] if text else None


try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
except ImportError:  # vLLM is not installed: nothing here can run
    LogitsProcessor = object  # type: ignore[assignment,misc]


class FlexcBudgets(LogitsProcessor):
    """Tracks each running request's budget by its index in vLLM's batch; changes no logit."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        if EXTRA_ARG in extra:
            check_budget(extra[EXTRA_ARG], _served_budgets())
        if ADAPTIVE_ARG in extra:
            check_adaptive(extra[ADAPTIVE_ARG], os.environ.get(ADAPTIVE_ENV) != "0")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from flexc.serving.moe import replays_graphs

        if replays_graphs(vllm_config):
            raise ValueError("flexc per-request budgets under CUDA graphs have not run yet (a captured graph would "
                             "keep one pass's grouping by budget); serve with enforce_eager=True, or --enforce-eager")
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("flexc per-request budgets need prefix caching off (enable_prefix_caching=False, or "
                             "--no-enable-prefix-caching): a KV block computed at one budget must not serve a "
                             "request at another")
        self.budgets: dict[int, tuple] = {}  # batch index -> (keep, adaptive) asked for (requests that ask either)
        _ACTIVE[:] = [self]

    def is_argmax_invariant(self) -> bool:
        return True  # greedy sampling may skip apply(): it changes nothing anyway

    def update_state(self, batch_update: "BatchUpdate | None") -> None:
        process_dict_updates(self.budgets, batch_update, lambda params, _prompt, _output: requested_budget(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def active() -> FlexcBudgets | None:
    return _ACTIVE[0] if _ACTIVE else None


def current_pass():
    """vLLM's context of the forward pass running now (one per pass), or None outside one."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context() if is_forward_context_available() else None


def token_groups(default: tuple[float, bool], num_tokens: int, resolve) -> list[tuple[tuple, torch.Tensor]] | None:
    """This forward pass's tokens grouped by how they run: ``[((budget, adaptive), token indices)]``, or None when
    every token runs as ``default`` (the engine's budget and mode; or no per-request budget is in play).

    ``resolve((keep, adaptive))`` maps what a request asked for (:func:`requested_budget`) to how it runs.
    The tokens of request ``i`` (vLLM's batch order) are ``query_start_loc[i]:query_start_loc[i+1]``
    of the attention metadata; padding rows past the last request run as ``default``.
    """
    processor, context = active(), current_pass()
    if processor is None or not processor.budgets or context is None:
        return None
    metadata = context.attn_metadata
    if isinstance(metadata, list):  # micro-batches: not used with flexc artifacts
        metadata = metadata[0]
    if not metadata:
        return None  # a profiling or warm-up pass without requests
    starts = next(iter(metadata.values())).query_start_loc.to("cpu")
    num_reqs = len(starts) - 1
    per_request = [default] * num_reqs
    for index, requested in processor.budgets.items():
        if index < num_reqs:
            per_request[index] = resolve(requested)
    covered = min(int(starts[-1]), num_tokens)
    padded = {default} if covered < num_tokens else set()  # padding rows run as the default
    present = sorted(set(per_request) | padded, reverse=True)
    if present == [default]:
        return None
    index = {key: i for i, key in enumerate(present)}
    per_token = torch.full((num_tokens,), index.get(default, -1), dtype=torch.int64)
    counts = (starts[1:] - starts[:-1]).to(torch.int64)
    per_token[:covered] = torch.tensor([index[key] for key in per_request]).repeat_interleave(counts)[:covered]
    return [(key, torch.nonzero(per_token == i).flatten()) for i, key in enumerate(present)]
