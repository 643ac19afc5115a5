"""Lowering: every supported family's graph equals Hugging Face eager, forward and backward."""

import pytest
import torch

from flexc.ir import NotMoEError, UnsupportedFamilyError, detect_family, lower
from flexc.ir.graph import is_expert_node
from flexc.ir.testing import tiny_families, tiny_model

FAMILIES = tiny_families()


@pytest.fixture(scope="module", params=FAMILIES)
def lowered(request):
    model = tiny_model(request.param)
    graph = lower(model)
    return request.param, model, graph


def eager_logits(model, ids):
    model.set_experts_implementation("eager")
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        model.set_experts_implementation("flexc")


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 17), (3, 1), (3, 17)])
def test_graph_equals_eager(lowered, batch, seq):
    family, model, graph = lowered
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))
    with torch.no_grad():
        want = eager_logits(model, ids)
        got = graph.logits(ids)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() <= 1e-5, family


def test_every_moe_layer_is_one_op_node(lowered):
    family, model, graph = lowered
    nodes = [n for n in graph.module.graph.nodes if is_expert_node(n)]
    assert len(nodes) == len(graph.groups) >= 1
    assert {n.name for n in nodes} == {g.node for g in graph.groups}
    moe_layers = [i for i in range(model.config.num_hidden_layers)
                  if not (family == "deepseek_v3" and i < model.config.first_k_dense_replace)]
    assert [g.layer for g in graph.groups] == moe_layers


def test_graph_shares_weights_with_model(lowered):
    _, model, graph = lowered
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    for name, p in graph.module.named_parameters():
        assert params[name] == p.data_ptr(), name


def test_expert_weight_gradients_match_eager(lowered):
    family, model, graph = lowered
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        logits = fn()
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        out = {}
        for g in graph.groups:
            experts = model.get_submodule(g.path)
            out[g.path] = (experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
        return out

    want = grads(lambda: eager_logits(model, ids))
    got = grads(lambda: graph.logits(ids))
    model.zero_grad(set_to_none=True)
    for path, (gu_w, dn_w) in want.items():
        gu_g, dn_g = got[path]
        for a, b in ((gu_g, gu_w), (dn_g, dn_w)):
            assert b.abs().max() > 0
            assert (a - b).abs().max() / b.abs().max() <= 1e-5, (family, path)


def test_set_widths_switches_in_place_and_state_round_trips(lowered, tmp_path):
    _, model, graph = lowered
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = graph.logits(ids)
        table = graph.widths()
        table[:, ::2] = 16
        table[:, 1] = 0
        graph.set_widths(table)
        pruned = graph.logits(ids)
        assert (pruned - full).abs().max() > 1e-3
        graph.save_state(tmp_path)
        graph.set_widths(None)
        torch.testing.assert_close(graph.logits(ids), full, rtol=0, atol=0)
        graph.load_state(tmp_path)
        torch.testing.assert_close(graph.widths(), table)
        torch.testing.assert_close(graph.logits(ids), pruned, rtol=0, atol=0)
        graph.set_widths(None)


def test_dense_model_is_a_clear_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotMoEError, match="no MoE layers found"):
        lower(model)


def test_unknown_moe_family_is_a_clear_error():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_next", vocab_size=64, hidden_size=32, num_experts=4, num_hidden_layers=1)
    with pytest.raises(UnsupportedFamilyError, match="unsupported MoE family 'qwen3_next'; supported: Qwen3-MoE"):
        detect_family(config)
