"""``recover`` on a layer-streamed model: LoRA adapters trained one decoder layer at a time.

The adapters are peft's, as in memory, but they cannot live in a model whose layers come and
go: :class:`LayerAdapters` keeps every layer's LoRA factors (on the compute device: they are
small) and attaches them to a decoder layer while it is loaded (:meth:`LayerAdapters.attached`:
peft's ``LoraModel`` on that layer, its fresh factors swapped for the kept ones, so gradients
land in the kept parameters; unloaded before the layer is freed).

- **Initialisation** matches the in-memory adapters: each factor is drawn from the seed and its
  own name (:func:`flexc.passes.lora.seed_factors`), whatever order peft creates adapters in; each
  layer's adapters are created on an uninitialised copy of the layer (peft reads shapes, not values:
  no weight is loaded).
- **A training step** (:meth:`StreamedRecoverModel.forward_loss`): one forward sweep, each layer
  loaded once and permuted into ranked order; the teacher's hidden states pass through it at full
  width with no adapters (the in-memory teacher: adapters disabled), then the student's at the
  chosen table's widths with the adapters attached, keeping each layer's input (the boundary
  states). The final norm and LM head give both logits, the loss and its gradient at the last
  layer's output; the backward sweep reloads each layer from the last to the first, attaches the
  adapters and back-propagates through it. The same loss and gradients as one step in memory.
- **Merging**: the weights stay in the source shards, so the trained factors go into the compile
  state (``extras["recover_adapters"]``: the factors, peft's options and the chosen table) and the
  exports merge them into each layer as they write it (:func:`merge_into_layer`, the in-memory
  merge rule: expert updates masked to the channels the fine-tune used).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from flexc.ir.experts_impl import set_widths
from flexc.passes.distill import TeacherTargets

STATE_KEY = "recover_adapters"


def _layer_prefix(lm, layer: int) -> str:
    return f"{lm.model.base_model_prefix}.layers.{layer}."


class _Shell:
    """An uninitialised copy of one decoder layer (its shapes; no weight read), with the two LayerGraph
    calls the adapters use: peft reads shapes to create adapters, and a merge's norms depend on the
    factors alone."""

    def __init__(self, lm, layer: int):
        self.model = copy.deepcopy(lm.layers[layer]).to_empty(device=lm.device)
        self._prefix = _layer_prefix(lm, layer)

    def experts_module(self, group) -> nn.Module:
        return self.model.get_submodule(group.path.removeprefix(self._prefix))


class LayerAdapters:
    """Every decoder layer's LoRA factors, attached to a layer while it is loaded."""

    def __init__(self, lm, *, rank: int, alpha: float, targets, params: dict[str, torch.Tensor] | None = None,
                 seed: int | None = None):
        from flexc.passes.lora import EXPERT_WEIGHTS, attention_linears

        self.lm, self.rank, self.alpha, self.targets = lm, rank, alpha, sorted(targets)
        self.modules: list[list[str]] = []  # per layer: attention linears (names within the layer)
        self.parameters: list[list[str]] = []  # per layer: stacked expert weights (names within the layer)
        attention = attention_linears(lm.model) if "attention" in self.targets else []
        if "attention" in self.targets and not attention:
            raise ValueError("recover: targets include 'attention', but the model has no linear layer inside a "
                             "module named '*attn' or '*attention'")
        for i in range(lm.num_layers):
            prefix = _layer_prefix(lm, i)
            group = lm.group_at(i)
            self.modules.append([n.removeprefix(prefix) for n in attention if n.startswith(prefix)])
            self.parameters.append([f"{group.path.removeprefix(prefix)}.{w}" for w in EXPERT_WEIGHTS]
                                   if group is not None and "experts" in self.targets else [])
        if params is None:
            params = self._initial(seed)
        self.params: dict[str, nn.Parameter] = {n: nn.Parameter(t.to(lm.device)) for n, t in params.items()}

    def _config(self, layer: int, modules: bool = True, parameters: bool = True):
        from flexc.passes.lora import lora_config

        mods = self.modules[layer] if modules else []
        params = self.parameters[layer] if parameters else []
        return lora_config(self.rank, self.alpha, mods, params) if mods or params else None

    def _initial(self, seed: int) -> dict[str, torch.Tensor]:
        """The factors :func:`~flexc.passes.lora.attach_adapters` starts the whole model's adapters from
        (``seed`` and each factor's name: the same in memory and streamed)."""
        from peft.tuners.lora import LoraModel

        from flexc.passes.lora import ADAPTER, peft_rng, seed_factors

        out: dict[str, torch.Tensor] = {}
        with peft_rng():
            for i in range(self.lm.num_layers):
                config = self._config(i)
                if config is None:
                    continue
                shell = _Shell(self.lm, i).model
                LoraModel(shell, config, ADAPTER)
                prefix = _layer_prefix(self.lm, i)
                out.update({prefix + n: p.detach().clone() for n, p in shell.named_parameters() if ".lora_" in n})
                del shell
        seed_factors(out, seed)
        return out

    @contextmanager
    def attached(self, layer: int, module: nn.Module):
        """``module`` (loaded decoder ``layer``) with its adapters attached: yields peft's LoRA model,
        whose factors are this object's parameters (gradients accumulate here)."""
        from peft.tuners.lora import LoraModel

        from flexc.passes.lora import ADAPTER, peft_rng

        config = self._config(layer)
        if config is None:
            yield None
            return
        with peft_rng():  # peft draws fresh factors, replaced below
            lora = LoraModel(module, config, ADAPTER)
        try:
            prefix = _layer_prefix(self.lm, layer)
            for name in [n for n, _ in module.named_parameters() if ".lora_" in n]:
                owner, attr = name.rsplit(".", 1)
                setattr(module.get_submodule(owner), attr, self.params[prefix + name])
            yield lora
        finally:
            lora.unload()

    def state(self, table: torch.Tensor) -> dict:
        """What the exports need to merge the adapters: factors, peft's options, the fine-tuned table."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "table": table.clone(),
                "params": {n: p.detach().to("cpu").clone() for n, p in self.params.items()}}

    @classmethod
    def from_state(cls, lm, saved: dict) -> "LayerAdapters":
        return cls(lm, rank=int(saved["rank"]), alpha=float(saved["alpha"]), targets=saved["targets"],
                   params=saved["params"])


def merge_into_layer(adapters: LayerAdapters, table: torch.Tensor | None, layer: int, graph) -> dict | None:
    """Merge decoder ``layer``'s adapters into its loaded weights (``graph``: its LayerGraph), the
    in-memory merge rule (expert updates masked to ``table``'s widths); the merge's norms, or None."""
    from flexc.passes.lora import merge_adapters

    group = adapters.lm.group_at(layer)
    groups = [group] if group is not None else []
    experts = [graph.experts_module(g) for g in groups]  # before peft wraps them
    rows = None
    if table is not None and group is not None:
        rows = table[adapters.lm.groups.index(group)][None]
    with adapters.attached(layer, graph.model) as lora:
        if lora is None:
            return None
        stats = merge_adapters(lora, experts, groups, rows)
    return stats[0] if stats else None


def merge_norms(adapters: LayerAdapters, table: torch.Tensor) -> list[dict]:
    """Per MoE layer, the norms of the update the exports will merge and of the part the mask drops
    (the in-memory recover's report), computed on an uninitialised copy of each layer."""
    stats = []
    for group in adapters.lm.groups:
        with torch.no_grad():
            merged = merge_into_layer(adapters, table, group.layer, _Shell(adapters.lm, group.layer))
        stats.append(merged or {"layer": group.layer, "merged_norm": 0.0, "dropped_norm": 0.0})
    return stats


def layer_merger(lm, state) -> Callable | None:
    """The exports' per-layer transform that merges a streamed ``recover``'s adapters, or None when
    the compile has none."""
    saved = state.extras.get(STATE_KEY)
    if saved is None:
        return None
    adapters = LayerAdapters.from_state(lm, saved)
    table = saved["table"]

    def transform(layer: int, graph) -> None:
        with torch.no_grad():
            merge_into_layer(adapters, table, layer, graph)

    return transform


class StreamedRecoverModel:
    """``recover``'s training step on a layer-streamed model (see the module docstring)."""

    def __init__(self, lm, adapters: LayerAdapters, table: torch.Tensor, loss_kind: str, transform):
        self.lm, self.adapters, self.table, self.loss_kind, self.transform = lm, adapters, table, loss_kind, transform

    def _set_widths(self, graph, table: bool) -> None:
        for group in graph.groups:
            row = (self.table[self.lm.groups.index(group)] if table
                   else torch.full((group.num_experts,), group.intermediate_size))
            set_widths(graph.experts_module(group), row)

    def forward_loss(self, ids: torch.Tensor, weight: float) -> tuple[torch.Tensor, Callable[[], None]]:
        """This rank's share of the loss on ``ids`` (weighted by ``weight``) and a function that
        back-propagates it into the adapters."""
        from flexc.passes.anneal import quality_loss

        lm, distill = self.lm, self.loss_kind == "distill"
        (student,), kwargs = lm.layer_inputs([ids])
        teacher = student
        inputs: list[torch.Tensor] = []
        for i in range(lm.num_layers):
            graph = self.lm.frozen_layer(i, kwargs, self.transform)
            with torch.no_grad():
                if distill:  # the unpruned model: full width, no adapters
                    self._set_widths(graph, table=False)
                    teacher = graph.run(teacher.to(lm.device)).to("cpu")
                self._set_widths(graph, table=True)
                inputs.append(student)
                with self.adapters.attached(i, graph.model):
                    student = graph.run(student.to(lm.device)).to("cpu")
            lm.free(i)
        with lm.head() as head:
            targets = None
            if distill:
                with torch.no_grad():
                    targets = TeacherTargets.from_logits(head(teacher.to(lm.device)), None)
            last = student.to(lm.device).requires_grad_(True)
            part = quality_loss(self.loss_kind, head(last), targets, ids.to(lm.device)) * weight
            (grad,) = torch.autograd.grad(part, last)
        del teacher, targets

        def backward() -> None:
            g = grad.to("cpu")
            for i in reversed(range(lm.num_layers)):
                graph = self.lm.frozen_layer(i, kwargs, self.transform)
                self._set_widths(graph, table=True)
                with self.adapters.attached(i, graph.model):
                    g = graph.backward(inputs[i], g)
                inputs[i] = None  # this layer's boundary state is spent
                lm.free(i)

        return part.detach(), backward
