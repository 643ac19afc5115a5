"""Family adapters: how each supported MoE family maps to the canonical expert form.

transformers 5 stores a layer's routed experts as stacked tensors behind the experts
interface (``@use_experts_implementation``); the decorator records the layout on each
experts module (``is_concatenated``, ``is_transposed``, ``has_bias``). An adapter adds what
the module does not say: the activation, the router kind, where shared experts live, and the
config fields for expert count, top-k and width.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: listing families or reading configs needs none
    from torch import nn


class UnsupportedModelError(ValueError):
    """The model cannot be lowered: not an MoE, or an MoE family flexc does not know."""


class NotMoEError(UnsupportedModelError):
    pass


class UnsupportedFamilyError(UnsupportedModelError):
    pass


# hidden_act names in configs -> canonical activation kinds of the op.
_ACT_KINDS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class FamilyAdapter:
    """What flexc needs to know about one MoE family beyond the experts module itself."""

    family: str  # config.model_type
    display_name: str
    router: str  # human-readable router kind
    num_experts_attr: str
    intermediate_attr: str
    shared_expert_attrs: tuple[str, ...] = ()  # attributes of the MoE block holding shared experts
    clamped_swiglu: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def activation(self, experts: nn.Module, config) -> tuple[str, float, float]:
        """(activation kind, alpha, limit) for this family's experts module."""
        if self.clamped_swiglu:
            return "swiglu_clamped", float(experts.alpha), float(experts.limit)
        act = getattr(config, "hidden_act", "silu")
        if act not in _ACT_KINDS:
            raise UnsupportedFamilyError(
                f"{self.display_name}: expert activation {act!r} is not supported; supported: {sorted(_ACT_KINDS)}"
            )
        return _ACT_KINDS[act], 1.702, 7.0

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)


FAMILIES: dict[str, FamilyAdapter] = {
    a.family: a
    for a in (
        FamilyAdapter(
            "qwen3_moe", "Qwen3-MoE", "softmax top-k, renormalised when norm_topk_prob",
            "num_experts", "moe_intermediate_size",
        ),
        FamilyAdapter(
            "qwen2_moe", "Qwen2-MoE", "softmax top-k, renormalised when norm_topk_prob",
            "num_experts", "moe_intermediate_size", shared_expert_attrs=("shared_expert", "shared_expert_gate"),
            notes="sigmoid-gated shared expert (counted, not pruned)",
        ),
        FamilyAdapter(
            "mixtral", "Mixtral", "softmax top-k, renormalised", "num_local_experts", "intermediate_size",
        ),
        FamilyAdapter(
            "olmoe", "OLMoE", "softmax top-k, renormalised when norm_topk_prob", "num_experts", "intermediate_size",
        ),
        FamilyAdapter(
            "deepseek_v3", "DeepSeek-V3", "sigmoid scores, group-limited top-k with bias correction, scaled",
            "n_routed_experts", "moe_intermediate_size", shared_expert_attrs=("shared_experts",),
            notes="shared experts (counted, not pruned); first_k_dense_replace layers are dense",
        ),
        FamilyAdapter(
            "gpt_oss", "GPT-OSS", "top-k over logits, softmax over the selected", "num_local_experts",
            "intermediate_size", clamped_swiglu=True,
            notes="interleaved gate/up, transposed storage, biases, clamped SwiGLU",
        ),
    )
}


def supported_families() -> list[FamilyAdapter]:
    return list(FAMILIES.values())


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module with stacked weights (the experts interface layout)."""
    import torch

    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor) and gu.dim() == 3
        and isinstance(dn, torch.Tensor) and dn.dim() == 3
        and hasattr(module, "is_concatenated")
    )


def _config_is_moe(config) -> bool:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return True
    return False


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def detect_family(model_or_config) -> FamilyAdapter:
    """The adapter for a model (or config); clear errors for dense and unknown MoE models."""
    config = getattr(model_or_config, "config", model_or_config)
    config = _text_config(config)
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    names = ", ".join(a.display_name for a in FAMILIES.values())
    has_experts = _config_is_moe(config)
    torch = sys.modules.get("torch")  # without torch imported, it cannot be a module
    if torch is not None and isinstance(model_or_config, torch.nn.Module):
        has_experts = has_experts or any(is_experts_module(m) for m in model_or_config.modules())
    if has_experts:
        raise UnsupportedFamilyError(f"unsupported MoE family {model_type!r}; supported: {names}")
    raise NotMoEError(f"no MoE layers found in model type {model_type!r} (a dense model); flexc compresses MoE models ({names})")
