"""FlexGraph: an exported fx GraphModule plus per-layer expert metadata.

The graph module shares its parameters with the Hugging Face model it was lowered from (no
weight copy), so a pass that rewrites expert weights in place (e.g. a channel permutation)
changes both; ``model`` stays the handle for saving checkpoints with ``save_pretrained``.

What :meth:`FlexGraph.save_state` writes scales with what passes changed, not with the model:
the graph knows which parameters still hold the source checkpoint's values (each parameter's
storage and autograd version counter, recorded when the graph is built and after a restore;
any in-place write through torch bumps the counter) and which hold them permuted by
:meth:`FlexGraph.permute_channels` (the ranking). Only other parameters are written, with the
permutations; :meth:`FlexGraph.load_state` re-derives the rest from a fresh lowering of the
same source. A pass that changes a weight behind torch's back (through ``.data``) must call
:meth:`FlexGraph.mark_changed`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from flexc.ir.experts_impl import WIDTHS_BUFFER, canonical_weights, set_widths
from flexc.ir.families import FamilyAdapter
from flexc.ir.groups import ExpertGroup
from flexc.ir.op import op_overloads

STATE_WEIGHTS = "graph_weights.safetensors"
STATE_META = "graph_meta.json"
GRAPH_PREFIX = "graph::"
PERM_PREFIX = "channel_perm::"  # + group index: the permutation the ranking applied to its experts
WEIGHTS_FORMAT = "changed"  # graph_meta.json "weights": only parameters that differ from the source
# Per-layer router-logit mask buffers of the graph module (added by expert_prune's insert_router_masks).
MASK_PREFIX = "flexc_router_mask_"


def is_expert_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in op_overloads()


def module_path_of(node: fx.Node) -> str | None:
    """Innermost Hugging Face module path that produced ``node`` (from torch.export metadata)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    # torch.export prefixes paths of submodules reached through attributes with "L['self']." etc.
    return path.removeprefix("L['self'].")


@dataclass
class FlexGraph:
    """A lowered MoE model: ``module`` (fx GraphModule) + ``groups`` (one per MoE layer)."""

    module: fx.GraphModule
    model: nn.Module
    groups: list[ExpertGroup]
    family: FamilyAdapter
    example_inputs: dict[str, Any] = field(default_factory=dict)
    properties: set[str] = field(default_factory=lambda: {"lowered"})
    # Structural rewrites applied by passes ({"pass": name, "options": {...}}), replayed by
    # load_state on a freshly lowered graph before its tensors are restored.
    rewrites: list[dict] = field(default_factory=list)
    # Permutations applied to each MoE layer's source expert weights (group index -> [E, I]).
    channel_perms: dict[int, torch.Tensor] = field(default_factory=dict)
    # Parameters holding source values (possibly permuted): name -> (storage pointer, version).
    _unchanged: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._mark_unchanged(name for name, _ in self.model.named_parameters())

    # ---- running -----------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def logits(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.module(input_ids=input_ids, use_cache=False, **kwargs).logits

    # ---- structure ----------------------------------------------------------------------
    def expert_nodes(self) -> list[fx.Node]:
        return [n for n in self.module.graph.nodes if is_expert_node(n)]

    def group(self, layer: int) -> ExpertGroup:
        for g in self.groups:
            if g.layer == layer:
                return g
        raise KeyError(f"no MoE layer {layer}; MoE layers: {[g.layer for g in self.groups]}")

    def node_of(self, group: ExpertGroup) -> fx.Node:
        for n in self.module.graph.nodes:
            if n.name == group.node:
                return n
        raise KeyError(f"graph has no node {group.node!r} for layer {group.layer}")

    def experts_module(self, group: ExpertGroup) -> nn.Module:
        """The Hugging Face experts module whose parameters the graph uses."""
        return self.model.get_submodule(group.path)

    def expert_weights(self, group: ExpertGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` views (shared storage)."""
        return canonical_weights(self.experts_module(group))

    # ---- rewriting (what passes that restructure the graph call) --------------------------
    def replace_expert_node(self, node: fx.Node, group: ExpertGroup, target: str | Callable, *,
                            submodule: nn.Module | None = None, args: tuple | None = None) -> fx.Node:
        """Replace ``group``'s expert node ``node`` by a call of ``target`` with the same arguments.

        ``target`` is a function (``call_function``) or, with ``submodule``, the name under which
        that module is added to the graph module (``call_module``). ``args`` replaces the node's
        positional arguments. The new node keeps the old one's metadata and users, and ``group``
        points at it. Finish a pass's rewrites with :meth:`record_rewrite`.
        """
        graph = self.module.graph
        if submodule is not None:
            self.module.add_submodule(target, submodule)
        with graph.inserting_after(node):
            call = graph.call_module if submodule is not None else graph.call_function
            new = call(target, args=node.args if args is None else args, kwargs=node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        group.node = new.name
        return new

    def record_rewrite(self, pass_name: str, options: dict) -> None:
        """Check and recompile the rewritten graph; record the rewrite (replayed when a compile resumes)."""
        self.module.graph.lint()
        self.module.recompile()
        self.rewrites.append({"pass": pass_name, "options": options})

    @property
    def routed_params(self) -> int:
        return sum(g.routed_params for g in self.groups)

    # ---- widths -------------------------------------------------------------------------
    def widths(self) -> torch.Tensor:
        """Current widths ``[layers, experts]`` (full width where none is set)."""
        rows = []
        for g in self.groups:
            buf = getattr(self.experts_module(g), WIDTHS_BUFFER, None)
            rows.append(torch.full((g.num_experts,), g.intermediate_size, dtype=torch.int32) if buf is None
                        else buf.detach().to("cpu", torch.int32))
        return torch.stack(rows)

    def set_widths(self, table: torch.Tensor | None) -> None:
        """Set every layer's widths in place (``[layers, experts]``); None means full width.

        The lowered graph reads each layer's width buffer, so this changes the computation
        without re-export, weight copies or recompilation.
        """
        for i, g in enumerate(self.groups):
            row = (torch.full((g.num_experts,), g.intermediate_size, dtype=torch.int32) if table is None
                   else torch.as_tensor(table[i], dtype=torch.int32))
            if row.shape != (g.num_experts,) or int(row.min()) < 0 or int(row.max()) > g.intermediate_size:
                raise ValueError(f"layer {g.layer}: widths must be {g.num_experts} values in [0, {g.intermediate_size}]")
            set_widths(self.experts_module(g), row)
            gm_buf = _graph_buffer(self.module, g.path)
            if gm_buf is not None and gm_buf.data_ptr() != getattr(self.experts_module(g), WIDTHS_BUFFER).data_ptr():
                gm_buf.copy_(row)

    # ---- weights that differ from the source --------------------------------------------
    @staticmethod
    def _stamp(p: torch.Tensor) -> tuple[int, int]:
        return p.data_ptr(), p._version

    def _mark_unchanged(self, names) -> None:
        params = dict(self.model.named_parameters())
        self._unchanged.update({n: self._stamp(params[n]) for n in names})

    def changed_parameters(self) -> list[str]:
        """Parameters whose values are not the source checkpoint's (nor its permutation by
        :attr:`channel_perms`): written in full by :meth:`save_state`."""
        return [n for n, p in self.model.named_parameters() if self._unchanged.get(n) != self._stamp(p)]

    def mark_changed(self, name: str) -> None:
        """Say that parameter ``name`` was changed in a way its version counter does not show."""
        self._unchanged.pop(name, None)

    def permute_channels(self, layer_index: int, perms: torch.Tensor) -> None:
        """Permute MoE layer ``layer_index``'s expert channels in place (``perms[e, j]``: the old
        channel at new position ``j``), and record it, so its weights need not be saved."""
        from flexc.ir.permute import permute_expert_channels

        group = self.groups[layer_index]
        prefix = group.path + "."
        names = [n for n, _ in self.model.named_parameters() if n.startswith(prefix)]
        changed = set(self.changed_parameters())
        still_source = not any(n in changed for n in names)
        permute_expert_channels(self, layer_index, perms)
        perms = perms.to("cpu", torch.int64)
        before = self.channel_perms.get(layer_index)
        # Composed with an earlier permutation: new position j holds source channel before[perm[j]].
        self.channel_perms[layer_index] = perms if before is None else torch.gather(before, 1, perms)
        if still_source:
            self._mark_unchanged(names)

    # ---- persistence (used by the driver to resume after a completed stage) -------------
    def save_state(self, directory: str | Path) -> None:
        """Write what passes changed (atomic per file): the parameters that differ from the
        source checkpoint, the channel permutations, widths, the graph's own tensors, metadata."""
        from safetensors.torch import save_file

        from flexc.utils.atomic import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = dict(self.model.named_parameters())
        tensors = {name: params[name].detach().contiguous() for name in self.changed_parameters()}
        tensors.update({f"{PERM_PREFIX}{i}": perm.contiguous() for i, perm in self.channel_perms.items()})
        tensors.update({f"{g.path}.{WIDTHS_BUFFER}": self.widths()[i] for i, g in enumerate(self.groups)})
        tensors.update({f"{GRAPH_PREFIX}{name}": t.detach().contiguous() for name, t in self._graph_own_tensors()})
        with atomic_path(directory / STATE_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        meta = {"groups": [g.to_dict() for g in self.groups], "properties": sorted(self.properties),
                "rewrites": self.rewrites, "weights": WEIGHTS_FORMAT}
        with atomic_path(directory / STATE_META) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))

    def load_state(self, directory: str | Path,
                   replay: Callable[[dict, "FlexGraph", Path], None] | None = None,
                   replay_dir: str | Path | None = None) -> None:
        """Restore what :meth:`save_state` wrote into this (freshly lowered) graph, in place.

        Structural rewrites the saved graph lists beyond this graph's own are re-applied by
        ``replay(rewrite, graph, workdir)`` first (the caller decides which passes may run;
        ``workdir`` is ``replay_dir``, default ``directory/replay``); without ``replay`` such a
        state cannot be restored. This graph's weights must be the
        source checkpoint's (a fresh lowering): the saved permutations are applied to them, then
        the saved parameters replace theirs. (A state written before only changed parameters were
        saved holds every parameter; it restores the same way.)
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        tensors = load_file(str(directory / STATE_WEIGHTS))
        meta = json.loads((directory / STATE_META).read_text())
        pending = meta.get("rewrites", [])[len(self.rewrites):]
        if pending and replay is None:
            raise ValueError(f"{directory}: the saved graph was rewritten by passes; pass replay= to restore it")
        for rewrite in pending:
            replay(rewrite, self, Path(replay_dir) if replay_dir is not None else directory / "replay")
        if meta.get("weights") == WEIGHTS_FORMAT:
            from flexc.ir.permute import check_permutations

            for key in sorted((k for k in tensors if k.startswith(PERM_PREFIX)), key=lambda k: int(k[len(PERM_PREFIX):])):
                i = int(key[len(PERM_PREFIX):])
                if not 0 <= i < len(self.groups):
                    raise ValueError(f"{directory / STATE_WEIGHTS}: {key} names no MoE layer of this model")
                g = self.groups[i]
                check_permutations(tensors[key], g.num_experts, g.intermediate_size, f"{directory / STATE_WEIGHTS}: {key}")
                self.permute_channels(i, tensors[key])
        else:  # the older format: every parameter saved
            missing = [n for n, _ in self.model.named_parameters() if n not in tensors]
            if missing:
                raise ValueError(f"{directory / STATE_WEIGHTS}: no saved values for {missing[:3]}")
        saved = [n for n, _ in self.model.named_parameters() if n in tensors]
        params = dict(self.model.named_parameters())
        for name in saved:
            if tensors[name].shape != params[name].shape:
                raise ValueError(f"{directory / STATE_WEIGHTS}: {name} is {list(tensors[name].shape)}; this model's is "
                                 f"{list(params[name].shape)} (a state of another model?)")
        missing = [f"{g.path}.{WIDTHS_BUFFER}" for g in self.groups if f"{g.path}.{WIDTHS_BUFFER}" not in tensors]
        if missing:
            raise ValueError(f"{directory / STATE_WEIGHTS}: no saved widths for {missing[0]}")
        with torch.no_grad():
            for name in saved:
                params[name].copy_(tensors[name])
            for name, t in self._graph_own_tensors():
                t.copy_(tensors[f"{GRAPH_PREFIX}{name}"])
        try:
            self.set_widths([tensors[f"{g.path}.{WIDTHS_BUFFER}"] for g in self.groups])
        except ValueError as exc:
            raise ValueError(f"{directory / STATE_WEIGHTS}: {exc}") from None
        self.properties = set(meta["properties"])
        for name in saved:  # they differ from the source (or, in the older format, may): saved again
            self.mark_changed(name)

    def _graph_own_tensors(self):
        """Parameters and buffers passes added to the graph module (not the model's own)."""
        model_names = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        for name, t in list(self.module.named_parameters()) + list(self.module.named_buffers()):
            if name not in model_names:
                yield name, t

    # ---- views --------------------------------------------------------------------------
    @property
    def code(self) -> str:
        return self.module.code


def _graph_buffer(gm: fx.GraphModule, path: str) -> torch.Tensor | None:
    try:
        return gm.get_buffer(f"{path}.{WIDTHS_BUFFER}")
    except AttributeError:
        return None


# ---- router masks: whole-expert removal (buffers added by expert_prune's insert_router_masks) ----


def has_router_masks(graph) -> bool:
    """Whether every MoE layer's router logits pass through a mask buffer."""
    return all(hasattr(graph.module, MASK_PREFIX + str(g.layer)) for g in graph.groups)


def set_expert_mask(graph, removed: torch.Tensor | None) -> None:
    """Mask the router logits of ``removed [L, E]`` (bool) experts; None removes nothing."""
    if removed is not None and bool(torch.as_tensor(removed).any()) and not has_router_masks(graph):
        raise ValueError("this graph has no router masks: run expert_prune (or insert_router_masks) first")
    if not has_router_masks(graph):
        return
    for i, g in enumerate(graph.groups):
        buf = getattr(graph.module, MASK_PREFIX + str(g.layer))
        row = torch.zeros(g.num_experts, dtype=torch.bool) if removed is None else torch.as_tensor(removed[i])
        if row.shape != (g.num_experts,):
            raise ValueError(f"layer {g.layer}: expected a mask of {g.num_experts} experts, got {tuple(row.shape)}")
        if int((~row).sum()) < g.top_k:
            raise ValueError(f"layer {g.layer}: at least top_k={g.top_k} experts must remain")
        buf.copy_(torch.where(row.to(buf.device), float("-inf"), 0.0).to(buf.dtype))
