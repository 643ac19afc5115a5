"""CPU inference path of the expert op: grouped GEMMs instead of the per-expert Python loop.

The reference (:func:`flexc.ir.op.moe_experts_reference`) runs its GEMMs expert by expert
from Python. Here the (token, slot) pairs sorted by expert run as one ``torch._grouped_mm``
for gate/up (two where gate and up rows are not one block) and one for down, over strided
views of the weights (no copies; bytes read scale with the GEMM width). Experts of mixed
widths (a learned table) — or pairs of per-pair widths (``[T, k]``: tokens at different budgets
in one call) — split the pairs into *runs*, each at one GEMM width:

- ``group``: one run per distinct width hit; every pair at its own width.
- ``pad``: one run at the widest width hit; the channels past an expert's own width are
  computed, then zeroed before the down GEMM (exact zeros, so they add nothing wherever the
  weights are finite).

:func:`moe_experts_cpu` pads while the multiply-adds padding wastes stay under
:data:`PAD_MACS_PER_RUN` per run it saves, and groups otherwise (below: pad at one token,
group from 8 tokens on with 4 distinct widths). A width that is not a multiple of 16 bytes
runs at the next one up, masked the same way. Pairs of width 0 are sorted last and
contribute zeros, bias included. Calls of up to :data:`HOST_PLAN_PAIRS` pairs are planned on the host from Python
lists (a few list operations instead of a dozen small tensor ops); each token's ``k`` slots are
summed in slot order, as ``routing.combine`` does for the reference. Same result as the
reference up to float rounding. Inference only: the op's backward is the reference's, and
forward observers see the reference.

CPU ``_grouped_mm`` is itself a C++ loop of one ``mm`` per group, empty groups included (about
1.2 µs each), so a run costs that for every expert it spans: the path saves the reference's
Python dispatch per expert, not GEMM work. With many experts and few tokens that visit costs
more than it saves (E=128, top-8, one or two tokens: about 1.2-1.8x the loop's time), so a
mixed-width call that would visit more than :data:`EMPTY_GROUPS_PER_EXPERT` empty groups per
expert hit returns None and the op runs the reference loop.

Figures: ``python benchmarks/experts_cpu.py --model small --synthetic --strategies --threads 1
--clock process`` (the zoo recipe ``small`` untrained: E=16, H=I=256, top-4, fp32; one thread,
process CPU time, on a 2-core VM that other jobs shared). Each cell: stock transformers' time
over the op's / the reference loop's time over the op's (>1: the op is faster); same widths.

==========================  ===========  ===========  ===========  ===========  ===========
widths                      1 token      8 tokens     64           512          2048
==========================  ===========  ===========  ===========  ===========  ===========
full                        1.11 / 1.33  1.01 / 1.69  0.97 / 1.23  0.98 / 1.03  0.99 / 0.86
4 widths, keep 0.5          0.94 / 1.05  0.91 / 1.17  1.41 / 1.14  1.63 / 1.05  2.25 / 1.02
4 widths with 0s, keep 0.5  1.01 / 0.97  1.05 / 1.21  1.50 / 1.12  1.66 / 1.03  2.34 / 1.02
8 levels, keep ~0.55        0.94 / 1.05  0.90 / 1.24  1.01 / 0.85  1.37 / 0.99  1.98 / 1.00
==========================  ===========  ===========  ===========  ===========  ===========

Forced strategies, loop's time over each (4 widths / 4 widths with 0s / 8 levels): pad
1.08 / 1.03 / 1.12 at 1 token, 1.14 / 1.23 / 1.24 at 8, 0.73 / 0.84 / 0.77 at 64 and 0.56 /
0.73 / 0.65 at 512; group 0.90 / 0.80 / 1.06, 1.22 / 1.25 / 0.95, 1.10 / 1.13 / 0.88 and
1.02 / 1.04 / 0.98. Two threads, wall clock (the default flags; two runs): 4 widths at
0.90-0.94 / 0.99-1.03, 0.92-1.13 / 1.21-1.22, 1.26-1.29 / 1.07-1.11, 1.52-1.53 / 1.05-1.09
and 1.70-1.80 / 0.95-1.00 over the same token counts. Repeated runs on the shared VM move
single cells by up to about 10%, most at 2048 tokens.
So: at one token the op ties with the loop (both are mostly one GEMV call per expert and
projection), from 8 to 64 tokens it is 1.1-1.25x faster with up to 4 distinct widths, and
from 512 tokens both are GEMM-bound and even. Eight distinct widths at 64 tokens run slower
than the loop (0.85x): eight runs visit more empty groups than the loop has experts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from itertools import accumulate
from typing import NamedTuple

import torch

from flexc.ir.layout import ExpertWeights, apply_activation, gate_up_rows
from flexc.ir.routing import route_by_expert

# A call with mixed widths runs as one padded run while the multiply-adds padding wastes stay
# under this many per run it saves, else as one run per width (see the module docstring).
PAD_MACS_PER_RUN = 750_000
# Up to this many pairs the call is planned (sorted by run and expert, split into runs) on the
# host from Python lists: a handful of list operations instead of a dozen small tensor ops,
# which at decode sizes cost more than the GEMMs. Above it, by tensor ops.
HOST_PLAN_PAIRS = 128
# A mixed-width call goes back to the reference loop where its grouped GEMMs would visit more
# than this many empty groups per expert hit: CPU grouped_mm visits every group of the experts
# it spans, empty ones included (about 1.2 µs each), which with many experts and few tokens
# (E=128, one token) costs more than the loop's per-expert dispatch saves.
EMPTY_GROUPS_PER_EXPERT = 15


def _grouped_strides(strides: tuple[int, ...], size: int) -> bool:
    # grouped_mm reads operands with a unit stride in one of the last two dims and every other
    # stride a multiple of 16 bytes.
    unit = strides[-1] == 1 or strides[-2] == 1
    return unit and all(s * size % 16 == 0 for s in strides if s != 1)


def _eligible(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, interleaved: bool) -> bool:
    """Whether grouped_mm can read these operands at all (dtype, hidden size, weight strides)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (
            hidden.dtype == gate_up.dtype == down.dtype):
        return False
    size = gate_up.element_size()
    if hidden.shape[1] * size % 16:  # activations are [n, H]
        return False
    g0, g1, g2 = gate_up.stride()  # the GEMMs read gate rows as [E, H, w] (every other row if interleaved)
    d0, d1, d2 = down.stride()  # and down as [E, w, H]
    return _grouped_strides((g0, g2, g1 * (2 if interleaved else 1)), size) and _grouped_strides((d0, d2, d1), size)


def _aligned(width: int, element_size: int) -> bool:
    return width * element_size % 16 == 0  # activations are [n, width]


class _Plan(NamedTuple):
    """A call's (token, slot) pairs sorted by (run, expert): each run's rows contiguous and
    sorted by expert, the rows of width-0 experts last; ties keep token order, as in
    :func:`flexc.ir.routing.route_by_expert`."""

    sizes: list[int]  # rows of each run
    spans: list[tuple[int, int]]  # first and last expert of each run's rows
    hit: list[int]  # experts with rows in each run
    offs: list[torch.Tensor]  # each run's group ends (int32), one per expert of its span
    order: torch.Tensor  # [n] sorted row -> flat pair index (token * k + slot)
    token: torch.Tensor  # [live] token of each row of a live run
    experts: torch.Tensor  # [live] expert of each such row
    combine: Callable[[torch.Tensor], torch.Tensor]  # [n, H] sorted rows -> [T, H]


def _plan_host(topk_ids: torch.Tensor, ids: list[int], run_of: list[int] | None, live_runs: int,
               num_experts: int) -> _Plan:
    """The plan from ``ids`` (``topk_ids`` flat, as a list); ``run_of`` is each pair's run
    (``live_runs`` for width 0; None: one run)."""
    num_tokens, k = topk_ids.shape
    keys = ids if run_of is None else [r * num_experts + e for r, e in zip(run_of, ids)]
    order = sorted(range(len(ids)), key=keys.__getitem__)  # stable
    sorted_keys = [keys[i] for i in order]
    starts = [bisect_left(sorted_keys, b * num_experts) for b in range(live_runs + 1)]
    sizes, spans, hit, offs = [], [], [], []
    for b in range(live_runs):
        rows = sorted_keys[starts[b] : starts[b + 1]]
        lo, hi = (rows[0] - b * num_experts, rows[-1] - b * num_experts) if rows else (0, -1)
        counts = [0] * (hi - lo + 1)
        for key in rows:
            counts[key - b * num_experts - lo] += 1
        sizes.append(len(rows))
        spans.append((lo, hi))
        hit.append(sum(1 for c in counts if c))
        offs.extend(accumulate(counts))
    live = starts[live_runs]
    inverse = [0] * len(order)
    for row, pair in enumerate(order):
        inverse[pair] = row
    index = torch.tensor(order + [i // k for i in order[:live]] + [ids[i] for i in order[:live]] + inverse,
                         device=topk_ids.device)
    n = len(order)
    offs_t = torch.tensor(offs, dtype=torch.int32, device=topk_ids.device)
    ends = list(accumulate(hi - lo + 1 for lo, hi in spans))
    run_offs = [offs_t[end - (hi - lo + 1) : end] for end, (lo, hi) in zip(ends, spans)]
    unsort = index[n + 2 * live :]

    def combine(y: torch.Tensor) -> torch.Tensor:  # the reduction of routing.combine, inverse precomputed
        return y[unsort].view(num_tokens, k, y.shape[-1]).sum(dim=1)

    return _Plan(sizes, spans, hit, run_offs, index[:n], index[n : n + live], index[n + live : n + 2 * live], combine)


def _plan_tensors(topk_ids: torch.Tensor, run_of: torch.Tensor | None, num_runs: int, live_runs: int,
                  num_experts: int) -> _Plan:
    """The plan by tensor ops; ``run_of [T, k]`` is each pair's run (None: one run)."""
    keys = topk_ids if run_of is None else run_of * num_experts + topk_ids
    routing = route_by_expert(keys, num_runs * num_experts)
    counts = routing.count_tensor.view(num_runs, num_experts)
    offs = torch.cumsum(counts, 1).to(torch.int32)  # group ends per run; 0 before the run's first expert
    # Each run's size, first and last expert, and experts hit, in one sync.
    nonempty = counts[:live_runs] > 0
    first = nonempty.to(torch.uint8).argmax(1)
    last = num_experts - 1 - nonempty.flip(1).to(torch.uint8).argmax(1)
    info = torch.stack((counts[:live_runs].sum(1), first, last, nonempty.sum(1)), 1).tolist()
    sizes, spans, hit = [r[0] for r in info], [(r[1], r[2]) for r in info], [r[3] for r in info]
    live = sum(sizes)
    experts = routing.sorted_experts if run_of is None else topk_ids.reshape(-1)[routing.order[:live]]
    run_offs = [offs[b, lo : hi + 1] for b, (lo, hi) in enumerate(spans)]
    return _Plan(sizes, spans, hit, run_offs, routing.order, routing.token[:live], experts,
                 lambda y: routing.combine(y, topk_ids.shape[0]))


def _run(x, offs, experts, gate_up, down, gate_up_bias, down_bias, width, mask_widths, activation, interleaved,
         alpha, limit) -> torch.Tensor:
    """Rows ``x [n, H]`` sorted by expert through their experts at GEMM width ``width``.

    ``gate_up``/``down`` hold the span of experts the rows use and ``offs`` one group end per
    expert of it (CPU grouped_mm visits every group, empty ones included); ``experts [n]`` is
    each row's expert (absolute ids, for the biases); ``mask_widths [n]`` (or None) zeroes each
    row's inner channels from its own width on.
    """
    intermediate = down.shape[2]
    if interleaved or width == intermediate:  # gate and up rows form one block: one GEMM
        both = torch._grouped_mm(x, gate_up[:, : 2 * width].transpose(1, 2), offs=offs)
        gate, up = (both[:, 0::2], both[:, 1::2]) if interleaved else (both[:, :width], both[:, width:])
    else:
        gate = torch._grouped_mm(x, gate_up[:, :width].transpose(1, 2), offs=offs)
        up = torch._grouped_mm(x, gate_up[:, intermediate : intermediate + width].transpose(1, 2), offs=offs)
    if gate_up_bias is not None:
        bias = gate_up_bias[experts]
        gate = gate + gate_up_rows(bias.t(), interleaved, 0).t()[:, :width]
        up = up + gate_up_rows(bias.t(), interleaved, 1).t()[:, :width]
    inner = apply_activation(gate, up, activation, alpha, limit)
    if mask_widths is not None:  # channels past the expert's width: exact zeros into the down GEMM
        inner = inner.masked_fill_(torch.arange(width, device=x.device) >= mask_widths[:, None], 0)
    out = torch._grouped_mm(inner, down[:, :, :width].transpose(1, 2), offs=offs)
    if down_bias is not None:
        out = out + down_bias[experts]
    return out


def _forward(hidden, topk_ids, topk_weights, weights, pair_widths, runs, masked, dead, ids: list[int] | None = None,
             host_widths: list[int] | None = None, guard: bool = False) -> torch.Tensor | None:
    """The pairs in ``len(runs)`` runs (run ``b`` at GEMM width ``runs[b]``, masked where
    ``masked[b]``) and, where ``dead``, the pairs of width 0, which contribute zeros.
    ``pair_widths [T*k]``: each pair's width (None: one run, unmasked). ``ids`` and
    ``host_widths``: the flat ``topk_ids`` and pair widths as lists where the host plans the call.
    ``guard``: None where the GEMMs would visit too many empty groups (:data:`EMPTY_GROUPS_PER_EXPERT`)."""
    hidden_size = hidden.shape[1]
    gate_up, down, gate_up_bias, down_bias = weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias
    activation, interleaved, alpha, limit = weights.layout
    num_experts = down.shape[0]
    live_runs = len(runs)
    num_runs = live_runs + dead
    if ids is not None:
        run_of = None if num_runs == 1 else [bisect_left(runs, w) if w else live_runs for w in host_widths]
        plan = _plan_host(topk_ids, ids, run_of, live_runs if run_of is not None else 1, num_experts)
    else:
        run_of = None
        if num_runs > 1:
            run_of = torch.bucketize(pair_widths, torch.tensor(runs, dtype=pair_widths.dtype, device=pair_widths.device))
            run_of = run_of.masked_fill_(pair_widths == 0, live_runs).view_as(topk_ids)
        plan = _plan_tensors(topk_ids, run_of, num_runs, live_runs, num_experts)
    if guard:
        gemms = [2 if interleaved or width == down.shape[2] else 3 for width in runs]
        empty = sum(g * (hi - lo + 1 - h) for g, (lo, hi), h in zip(gemms, plan.spans, plan.hit))
        if empty > EMPTY_GROUPS_PER_EXPERT * sum(plan.hit):
            return None
    x = hidden[plan.token]
    slot_weights = topk_weights.reshape(-1)[plan.order]
    y = hidden.new_empty(topk_ids.numel(), hidden_size)  # sorted rows, weighted
    start = 0
    for b, width in enumerate(runs):
        rows = slice(start, start + plan.sizes[b])
        start = rows.stop
        if rows.stop == rows.start:
            continue
        span = slice(plan.spans[b][0], plan.spans[b][1] + 1)
        experts = plan.experts[rows]
        out = _run(x[rows], plan.offs[b], experts, gate_up[span], down[span], gate_up_bias, down_bias, width,
                   pair_widths[plan.order[rows]] if masked[b] else None, activation, interleaved, alpha, limit)
        # out * weight in the weights' dtype, rounded to the hidden dtype, as the reference does
        torch.mul(out.to(slot_weights.dtype), slot_weights[rows, None], out=y[rows])
    if dead:  # removed experts contribute nothing, bias included
        y[start:].zero_()
    return plan.combine(y)  # the k slots of each token summed in slot order, as in the reference


def moe_experts_cpu(hidden, topk_ids, topk_weights, weights: ExpertWeights, widths=None, *, strategy: str | None = None,
                    host_plan: bool | None = None) -> torch.Tensor | None:
    """The op's CPU inference forward by grouped GEMMs, any widths (``[E]`` per expert, or ``[T, k]``
    per routed pair); None where grouped GEMMs do not apply (dtype, alignment, invalid widths or
    ids, no tokens, the empty-group guard), for the caller to run the reference.

    ``strategy`` forces mixed widths to ``"pad"`` (one padded run) or ``"group"`` (one run per
    width) instead of the choice by :data:`PAD_MACS_PER_RUN`; ``host_plan`` overrides
    :data:`HOST_PLAN_PAIRS`.
    """
    gate_up, down = weights.gate_up, weights.down
    num_experts, _, intermediate = down.shape
    pairs = topk_ids.numel()
    if pairs == 0 or not _eligible(hidden, gate_up, down, weights.layout.interleaved):
        return None
    per_pair = widths is not None and widths.shape == topk_ids.shape
    if widths is not None and widths.shape != (num_experts,) and not per_pair:
        return None

    def flat_pair_widths() -> torch.Tensor:  # each pair's width, in pair order (token * k + slot)
        return widths.reshape(-1) if per_pair else widths[topk_ids].reshape(-1)

    size = gate_up.element_size()
    host = pairs <= HOST_PLAN_PAIRS if host_plan is None else host_plan
    ids = topk_ids.reshape(-1).tolist() if host else None
    if ids is not None and (min(ids) < 0 or max(ids) >= num_experts):
        return None  # the reference says why
    pair_widths = host_widths = None  # each pair's width, flat: a tensor, and a list where the host plans
    if widths is None:
        pairs_at = {intermediate: pairs}
    elif per_pair and ids is not None:
        host_widths = widths.reshape(-1).tolist()
        pairs_at = Counter(host_widths)
    elif ids is not None:
        per_expert = widths.tolist()
        host_widths = [per_expert[e] for e in ids]
        pairs_at = Counter(host_widths)
    else:
        pair_widths = flat_pair_widths()
        values, counts = torch.unique(pair_widths, return_counts=True)
        pairs_at = dict(zip(values.tolist(), counts.tolist()))
    hit = sorted(pairs_at)  # the widths hit; pairs_at[w]: how many pairs each
    if hit[0] < 0 or hit[-1] > intermediate:
        return None  # the reference says why
    if len(hit) == 1 and _aligned(hit[0], size):  # one width: one unmasked run
        if hit[0] == 0:
            return hidden.new_zeros(hidden.shape)
        return _forward(hidden, topk_ids, topk_weights, weights, None, hit, [False], False, ids)
    step = 16 // size  # GEMM widths are multiples of 16 bytes
    run_at = {w: min(-(-w // step) * step, intermediate) for w in hit if w > 0}  # own width -> GEMM width
    widest = max(run_at.values())
    if not _aligned(widest, size):
        return None  # the widest would run at a misaligned intermediate size
    auto = strategy is None
    if auto and per_pair:
        # Per-pair widths (tokens at several budgets): every run spans nearly every expert, so each
        # extra run visits all their groups again. One padded run was the faster in 6 of 8 cases of
        # benchmarks/mixed_budgets.py (two shapes, 4-256 tokens; grouping won at E=64 I=768, 8 tokens).
        strategy = "pad"
    elif auto:  # pad while the multiply-adds it wastes cost less than grouping's extra runs
        wasted = 3 * hidden.shape[1] * sum(pairs_at[w] * (widest - r) for w, r in run_at.items())
        strategy = "pad" if wasted < PAD_MACS_PER_RUN * (len(set(run_at.values())) - 1) else "group"
    elif strategy not in ("pad", "group"):
        raise ValueError(f"strategy must be 'pad', 'group' or None, got {strategy!r}")
    for choice in [strategy] + (["pad"] if auto and strategy == "group" else []):
        # grouping that the empty-group guard declines may still pay as one padded run
        runs = [widest] if choice == "pad" else sorted(set(run_at.values()))
        masked = [False] * len(runs)  # a run needs the mask where it serves an expert narrower than itself
        for w in run_at:
            b = bisect_left(runs, w)
            masked[b] = masked[b] or w != runs[b]
        if pair_widths is None:  # planned on the host: the tensor only for the runs' masks
            pair_widths = flat_pair_widths()
        out = _forward(hidden, topk_ids, topk_weights, weights, pair_widths, runs, masked, hit[0] == 0, ids,
                       host_widths, guard=True)
        if out is not None:
            return out
    return None
