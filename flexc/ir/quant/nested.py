"""Quantizing one MoE layer's expert weights so that every budget stays a prefix of the same codes.

Weights are ``[E, rows, cols]`` with ``cols`` the input dimension (``gate_up``: hidden; ``down``:
intermediate channels, ranked most important first). Scales are per group of ``group_size``
consecutive input columns of each row (compressed-tensors' ``group`` strategy; its scale formula
and integer range are used, so the codes are the ones its formats store).

- :func:`quantize_rtn`: round to nearest. A row's codes depend only on that row's groups, so a
  budget that keeps a prefix of whole groups gets exactly the codes of its own sliced weights.
- :func:`quantize_gptq`: GPTQ-style error compensation (Frantar et al., arXiv 2210.17323): columns
  are quantized in order and each one's rounding error is spread over the columns not yet
  quantized, weighted by the inverse Hessian of the layer's inputs. For ``down`` the columns are
  the ranked channels and a budget keeps a prefix of them, so compensation must not cross a width
  a budget cuts at: spreading a kept channel's error onto channels a lower budget drops would lose
  that compensation at the lower budget, and spreading a dropped channel's error onto kept ones
  would add an error the lower budget never had. ``cuts`` marks those widths; the Hessian is
  made block-diagonal on them, so every segment between cuts is quantized on its own and slicing
  the result at a cut equals quantizing the sliced weights (the invariant the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexc.ir.quant.scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """Integer ``codes [..., rows, cols]`` (int8 storage, any bit width) and ``scales [..., rows, cols/group]``."""

    codes: torch.Tensor
    scales: torch.Tensor

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales.float(), self.codes.shape[-1] // self.scales.shape[-1], dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``codes [..., cols] * scales [..., cols/group]`` (each scale over its group), computed in the scales'
    dtype and returned in ``dtype``. (A broadcast over the groups: no scale tensor of the codes' size.)"""
    shape = codes.shape
    grouped = codes.reshape(*shape[:-1], shape[-1] // group, group).to(scales.dtype) * scales.unsqueeze(-1)
    return grouped.reshape(shape).to(dtype)


def codes_of(dequantized: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The integer codes (int8) of weights that hold ``codes * scales`` (e.g. a sliced export's)."""
    low, high = _code_range(scheme)
    return _round(dequantized.detach().float(), scales.float().repeat_interleave(scheme.group_size, dim=-1),
                  low, high).to(torch.int8)


def pack_codes(codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` int32 packing of ``codes [..., rows, cols]`` along ``cols``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(codes.contiguous(), scheme.bits)


def _check_groups(cols: int, scheme: QuantScheme, what: str) -> None:
    if cols % scheme.group_size:
        raise ValueError(f"{what}: {cols} input channels are not a whole number of quantization groups of "
                         f"{scheme.group_size}")


def group_scales(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """compressed-tensors' symmetric scales of each group of ``w [..., rows, cols]``: ``[..., rows, cols/group]``."""
    from compressed_tensors.quantization.utils import calculate_qparams

    grouped = w.detach().float().unflatten(-1, (-1, scheme.group_size))
    scales, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.args())
    return _nonzero(scales)


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    # An all-zero group has scale 0; any positive scale codes it as zeros, and dividing by it stays finite.
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _code_range(scheme: QuantScheme) -> tuple[int, int]:
    from compressed_tensors.quantization.utils import calculate_range

    low, high = calculate_range(scheme.args(), "cpu")
    return int(low), int(high)


def _round(x: torch.Tensor, scale: torch.Tensor, low: int, high: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), low, high)


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest codes and scales of ``w [..., rows, cols]``."""
    _check_groups(w.shape[-1], scheme, "quantize_rtn")
    scales = group_scales(w, scheme)
    low, high = _code_range(scheme)
    codes = _round(w.detach().float(), scales.repeat_interleave(scheme.group_size, dim=-1), low, high)
    return QuantizedWeight(codes.to(torch.int8), scales)


def segment_starts(cuts: list[list[int]] | None, cols: int) -> torch.Tensor | None:
    """``[E, cols]`` bool, True where a segment starts: at column 0 and at every cut of each expert."""
    if cuts is None:
        return None
    starts = torch.zeros(len(cuts), cols, dtype=torch.bool)
    starts[:, 0] = True
    for e, widths in enumerate(cuts):
        for w in widths:
            if 0 < w < cols:
                starts[e, w] = True
    return starts


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *,
                  cuts: list[list[int]] | None = None, dampening: float = 0.01, block: int = 128,
                  hessian_bytes: int = 1 << 28) -> QuantizedWeight:
    """GPTQ-style codes and scales of ``w [E, rows, cols]`` given each expert's input Hessian
    ``hessian [E, cols, cols]`` (``X^T X`` over its calibration tokens).

    ``cuts[e]``: the widths at which a budget slices expert ``e``'s columns (each a multiple of the
    group size); no error crosses them. An expert with no calibration tokens (zero Hessian) gets
    round-to-nearest codes. ``dampening``: fraction of the mean diagonal added to it, for stability.
    Experts are independent: as many are worked on together as fit ``hessian_bytes`` of float64
    Hessians (at least one), which bounds the several working copies the inversion makes of them.
    (Fewer at a time costs Python time per column: on 64 experts of 384 x 1024, 8 at a time took
    1.3x as long as all 64.)
    """
    at_once = max(1, hessian_bytes // (8 * w.shape[-1] ** 2))
    if w.shape[0] > at_once:
        parts = [quantize_gptq(w[i:i + at_once], hessian[i:i + at_once], scheme,
                               cuts=None if cuts is None else cuts[i:i + at_once], dampening=dampening,
                               block=block, hessian_bytes=hessian_bytes)
                 for i in range(0, w.shape[0], at_once)]
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]))
    num_experts, rows, cols = w.shape
    group = scheme.group_size
    _check_groups(cols, scheme, "quantize_gptq")
    if tuple(hessian.shape) != (num_experts, cols, cols):
        raise ValueError(f"hessian must be [{num_experts}, {cols}, {cols}]; got {list(hessian.shape)}")
    starts = segment_starts(cuts, cols)
    if starts is not None and bool(starts[:, torch.arange(cols) % group != 0].any()):
        raise ValueError(f"every cut must be a multiple of the group size {group}; got {cuts}")
    u = _inverse_cholesky(hessian, starts, dampening)
    low, high = _code_range(scheme)
    work = w.detach().float().clone()
    codes = torch.zeros(num_experts, rows, cols, dtype=torch.int8)
    scales = torch.zeros(num_experts, rows, cols // group)
    block = max(group, block // group * group)  # a group never straddles two blocks
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        errors = torch.zeros(num_experts, rows, b1 - b0)
        for i in range(b0, b1):
            if i % group == 0:
                scales[:, :, i // group] = group_scales(work[:, :, i:i + group], scheme)[..., 0]
            scale = scales[:, :, i // group]
            col = work[:, :, i]
            q = _round(col, scale, low, high)
            codes[:, :, i] = q.to(torch.int8)
            err = (col - q * scale) / u[:, i, i, None]
            work[:, :, i + 1:b1] -= err[:, :, None] * u[:, None, i, i + 1:b1]
            errors[:, :, i - b0] = err
        work[:, :, b1:] -= errors @ u[:, b0:b1, b1:]  # the block's errors, onto the later blocks at once
    return QuantizedWeight(codes, scales)


def _inverse_cholesky(hessian: torch.Tensor, starts: torch.Tensor | None, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of each expert's (dampened, segment-block-diagonal) inverse Hessian."""
    h = hessian.detach().double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0  # a column no calibration token reached: its weight is quantized on its own
    h[dead.unsqueeze(-1).expand_as(h) | dead.unsqueeze(-2).expand_as(h)] = 0
    diag[dead] = 1.0
    # Each segment is quantized on its own: no cross-segment terms, and its own mean diagonal damps it.
    if starts is None:
        same = torch.ones_like(h, dtype=torch.bool)
    else:
        segment = starts.long().cumsum(dim=1)
        same = segment[:, :, None] == segment[:, None, :]
    h = h * same
    mean_diag = (same * h.diagonal(dim1=-2, dim2=-1)[:, None, :]).sum(-1) / same.sum(-1)  # [E, cols]
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + torch.diag_embed(dampening * 10 ** attempt * mean_diag))
        if not bool(info.any()):
            break
    else:
        raise ValueError("quantize_gptq: an expert's Hessian is not positive definite even with 10^5 times the "
                         "dampening; its calibration inputs are degenerate")
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True).float()
