"""A nested artifact's engine budget on vLLM's CPU fused-MoE kernel: each switch packs the kept prefixes.

vLLM's CPU experts kernel (``cpu_fused_moe``) reads weights it has first rearranged into its own
blocked layout (``cpu_prepack_moe_weight``), with one intermediate size per call, so a prefix of the
nested weights cannot be handed to it in place. At each budget switch a nested layer therefore
copies every width bucket's kept channels (gate and up rows, down columns) into that layout and runs
the buckets as a sliced checkpoint's run (:class:`flexc.serving.buckets.BucketRouting`).

Why: on one layer of zoo ``small``'s shape (E=16, H=I=256, top-4, fp32, one thread) vLLM's kernel
took 52 / 217 / 1,259 / 8,706 us at 1 / 8 / 64 / 512 tokens against 258 / 1,677 / 3,867 / 13,729 us
for flexc's CPU op at full width (timed by hand in vLLM's environment). The cost: the engine holds
the current budget's packed experts beside the nested weights (the experts' bytes once more at keep
1.0, half of them at keep 0.5), and a switch takes the time to copy them (about 1.4 ms per layer of
``small`` at keep 0.5). Calls with a width per routed pair (budgets mixed in a batch, the adaptive
policy) run here too, on one more copy of the experts cut into 32-channel pieces
(:class:`PackedPieces`); a width off those cuts runs flexc's op on the nested weights.
``flexc_experts_kernel: flexc`` keeps flexc's op for every call (no copy, switches in microseconds);
a copy that would not fit in memory is not made (:func:`fits_in_memory`).
"""

from __future__ import annotations

import torch

from flexc.serving.buckets import VLLM_ACTIVATIONS, BucketRouting

# vLLM's CPU experts classes want hidden and intermediate sizes that are multiples of this; a bucket
# narrower than a multiple is zero-padded as vLLM pads its own (zero gate/up rows and down columns add 0).
ALIGN = 32


def cpu_kernel_isa(dtype: torch.dtype, hidden: int, activation: str, device: torch.device) -> str | None:
    """The instruction set vLLM's CPU experts kernel runs a layer with on this machine (as vLLM's own
    choice of experts class makes it: AMX for bf16 where the CPU has tiles, else its portable vector
    kernel), or None where it cannot run the layer (no vLLM CPU build, not on CPU, an activation or a
    hidden size it lacks)."""
    if device.type != "cpu" or activation not in VLLM_ACTIVATIONS or hidden % ALIGN:
        return None
    try:
        from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight  # noqa: F401 -- present in CPU builds
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import X86CPUUnquantizedExperts
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if not current_platform.is_cpu():
        return None
    if dtype == torch.bfloat16 and X86CPUUnquantizedExperts._supports_current_device():
        return X86CPUUnquantizedExperts.isa
    return "vec"


# A packed copy is made only while it takes at most this share of the memory available to it (what the
# system reports free plus the copy it replaces): the engine's KV cache and activations need the rest.
MEMORY_SHARE = 0.5


def packed_nbytes(widths: list[int], hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one layer's experts at ``widths`` packed for vLLM's CPU kernel (:class:`PackedLayer`)."""
    return sum(3 * -(-int(w) // ALIGN) * ALIGN * hidden for w in widths if w > 0) * \
        torch.empty((), dtype=dtype).element_size()


def fits_in_memory(needed: int, held: int) -> bool:
    """Whether a packed copy of ``needed`` bytes, replacing ``held`` bytes of copies, leaves the engine room
    (:data:`MEMORY_SHARE`); true where the available memory cannot be read."""
    try:
        import psutil
    except ImportError:
        return True
    return needed <= MEMORY_SHARE * (psutil.virtual_memory().available + held)


class PackedBucket:
    """One width bucket's experts in vLLM's CPU layout: ``w13 [n, 2w, H]`` and ``w2 [n, H, w]`` packed."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, isa: str, activation: str):
        from vllm._custom_ops import cpu_prepack_moe_weight

        self.w13 = cpu_prepack_moe_weight(w13.contiguous(), isa)
        self.w2 = cpu_prepack_moe_weight(w2.contiguous(), isa)
        self.isa, self.activation = isa, VLLM_ACTIVATIONS[activation]

    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def takes_any_k(self) -> bool:
        return True  # the kernel reads k from the ids

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from vllm._custom_ops import cpu_fused_moe

        if weights.dtype != torch.float32 or not weights.is_contiguous():
            weights = weights.float().contiguous()
        if ids.dtype != torch.int32 or not ids.is_contiguous():
            ids = ids.to(torch.int32).contiguous()
        out = torch.empty_like(x)
        cpu_fused_moe(out, x.contiguous(), self.w13, self.w2, None, None, weights, ids, self.activation, self.isa,
                      False)
        return out

    __call__ = forward


class PackedLayer:
    """One nested layer's experts at fixed ``widths`` on vLLM's CPU kernel: its buckets' kept prefixes,
    copied out of ``gate_up [E, 2I, H]`` (gate rows then up rows) and ``down [E, H, I]``.

    ``source[i]``: the nested expert whose prefix expert ``i`` of this layer is (default ``i``; several
    entries may name one expert at different widths, :class:`PackedWidths`)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, widths: list[int], top_k: int, isa: str,
                 activation: str, source: list[int] | None = None):
        self.routing = BucketRouting(widths, top_k).to(down.device)
        capacity = down.shape[2]
        source = list(range(len(widths))) if source is None else source
        self.kernels = []
        with torch.no_grad():
            for width, ids in self.routing.buckets:
                padded = -(-width // ALIGN) * ALIGN
                index = torch.tensor([source[i] for i in ids], device=down.device)
                gate, up = gate_up[index, :width], gate_up[index, capacity:capacity + width]
                w2 = down[index, :, :width]
                if padded > width:  # zero channels: silu(0) * 0 = 0 (gelu likewise), and zero down columns
                    gate, up = (torch.nn.functional.pad(t, (0, 0, 0, padded - width)) for t in (gate, up))
                    w2 = torch.nn.functional.pad(w2, (0, padded - width))
                self.kernels.append(PackedBucket(torch.cat([gate, up], dim=1), w2, isa, activation))

    def nbytes(self) -> int:
        return sum(k.nbytes() for k in self.kernels)

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.routing(self.kernels, hidden, topk_ids, topk_weights)


def piece_cuts(widths: list[int], capacity: int) -> list[int]:
    """Where one expert of :class:`PackedPieces` is cut: every :data:`ALIGN` channels, and at each of
    ``widths`` (the expert's widths in the tables) that falls between."""
    return sorted(set(range(ALIGN, capacity, ALIGN)) | {capacity} | {int(w) for w in widths if 0 < w < capacity})


def pieces_nbytes(rows: list[list[int]], capacity: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one layer's :class:`PackedPieces` for the tables ``rows`` (one more piece: the zero one)."""
    pieces = 1 + sum(len(piece_cuts([row[e] for row in rows], capacity)) for e in range(len(rows[0])))
    return pieces * 3 * ALIGN * hidden * torch.empty((), dtype=dtype).element_size()


class PackedPieces:
    """One nested layer's experts cut into pieces of :data:`ALIGN` channels (:func:`piece_cuts`), each packed
    for vLLM's CPU kernel as an expert of its own. An expert's FFN is a sum over its channels, so a routed
    pair at width ``w`` runs as its expert's pieces below ``w`` at the pair's routing weight: a call whose
    pairs each take any width on the cuts (budgets mixed in a batch, an adaptive policy's widths) is one
    kernel call, each piece read once however many budgets share it, and memory is one copy of the
    experts. (Dearer than :class:`PackedLayer` at one width: more, narrower GEMMs; measured in
    docs/serving.md.)"""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, rows: list[list[int]], isa: str, activation: str):
        experts, capacity = down.shape[0], down.shape[2]
        source, starts, ends = [], [], []
        below = torch.full((experts, capacity + 1), -1, dtype=torch.long)  # (expert, width) -> its pieces below it
        first = torch.zeros(experts, dtype=torch.long)  # each expert's first piece (its pieces are consecutive)
        for e in range(experts):
            first[e], below[e, 0], start = len(source), 0, 0
            for cut in piece_cuts([row[e] for row in rows], capacity):
                source.append(e), starts.append(start), ends.append(cut)
                below[e, cut] = len(source) - int(first[e])
                start = cut
        self.zero = len(source)  # an all-zero piece: pads each token's list of pieces
        channel = torch.tensor(starts)[:, None] + torch.arange(ALIGN)
        inside = (channel < torch.tensor(ends)[:, None]).to(down.dtype)
        channel = channel.clamp_max(capacity - 1).to(down.device)
        inside, index = inside.to(down.device), torch.tensor(source, device=down.device)[:, None]
        with torch.no_grad():
            gate = gate_up[index, channel] * inside[..., None]
            up = gate_up[index, capacity + channel] * inside[..., None]
            w2 = down[index, :, channel].transpose(1, 2) * inside[:, None, :]
            w13 = torch.cat([gate, up], dim=1)
            self.kernel = PackedBucket(torch.cat([w13, w13.new_zeros(1, *w13.shape[1:])]),
                                       torch.cat([w2, w2.new_zeros(1, *w2.shape[1:])]), isa, activation)
        self.below, self.first = below.to(down.device), first.to(down.device)

    def nbytes(self) -> int:
        return self.kernel.nbytes()

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 widths: torch.Tensor) -> torch.Tensor | None:
        """The experts with each routed pair at ``widths`` (``[T, k]``, or ``[E]`` per expert); None when a
        pair's width is not on the cuts (the caller runs flexc's op)."""
        pair_widths = widths[topk_ids] if widths.dim() == 1 else widths
        counts = self.below[topk_ids, pair_widths.long()]  # [T, k]
        low, high = torch.stack(torch.aminmax(counts)).tolist() if counts.numel() else (0, 0)
        if low < 0:
            return None
        if high == 0:
            return torch.zeros_like(hidden)
        step = torch.arange(high, device=counts.device)
        used = step < counts[..., None]  # [T, k, high]: each pair's pieces, then padding
        ids = torch.where(used, self.first[topk_ids][..., None] + step, self.zero).flatten(1)
        weights = torch.where(used, topk_weights[..., None].float(), 0.0).flatten(1)
        return self.kernel(hidden, weights, ids)
