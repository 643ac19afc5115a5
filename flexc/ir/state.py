"""The compile state: what passes hand each other, one typed record.

One :class:`CompileState` travels through a compile. Every pass gets it as ``ctx.state`` and
reads or sets its attributes; the driver saves it to ``<out>/state/`` after every pass and a
resumed compile loads it back; exporters, the report, ``flexc compare`` and eval read it.

- ``routing_counts``, ``routing_weight_sums`` ``[layers, experts]``: set by ``rank_channels``
  (by ``expert_prune`` when no earlier pass collected them); read by ``anneal`` and the
  baselines (``flops`` metric, coverage's ``load`` importance), ``expert_prune``, compare.
- ``channel_scores`` ``[layers, experts, intermediate]``, ranked order: set by
  ``rank_channels``; read by ``coverage`` (and so ``anneal``'s warm start).
- ``channel_perms`` ``[layers, experts, intermediate]``: the ranking's permutation, set by the
  layer-streamed ``rank_channels`` (:mod:`flexc.compiler.streamed`), whose exports apply it to
  each loaded layer (a graph's ``rank_channels`` permutes the weights in place instead).
- ``width_tables`` (one :class:`WidthTables`): set by ``anneal``, ``uniform``, ``coverage``,
  ``expert_prune``; read by ``fold_masks``, ``recover``, the exporters, the report, compare, eval.
- ``width_method``: set by the baselines (a record of which one chose the tables).
- ``expert_masks`` ``[budgets, layers, experts]`` bool: set by ``expert_prune``; read by the
  exporters (which refuse it), the report, eval.
- ``recovered_keep``, ``kernel_backend``: set by ``recover``, ``lower_kernels`` (records).
- ``quantization``: set by ``quantize``: its scheme (``scheme``, ``bits``, ``group_size``, ``method``)
  and ``scales`` (per layer ``"layer{L}"``: ``gate_up [E, 2I, H/group]``, ``down [E, H, I/group]``),
  which with the dequantized weights give back the integer codes; read by the exporters, the report.
- ``adaptive_policy``: set by ``adaptive_widths``: the token-adaptive policy
  (:meth:`flexc.ir.adaptive.AdaptivePolicy.to_dict`); read by the nested export, the report.
- ``extras``: a user pass's own results, under names of its choosing.

``extras`` holds tensors and JSON values (nested lists and dicts with string keys); anything
else cannot be saved between stages and is refused when the state is saved.

Older code reads and writes the state as a dict (``ctx.state["routing_counts"]``). That still
works: a name of an attribute above reads and writes the attribute, the hand-off names of the
width tables (``width_budgets``, ``width_tables``, ``width_metric``) read from
:attr:`CompileState.width_tables` (set them as one :class:`WidthTables`), and any other name is
an entry of ``extras``. There is no second store.

On disk (:meth:`CompileState.save`): the width tables in the format every flexc artifact uses
(``flexc_widths.safetensors``, :meth:`WidthTables.save`), the other tensors in
``compile_state.safetensors``, everything else in ``compile_state.json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from flexc.ir.tables import WIDTHS_FILE, WidthTables

STATE_JSON = "compile_state.json"
STATE_TENSORS = "compile_state.safetensors"
LEGACY_JSON = "ctx_state.json"  # the dict form flexc wrote before the state was typed
LEGACY_TENSORS = "ctx_state.safetensors"

# Hand-off names of the width tables in the dict form; they read from ``width_tables``.
_WIDTH_KEYS = ("width_budgets", "width_tables", "width_metric")
_TENSOR_FIELDS = ("routing_counts", "routing_weight_sums", "channel_scores", "channel_perms", "expert_masks")
_VALUE_FIELDS = ("width_method", "recovered_keep", "kernel_backend", "adaptive_policy")


@dataclass(eq=False)
class CompileState(MutableMapping):
    """What passes hand each other (the module docstring lists who sets and reads what)."""

    routing_counts: torch.Tensor | None = None  # [layers, experts] token-slots routed to each expert
    routing_weight_sums: torch.Tensor | None = None  # [layers, experts] their summed router weights
    channel_scores: torch.Tensor | None = None  # [layers, experts, intermediate], ranked (descending) order
    channel_perms: torch.Tensor | None = None  # [layers, experts, intermediate]: the ranking (streamed compile)
    width_tables: WidthTables | None = None  # one [layers, experts] table per budget, nested
    width_method: str | None = None  # the baseline that chose the tables (None: anneal)
    expert_masks: torch.Tensor | None = None  # [budgets, layers, experts] bool: experts removed (expert_prune)
    recovered_keep: float | None = None  # the budget recover fine-tuned at
    kernel_backend: str | None = None  # "triton" or "reference", chosen by lower_kernels
    quantization: dict | None = None  # quantize's scheme (scheme, bits, group_size, method) and "scales"
    adaptive_policy: dict | None = None  # adaptive_widths' policy (AdaptivePolicy.to_dict())
    extras: dict[str, Any] = field(default_factory=dict)  # user passes' own results

    __eq__ = object.__eq__  # identity: Mapping's would compare tensors elementwise
    __hash__ = object.__hash__

    # ---- reading the width tables ---------------------------------------------------------
    def checked_width_tables(self, *, allow_expert_masks: bool = False) -> WidthTables:
        """The width tables, or an error saying which pass to add.

        Whole-expert pruning (``expert_masks``) also masks router logits, which width tables
        alone cannot express: only callers that apply those masks themselves accept it.
        """
        if self.width_tables is None:
            raise ValueError("no width tables: the pipeline must run a pass that chooses widths "
                             "(anneal, or a baseline such as uniform) before this stage")
        if self.removes_experts() and not allow_expert_masks:
            raise ValueError("these tables remove whole experts (expert_prune), which also re-routes tokens "
                             "through router masks; nested, sliced and ONNX exports support width tables "
                             "only (anneal, uniform, coverage) for now")
        return self.width_tables

    def removes_experts(self) -> bool:
        """Whether a budget removes whole experts through router masks (expert_prune)."""
        return self.expert_masks is not None and bool(self.expert_masks.any())

    def copy(self) -> "CompileState":
        """A copy whose attributes can be replaced without touching this one (tensors are shared)."""
        return CompileState(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"},
                            extras=copy.copy(self.extras))

    # ---- the dict form (older passes) ------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in _WIDTH_KEYS:
            if self.width_tables is None:
                raise KeyError(key)
            t = self.width_tables
            return {"width_budgets": torch.tensor(t.budgets, dtype=torch.float64), "width_tables": t.tables,
                    "width_metric": t.metric}[key]
        if key in _TENSOR_FIELDS or key in _VALUE_FIELDS:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extras[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _WIDTH_KEYS:
            raise TypeError(f"ctx.state[{key!r}]: set the width tables as one record, "
                            "ctx.state.width_tables = flexc.ir.tables.WidthTables(budgets, tables, metric, layers, full)")
        if key in _TENSOR_FIELDS or key in _VALUE_FIELDS:
            setattr(self, key, value)
        else:
            self.extras[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        if key in _WIDTH_KEYS:
            self.width_tables = None
        elif key in _TENSOR_FIELDS or key in _VALUE_FIELDS:
            setattr(self, key, None)
        else:
            del self.extras[key]

    def __iter__(self) -> Iterator[str]:
        if self.width_tables is not None:
            yield from _WIDTH_KEYS
        yield from (k for k in (*_TENSOR_FIELDS, *_VALUE_FIELDS) if getattr(self, k) is not None)
        yield from self.extras

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        set_ = [f.name for f in fields(self) if f.name != "extras" and getattr(self, f.name) is not None]
        return f"CompileState(set: {', '.join(set_) or 'nothing'}; extras: {', '.join(self.extras) or 'none'})"

    # ---- on disk --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the state into ``directory`` (each file atomically)."""
        from safetensors.torch import save_file

        from flexc.utils.atomic import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        tree: dict[str, Any] = {}
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
                tree[name] = {"__tensor__": name}
        for name in _VALUE_FIELDS:
            tree[name] = getattr(self, name)
        tree["extras"] = _flatten(self.extras, "extras", tensors)
        tree["quantization"] = _flatten(self.quantization, "quantization", tensors)
        tree["width_tables"] = WIDTHS_FILE if self.width_tables is not None else None
        if self.width_tables is not None:
            self.width_tables.save(directory / WIDTHS_FILE)
        with atomic_path(directory / STATE_TENSORS) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(directory / STATE_JSON) as tmp:
            tmp.write_text(json.dumps(tree, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, groups=None) -> "CompileState":
        """The state :meth:`save` wrote into ``directory``.

        A state saved by flexc before the state was typed (``ctx_state.json``) is read too;
        its width tables need the graph's MoE layers (``groups``).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / STATE_JSON).is_file() and (directory / LEGACY_JSON).is_file():
            tree = json.loads((directory / LEGACY_JSON).read_text())
            legacy = _unflatten(tree, load_file(str(directory / LEGACY_TENSORS)))
            return cls.from_mapping(legacy, groups)
        tree = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
        state = cls(extras=_unflatten(tree.get("extras") or {}, tensors))
        for name in _TENSOR_FIELDS:
            if tree.get(name) is not None:
                setattr(state, name, tensors[name])
        for name in _VALUE_FIELDS:
            setattr(state, name, tree.get(name))
        state.quantization = _unflatten(tree.get("quantization"), tensors)
        if tree.get("width_tables"):
            try:
                state.width_tables = WidthTables.load(directory / tree["width_tables"])
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{directory / tree['width_tables']}: {exc}") from None
        return state

    def check(self, groups, where: str | Path) -> None:
        """What a digest cannot vouch for: every tensor has this model's shape (``groups``: its MoE
        layers) and a meaningful value; permutations are permutations, width tables belong to these
        layers. Raises ValueError naming the file in ``where`` (the folder :meth:`save` wrote)."""
        from flexc.ir.permute import check_permutations

        tensors_file, widths_file = Path(where) / STATE_TENSORS, Path(where) / WIDTHS_FILE
        L = len(groups)
        E = {g.num_experts for g in groups}
        I = {g.intermediate_size for g in groups}
        shape_le = (L, *E) if len(E) == 1 else None

        def bad(name: str, why: str) -> ValueError:
            file = widths_file if name == "width_tables" else tensors_file
            return ValueError(f"{file}: {name} {why} (a state of another model, or edited?)")

        for name in ("routing_counts", "routing_weight_sums"):
            t = getattr(self, name)
            if t is None:
                continue
            if shape_le is not None and tuple(t.shape) != shape_le:
                raise bad(name, f"is {list(t.shape)}; expected [{L}, {shape_le[1]}] (layers, experts)")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise bad(name, "holds negative or non-finite values")
        for name in ("channel_scores", "channel_perms"):
            t = getattr(self, name)
            if t is None:
                continue
            if shape_le is not None and len(I) == 1 and tuple(t.shape) != (*shape_le, *I):
                raise bad(name, f"is {list(t.shape)}; expected [{L}, {shape_le[1]}, {next(iter(I))}] "
                                "(layers, experts, channels)")
            if name == "channel_scores" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise bad(name, "holds non-finite values")
        if self.channel_perms is not None:
            for i, g in enumerate(groups):
                check_permutations(self.channel_perms[i], g.num_experts, g.intermediate_size,
                                   f"{tensors_file}: channel_perms of layer {g.layer}")
        t = self.width_tables
        if t is not None and (list(t.layers) != [g.layer for g in groups]
                              or list(t.full) != [g.intermediate_size for g in groups]
                              or (len(E) == 1 and t.tables.shape[2] != next(iter(E)))):
            raise bad("width_tables", f"are for layers {list(t.layers)} of widths {list(t.full)}; this model's MoE "
                                      f"layers are {[g.layer for g in groups]} of widths "
                                      f"{[g.intermediate_size for g in groups]}")
        if self.expert_masks is not None and shape_le is not None and tuple(self.expert_masks.shape[1:]) != shape_le:
            raise bad("expert_masks", f"is {list(self.expert_masks.shape)}; expected [budgets, {L}, {shape_le[1]}]")

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any], groups=None) -> "CompileState":
        """A state from the dict form (``width_budgets``/``width_tables``/``width_metric`` become one
        :class:`WidthTables` over ``groups``, the graph's MoE layers)."""
        state = cls()
        for key, value in mapping.items():
            if key not in _WIDTH_KEYS:
                state[key] = value
        if "width_tables" in mapping:
            if groups is None:
                raise ValueError("width tables given in the dict form (width_budgets, width_tables) need the graph's MoE layers: "
                             "set state.width_tables = WidthTables(budgets, tables, metric, layers, full) instead")
            state.width_tables = WidthTables(
                budgets=[float(b) for b in mapping["width_budgets"]], tables=mapping["width_tables"],
                metric=str(mapping.get("width_metric", "params")),
                layers=[g.layer for g in groups], full=[g.intermediate_size for g in groups])
        return state


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"ctx.state.{path}: key {k!r} is not a string")
            out[k] = _flatten(v, f"{path}/{k}", tensors)
        return out
    if isinstance(value, (list, tuple)):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"ctx.state.{path} holds a {type(value).__name__}, which cannot be saved between stages "
                    "(use tensors, numbers, strings, lists and dicts)")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value
