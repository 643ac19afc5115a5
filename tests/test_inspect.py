"""`flexc inspect` counts equal counts computed directly from the state dict."""

import pytest

from flexc.ir.inspect import summarize
from flexc.ir.testing import tiny_families, tiny_model


def counts_from_state_dict(model):
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("flexc_widths")}
    total = sum(p.numel() for p in model.parameters())
    routed = sum(v.numel() for k, v in sd.items() if ".experts." in k and "shared" not in k)
    shared = sum(v.numel() for k, v in sd.items() if ".shared_expert" in k)
    embeddings = sum(v.numel() for k, v in sd.items() if "embed_tokens" in k or k.startswith("lm_head"))
    return total, routed, shared, embeddings


@pytest.mark.parametrize("family", tiny_families())
def test_counts_match_state_dict(family):
    model = tiny_model(family)
    s = summarize(model)
    total, routed, shared, embeddings = counts_from_state_dict(model)
    assert s.total_params == total
    assert s.routed_params == routed == sum(g.routed_params for g in s.groups)
    assert s.shared_params == shared == sum(g.shared_params for g in s.groups)
    assert s.embedding_params == embeddings
    parts = (s.routed_params + s.shared_params + s.router_params + s.attention_params + s.embedding_params
             + s.dense_mlp_params + s.other_params)
    assert parts == s.total_params
    g = s.groups[0]
    config = model.config
    assert g.top_k == config.num_experts_per_tok
    assert g.hidden_size == config.hidden_size


def test_qwen2_and_mixtral_exact_figures():
    # Hand-computed from the tiny configs: 8 experts, H=32, I=32, 2 layers.
    per_layer = 8 * (2 * 32 * 32 + 32 * 32)
    q = summarize(tiny_model("qwen2_moe"))
    assert q.routed_params == 2 * per_layer
    assert q.shared_params == 2 * (3 * 32 * 48 + 32)  # shared expert MLP (I=48) + its sigmoid gate
    m = summarize(tiny_model("mixtral"))
    assert m.routed_params == 2 * per_layer and m.shared_params == 0
    assert m.router_params == 2 * 8 * 32
