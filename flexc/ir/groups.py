"""ExpertGroup: the per-layer record of a model's routed experts, found on the eager model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from flexc.ir.families import FamilyAdapter, NotMoEError, detect_family, is_experts_module


@dataclass
class ExpertGroup:
    """One MoE layer's routed experts.

    ``path`` is the Hugging Face module path of the experts module (``model.layers.3.mlp.experts``);
    ``node`` the name of its flexc op node in the lowered graph (filled by lowering).
    Parameter counts are per layer: routed = stacked expert weights and biases; shared =
    shared experts (and their gate); router = the router's parameters.
    """

    layer: int
    path: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    activation: str
    interleaved: bool
    transposed: bool
    has_bias: bool
    routed_params: int
    shared_params: int = 0
    router_params: int = 0
    shared_paths: list[str] = field(default_factory=list)
    node: str | None = None

    @property
    def params_per_channel(self) -> int:
        """Parameters tied to one intermediate channel of one expert (gate row, up row, down column)."""
        return 3 * self.hidden_size + (2 if self.has_bias else 0)

    def to_dict(self) -> dict:
        return asdict(self)


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _router_of(block: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def find_expert_groups(model: nn.Module, adapter: FamilyAdapter | None = None) -> list[ExpertGroup]:
    """Every MoE layer's routed experts, in layer order. Raises for dense or unknown models."""
    adapter = adapter or detect_family(model)
    from flexc.ir.experts_impl import expert_activation  # avoid an import cycle at module load

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    modules = dict(model.named_modules())
    groups = []
    for path, module in modules.items():
        if not is_experts_module(module):
            continue
        block_path = path.rsplit(".", 1)[0] if "." in path else ""
        block = modules.get(block_path)
        match = _LAYER_RE.search(path)
        layer = int(match.group(1)) if match else len(groups)
        activation, _, _ = expert_activation(module)
        num_experts, _, _ = module.gate_up_proj.shape
        gate_up_shape = module.gate_up_proj.shape
        down_shape = module.down_proj.shape
        if module.is_transposed:
            hidden, intermediate = gate_up_shape[1], gate_up_shape[2] // 2
        else:
            hidden, intermediate = gate_up_shape[2], gate_up_shape[1] // 2
        assert down_shape[0] == num_experts
        routed = module.gate_up_proj.numel() + module.down_proj.numel()
        if module.has_bias:
            routed += module.gate_up_proj_bias.numel() + module.down_proj_bias.numel()
        shared_paths, shared = [], 0
        for attr in adapter.shared_expert_attrs:
            sub = getattr(block, attr, None) if block is not None else None
            if isinstance(sub, nn.Module):
                shared_paths.append(f"{block_path}.{attr}")
                shared += _numel(sub)
        groups.append(
            ExpertGroup(
                layer=layer,
                path=path,
                num_experts=num_experts,
                hidden_size=hidden,
                intermediate_size=intermediate,
                top_k=adapter.top_k(config),
                activation=activation,
                interleaved=not module.is_concatenated,
                transposed=bool(module.is_transposed),
                has_bias=bool(module.has_bias),
                routed_params=routed,
                shared_params=shared,
                router_params=_numel(_router_of(block)) if block is not None else 0,
                shared_paths=shared_paths,
            )
        )
    if not groups:
        raise NotMoEError(f"no MoE layers found in {type(model).__name__}")
    groups.sort(key=lambda g: g.layer)
    return groups
