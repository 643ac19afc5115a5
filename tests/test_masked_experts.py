"""The anneal's masked experts op: the reference's values and gradients, from the channels that matter."""

import pytest
import torch

from flexc.ir.layout import ExpertLayout, ExpertWeights
from flexc.passes.masked_experts import masked_experts, masked_experts_reference

UPPER = [48, 32, 16, 48, 32, 48]  # widest allowed action per expert
SAMPLED = [32, 32, 16, 0, 16, 48]  # the mask's nonzero prefix (expert 3 fully pruned)


@pytest.mark.parametrize("layout,bias", [(ExpertLayout(), False), (ExpertLayout("swiglu_clamped", True), True),
                                         (ExpertLayout("gelu"), True)])
def test_masked_experts_matches_the_full_width_reference(layout, bias):
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, k = 200, 32, 48, 6, 2
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    router = torch.randn(tokens, experts, generator=g, requires_grad=True)
    weights, ids = torch.softmax(router, -1).topk(k, -1)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    down = torch.randn(experts, hidden, inter, generator=g) * 0.2
    gate_up_bias = torch.randn(experts, 2 * inter, generator=g) if bias else None
    down_bias = torch.randn(experts, hidden, generator=g) if bias else None
    mask = torch.zeros(experts, inter)
    for e, s in enumerate(SAMPLED):
        mask[e, :s] = 1 + 0.01 * e  # a straight-through sample's forward value: ~1 on the prefix, 0 after
    mask.requires_grad_(True)
    probe = torch.linspace(-1, 1, hidden)
    results = []
    experts = ExpertWeights(gate_up, down, gate_up_bias, down_bias, layout)
    for run in (lambda: masked_experts(x, ids, weights, experts, mask, UPPER, SAMPLED),
                lambda: masked_experts_reference(x, ids, weights, experts, mask)):
        out = run()
        results.append((out.detach(), *torch.autograd.grad((out * probe).sum(), (x, router, mask), retain_graph=True)))
    (out, gx, grouter, gmask), (ref, rgx, rgrouter, rgmask) = results
    allowed = torch.arange(inter)[None, :] < torch.tensor(UPPER)[:, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouter, rgrouter, rtol=1e-5, atol=1e-5)
    # the mask's gradient wherever an allowed action can take it, zero beyond (no action reads it)
    torch.testing.assert_close(gmask[allowed], rgmask[allowed], rtol=1e-4, atol=1e-5)
    assert gmask[allowed].abs().sum() > 0 and (gmask[~allowed] == 0).all()


@pytest.mark.parametrize("k,saturated", [(4, False), (64, False), (97, False), (4, True)])
def test_mean_distill_loss_gradient_is_autograds(k, saturated):
    """The distillation loss's written-out gradient equals autograd's through log-softmax, also
    where the student's top-k mass passes the cap (no gradient through the clamp there)."""
    import torch.nn.functional as F

    from flexc.passes.distill import TeacherTargets, distill_kl, distill_loss

    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 5, 97, generator=g) * 3
    teacher = TeacherTargets.from_logits(torch.randn(3, 5, 97, generator=g) * 3, k)
    if saturated:  # the student puts all but ~e-20 of its mass on the teacher's top k
        logits = logits.scatter_add(-1, teacher.index, torch.full(teacher.index.shape, 60.0))
    logits.requires_grad_(True)
    fused = distill_loss(logits, teacher)
    (grad,) = torch.autograd.grad(fused, logits)
    plain = distill_kl(F.log_softmax(logits, dim=-1), teacher)
    (expected,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
    assert grad.abs().max() > 1e-4
