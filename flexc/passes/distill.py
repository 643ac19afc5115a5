"""Distillation targets computed once: the unpruned model's next-token distribution per batch.

Passes that train with frozen weights (``anneal``) distil the full-width model into a pruned
one. The teacher never changes, so its outputs are computed once per calibration batch and
kept as the top-``k`` log-probabilities (``k`` = the vocabulary keeps the whole distribution)
plus the log-mass of the rest, instead of a second forward pass every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MASS_CAP = 1 - 1e-6  # keeps log(1 - mass) finite when the top-k hold (almost) everything


@dataclass
class TeacherTargets:
    logp: torch.Tensor  # [batch, seq, k] log-probabilities of the teacher's top-k tokens
    index: torch.Tensor  # [batch, seq, k] their token ids
    rest: torch.Tensor | None  # [batch, seq] log of the probability mass outside the top k (None: k = vocab)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int | None) -> "TeacherTargets":
        logp = F.log_softmax(logits.detach().float(), dim=-1)
        k = logp.shape[-1] if k is None else min(k, logp.shape[-1])
        top, index = logp.topk(k, dim=-1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=_MASS_CAP)) if k < logp.shape[-1] else None
        return cls(top, index, rest)


def distill_loss(student_logits: torch.Tensor, teacher: TeacherTargets, reduction: str = "mean") -> torch.Tensor:
    """Mean KL(teacher || student) over the teacher's top-k tokens and one bucket for the rest
    (``reduction="none"``: the KL at every position, ``[batch, seq]``).

    Merging the tail into one outcome can only lower a KL divergence, so this is a lower bound
    of the full KL and equals it when ``k`` covers the vocabulary.
    """
    if reduction == "none":
        return distill_kl(F.log_softmax(student_logits.float(), dim=-1), teacher, reduction)
    return _MeanDistillKL.apply(student_logits, teacher.logp, teacher.index, teacher.rest)


def distill_kl(logp: torch.Tensor, teacher: TeacherTargets, reduction: str = "mean") -> torch.Tensor:
    """:func:`distill_loss` from the student's log-probabilities (a caller that needs them for
    another loss too normalises the logits once)."""
    top = logp.gather(-1, teacher.index)
    kl = (teacher.logp.exp() * (teacher.logp - top)).sum(-1)
    if teacher.rest is not None:
        student_rest = torch.log1p(-top.exp().sum(-1).clamp(max=_MASS_CAP))
        kl = kl + teacher.rest.exp() * (teacher.rest - student_rest)
    return kl if reduction == "none" else kl.mean()


class _MeanDistillKL(torch.autograd.Function):
    """The mean of :func:`distill_kl` over positions, its gradient in the logits written out.

    With ``q = softmax(z)``, teacher top-``k`` probabilities ``p``, their student mass
    ``Q = sum q_top`` and the teacher's rest ``r``: ``dKL/dz = q * (sum p - c Q) + [top] (c q - p)``,
    ``c = r / (1 - Q)``. One pass over the vocabulary, where autograd's log-softmax backward and
    the gather's zero-filled gradient took three (``benchmarks/anneal_step.py``: 40 against 46 ms
    on a batch of ``small``'s logits)."""

    @staticmethod
    def forward(ctx, logits, teacher_logp, index, rest):
        logp = F.log_softmax(logits.float(), dim=-1)
        kl = distill_kl(logp, TeacherTargets(teacher_logp, index, rest), reduction="none")
        ctx.save_for_backward(logp, teacher_logp, index, rest)
        ctx.dtype = logits.dtype
        return kl.mean()

    @staticmethod
    def backward(ctx, grad):
        logp, teacher_logp, index, rest = ctx.saved_tensors
        p = teacher_logp.exp()
        q_top = logp.gather(-1, index).exp()
        weight, spread = p.sum(-1), -p
        if rest is not None:
            mass = q_top.sum(-1)
            # the clamp in distill_kl passes no gradient where the student's top-k mass exceeds the cap
            c = torch.where(mass <= _MASS_CAP, rest.exp() / (1 - mass.clamp(max=_MASS_CAP)), 0.0)
            weight, spread = weight - c * mass, spread + c[..., None] * q_top
        out = logp.exp().mul_(weight[..., None]).scatter_add_(-1, index, spread)
        positions = out.numel() // out.shape[-1]
        return out.mul_(grad / positions).to(ctx.dtype), None, None, None
