"""The canonical expert op: reference == naive per-token loop; autograd == finite differences."""

import pytest
import torch

from flexc.ir.op import apply_activation, call_moe_experts, gate_up_rows, moe_experts_reference


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
    widths = torch.tensor([0, 16, 5, 1, 11])  # zero, full, odd mixes
    got = call_moe_experts(h, ids, w, gate_up, down, gate_up_bias=gub, down_bias=db, widths=widths,
                           activation=activation, interleaved=interleaved)
    want = naive_experts(h, ids, w, gate_up, down, gub, db, widths, activation, interleaved)
    assert got.abs().max() > 1.0  # a real signal, not zeros
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
@pytest.mark.parametrize("T", [1, 7, 64])
def test_grouped_cpu_path_equals_naive_loop(activation, interleaved, bias, T):
    """The CPU inference path for one shared width (grouped GEMMs) against the definition,
    and the op's choice between it and the reference loop."""
    from flexc.ir.grouped import moe_experts_grouped, shared_width

    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float32, T=T, bias=bias, seed=T)
    as_double = [t.double() if t is not None and t.is_floating_point() else t for t in (h, ids, w, gate_up, down, gub, db)]
    for width in (16, 8, 0):  # full, part, removed
        widths = torch.full((5,), width)
        got = moe_experts_grouped(h, ids, w, gate_up, down, gub, db, width, activation, interleaved)
        want = naive_experts(*as_double, widths, activation, interleaved)
        assert width == 0 or want.abs().max() > 1.0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    def op(widths):
        return call_moe_experts(h, ids, w, gate_up, down, gate_up_bias=gub, down_bias=db, widths=widths,
                                activation=activation, interleaved=interleaved)

    def reference(widths):
        return moe_experts_reference(h, ids, w, gate_up, down, gub, db, widths, activation, interleaved)

    # The registered op on CPU takes the grouped path when every expert hit shares a width, the
    # reference loop otherwise. Both paths are deterministic, so the chosen one matches exactly.
    uniform = torch.full((5,), 8)
    assert shared_width(h, ids, gate_up, down, uniform, interleaved) == 8
    assert torch.equal(op(uniform), moe_experts_grouped(h, ids, w, gate_up, down, gub, db, 8, activation, interleaved))
    # Mixed widths among the experts hit: token 0's two experts get different widths.
    mixed = torch.tensor([0, 16, 8, 16, 8])
    mixed[ids[0, 0]], mixed[ids[0, 1]] = 16, 8
    assert shared_width(h, ids, gate_up, down, mixed, interleaved) is None
    assert torch.equal(op(mixed), reference(mixed))


def test_default_widths_mean_full_width():
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float64)
    full = torch.full((5,), 16)
    torch.testing.assert_close(call_moe_experts(h, ids, w, gate_up, down),
                               call_moe_experts(h, ids, w, gate_up, down, widths=full))


def test_width_zero_expert_contributes_nothing():
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, bias=True)
    widths = torch.zeros(5, dtype=torch.int64)
    out = call_moe_experts(h, ids, w, gate_up, down, gate_up_bias=gub, down_bias=db, widths=widths)
    assert torch.count_nonzero(out) == 0


def test_invalid_widths_are_rejected():
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float64)
    with pytest.raises(ValueError, match="widths must be 5 integers"):
        moe_experts_reference(h, ids, w, gate_up, down, widths=torch.tensor([0, 17, 1, 1, 1]))


@pytest.mark.parametrize("activation,interleaved,bias", CASES)
def test_gradcheck_float64(activation, interleaved, bias):
    h, ids, w, gate_up, down, gub, db = make_inputs(torch.float64, E=4, H=5, I=6, T=5, bias=bias, seed=1)
    widths = torch.tensor([0, 6, 3, 1])
    tensors = [h, w, gate_up, down] + ([gub, db] if bias else [])
    tensors = [t.requires_grad_() for t in tensors]

    def f(*args):
        extra = {"gate_up_bias": args[4], "down_bias": args[5]} if bias else {}
        return call_moe_experts(args[0], ids, args[1], args[2], args[3], widths=widths,
                                activation=activation, interleaved=interleaved, **extra)

    assert torch.autograd.gradcheck(f, tuple(tensors))


def test_backward_leaves_widths_and_routing_ids_untouched():
    """Backward differentiates the float inputs only; the integer routing ids and widths it
    reads (the op sorts tokens by expert internally) come out unchanged."""
    h, ids, w, gate_up, down, _, _ = make_inputs(torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    widths = torch.tensor([3, 16, 5, 1, 11])
    ids_before, widths_before = ids.clone(), widths.clone()
    call_moe_experts(h, ids, w, gate_up, down, widths=widths).sum().backward()
    assert h.grad.abs().max() > 0 and w.grad.abs().max() > 0
    assert torch.equal(ids, ids_before) and torch.equal(widths, widths_before)
    assert not ids.requires_grad and not widths.requires_grad
