"""peft LoRA adapters on a model's routed experts (their stacked weights) and attention linears:
attach, list, mask to each expert's width, merge. Used by ``recover`` in memory and streamed."""

from __future__ import annotations

import math
import warnings
import zlib
from contextlib import contextmanager

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def attention_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside attention blocks (any module path part ending in 'attn'/'attention')."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(part.endswith(("attn", "attention")) for part in name.split(".")[:-1])]


def lora_config(rank: int, alpha: float, modules: list[str], params: list[str]):
    """peft's LoRA options for ``modules`` (linear layers) and ``params`` (stacked expert weights)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules, target_parameters=params)


@contextmanager
def peft_rng():
    """Creating adapters leaves the global RNG as it was (their start is drawn by :func:`seed_factors`),
    and peft's query of a deprecated transformers attribute is not reported."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def seed_factors(named: dict[str, torch.Tensor], seed: int) -> None:
    """Draw every LoRA ``A`` factor in ``named`` (names as in the model: ``model.layers.0...lora_A...``)
    from ``seed`` and its own name, in place, as peft draws it (kaiming-uniform, ``a = sqrt(5)``: uniform
    in ``±1/sqrt(fan_in)``); ``B`` factors stay as peft made them (zeros). The adapters' start is then
    a function of the seed alone, not of the order peft creates them in (which changed in peft 0.22),
    so the in-memory and the layer-streamed fine-tunes start from the same factors."""
    with torch.no_grad():
        for name, factor in named.items():
            if ".lora_A" not in name:
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1.0 / math.sqrt(factor[0].numel())
            factor.copy_(torch.rand(factor.shape, generator=generator, dtype=torch.float64)
                         .mul_(2 * bound).sub_(bound).to(factor.dtype))


def attach_adapters(model: nn.Module, groups, *, rank: int, alpha: float, targets, seed: int):
    """Wrap ``model`` (in place) with LoRA adapters; returns the peft model. Base weights stay frozen."""
    from peft import get_peft_model

    params = [f"{g.path}.{name}" for g in groups for name in EXPERT_WEIGHTS] if "experts" in targets else []
    modules = attention_linears(model) if "attention" in targets else []
    if "attention" in targets and not modules:
        raise ValueError("recover: targets include 'attention', but the model has no linear layer inside a module "
                         "named '*attn' or '*attention'")
    for p in model.parameters():
        p.requires_grad_(False)
    with peft_rng():
        peft_model = get_peft_model(model, lora_config(rank, alpha, modules, params))
    # The adapters' init is a function of the seed, so a resumed run (and the streamed fine-tune) matches.
    seed_factors({n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters()}, seed)
    return peft_model


def adapter_parameters(peft_model) -> dict[str, nn.Parameter]:
    """The trainable parameters: LoRA factors only (checked)."""
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    stray = [n for n in trainable if ".lora_" not in n]
    if stray or not trainable:
        raise RuntimeError(f"recover: expected only LoRA parameters to be trainable; found {stray or 'none'}")
    return trainable


def channel_mask(group, widths: torch.Tensor, weight: str) -> torch.Tensor:
    """Boolean mask over a canonical stacked weight: True where the entry belongs to a channel < ``widths[e]``.

    ``gate_up [E, 2I, H]`` (concatenated or interleaved rows) gets ``[E, 2I, 1]``, ``down [E, H, I]`` ``[E, 1, I]``.
    """
    size = group.intermediate_size
    kept = torch.arange(size)[None, :] < widths.to(torch.int64)[:, None]  # [E, I]
    if weight == "down_proj":
        return kept[:, None, :]
    rows = torch.arange(2 * size)
    channel_of_row = rows // 2 if group.interleaved else rows % size
    return kept[:, channel_of_row][:, :, None]


@torch.no_grad()
def merge_adapters(peft_model, experts: list[nn.Module], groups, table: torch.Tensor | None) -> list[dict]:
    """Add every adapter's update into its base weight, in place (shared storage: the graph sees it).

    Expert updates are masked to each expert's prefix ``[0, table[l, e])`` (None: no mask).
    Returns, per MoE layer, the norm of the update merged and of the part dropped by the mask.
    """
    from peft.tuners.lora import LoraLayer, ParamWrapper

    index = {id(m): i for i, m in enumerate(experts)}
    stats = [{"layer": g.layer, "merged_norm": 0.0, "dropped_norm": 0.0} for g in groups]
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        delta = module.get_delta_weight(ADAPTER)
        if not isinstance(module, ParamWrapper):  # an attention linear: serves every budget alike
            module.get_base_layer().weight.add_(delta.to(module.get_base_layer().weight.dtype))
            continue
        base = module.get_base_layer()
        i = index[id(base)]
        param = module.get_param()
        if base.is_transposed:  # work in the canonical [E, 2I, H] / [E, H, I] layout
            delta, param = delta.transpose(1, 2), param.transpose(1, 2)
        keep = (torch.ones((), dtype=torch.bool) if table is None
                else channel_mask(groups[i], table[i], module.parameter_name).to(delta.device))
        merged = delta * keep
        param.add_(merged)
        stats[i]["merged_norm"] = math.hypot(stats[i]["merged_norm"], float(merged.norm()))
        stats[i]["dropped_norm"] = math.hypot(stats[i]["dropped_norm"], float((delta - merged).norm()))
    return stats
