"""flexc's transformers experts implementation: Hugging Face experts modules call the flexc op.

Registered in transformers' ``ExpertsInterface`` under the name ``"flexc"``, so that
``model.set_experts_implementation("flexc")`` routes every MoE layer through
``torch.ops.flexc.moe_experts`` (one graph node per layer once exported). A module's
optional non-persistent buffer ``flexc_widths [E]`` carries its per-expert widths; changing
it in place switches the budget without touching weights. A module may also carry an op of
its own in place of the flexc op (:func:`override_op`: a training pass's gated op on a layer
that is not in a graph), or hold integer codes and scales instead of its float weights
(:func:`hold_quantized`: a quantized nested artifact loaded by the runtime), or choose each routed
pair's width from its routing weight (:func:`set_adaptive`: a nested runtime's token-adaptive policy,
:mod:`flexc.ir.adaptive`).
"""

from __future__ import annotations

import torch
from torch import nn

from flexc.ir.families import UnsupportedFamilyError, detect_family
from flexc.ir.layout import ExpertLayout, ExpertWeights, QuantScales
from flexc.ir.op import run_experts

IMPLEMENTATION_NAME = "flexc"
WIDTHS_BUFFER = "flexc_widths"
OP_OVERRIDE = "_flexc_op_override"
QUANT_CODES = "flexc_codes_"  # + "gate_up" / "down": int8 codes of a quantized module (hold_quantized)
QUANT_SCALES = "flexc_scales_"
ADAPTIVE = "_flexc_adaptive"  # an AdaptiveLayer (flexc.ir.adaptive) while the module runs adaptive widths


def canonical_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up [E, 2I, H]`` and ``down [E, H, I]`` views of a module's stored weights (no copy)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if experts.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def expert_activation(experts: nn.Module) -> tuple[str, float, float]:
    """(kind, alpha, limit) of a module's gated activation, cached on the module."""
    cached = getattr(experts, "_flexc_activation", None)
    if cached is None:
        if getattr(experts, "has_post_expert_norm", False) or not getattr(experts, "has_gate", True):
            raise UnsupportedFamilyError(f"{type(experts).__name__}: experts without a gated FFN are not supported")
        cached = detect_family(experts.config).activation(experts, experts.config)
        experts._flexc_activation = cached
    return cached


def module_weights(experts: nn.Module) -> ExpertWeights:
    """A transformers experts module's weights as the op's one value (views, no copy); its integer codes
    and scales where :func:`hold_quantized` replaced its weights."""
    activation, alpha, limit = expert_activation(experts)
    quant = experts._buffers.get(QUANT_CODES + "gate_up")
    if quant is not None:
        b = experts._buffers
        gate_up, down = b[QUANT_CODES + "gate_up"], b[QUANT_CODES + "down"]
        scales = QuantScales(b[QUANT_SCALES + "gate_up"], b[QUANT_SCALES + "down"], experts._flexc_quant_group)
    else:
        (gate_up, down), scales = canonical_weights(experts), None
    return ExpertWeights(gate_up, down, experts.gate_up_proj_bias if experts.has_bias else None,
                         experts.down_proj_bias if experts.has_bias else None,
                         ExpertLayout(activation, not experts.is_concatenated, alpha, limit), scales)


def hold_quantized(experts: nn.Module, gate_up_codes: torch.Tensor, gate_up_scales: torch.Tensor,
                   down_codes: torch.Tensor, down_scales: torch.Tensor, group: int) -> None:
    """Make ``experts`` hold int8 codes ``[E, 2I, H]`` / ``[E, H, I]`` (canonical layout) and their group scales
    instead of its float weights, which are freed: the op then dequantizes each expert's kept prefix as it
    runs (:meth:`ExpertWeights.expert`). For inference: the module no longer has trainable expert weights."""
    for name, tensor in (("gate_up", gate_up_codes), ("down", down_codes)):
        experts.register_buffer(QUANT_CODES + name, tensor.to(torch.int8).contiguous(), persistent=False)
    experts.register_buffer(QUANT_SCALES + "gate_up", gate_up_scales.contiguous(), persistent=False)
    experts.register_buffer(QUANT_SCALES + "down", down_scales.contiguous(), persistent=False)
    experts._flexc_quant_group = int(group)
    device = gate_up_codes.device
    experts.gate_up_proj = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
    experts.down_proj = nn.Parameter(torch.empty(0, device=device), requires_grad=False)


def flexc_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    weights, widths = module_weights(self), getattr(self, WIDTHS_BUFFER, None)
    adaptive = self.__dict__.get(ADAPTIVE)
    if adaptive is not None:  # per-pair widths from the routing weights
        widths = adaptive.pair_widths(top_k_index, top_k_weights)
    op = getattr(self, OP_OVERRIDE, None)
    if op is None:
        return run_experts(hidden_states, top_k_index, top_k_weights, weights, widths)
    return op(hidden_states, top_k_index, top_k_weights, *weights.op_args(widths))  # stands in for the op


def register() -> None:
    """Make ``"flexc"`` a valid ``experts_implementation`` (idempotent).

    Called when a model is switched to it, not at import: transformers' MoE integrations take
    seconds to import, and ``flexc validate`` reads pass modules that import this one.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, flexc_experts_forward)


def use_flexc_experts(model: nn.Module) -> None:
    """Route every MoE layer of a transformers model through the flexc op."""
    register()
    model.set_experts_implementation(IMPLEMENTATION_NAME)


def override_op(experts: nn.Module, op=None) -> None:
    """Make ``experts`` call ``op`` (the op's flat arguments: it stands in for the op) instead of the flexc op;
    None restores it. Kept outside the module's registry (an ``nn.Module`` op is not a submodule),
    so the module's parameters, state dict and ``to_empty`` are unchanged."""
    if op is None:
        experts.__dict__.pop(OP_OVERRIDE, None)
    else:
        experts.__dict__[OP_OVERRIDE] = op


def set_adaptive(experts: nn.Module, layer=None) -> None:
    """Make ``experts`` choose each routed pair's width with ``layer`` (an :class:`~flexc.ir.adaptive.AdaptiveLayer`;
    its widths buffer is then unused); None: per-expert widths again. Kept outside the module's registry."""
    if layer is None:
        experts.__dict__.pop(ADAPTIVE, None)
    else:
        experts.__dict__[ADAPTIVE] = layer


def set_widths(experts: nn.Module, widths: torch.Tensor | None) -> None:
    """Attach (or update in place) an experts module's width buffer; None removes it."""
    if widths is None:
        if WIDTHS_BUFFER in experts._buffers:
            del experts._buffers[WIDTHS_BUFFER]
        return
    current = experts._buffers.get(WIDTHS_BUFFER)
    widths = widths.to(device=experts.down_proj.device, dtype=torch.int32)
    if current is not None and current.shape == widths.shape:
        current.copy_(widths)
    else:
        experts.register_buffer(WIDTHS_BUFFER, widths.clone(), persistent=False)
