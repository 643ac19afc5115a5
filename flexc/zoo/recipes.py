"""Zoo recipes: everything that determines a reference model, as one frozen dataclass.

A recipe fixes the tokenizer, the model's family and shape, and the training schedule. Together with a
seed and the corpus (:mod:`flexc.data.corpus`) it determines the weights bit for bit on a
given CPU and software stack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["FAMILIES", "GRANULE", "RECIPES", "Recipe"]

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")

#: Every routed expert's intermediate size is a multiple of this, so pruning can keep widths
#: in whole granules.
GRANULE = 16


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to build one zoo model.

    Model fields map onto :class:`transformers.Qwen3MoeConfig` (``family="qwen3_moe"``),
    :class:`transformers.MixtralConfig` (``"mixtral"``), :class:`transformers.Qwen2MoeConfig`
    (``"qwen2_moe"``, with a gated shared expert of ``shared_expert_intermediate_size``) or
    :class:`transformers.OlmoeConfig` (``"olmoe"``); every decoder layer is a MoE layer with top-k
    routing over renormalised top-k probabilities. Qwen2-MoE and OLMoE derive the head size from
    the hidden size, so ``head_dim`` must equal ``hidden_size / num_heads`` there. Weights are fp32.
    """

    name: str
    description: str
    # Tokenizer: byte-level BPE trained on the corpus' train split.
    vocab_size: int
    # Model.
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    family: str = "qwen3_moe"  # or "mixtral", "qwen2_moe", "olmoe"
    shared_expert_intermediate_size: int = 0  # qwen2_moe only: the shared expert's width
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Training: AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``.
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.01
    # Reproducibility and evaluation. ``threads`` is the intra-op thread count used while
    # training: float reductions are split by thread, so weights are bit-identical only
    # between runs with the same count ($FLEXC_ZOO_THREADS overrides it; the manifest
    # records the count used).
    seed: int = 0
    threads: int = 2
    eval_batch_size: int = 16
    corpus: str = "python-stdlib"

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} must be one of {', '.join(map(repr, FAMILIES))}")
        if self.family in ("qwen2_moe", "olmoe") and self.head_dim * self.num_heads != self.hidden_size:
            problems.append(f"{self.family} derives head_dim from hidden_size / num_heads; set head_dim="
                            f"{self.hidden_size // self.num_heads}")
        if bool(self.shared_expert_intermediate_size) != (self.family == "qwen2_moe"):
            problems.append("shared_expert_intermediate_size is for the qwen2_moe family (and required there)")
        if self.moe_intermediate_size % GRANULE:
            problems.append(f"moe_intermediate_size={self.moe_intermediate_size} is not a multiple of {GRANULE}")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (rotary embeddings)")
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1:
            problems.append("steps, batch_size must be >= 1 and seq_len >= 2")
        if problems:
            raise ValueError(f"invalid zoo recipe {self.name!r}: " + "; ".join(problems))

    @property
    def granules(self) -> int:
        """Number of :data:`GRANULE`-channel granules per expert."""
        return self.moe_intermediate_size // GRANULE

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def lr_at(self, step: int, total_steps: int | None = None) -> float:
        """Learning rate for 0-based ``step`` of a run of ``total_steps`` (default ``steps``)."""
        total = self.steps if total_steps is None else total_steps
        warmup = min(self.warmup_steps, max(total // 10, 1))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def model_config(
        self,
        vocab_size: int | None = None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ):
        """The transformers config for this recipe (Qwen3-MoE or Mixtral).

        ``vocab_size`` defaults to the recipe's; pass the trained tokenizer's actual size and
        its special-token ids.
        """
        shared = dict(
            vocab_size=self.vocab_size if vocab_size is None else vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=max(self.seq_len, 512),
            initializer_range=self.initializer_range,
            rms_norm_eps=1e-6,
            use_cache=True,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_dropout=0.0,
            num_experts_per_tok=self.top_k,
            output_router_logits=False,
            router_aux_loss_coef=self.router_aux_loss_coef,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            dtype="float32",
        )
        if self.family == "qwen2_moe":
            from transformers import Qwen2MoeConfig

            del shared["head_dim"]
            return Qwen2MoeConfig(
                **shared,
                intermediate_size=4 * self.hidden_size,  # dense MLP size; unused: every layer is a MoE layer
                moe_intermediate_size=self.moe_intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                num_experts=self.num_experts,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                qkv_bias=True,
                use_sliding_window=False,
            )
        if self.family == "olmoe":
            from transformers import OlmoeConfig

            del shared["head_dim"]
            return OlmoeConfig(
                **shared,
                intermediate_size=self.moe_intermediate_size,  # OLMoE's experts are its only MLPs
                num_experts=self.num_experts,
                norm_topk_prob=True,
                attention_bias=False,
                clip_qkv=None,
            )
        if self.family == "mixtral":
            from transformers import MixtralConfig

            return MixtralConfig(
                **shared,
                intermediate_size=self.moe_intermediate_size,  # Mixtral's experts are its only MLPs
                num_local_experts=self.num_experts,
                sliding_window=None,
                router_jitter_noise=0.0,
            )
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **shared,
            intermediate_size=4 * self.hidden_size,  # dense MLP size; unused: every layer is a MoE layer
            attention_bias=False,
            decoder_sparse_step=1,
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            norm_topk_prob=True,
            mlp_only_layers=[],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for the manifest)."""
        out = dataclasses.asdict(self)
        if self.family == "qwen3_moe":
            # Recorded only for other families, so that Qwen3-MoE caches built before the field
            # existed stay current (and are read the same by older flexc versions).
            del out["family"]
        if not self.shared_expert_intermediate_size:
            del out["shared_expert_intermediate_size"]  # likewise: only Qwen2-MoE has one
        out["adam_betas"] = list(self.adam_betas)
        return out


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="tiny",
            description=(
                "2-layer Qwen3-MoE, hidden 128, 8 experts top-2, expert width 128, 2k vocab; under 3 "
                "minutes on one CPU core. For the quickstart and the tests."
            ),
            vocab_size=2048,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            num_experts=8,
            top_k=2,
            moe_intermediate_size=128,
            seq_len=128,
            batch_size=8,
            steps=640,
            lr=3e-3,
            warmup_steps=60,
            # One thread: these matrices are too small to gain much from two, and one thread
            # stays fast when other processes share the cores (tests, CI).
            threads=1,
        ),
        Recipe(
            name="mixtral-tiny",
            description=(
                "3-layer Mixtral-style MoE, hidden 128, 8 experts top-2, expert width 192, no shared "
                "expert, 2k vocab; a second family for the pruning-quality benchmarks. About 5 minutes on "
                "one CPU core."
            ),
            family="mixtral",
            vocab_size=2048,
            hidden_size=128,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            num_experts=8,
            top_k=2,
            moe_intermediate_size=192,
            seq_len=128,
            batch_size=8,
            steps=640,
            lr=3e-3,
            warmup_steps=60,
            threads=1,
        ),
        Recipe(
            name="small",
            description=(
                "4-layer Qwen3-MoE, hidden 256, 16 experts top-4, expert width 256; about 23 minutes "
                "on 2 free CPU cores (much longer on a shared machine). The reference model for pruning-quality benchmarks."
            ),
            vocab_size=8192,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            num_experts=16,
            top_k=4,
            moe_intermediate_size=256,
            seq_len=128,
            batch_size=16,
            steps=700,
            lr=2e-3,
            warmup_steps=50,
        ),
        Recipe(
            name="qwen2-moe-prose",
            description=(
                "3-layer Qwen2-MoE, hidden 128, 16 experts top-4, expert width 128, a gated shared expert of "
                "256, 4k vocab, trained on English prose (python-docs); a model the anneal's defaults were not "
                "tuned on."
            ),
            family="qwen2_moe",
            corpus="python-docs",
            vocab_size=4096,
            hidden_size=128,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            num_experts=16,
            top_k=4,
            moe_intermediate_size=128,  # 8 granules: room to choose widths down to keep 0.25
            shared_expert_intermediate_size=256,
            seq_len=128,
            batch_size=16,
            steps=600,
            lr=3e-3,
            warmup_steps=50,
        ),
        Recipe(
            name="olmoe-prose",
            description=(
                "3-layer OLMoE, hidden 128, 64 small experts top-8, expert width 96, 4k vocab, trained on "
                "English prose (python-docs); many small experts, a model the anneal's defaults were not tuned on."
            ),
            family="olmoe",
            corpus="python-docs",
            vocab_size=4096,
            hidden_size=128,
            num_layers=3,
            num_heads=4,
            num_kv_heads=4,
            head_dim=32,
            num_experts=64,
            top_k=8,
            moe_intermediate_size=96,
            seq_len=128,
            batch_size=16,
            steps=600,
            lr=3e-3,
            warmup_steps=50,
        ),
    )
}
