"""Tiny random models of every supported family, for tests and for users testing their passes."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# Per family: config overrides giving 8 experts, top-2, intermediate width 32 (two 16-granules).
_TINY = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      norm_topk_prob=True, head_dim=8),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4, rope_interleave=False),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=8,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                    max_position_embeddings=131072),  # GPT-OSS YaRN expects 32x its 4096 base
}


def tiny_families() -> list[str]:
    return list(_TINY)


def tiny_config(family: str, **overrides):
    """A small random config of ``family`` (a transformers ``model_type``)."""
    kwargs = {**_COMMON, **_TINY[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny causal LM of ``family``, in eval mode.

    Weights get a larger init than transformers' default so that expert outputs are far from
    zero (a comparison of near-zero outputs would prove nothing); routers and correction
    biases are randomised so that every expert is used.
    """
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()
