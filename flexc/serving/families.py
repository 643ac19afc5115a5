"""The MoE families flexc serves in vLLM, and where each one's MoE block sits in vLLM's model.

flexc's vLLM models are vLLM's own model classes (attention, paged KV cache, continuous
batching, weight loading of everything else) with one change: each decoder layer's MoE block is
a :class:`flexc.serving.moe.FlexcMoeBlock`. A :class:`ServedFamily` says which vLLM class to
derive from, which name the decoder layer looks its MoE block class up by (so flexc's block is
built in its place, never beside it), how the router behaves and how the checkpoint names its
expert weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexc.errors import FlexcError


class ServingError(FlexcError):
    """A flexc artifact cannot be served by vLLM as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ServedFamily:
    model_type: str  # the Hugging Face config's model_type
    architecture: str  # the transformers / vLLM architecture name in config.json
    vllm_module: str  # module of vLLM's model class
    block_name: str  # global in vllm_module naming the MoE block class its decoder layer builds
    block_attr: str  # attribute of the decoder layer holding the MoE block
    num_experts_attr: str
    intermediate_attr: str
    # Router: softmax over all experts in float32, top-k, then renormalised over the k when
    # ``renormalize`` is True or, if None, when ``config.norm_topk_prob`` is; the weights cast back
    # to the logits' dtype when ``cast_weights`` (what each transformers router does).
    renormalize: bool | None
    cast_weights: bool
    # Per-expert checkpoint names (legacy layout) of the gate, up and down projections.
    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    shared_expert: bool = False  # sigmoid-gated shared expert (Qwen2-MoE)

    @property
    def display(self) -> str:
        return self.architecture.removesuffix("ForCausalLM")


FAMILIES: dict[str, ServedFamily] = {
    f.model_type: f
    for f in (
        ServedFamily("qwen3_moe", "Qwen3MoeForCausalLM", "vllm.model_executor.models.qwen3_moe",
                     "Qwen3MoeSparseMoeBlock", "mlp", "num_experts", "moe_intermediate_size",
                     renormalize=None, cast_weights=True),
        ServedFamily("qwen2_moe", "Qwen2MoeForCausalLM", "vllm.model_executor.models.qwen2_moe",
                     "Qwen2MoeSparseMoeBlock", "mlp", "num_experts", "moe_intermediate_size",
                     renormalize=None, cast_weights=True, shared_expert=True),
        ServedFamily("mixtral", "MixtralForCausalLM", "vllm.model_executor.models.mixtral",
                     "MixtralMoE", "block_sparse_moe", "num_local_experts", "intermediate_size",
                     renormalize=True, cast_weights=False, gate_name="w1", up_name="w3", down_name="w2"),
    )
}

BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def family_for(model_type: str) -> ServedFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        served = ", ".join(f.display for f in FAMILIES.values())
        raise ServingError(f"flexc's vLLM plugin does not serve model type {model_type!r} yet; it serves "
                           f"{served}. Serve this artifact with flexc.load (transformers) instead.") from None
