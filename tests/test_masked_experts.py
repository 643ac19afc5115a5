"""The anneal's masked experts op: the reference's values and gradients, from the channels that matter."""

import pytest
import torch

from flexc.ir.layout import ExpertLayout
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
    for run in (lambda: masked_experts(x, ids, weights, gate_up, down, gate_up_bias, down_bias, mask, UPPER, SAMPLED,
                                       layout),
                lambda: masked_experts_reference(x, ids, weights, gate_up, down, gate_up_bias, down_bias, mask, layout)):
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
