"""Baselines: uniform, coverage, expert_prune — budgets in parameter count, nesting, renormalisation."""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flexc.eval.budgets import apply_budget
from flexc.ir import lower
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext, resolve_pass
from flexc.passes.expert_prune import removal_order, set_expert_mask
from flexc.passes.manager import run_checked, run_pass

BUDGETS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3)
GRANULE = 16
I = 64  # intermediate width of the test model: four granules


def data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def make_ctx(tmp_path, state=None):
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=BUDGETS, metric="params"))
    return PassContext(workdir=tmp_path, spec=spec, calibration_data=data(), quiet=True, state=state if state is not None else {},
                       logger=logging.getLogger("test"))


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    graph = lower(tiny_model("qwen3_moe", moe_intermediate_size=I, norm_topk_prob=False))
    ctx = make_ctx(tmp_path_factory.mktemp("rank"))
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    return graph, ctx.state


def run_baseline(graph, state, tmp_path, name, options=None):
    ctx = make_ctx(tmp_path, state.copy())
    check = {"input_ids": data(1, seed=5)[0]}
    run_checked(resolve_pass(name)(options or {}), graph, ctx, check)  # graph left computing the full model
    return ctx.state


def kept_params(graph, table):
    return sum(int(table[i].sum()) * g.params_per_channel for i, g in enumerate(graph.groups))


@pytest.mark.parametrize("method,options,unit", [
    ("uniform", {}, "granule"),
    ("coverage", {}, "granule"),
    ("coverage", {"importance": "load"}, "granule"),
    ("expert_prune", {"criterion": "frequency"}, "expert"),
    ("expert_prune", {"criterion": "reap"}, "expert"),
])
def test_budget_hit_in_parameter_count_and_nested(ranked, tmp_path, method, options, unit):
    graph, state = ranked
    out = run_baseline(graph, state, tmp_path, method, options)
    tables = out.checked_width_tables(allow_expert_masks=True)  # nesting and ranges were checked when built
    assert tables.budgets == pytest.approx(list(BUDGETS)) and tables.metric == "params"
    routed = graph.routed_params
    per_channel = graph.groups[0].params_per_channel
    step = (GRANULE if unit == "granule" else I) * per_channel  # one granule (or one whole expert) of one expert
    for b, table in zip(BUDGETS, tables.tables):
        kept = kept_params(graph, table)
        assert b * routed - step < kept <= b * routed + 1e-6, (b, kept, b * routed)
        if unit == "granule":
            assert (table % GRANULE == 0).all() and (table >= GRANULE).all()
        else:
            assert set(table.unique().tolist()) <= {0, I}


def test_uniform_widths_differ_by_at_most_one_granule(ranked, tmp_path):
    graph, state = ranked
    tables = run_baseline(graph, state, tmp_path, "uniform").width_tables.tables
    for table in tables:
        assert int(table.max() - table.min()) <= GRANULE
    # keep 0.5 of 64 channels is exactly two granules everywhere
    assert (tables[BUDGETS.index(0.5)] == 32).all()


def test_coverage_prefers_experts_with_concentrated_scores(tmp_path):
    # Two layers, two experts: expert 0's score sits in its first channels, expert 1's is flat.
    group = SimpleNamespace(num_experts=2, intermediate_size=64, routed_params=2 * 64 * 3, layer=0)
    graph = SimpleNamespace(groups=[group])
    scores = torch.stack([torch.cat([torch.full((16,), 10.0), torch.full((48,), 0.01)]), torch.ones(64)])
    ctx = make_ctx(tmp_path, {"channel_scores": scores[None]})
    pass_ = resolve_pass("coverage")({"budgets": [0.5], "importance": "none"})
    pass_.run(graph, ctx)
    table = ctx.state.width_tables.tables[0, 0]
    assert table.tolist() == [16, 48]  # same coverage target: the concentrated expert needs far fewer channels


def manual_moe(hidden, router_w, experts, keep, top_k, norm_topk_prob=True):
    """A Qwen3-MoE block with only the experts in ``keep`` (the checkpoint with the others deleted)."""
    ids = torch.tensor(keep)
    logits = hidden @ router_w[ids].t()
    probs = F.softmax(logits.float(), dim=-1)
    top_v, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_v = top_v / top_v.sum(-1, keepdim=True)
    gate_up, down = experts
    inter = down.shape[-1]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for v, j in zip(top_v[t], top_i[t]):
            e = int(ids[j])
            gu = gate_up[e] @ hidden[t]
            out[t] += v * (down[e] @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def layer0_input(model, ids):
    captured = {}
    hook = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return captured["x"].reshape(-1, model.config.hidden_size)


def routing_of(graph, ids):
    """topk ids and weights the graph hands layer 0's experts node."""
    from flexc.ir.op import observe_expert_forward

    gate_up = graph.expert_weights(graph.groups[0])[0]
    seen = {}

    def observer(info):
        if info["event"] == "routing" and info["gate_up"].data_ptr() == gate_up.data_ptr():
            seen["ids"], seen["w"] = info["topk_ids"].clone(), info["topk_weights"].clone()

    with observe_expert_forward(observer), torch.no_grad():
        graph.logits(ids)
    return seen["ids"], seen["w"]


def test_expert_prune_switches_replays_and_renormalises(ranked, tmp_path, replay_by_name):
    graph, state = ranked
    out = run_baseline(graph, state, tmp_path, "expert_prune", {"criterion": "man"})
    masks = out["expert_masks"]
    assert masks.shape == (len(BUDGETS), 2, 8)
    assert (masks[1:] >= masks[:-1]).all()  # nested: a removed expert stays removed
    assert torch.equal(out["width_tables"] == 0, masks)
    assert {"pass": "insert_router_masks", "options": {}} in graph.rewrites
    ids = data(1, seed=7)[0]
    with torch.no_grad():
        full = graph.logits(ids).clone()
        apply_budget(graph, out, 0.5)
        half = graph.logits(ids).clone()
        apply_budget(graph, out, None)
        assert torch.equal(graph.logits(ids), full)
    assert not torch.allclose(half, full)

    # A resumed compile replays the rewrite on a freshly lowered graph and gets the same model.
    graph.save_state(tmp_path / "state")
    model = tiny_model("qwen3_moe", moe_intermediate_size=I, norm_topk_prob=False)
    fresh = lower(model)
    fresh.load_state(tmp_path / "state", replay=replay_by_name)
    with torch.no_grad():
        apply_budget(fresh, out, 0.5)
        torch.testing.assert_close(fresh.logits(ids), half)

    # Masked routing == the checkpoint with those experts deleted, computed by hand.
    removed = torch.zeros(2, 8, dtype=torch.bool)
    removed[0, [1, 4, 6]] = True
    set_expert_mask(fresh, removed)
    ids = ids[:1, :6]
    x = layer0_input(model, ids)
    keep = [e for e in range(8) if not removed[0, e]]
    gate_up, down = (t.detach() for t in fresh.expert_weights(fresh.groups[0]))
    expected = manual_moe(x, model.model.layers[0].mlp.gate.weight.detach(), (gate_up, down), keep, top_k=2,
                          norm_topk_prob=False)
    topk_ids, topk_w = routing_of(fresh, ids)
    assert not torch.isin(topk_ids, torch.tensor([1, 4, 6])).any()
    from flexc.ir.op import ExpertWeights, moe_experts_reference

    torch.testing.assert_close(moe_experts_reference(x, topk_ids, topk_w, ExpertWeights(gate_up, down)), expected,
                               rtol=1e-5, atol=1e-5)
    set_expert_mask(fresh, None)
    assert torch.isin(routing_of(fresh, ids)[0], torch.tensor([1, 4, 6])).any()  # switchable: masks off


def test_removal_order_balances_layers_and_respects_top_k():
    scores = torch.tensor([[5.0, 1.0, 3.0, 4.0], [1.0, 2.0, 9.0, 8.0]])
    order = removal_order(scores, [2, 2])
    assert len(order) == 4
    counts = torch.zeros(2)
    for l, _ in order:
        counts[l] += 1
        assert abs(int(counts[0]) - int(counts[1])) <= 1
    assert order[0] in {(0, 1), (1, 0)}
    assert (0, 1) in order[:2] and (1, 0) in order[:2]


def test_clear_errors(ranked, tmp_path):
    graph, state = ranked
    with pytest.raises(ValueError, match="channel scores"):
        resolve_pass("coverage")({}).run(graph, make_ctx(tmp_path))
    with pytest.raises(ValueError, match="below"):
        resolve_pass("uniform")({"budgets": [0.1]}).run(graph, make_ctx(tmp_path, state.copy()))
    with pytest.raises(ValueError, match="top_k"):
        resolve_pass("expert_prune")({"budgets": [0.1]}).run(graph, make_ctx(tmp_path, state.copy()))
    with pytest.raises(ValueError, match="criterion"):
        resolve_pass("expert_prune")({"criterion": "nope"})
