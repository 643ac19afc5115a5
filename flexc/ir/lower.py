"""Lowering: a Hugging Face MoE causal LM -> FlexGraph.

The model's experts modules are switched to flexc's experts implementation (so each MoE
layer calls ``torch.ops.flexc.moe_experts``), each gets a full-width ``flexc_widths`` buffer,
and the model is exported with ``torch.export`` (non-strict) with dynamic batch and sequence
dimensions. Exporting does not copy weights: the graph module's parameters are the model's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from flexc.ir import experts_impl
from flexc.ir.families import detect_family
from flexc.ir.graph import FlexGraph, is_expert_node, module_path_of
from flexc.ir.groups import find_expert_groups

log = logging.getLogger("flexc.lower")


def default_example(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """A small batch of token ids for tracing (values do not matter, shapes are dynamic)."""
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator).to(device)}


def prepare_model(model: nn.Module) -> list:
    """Route every experts module through the flexc op with a full-width widths buffer."""
    groups = find_expert_groups(model)
    experts_impl.use_flexc_experts(model)
    for g in groups:
        module = model.get_submodule(g.path)
        if getattr(module, experts_impl.WIDTHS_BUFFER, None) is None:
            experts_impl.set_widths(module, torch.full((g.num_experts,), g.intermediate_size, dtype=torch.int32))
    return groups


def lower(model: nn.Module, example_inputs: dict[str, Any] | torch.Tensor | None = None, *,
          dynamic: bool = True) -> FlexGraph:
    """Export ``model`` to a FlexGraph whose MoE layers are flexc op nodes.

    ``example_inputs`` is a dict of forward keyword arguments (or a tensor of input ids);
    batch and sequence dims of ``input_ids``/``attention_mask`` are dynamic unless
    ``dynamic=False``.
    """
    adapter = detect_family(model)
    if example_inputs is None:
        example_inputs = default_example(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input_ids": example_inputs}
    kwargs = {**example_inputs, "use_cache": False}
    groups = prepare_model(model)
    dynamic_shapes = {
        name: ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC} if dynamic and isinstance(v, torch.Tensor) and v.dim() == 2 else None)
        for name, v in kwargs.items()
    }
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    program = torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    module = program.module()
    log.debug("exported %s in %.2fs", type(model).__name__, time.perf_counter() - start)
    model.train(was_training)

    by_path = {g.path: g for g in groups}
    for node in module.graph.nodes:
        if is_expert_node(node):
            path = module_path_of(node)
            if path not in by_path:
                raise RuntimeError(f"expert node {node.name} comes from unknown module {path!r}")
            by_path[path].node = node.name
    missing = [g.path for g in groups if g.node is None]
    if missing:
        raise RuntimeError(f"lowering lost MoE layers (no flexc op node): {missing}")
    return FlexGraph(module=module, model=model, groups=groups, family=adapter,
                     example_inputs=dict(example_inputs))
