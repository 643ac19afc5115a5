"""rank_channels: the permutation preserves outputs; the Taylor score equals plain autograd."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from flexc.ir import lower
from flexc.ir.testing import tiny_families, tiny_model
from flexc.passes import PassContext, resolve_pass
from flexc.passes.manager import run_checked


def batches(vocab, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


def context(tmp_path, data):
    return PassContext(workdir=tmp_path, calibration_data=data, logger=logging.getLogger("test"), quiet=True)


@pytest.mark.parametrize("family", tiny_families())
@pytest.mark.parametrize("score", ["taylor", "activation", "weight_activation"])
def test_ranking_preserves_output_and_sorts_scores(family, score, tmp_path):
    if score != "taylor" and family not in ("qwen3_moe", "gpt_oss"):
        pytest.skip("forward-only scores: one plain and one interleaved/bias family suffice")
    model = tiny_model(family)
    graph = lower(model)
    data = batches(model.config.vocab_size)
    check = {"input_ids": torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))}
    before = [w.clone() for g in graph.groups for w in graph.expert_weights(g)]
    pass_ = resolve_pass("rank_channels")({"score": score, "plot": False})
    ctx = context(tmp_path, data)
    result, diff = run_checked(pass_, graph, ctx, check, atol=1e-5)  # raises if > 1e-5
    assert diff <= 1e-5
    after = [w for g in graph.groups for w in graph.expert_weights(g)]
    assert any((a - b).abs().max() > 0 for a, b in zip(after, before)), "no channel moved"
    saved = load_file(str(tmp_path / "channel_scores.safetensors"))
    # Scoring the ranked model afresh must give each expert's channels in descending order:
    # this checks that the weights were permuted by the scores' order, not only the saved scores.
    rescored, _ = pass_.compute_scores(graph, context(tmp_path / "rescore", data))
    for i, g in enumerate(graph.groups):
        s = saved[f"layer{i}.scores"]
        assert s.shape == (g.num_experts, g.intermediate_size)
        assert s.sum() > 0
        fresh = rescored[i].double()
        scale = fresh.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # unrouted experts score 0
        torch.testing.assert_close(fresh / scale, s.double() / scale, rtol=1e-4, atol=1e-5)
        assert (fresh[:, :-1] - fresh[:, 1:] >= -1e-4 * scale).all()  # descending, up to float rounding
        perm = saved[f"layer{i}.perm"]
        assert (perm.sort(dim=1).values == torch.arange(g.intermediate_size)).all()
    counts = ctx.state["routing_counts"]
    n_tokens = sum(b.numel() for b in data)
    assert counts.sum(dim=1).tolist() == [n_tokens * graph.groups[0].top_k] * len(graph.groups)
    assert "channels_ranked" in graph.properties


def reference_taylor(model, groups, data):
    """Plain autograd on full gradients: mean over batches of per-channel sums of (theta*grad)^2."""
    model.set_experts_implementation("eager")
    experts = [model.get_submodule(g.path) for g in groups]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in experts:
        m.gate_up_proj.requires_grad_(True)
        m.down_proj.requires_grad_(True)
    total = [torch.zeros(g.num_experts, g.intermediate_size, dtype=torch.float64) for g in groups]
    for ids in data:
        for m in experts:
            m.gate_up_proj.grad = m.down_proj.grad = None
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        for t, m in zip(total, experts):
            gu = (m.gate_up_proj * m.gate_up_proj.grad).double() ** 2  # [E, 2I, H]
            dn = (m.down_proj * m.down_proj.grad).double() ** 2  # [E, H, I]
            half = gu.shape[1] // 2
            t += gu[:, :half].sum(-1) + gu[:, half:].sum(-1) + dn.sum(1)
    for m in experts:
        m.gate_up_proj.requires_grad_(False)
        m.down_proj.requires_grad_(False)
    model.set_experts_implementation("flexc")
    return [t / len(data) for t in total]


def test_taylor_score_equals_full_gradient_reference(tmp_path):
    model = tiny_model("qwen3_moe")
    graph = lower(model)
    data = batches(model.config.vocab_size, n=3, seed=1)
    want = reference_taylor(model, graph.groups, data)
    pass_ = resolve_pass("rank_channels")({"score": "taylor", "plot": False})
    scores, _ = pass_.compute_scores(graph, context(tmp_path, data))
    for got, ref in zip(scores, want):
        assert ref.max() > 0
        assert ((got.double() - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_taylor_allocates_no_expert_weight_gradients(tmp_path):
    model = tiny_model("mixtral")
    graph = lower(model)
    pass_ = resolve_pass("rank_channels")({"plot": False})
    pass_.compute_scores(graph, context(tmp_path, batches(model.config.vocab_size, n=1)))
    assert all(p.grad is None for p in model.parameters())


def test_reuse_from_earlier_run(tmp_path):
    model = tiny_model("olmoe")
    graph = lower(model)
    first = tmp_path / "first"
    resolve_pass("rank_channels")({"plot": True})(graph, context(first, batches(model.config.vocab_size)))
    assert (first / "channel_scores.png").stat().st_size > 1000
    ranked = [w.clone() for g in graph.groups for w in graph.expert_weights(g)]

    fresh = lower(tiny_model("olmoe"))
    resolve_pass("rank_channels")({"from": str(first), "plot": False})(fresh, context(tmp_path / "second", None))
    for a, b in zip((w for g in fresh.groups for w in fresh.expert_weights(g)), ranked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_score_is_an_options_error():
    with pytest.raises(ValueError, match="unknown score 'tayler'"):
        resolve_pass("rank_channels")({"score": "tayler"})
