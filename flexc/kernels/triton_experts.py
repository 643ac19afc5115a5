"""Triton kernels for the routed experts of one MoE layer, with per-expert or per-pair widths.

Semantics are those of ``torch.ops.flexc.moe_experts`` (see ``flexc/ir/op.py``): expert ``e``
uses only its first ``widths[e]`` intermediate channels; width 0 contributes nothing, bias
included. ``widths`` is a device ``int32`` tensor read by the kernels at run time, so changing
it never recompiles anything and a captured CUDA graph stays valid.

Two paths, chosen per batch bucket by a :class:`KernelConfig`:

``grouped`` (prefill and larger decode batches)
    1. ``_count_kernel`` / ``_scan_kernel`` / ``_place_kernel``: a counting sort of the
       ``T*k`` (token, slot) pairs by expert, on the device, with fixed-size outputs (no host
       synchronisation): ``order`` (sorted position -> pair) and a small ``meta`` table (segment
       start, count and cumulative block count per expert). Each expert's segment is cut into
       blocks of ``BLOCK_M`` rows; the GEMM grids are sized by the static upper bound
       ``cdiv(T*k, BLOCK_M) + min(E, T*k)`` and surplus programs exit at once.
    2. ``_gate_up_kernel``: gathers token rows, runs the gate and up GEMMs with two
       accumulators (one accumulator over ``2*BLOCK_N`` adjacent rows for interleaved layouts,
       split in the epilogue), adds biases, applies the gated activation and stores the
       ``[T*k, I]`` intermediate in sorted order. Column blocks at or past ``widths[e]`` exit
       before reading a byte of weights.
    3. ``_down_kernel``: the down GEMM whose reduction loop stops at ``widths[e]``; bias and
       routing weight in the epilogue; writes one row per (token, slot).
    4. a sum over the ``k`` slots (``torch.sum``; deterministic, no floating-point atomics).

``gemv`` (small decode batches, where sorting costs more than it saves)
    1. ``_gemv_gate_up_kernel``: one program per (pair, column block), no sorting at all.
    2. ``_gemv_down_kernel``: one program per (token, row block) looping over the token's
       ``k`` slots in order (the reduction over slots happens in registers, deterministic), or
       one per (pair, row block) followed by the slot sum (``split_slots``).

Weights may be arbitrary strided views (e.g. the transposed views of GPT-OSS); every kernel
takes all strides. Token-count arguments are never specialised, so a new batch size does not
compile anything new either; only a new block configuration does.

This module imports nothing from flexc, so its source can be written into an artifact as is
(see :mod:`flexc.kernels.specialize`). Whether the kernels run compiled or in Triton's
interpreter is decided when this module is imported (``TRITON_INTERPRET=1``), as with any
Triton code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_clamped": 4}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block configuration of one forward.

    ``path`` is ``"grouped"`` or ``"gemv"``. Fields ``*1`` belong to the gate/up kernel,
    ``*2`` to the down kernel; ``gv_*`` to the gemv path. ``tma1``/``tma2``: the grouped kernels read
    weights through tensor descriptors (Hopper's bulk copy engine) where the weights'
    last dimension is contiguous; other layouts fall back to pointer loads.
    """

    path: str = "grouped"
    block_m: int = 64
    block_n1: int = 64
    block_k1: int = 64
    warps1: int = 4
    stages1: int = 3
    block_n2: int = 64
    block_k2: int = 64
    warps2: int = 4
    stages2: int = 3
    group_m: int = 8
    gv_block_n1: int = 16
    gv_block_k1: int = 256
    gv_warps1: int = 4
    gv_block_n2: int = 16
    gv_block_k2: int = 256
    gv_warps2: int = 4
    split_slots: bool = False
    tma1: bool = False
    tma2: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown kernel config keys {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> KernelConfig:
        return dataclasses.replace(self, **kw)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Device-side routing: counting sort of (token, slot) pairs by expert.


@triton.jit(do_not_specialize=["P"])
def _count_kernel(ids_ptr, counts_ptr, P, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """counts[c, e] = pairs of chunk ``c`` routed to expert ``e``."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    experts = tl.arange(0, E_PAD)
    hits = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + c * E_PAD + experts, tl.sum(hits, axis=0))


@triton.jit(do_not_specialize=["n_chunks"])
def _scan_kernel(counts_ptr, meta_ptr, n_chunks, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Turns per-chunk counts into per-chunk bases (in place) and the per-expert meta table.

    meta[0:E_PAD]        first sorted position of each expert's segment
    meta[E_PAD:2E_PAD]   pairs routed to each expert
    meta[2E_PAD:3E_PAD]  cumulative number of BLOCK_M blocks up to and including the expert
    """
    experts = tl.arange(0, E_PAD)
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for c in range(n_chunks):
        cnt = tl.load(counts_ptr + c * E_PAD + experts)
        tl.store(counts_ptr + c * E_PAD + experts, running)
        running += cnt
    running = tl.where(experts < E, running, 0)
    seg_start = tl.cumsum(running, axis=0) - running
    blocks = (running + BLOCK_M - 1) // BLOCK_M
    tl.store(meta_ptr + experts, seg_start)
    tl.store(meta_ptr + E_PAD + experts, running)
    tl.store(meta_ptr + 2 * E_PAD + experts, tl.cumsum(blocks, axis=0))


@triton.jit(do_not_specialize=["P"])
def _place_kernel(ids_ptr, counts_ptr, meta_ptr, order_ptr, P, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """order[seg_start[e] + earlier pairs of e] = pair, stable in pair order."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    valid = offs < P
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1)
    j = tl.arange(0, CHUNK)
    same_before = (ids[:, None] == ids[None, :]) & (j[None, :] < j[:, None])
    rank = tl.sum(same_before.to(tl.int32), axis=1)
    safe = tl.where(valid, ids, 0)
    base = tl.load(counts_ptr + c * E_PAD + safe, mask=valid, other=0)
    start = tl.load(meta_ptr + safe, mask=valid, other=0)
    tl.store(order_ptr + start + base + rank, offs, mask=valid)


# --------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _gated_activation(g, u, ACT: tl.constexpr, alpha, limit):
    """act(g) * u in fp32 (codes as in ``ACT_CODES``)."""
    if ACT == 0:
        out = g / (1.0 + tl.exp(-g)) * u
    elif ACT == 1:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        out = 0.5 * g * (1.0 + th) * u
    elif ACT == 3:
        out = tl.maximum(g, 0.0) * u
    else:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        out = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
    return out


@triton.jit
def _block_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering of a 1-D grid (neighbouring programs share weight and token tiles)."""
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    return pid_m, pid_n


@triton.jit
def _expert_of_block(meta_ptr, pid_m, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row, end row) of row block ``pid_m``; expert == E when past the last."""
    experts = tl.arange(0, E_PAD)
    blk_end = tl.load(meta_ptr + 2 * E_PAD + experts, mask=experts < E, other=2147483647)
    e = tl.sum((blk_end <= pid_m).to(tl.int32), axis=0)
    safe = tl.minimum(e, E - 1)
    start = tl.load(meta_ptr + safe)
    count = tl.load(meta_ptr + E_PAD + safe)
    first_blk = tl.load(meta_ptr + 2 * E_PAD + safe) - (count + BLOCK_M - 1) // BLOCK_M
    row0 = start + (pid_m - first_blk) * BLOCK_M
    return e, row0, start + count


# --------------------------------------------------------------------------------------------
# Grouped path


@triton.jit(do_not_specialize=["num_m"])
def _gate_up_kernel(
    x_ptr, order_ptr, meta_ptr, w_ptr, w_desc, b_ptr, widths_ptr, inter_ptr,
    num_m, E,
    stride_xt, stride_xh,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    alpha, limit,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, E_PAD: tl.constexpr,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MASK_W: tl.constexpr, USE_TMA: tl.constexpr, PAIR_W: tl.constexpr,
):
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _block_of(tl.program_id(0), num_m, num_n, GROUP_M)
    e, row0, row_end = _expert_of_block(meta_ptr, pid_m, E, BLOCK_M, E_PAD)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
    if PAIR_W:  # the block runs to its widest row; the down kernel stops each row at its own width
        width = tl.max(tl.minimum(tl.maximum(tl.load(widths_ptr + pair, mask=row_ok, other=0), 0), I), axis=0)
    else:
        width = tl.minimum(tl.maximum(tl.load(widths_ptr + e), 0), I)
    n0 = pid_n * BLOCK_N
    if n0 >= width:
        return

    tok = (pair // TOPK).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_base = w_ptr + e.to(tl.int64) * stride_we

    if INTERLEAVED:
        # gate row c = 2c, up row c = 2c + 1: one tile of 2*BLOCK_N adjacent rows.
        wrows = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        wrows_ok = wrows < 2 * I
        read_ok = wrows < 2 * width  # rows past the width are never read
        wrows = tl.where(wrows_ok, wrows, 0)
        b_ptrs = w_base + wrows[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if USE_TMA:  # weights [E, 2I, H] through a descriptor, block [1, 2*BLOCK_N, BLOCK_K]
                if H % BLOCK_K == 0:
                    a = tl.load(a_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=((k0 + offs_k) < H)[None, :], other=0.0)
                b = tl.trans(tl.reshape(w_desc.load([e, 2 * n0, k0]), (2 * BLOCK_N, BLOCK_K)))
            elif H % BLOCK_K == 0:
                a = tl.load(a_ptrs)
                if MASK_W:
                    b = tl.load(b_ptrs, mask=read_ok[None, :], other=0.0)
                else:
                    b = tl.load(b_ptrs)
            else:
                k_ok = (k0 + offs_k) < H
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & read_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K * stride_xh
            b_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + wrows * stride_bn, mask=wrows_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        cols = n0 + tl.arange(0, BLOCK_N)
        cols_ok = cols < I
        read_ok = cols < width  # channels past the width are never read
        cols = tl.where(cols_ok, cols, 0)
        g_ptrs = w_base + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if USE_TMA:  # weights [E, 2I, H] through a descriptor, block [1, BLOCK_N, BLOCK_K]
                if H % BLOCK_K == 0:
                    a = tl.load(a_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=((k0 + offs_k) < H)[None, :], other=0.0)
                bg = tl.trans(tl.reshape(w_desc.load([e, n0, k0]), (BLOCK_N, BLOCK_K)))
                bu = tl.trans(tl.reshape(w_desc.load([e, I + n0, k0]), (BLOCK_N, BLOCK_K)))
            elif H % BLOCK_K == 0:
                a = tl.load(a_ptrs)
                if MASK_W:
                    bg = tl.load(g_ptrs, mask=read_ok[None, :], other=0.0)
                    bu = tl.load(u_ptrs, mask=read_ok[None, :], other=0.0)
                else:
                    bg = tl.load(g_ptrs)
                    bu = tl.load(u_ptrs)
            else:
                k_ok = (k0 + offs_k) < H
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                bg = tl.load(g_ptrs, mask=k_ok[:, None] & read_ok[None, :], other=0.0)
                bu = tl.load(u_ptrs, mask=k_ok[:, None] & read_ok[None, :], other=0.0)
            acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K * stride_xh
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            b_base = b_ptr + e.to(tl.int64) * stride_be
            acc_g += tl.load(b_base + cols * stride_bn, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_base + (cols + I) * stride_bn, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        g = acc_g
        u = acc_u

    h = _gated_activation(g, u, ACT, alpha, limit)
    out_cols = n0 + tl.arange(0, BLOCK_N)
    out_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * I + out_cols[None, :]
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & (out_cols < I)[None, :])


@triton.jit(do_not_specialize=["num_m", "P"])
def _down_kernel(
    inter_ptr, order_ptr, meta_ptr, w_ptr, w_desc, b_ptr, widths_ptr, rw_ptr, out_ptr,
    num_m, E, P,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    H: tl.constexpr, I: tl.constexpr, E_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, PAIR_W: tl.constexpr,
):
    num_n = tl.cdiv(H, BLOCK_N)
    pid_m, pid_n = _block_of(tl.program_id(0), num_m, num_n, GROUP_M)
    e, row0, row_end = _expert_of_block(meta_ptr, pid_m, E, BLOCK_M, E_PAD)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
    if PAIR_W:  # each row's own width: its channels past it meet zeros in `a`, its bias only if it has any
        row_w = tl.minimum(tl.maximum(tl.load(widths_ptr + pair, mask=row_ok, other=0), 0), I)
        width = tl.max(row_w, axis=0)
    else:
        width = tl.minimum(tl.maximum(tl.load(widths_ptr + e), 0), I)
        row_w = tl.zeros([BLOCK_M], dtype=tl.int32) + width
    rows_ld = tl.where(row_ok, rows, row0).to(tl.int64)  # always a real row: loads need no row mask
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < H
    cols_ld = tl.where(cols_ok, cols, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows_ld[:, None] * I + offs_k[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols_ld[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n0 = pid_n * BLOCK_N
    for k0 in range(0, width, BLOCK_K):
        k_ok = (k0 + offs_k) < width
        if PAIR_W:
            a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < row_w[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if USE_TMA:  # down [E, H, I] through a descriptor; channels past the width meet zeros in `a`
            b = tl.trans(tl.reshape(w_desc.load([e, n0, k0]), (BLOCK_N, BLOCK_K)))
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols_ld * stride_bn, mask=cols_ok, other=0.0)
        acc += tl.where((row_w > 0)[:, None], bias.to(tl.float32)[None, :], 0.0)
    rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & cols_ok[None, :])


# --------------------------------------------------------------------------------------------
# GEMV path (no sorting)


@triton.jit
def _gemv_gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, b_ptr, widths_ptr, inter_ptr,
    stride_xt, stride_xh,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    alpha, limit,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr,
    ACT: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASK_W: tl.constexpr, PAIR_W: tl.constexpr,
):
    p = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    e = tl.load(ids_ptr + p)
    width = tl.minimum(tl.maximum(tl.load(widths_ptr + (p if PAIR_W else e)), 0), I)
    if n0 >= width:
        return
    tok = (p // TOPK).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok * stride_xt + offs_k * stride_xh
    w_base = w_ptr + e.to(tl.int64) * stride_we
    if INTERLEAVED:
        wrows = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        wrows_ok = wrows < 2 * I
        read_ok = wrows < 2 * width
        wrows = tl.where(wrows_ok, wrows, 0)
        w_ptrs = w_base + wrows[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.zeros([2 * BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if H % BLOCK_K == 0:
                x = tl.load(x_ptrs)
                if MASK_W:
                    w = tl.load(w_ptrs, mask=read_ok[:, None], other=0.0)
                else:
                    w = tl.load(w_ptrs)
            else:
                k_ok = (k0 + offs_k) < H
                x = tl.load(x_ptrs, mask=k_ok, other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[None, :] & read_ok[:, None], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            x_ptrs += BLOCK_K * stride_xh
            w_ptrs += BLOCK_K * stride_wk
        gu = tl.sum(acc, axis=1)
        if HAS_BIAS:
            gu += tl.load(b_ptr + e.to(tl.int64) * stride_be + wrows * stride_bn, mask=wrows_ok, other=0.0).to(tl.float32)
        g, u = tl.split(tl.reshape(gu, (BLOCK_N, 2)))
    else:
        cols = n0 + tl.arange(0, BLOCK_N)
        cols_ok = cols < I
        read_ok = cols < width
        cols = tl.where(cols_ok, cols, 0)
        g_ptrs = w_base + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if H % BLOCK_K == 0:
                x = tl.load(x_ptrs)
                if MASK_W:
                    wg = tl.load(g_ptrs, mask=read_ok[:, None], other=0.0)
                    wu = tl.load(u_ptrs, mask=read_ok[:, None], other=0.0)
                else:
                    wg = tl.load(g_ptrs)
                    wu = tl.load(u_ptrs)
            else:
                k_ok = (k0 + offs_k) < H
                x = tl.load(x_ptrs, mask=k_ok, other=0.0)
                wg = tl.load(g_ptrs, mask=k_ok[None, :] & read_ok[:, None], other=0.0)
                wu = tl.load(u_ptrs, mask=k_ok[None, :] & read_ok[:, None], other=0.0)
            xf = x.to(tl.float32)[None, :]
            acc_g += wg.to(tl.float32) * xf
            acc_u += wu.to(tl.float32) * xf
            x_ptrs += BLOCK_K * stride_xh
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        if HAS_BIAS:
            b_base = b_ptr + e.to(tl.int64) * stride_be
            g += tl.load(b_base + cols * stride_bn, mask=cols_ok, other=0.0).to(tl.float32)
            u += tl.load(b_base + (cols + I) * stride_bn, mask=cols_ok, other=0.0).to(tl.float32)
    h = _gated_activation(g, u, ACT, alpha, limit)
    out_cols = n0 + tl.arange(0, BLOCK_N)
    tl.store(inter_ptr + p.to(tl.int64) * I + out_cols, h.to(inter_ptr.dtype.element_ty), mask=out_cols < I)


@triton.jit
def _gemv_down_kernel(
    inter_ptr, ids_ptr, rw_ptr, w_ptr, b_ptr, widths_ptr, out_ptr,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr,
    SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_W: tl.constexpr,
):
    """Program (row block, r): r is a token (SLOTS == TOPK, slots summed here in order) or a
    pair (SLOTS == 1, one output row per pair)."""
    r = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < H
    cols_ld = tl.where(cols_ok, cols, 0)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SLOTS):
        p = r * SLOTS + s
        e = tl.load(ids_ptr + p)
        width = tl.minimum(tl.maximum(tl.load(widths_ptr + (p if PAIR_W else e)), 0), I)
        rw = tl.load(rw_ptr + p).to(tl.float32)
        a_ptrs = inter_ptr + p.to(tl.int64) * I + offs_k
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols_ld[:, None] * stride_wn + offs_k[None, :] * stride_wk
        part = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):
            k_ok = (k0 + offs_k) < width
            a = tl.load(a_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            part += w.to(tl.float32) * a.to(tl.float32)[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        y = tl.sum(part, axis=1)
        if HAS_BIAS:
            bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols_ld * stride_bn, mask=cols_ok, other=0.0)
            y += tl.where(width > 0, bias.to(tl.float32), 0.0)
        acc += y * rw
    tl.store(out_ptr + r.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols_ok)


# --------------------------------------------------------------------------------------------
# Host side

_ROUTE_CHUNK = 128


def _flat_ids(topk_ids: torch.Tensor) -> torch.Tensor:
    """The ``[T*k]`` expert ids as the kernels read them: int32 or int64 as given (no cast kernel)."""
    ids = topk_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int32)
    return ids.contiguous()


def route(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Counting sort of the (token, slot) pairs by expert, on the device, no host sync.

    ``topk_ids`` may be int32 or int64. Returns ``order`` (``[T*k]`` int32: sorted position -> pair
    index), ``meta`` (see
    ``_scan_kernel``) and the static upper bound on the number of ``block_m`` row blocks.
    """
    device = topk_ids.device
    ids = _flat_ids(topk_ids)
    P = ids.numel()
    e_pad = max(16, _next_pow2(num_experts))
    n_chunks = triton.cdiv(P, _ROUTE_CHUNK)
    counts = torch.empty(n_chunks * e_pad, dtype=torch.int32, device=device)
    meta = torch.empty(3 * e_pad, dtype=torch.int32, device=device)
    order = torch.empty(P, dtype=torch.int32, device=device)
    _count_kernel[(n_chunks,)](ids, counts, P, E_PAD=e_pad, CHUNK=_ROUTE_CHUNK, num_warps=4)
    _scan_kernel[(1,)](counts, meta, n_chunks, num_experts, BLOCK_M=block_m, E_PAD=e_pad, num_warps=4)
    _place_kernel[(n_chunks,)](ids, counts, meta, order, P, E_PAD=e_pad, CHUNK=_ROUTE_CHUNK, num_warps=4)
    max_blocks = triton.cdiv(P, block_m) + min(num_experts, P)
    return order, meta, max_blocks


def _check(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths, activation):
    if activation not in ACT_CODES:
        raise ValueError(f"unknown expert activation {activation!r}; expected one of {tuple(ACT_CODES)}")
    if hidden.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError("expected hidden [T, H], gate_up [E, 2I, H], down [E, H, I]")
    T, H = hidden.shape
    E, two_i, H2 = gate_up.shape
    if H2 != H or two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} must be [T, k]")
    if gate_up_bias is not None and tuple(gate_up_bias.shape) != (E, two_i):
        raise ValueError(f"gate_up_bias must be [E, 2I], got {tuple(gate_up_bias.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (E, H):
        raise ValueError(f"down_bias must be [E, H], got {tuple(down_bias.shape)}")
    if widths is not None and tuple(widths.shape) not in ((E,), tuple(topk_ids.shape)):
        raise ValueError(f"widths must be [E] or [T, k] like topk_ids, got {tuple(widths.shape)}")
    if gate_up.dtype != down.dtype:
        raise ValueError(f"gate_up ({gate_up.dtype}) and down ({down.dtype}) must share a dtype")


def default_config(num_experts: int, top_k: int, num_tokens: int, interpret: bool = False) -> KernelConfig:
    """Heuristic block configuration (used when no tuned table entry exists)."""
    pairs = num_tokens * top_k
    if interpret:  # the interpreter's cost is per program and per op: few, small blocks
        return KernelConfig(path="grouped", block_m=16, block_n1=32, block_k1=32, block_n2=32, block_k2=32,
                            group_m=4, gv_block_n1=16, gv_block_k1=32, gv_block_n2=16, gv_block_k2=32)
    per_expert = pairs / max(1, num_experts)
    if pairs <= 16:
        return KernelConfig(path="gemv", gv_block_n1=16, gv_block_k1=256, gv_warps1=4,
                            gv_block_n2=16, gv_block_k2=256, gv_warps2=4, split_slots=True)
    if per_expert <= 16:
        return KernelConfig(block_m=16, block_n1=64, block_k1=128, warps1=4, stages1=4,
                            block_n2=64, block_k2=128, warps2=4, stages2=4, group_m=1)
    if per_expert <= 64:
        return KernelConfig(block_m=64, block_n1=64, block_k1=64, warps1=4, stages1=4,
                            block_n2=128, block_k2=64, warps2=4, stages2=4, group_m=8)
    return KernelConfig(block_m=128, block_n1=128, block_k1=64, warps1=8, stages1=3,
                        block_n2=128, block_k2=64, warps2=8, stages2=4, group_m=8)


def _descriptor(w: torch.Tensor, block_rows: int, block_k: int):
    """A tensor descriptor over a ``[E, R, K]`` weight with block ``[1, block_rows, block_k]``,
    or None where the layout does not allow one (last dim not contiguous, misaligned, no TMA)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    if w.stride(2) != 1 or w.data_ptr() % 16 or any((st * w.element_size()) % 16 for st in w.stride()[:2]):
        return None
    if w.device.type == "cuda" and torch.cuda.get_device_capability(w.device)[0] < 9:
        return None
    return TensorDescriptor(w, list(w.shape), list(w.stride()), [1, block_rows, block_k])


def _mask_w(granule: int | None, block_n: int) -> bool:
    return not granule or granule % block_n != 0


def moe_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    widths: torch.Tensor | None = None,
    activation: str = "silu",
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    config: KernelConfig | None = None,
    granule: int | None = None,
) -> torch.Tensor:
    """The op's forward through the Triton kernels (positional signature of the op, plus ``config``).

    No host synchronisation: CUDA-graph capturable. ``widths`` (``[E]`` per expert, or ``[T, k]`` per
    routed pair) values are clamped to ``[0, I]`` on the device; ``topk_ids`` must lie in ``[0, E)``. ``granule`` (optional) promises that
    every width is a multiple of it; where it is a multiple of the gate/up column block, the
    kernels skip the per-row width masks (correct either way: the promise only saves work).
    """
    _check(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths, activation)
    T, H = hidden.shape
    E = gate_up.shape[0]
    I = down.shape[2]
    k = topk_ids.shape[1]
    out_dtype = hidden.dtype
    device = hidden.device
    if T == 0:
        return hidden.new_empty((0, H))
    x = hidden if hidden.dtype == gate_up.dtype else hidden.to(gate_up.dtype)
    pair_w = widths is not None and widths.dim() == 2
    if widths is None:
        widths = torch.full((E,), I, dtype=torch.int32, device=device)
    elif widths.dtype != torch.int32 or widths.device != device:
        widths = widths.to(device=device, dtype=torch.int32)
    widths = widths.reshape(-1).contiguous()  # per pair: [T*k], in pair order
    rw = topk_weights.reshape(-1).contiguous()
    if config is None:
        config = default_config(E, k, T, interpret=device.type == "cpu")
    act = ACT_CODES[activation]
    has_bias_gu = gate_up_bias is not None
    has_bias_d = down_bias is not None
    gub = gate_up_bias if has_bias_gu else gate_up  # dummy pointer when absent
    db = down_bias if has_bias_d else down
    gub_strides = (gate_up_bias.stride(0), gate_up_bias.stride(1)) if has_bias_gu else (0, 0)
    db_strides = (down_bias.stride(0), down_bias.stride(1)) if has_bias_d else (0, 0)
    dot_prec = "ieee" if x.dtype == torch.float32 else "tf32"
    P = T * k
    inter = torch.empty((P, I), dtype=x.dtype, device=device)

    if config.path == "gemv":
        ids = _flat_ids(topk_ids)
        bn1 = config.gv_block_n1
        _gemv_gate_up_kernel[(P, triton.cdiv(I, bn1))](
            x, ids, gate_up, gub, widths, inter,
            x.stride(0), x.stride(1), *gate_up.stride(), *gub_strides,
            float(alpha), float(limit),
            H=H, I=I, TOPK=k, ACT=act, INTERLEAVED=bool(interleaved), HAS_BIAS=has_bias_gu,
            BLOCK_N=bn1, BLOCK_K=config.gv_block_k1, MASK_W=_mask_w(granule, bn1), PAIR_W=pair_w,
            num_warps=config.gv_warps1,
        )
        split = config.split_slots and k > 1
        out = torch.empty((P if split else T, H), dtype=out_dtype, device=device)
        bn2 = config.gv_block_n2
        _gemv_down_kernel[(triton.cdiv(H, bn2), P if split else T)](
            inter, ids, rw, down, db, widths, out,
            *down.stride(), *db_strides,
            H=H, I=I, TOPK=k, SLOTS=1 if split else k, HAS_BIAS=has_bias_d,
            BLOCK_N=bn2, BLOCK_K=config.gv_block_k2, PAIR_W=pair_w, num_warps=config.gv_warps2,
        )
        if split:
            out = out.view(T, k, H).sum(dim=1)
        return out

    bm = config.block_m
    gu_desc = d_desc = None
    if config.tma1:
        gu_desc = _descriptor(gate_up, config.block_n1 * (2 if interleaved else 1), config.block_k1)
    if config.tma2:
        d_desc = _descriptor(down, config.block_n2, config.block_k2)
    order, meta, max_blocks = route(topk_ids, E, bm)
    e_pad = meta.numel() // 3
    bn1 = config.block_n1
    _gate_up_kernel[(max_blocks * triton.cdiv(I, bn1),)](
        x, order, meta, gate_up, gu_desc, gub, widths, inter,
        max_blocks, E,
        x.stride(0), x.stride(1), *gate_up.stride(), *gub_strides,
        float(alpha), float(limit),
        H=H, I=I, TOPK=k, E_PAD=e_pad, ACT=act, INTERLEAVED=bool(interleaved), HAS_BIAS=has_bias_gu,
        DOT_PREC=dot_prec, BLOCK_M=bm, BLOCK_N=bn1, BLOCK_K=config.block_k1, GROUP_M=config.group_m,
        MASK_W=_mask_w(granule, bn1), USE_TMA=gu_desc is not None, PAIR_W=pair_w, num_warps=config.warps1,
        num_stages=config.stages1,
    )
    out_pairs = torch.empty((P, H), dtype=out_dtype, device=device)
    bn2 = config.block_n2
    _down_kernel[(max_blocks * triton.cdiv(H, bn2),)](
        inter, order, meta, down, d_desc, db, widths, rw, out_pairs,
        max_blocks, E, P,
        *down.stride(), *db_strides,
        H=H, I=I, E_PAD=e_pad, HAS_BIAS=has_bias_d, DOT_PREC=dot_prec,
        BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=config.block_k2, GROUP_M=config.group_m,
        USE_TMA=d_desc is not None, PAIR_W=pair_w, num_warps=config.warps2, num_stages=config.stages2,
    )
    if k == 1:
        return out_pairs
    return out_pairs.view(T, k, H).sum(dim=1)


def weight_bytes_read(widths: torch.Tensor | None, topk_ids: torch.Tensor, hidden_size: int, intermediate: int,
                      element_size: int) -> int:
    """Bytes of expert weights a forward must read: 3*H*width per distinct expert hit (host-side helper)."""
    hit = torch.unique(topk_ids.reshape(-1)).cpu()
    if widths is None:
        w = torch.full((int(hit.max()) + 1 if hit.numel() else 0,), intermediate)
    else:
        w = widths.detach().cpu().clamp(0, intermediate)
    return int(sum(3 * hidden_size * int(w[e]) for e in hit.tolist())) * element_size


__all__ = ["ACT_CODES", "KernelConfig", "default_config", "moe_forward", "route", "weight_bytes_read"]
