"""The canonical expert op: reference == naive per-token loop; autograd == finite differences."""

import itertools

import pytest
import torch

from flexc.ir.op import ExpertLayout, ExpertWeights, apply_activation, gate_up_rows, moe_experts_reference, run_experts


def naive_experts(h, ids, w, gate_up, down, gub, db, widths, activation, interleaved):
    """One token and one slot at a time: the definition of the op."""
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            width = int(widths[e])
            if width == 0:
                continue
            g = gate_up_rows(gate_up[e], interleaved, 0)[:width] @ h[t]
            u = gate_up_rows(gate_up[e], interleaved, 1)[:width] @ h[t]
            if gub is not None:
                g = g + gate_up_rows(gub[e], interleaved, 0)[:width]
                u = u + gate_up_rows(gub[e], interleaved, 1)[:width]
            y = down[e][:, :width] @ apply_activation(g, u, activation, 1.702, 7.0)
            if db is not None:
                y = y + db[e]
            out[t] += w[t, j] * y
    return out


CASES = [
    ("silu", False, False),
    ("gelu_tanh", False, True),
    ("swiglu_clamped", True, True),  # GPT-OSS layout
]


def make_inputs(dtype, E=5, H=12, I=16, T=9, k=2, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, dtype=dtype, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, dtype=dtype, generator=g)
    gate_up = torch.randn(E, 2 * I, H, dtype=dtype, generator=g)
    down = torch.randn(E, H, I, dtype=dtype, generator=g)
    gub = torch.randn(E, 2 * I, dtype=dtype, generator=g) if bias else None
    db = torch.randn(E, H, dtype=dtype, generator=g) if bias else None
    return h, ids, w, gate_up, down, gub, db


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_reference_equals_naive_loop_with_widths(activation, interleaved, bias):
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, bias=bias)
    experts = ExpertWeights(gate_up, down, gub, db, ExpertLayout(activation, interleaved))
    widths = torch.tensor([0, 16, 5, 1, 11])  # zero, full, odd mixes
    got = run_experts(h, ids, w, experts, widths)
    want = naive_experts(h, ids, w, gate_up, down, gub, db, widths, activation, interleaved)
    assert got.abs().max() > 1.0  # a real signal, not zeros
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
@pytest.mark.parametrize("T", [1, 7, 64])
def test_grouped_cpu_path_equals_naive_loop(activation, interleaved, bias, T):
    """The CPU inference path for one shared width (grouped GEMMs) against the definition,
    and the op's choice between it and the reference loop."""
    from flexc.ir.grouped import moe_experts_cpu

    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float32, T=T, bias=bias, seed=T)
    experts = ExpertWeights(gate_up, down, gub, db, ExpertLayout(activation, interleaved))
    as_double = [t.double() if t is not None and t.is_floating_point() else t for t in (h, ids, w, gate_up, down, gub, db)]
    for width in (16, 8, 0):  # full, part, removed
        widths = torch.full((5,), width)
        got = moe_experts_cpu(h, ids, w, experts, widths)
        want = naive_experts(*as_double, widths, activation, interleaved)
        assert width == 0 or want.abs().max() > 1.0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    def op(widths):
        return run_experts(h, ids, w, experts, widths)

    def reference(widths):
        return moe_experts_reference(h, ids, w, experts, widths)

    # The registered op on CPU takes the one-width grouped path when every expert hit shares a
    # width (deterministic, so it matches exactly), the mixed-width grouped path otherwise.
    uniform = torch.full((5,), 8)
    assert torch.equal(op(uniform), moe_experts_cpu(h, ids, w, experts, uniform))
    # Mixed widths among the experts hit: token 0's two experts get different widths.
    mixed = torch.tensor([0, 16, 8, 16, 8])
    mixed[ids[0, 0]], mixed[ids[0, 1]] = 16, 8
    torch.testing.assert_close(op(mixed), reference(mixed), rtol=1e-5, atol=1e-5)


def test_default_widths_mean_full_width():
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float64)
    full = torch.full((5,), 16)
    torch.testing.assert_close(run_experts(h, ids, w, ExpertWeights(gate_up, down)),
                               run_experts(h, ids, w, ExpertWeights(gate_up, down), full))


def test_width_zero_expert_contributes_nothing():
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, bias=True)
    widths = torch.zeros(5, dtype=torch.int64)
    out = run_experts(h, ids, w, ExpertWeights(gate_up, down, gub, db), widths)
    assert torch.count_nonzero(out) == 0


def test_invalid_widths_are_rejected():
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float64)
    with pytest.raises(ValueError, match="widths must be 5 integers"):
        moe_experts_reference(h, ids, w, ExpertWeights(gate_up, down), torch.tensor([0, 17, 1, 1, 1]))


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_gradcheck_float64(activation, interleaved, bias):
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, E=4, H=5, I=6, T=5, bias=bias, seed=1)
    widths = torch.tensor([0, 6, 3, 1])
    tensors = [h, w, gate_up, down] + ([gub, db] if bias else [])
    tensors = [t.requires_grad_() for t in tensors]

    def f(*args):
        biases = (args[4], args[5]) if bias else (None, None)
        weights = ExpertWeights(args[2], args[3], *biases, ExpertLayout(activation, interleaved))
        return run_experts(args[0], ids, args[1], weights, widths)

    assert torch.autograd.gradcheck(f, tuple(tensors))


def test_backward_leaves_widths_and_routing_ids_untouched():
    """Backward differentiates the float inputs only; the integer routing ids and widths it
    reads (the op sorts tokens by expert internally) come out unchanged."""
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    widths = torch.tensor([3, 16, 5, 1, 11])
    ids_before, widths_before = ids.clone(), widths.clone()
    run_experts(h, ids, w, ExpertWeights(gate_up, down), widths).sum().backward()
    assert h.grad.abs().max() > 0 and w.grad.abs().max() > 0
    assert torch.equal(ids, ids_before) and torch.equal(widths, widths_before)
    assert not ids.requires_grad and not widths.requires_grad


# --------------------------------------------------------------------------------------------
# The CPU path with mixed widths: grouped GEMMs per run of widths (or one padded run), no
# per-expert loop, equal to the reference up to float rounding.

MIXED_E, MIXED_H, MIXED_I, MIXED_K = 8, 16, 32, 3
MIXED_WIDTHS = {
    "2 widths": [8, 24, 8, 24, 8, 24, 8, 24],
    "4 widths with full": [8, 16, 24, 32, 32, 24, 16, 8],
    "zeros": [0, 16, 0, 32, 16, 0, 32, 16],
    "unaligned, zero and full": [5, 32, 13, 1, 32, 0, 27, 3],  # runs at the next 16 bytes up, masked
}


def mixed_inputs(dtype, T, bias, seed=0):
    """Seeded weights; routing written out (token t, slot j -> expert (5t + 3j) mod 8), so token 0
    hits experts 0, 3, 6 and every expert is hit from 6 tokens on."""
    E, H, I, k = MIXED_E, MIXED_H, MIXED_I, MIXED_K
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    w = torch.rand(T, k, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    gub = torch.randn(E, 2 * I, generator=g) if bias else None
    db = torch.randn(E, H, generator=g) if bias else None
    ids = (5 * torch.arange(T)[:, None] + 3 * torch.arange(k)[None, :]) % E
    cast = [t if t is None else t.to(dtype) for t in (h, w, gate_up, down, gub, db)]
    return cast[0], ids, *cast[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", list(MIXED_WIDTHS))
@pytest.mark.parametrize("T", [1, 8, 200])
@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_cpu_path_mixed_widths_equals_reference(activation, interleaved, bias, T, pattern, dtype):
    from flexc.ir.grouped import moe_experts_cpu

    h, ids, w, gate_up, down, gub, db = mixed_inputs(dtype, T, bias, seed=T)
    experts = ExpertWeights(gate_up, down, gub, db, ExpertLayout(activation, interleaved))
    widths = torch.tensor(MIXED_WIDTHS[pattern], dtype=torch.int32)
    assert len(torch.unique(widths[ids])) >= 2  # the call really mixes widths, from one token on
    want = moe_experts_reference(h, ids, w, experts, widths)
    assert want.abs().max() > 0.5  # a real signal, not zeros
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    got = run_experts(h, ids, w, experts, widths)
    torch.testing.assert_close(got, want, **tol)
    # Both strategies at every size, one run per width and one padded run, each planned on the
    # host and by tensor ops.
    for strategy in ("group", "pad"):
        for host_plan in (True, False):
            got = moe_experts_cpu(h, ids, w, experts, widths, strategy=strategy, host_plan=host_plan)
            assert got is not None and got.dtype == dtype
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_cpu_path_mixed_widths_routing_weights_in_another_dtype(hidden_dtype, weight_dtype):
    """Each slot's output is weighted in the routing weights' dtype and rounded to the hidden
    dtype, as in the reference."""
    from flexc.ir.grouped import moe_experts_cpu

    h, ids, w, gate_up, down, gub, db = mixed_inputs(hidden_dtype, 8, bias=True)
    w = w.to(weight_dtype)
    widths = torch.tensor(MIXED_WIDTHS["unaligned, zero and full"], dtype=torch.int32)
    want = moe_experts_reference(h, ids, w, ExpertWeights(gate_up, down, gub, db), widths)
    for strategy in ("group", "pad"):
        got = moe_experts_cpu(h, ids, w, ExpertWeights(gate_up, down, gub, db), widths, strategy=strategy)
        assert got.dtype == hidden_dtype
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=2e-2)


def test_cpu_path_mixed_widths_runs_no_per_expert_loop(monkeypatch):
    """Inference with mixed widths never reaches the reference loop nor the per-expert FFN."""
    for (pattern, values), T in itertools.product(MIXED_WIDTHS.items(), (1, 8, 200)):  # host and tensor plans
        h, ids, w, gate_up, down, gub, db = mixed_inputs(torch.float32, T, bias=True)
        experts = ExpertWeights(gate_up, down, gub, db, ExpertLayout("swiglu_clamped", True))
        widths = torch.tensor(values, dtype=torch.int32)
        want = moe_experts_reference(h, ids, w, experts, widths)
        got = run_without_the_loop(monkeypatch, h, ids, w, experts, widths)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{pattern}, {T} tokens")


def run_without_the_loop(monkeypatch, h, ids, w, experts, widths):
    """``run_experts`` with the reference loop and the per-expert FFN made to fail if they run."""
    import flexc.ir.op as op_module

    with monkeypatch.context() as m:
        def loop(*args, **kwargs):
            raise AssertionError("the per-expert loop ran")

        m.setattr(op_module, "moe_experts_reference", loop)
        m.setattr(op_module, "expert_ffn", loop)
        return run_experts(h, ids, w, experts, widths)


def test_cpu_path_mixed_widths_keeps_reference_for_observers_and_autograd():
    """Observers still see the reference's expert events; a call that needs gradients still
    differentiates through the reference backward (its forward runs the grouped path)."""
    from flexc.ir.op import observe_expert_forward

    h, ids, w, gate_up, down, gub, db = mixed_inputs(torch.float32, 8, bias=True)
    widths = torch.tensor(MIXED_WIDTHS["zeros"], dtype=torch.int32)
    events = []
    with observe_expert_forward(lambda info: events.append(info["event"])):
        run_experts(h, ids, w, ExpertWeights(gate_up, down, gub, db), widths)
    assert events[0] == "routing" and events.count("expert") == sum(1 for v in widths.tolist() if v > 0)

    def grads(fn):
        x, tw = h.clone().requires_grad_(), w.clone().requires_grad_()
        fn(x, tw).square().sum().backward()
        return x.grad, tw.grad

    got = grads(lambda x, tw: run_experts(x, ids, tw, ExpertWeights(gate_up, down, gub, db), widths))
    want = grads(lambda x, tw: moe_experts_reference(x, ids, tw, ExpertWeights(gate_up, down, gub, db), widths))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_path_rejects_hit_widths_out_of_range():
    h, ids, w, gate_up, down, _, _ = mixed_inputs(torch.float32, 8, bias=False)
    widths = torch.tensor([8, 16, 24, 33, 8, 16, 24, 32], dtype=torch.int32)  # expert 3 is hit
    with pytest.raises(ValueError, match="widths must be 8 integers"):
        run_experts(h, ids, w, ExpertWeights(gate_up, down), widths)


def test_cpu_path_many_experts_one_token_goes_back_to_the_loop():
    """With many experts and one token, a mixed-width call's grouped GEMMs would mostly visit
    empty groups (EMPTY_GROUPS_PER_EXPERT): it runs the reference loop instead. With many
    tokens the same layer runs grouped."""
    from flexc.ir.grouped import moe_experts_cpu

    E, H, I = 128, 16, 32
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    widths = torch.tensor([8, 16, 24, 32] * (E // 4), dtype=torch.int32)
    h, w = torch.randn(1, H, generator=g), torch.rand(1, 4, generator=g)
    ids = torch.tensor([[0, 40, 80, 127]])  # widths 8, 8, 8, 32; a run spanning all 128 experts
    assert moe_experts_cpu(h, ids, w, ExpertWeights(gate_up, down), widths) is None
    assert torch.equal(run_experts(h, ids, w, ExpertWeights(gate_up, down), widths),
                       moe_experts_reference(h, ids, w, ExpertWeights(gate_up, down), widths))

    T = 64
    h, w = torch.randn(T, H, generator=g), torch.rand(T, 4, generator=g)
    ids = (torch.arange(T)[:, None] * 4 + torch.arange(4)[None, :]) % E  # 2 tokens per expert
    got = moe_experts_cpu(h, ids, w, ExpertWeights(gate_up, down), widths)
    assert got is not None
    torch.testing.assert_close(got, moe_experts_reference(h, ids, w, ExpertWeights(gate_up, down), widths),
                               rtol=1e-5, atol=1e-5)
