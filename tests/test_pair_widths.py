"""Per-pair widths: ``widths [T, k]`` gives each routed (token, slot) pair its own prefix of its expert.

The definition is the naive loop of test_op.py with ``widths[t, j]`` in place of ``widths[e]``; a
batch whose pairs of each expert share one width computes what per-expert widths compute, and
each token of a mixed batch gets what it gets alone at its own widths.
"""

import pytest
import torch

from flexc.ir.op import ExpertLayout, ExpertWeights, moe_experts_reference, run_experts
from test_op import CASES, make_inputs, naive_experts


def naive_pair_experts(h, ids, w, gate_up, down, gub, db, pair_widths, activation, interleaved):
    """Token by token: each token alone, its experts at the widths of its own pairs."""
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        per_expert = torch.zeros(down.shape[0], dtype=torch.long)
        per_expert[ids[t]] = pair_widths[t]  # a token's k slots name k distinct experts
        out[t] = naive_experts(h[t:t + 1], ids[t:t + 1], w[t:t + 1], gate_up, down, gub, db, per_expert,
                               activation, interleaved)[0]
    return out


def _weights(gate_up, down, gub, db, activation="silu", interleaved=False) -> ExpertWeights:
    return ExpertWeights(gate_up, down, gub, db, ExpertLayout(activation, interleaved))


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_mixed_pair_widths_equal_each_token_at_its_own_widths(activation, interleaved, bias):
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, T=12, bias=bias, seed=3)
    pair_widths = torch.randint(0, 17, ids.shape, generator=torch.Generator().manual_seed(4))
    pair_widths[0, 0], pair_widths[1, 1], pair_widths[2, 0] = 0, 16, 1  # none, full, one channel
    got = run_experts(h, ids, w, _weights(gate_up, down, gub, db, activation, interleaved), pair_widths)
    want = naive_pair_experts(h, ids, w, gate_up, down, gub, db, pair_widths, activation, interleaved)
    assert got.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_pair_widths_shared_by_each_expert_equal_per_expert_widths():
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float32, T=20, bias=True, seed=5)
    per_expert = torch.tensor([0, 16, 5, 9, 12])
    weights = _weights(gate_up, down, gub, db)
    by_pair, by_expert = run_experts(h, ids, w, weights, per_expert[ids]), run_experts(h, ids, w, weights, per_expert)
    # float32: the per-expert call runs the CPU path's grouped GEMMs, another summation order
    torch.testing.assert_close(by_pair, by_expert, rtol=1e-4, atol=1e-5 * float(by_expert.abs().max()))

    grads = []
    for widths in (per_expert, per_expert[ids]):
        tensors = [t.clone().requires_grad_() for t in (h, w, gate_up, down, gub, db)]
        out = run_experts(tensors[0], ids, tensors[1], _weights(*tensors[2:]), widths)
        out.square().sum().backward()
        grads.append([t.grad for t in tensors])
    for one, other in zip(*grads):  # the same backward, of outputs that differ in summation order
        torch.testing.assert_close(one, other, rtol=1e-4, atol=1e-5 * float(other.abs().max()))


def test_a_pair_of_width_zero_contributes_nothing_bias_included():
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, T=4, bias=True, seed=6)
    widths = torch.full(ids.shape, 16)
    widths[2, :] = 0  # token 2 keeps none of its experts
    widths[3, 0] = 0
    out = run_experts(h, ids, w, _weights(gate_up, down, gub, db), widths)
    assert out[2].abs().max() == 0
    alone = run_experts(h[3:4, ], ids[3:4, 1:], w[3:4, 1:], _weights(gate_up, down, gub, db), widths[3:4, 1:])
    torch.testing.assert_close(out[3], alone[0])


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_gradcheck_float64_with_mixed_pair_widths(activation, interleaved, bias):
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, E=4, H=5, I=6, T=6, bias=bias, seed=7)
    pair_widths = torch.tensor([[0, 6], [3, 1], [6, 2], [4, 4], [1, 5], [2, 0]])
    tensors = [t.requires_grad_() for t in [h, w, gate_up, down] + ([gub, db] if bias else [])]

    def f(*args):
        biases = (args[4], args[5]) if bias else (None, None)
        return run_experts(args[0], ids, args[1], _weights(args[2], args[3], *biases, activation, interleaved),
                           pair_widths)

    assert torch.autograd.gradcheck(f, tuple(tensors))


def test_pair_widths_of_the_wrong_shape_or_range_are_refused():
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float64)
    with pytest.raises(ValueError, match=r"widths must be \[E\] = \[5\] \(per expert\) or \[T, k\] = \[9, 2\]"):
        moe_experts_reference(h, ids, w, ExpertWeights(gate_up, down), torch.full((9, 3), 4))
    with pytest.raises(ValueError, match=r"widths must be in \[0, 16\]; got values from 0 to 17"):
        moe_experts_reference(h, ids, w, ExpertWeights(gate_up, down), torch.tensor([[17, 0]] * 9))


PAIR_WIDTH_CHOICES = (0, 5, 8, 16, 24, 32)  # none, unaligned, aligned, full (MIXED_I = 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8, 200])
@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_cpu_path_with_pair_widths_equals_reference(activation, interleaved, bias, T, dtype):
    """The grouped-GEMM CPU path reads each pair's width: pairs of one expert at different widths
    run in different runs (or one padded, masked run), planned on the host and by tensor ops."""
    from flexc.ir.grouped import moe_experts_cpu
    from test_op import mixed_inputs

    h, ids, w, gate_up, down, gub, db = mixed_inputs(dtype, T, bias, seed=T)
    experts = ExpertWeights(gate_up, down, gub, db, ExpertLayout(activation, interleaved))
    pick = torch.randint(0, len(PAIR_WIDTH_CHOICES), ids.shape, generator=torch.Generator().manual_seed(T))
    widths = torch.tensor(PAIR_WIDTH_CHOICES, dtype=torch.int32)[pick]
    want = moe_experts_reference(h, ids, w, experts, widths)
    assert want.abs().max() > 0.5
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    for strategy in ("group", "pad"):
        for host_plan in (True, False):
            got = moe_experts_cpu(h, ids, w, experts, widths, strategy=strategy, host_plan=host_plan)
            assert got is not None and got.dtype == dtype, (strategy, host_plan)
            torch.testing.assert_close(got, want, **tol)


def test_inference_with_pair_widths_runs_no_per_expert_loop(monkeypatch):
    from test_op import mixed_inputs, run_without_the_loop

    for T in (1, 8, 200):  # host and tensor plans
        h, ids, w, gate_up, down, gub, db = mixed_inputs(torch.float32, T, bias=True)
        experts = ExpertWeights(gate_up, down, gub, db, ExpertLayout("silu", False))
        widths = torch.tensor(PAIR_WIDTH_CHOICES, dtype=torch.int32)[torch.arange(ids.numel()).view_as(ids) % 6]
        want = moe_experts_reference(h, ids, w, experts, widths)
        got = run_without_the_loop(monkeypatch, h, ids, w, experts, widths)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{T} tokens")
