"""One decoder layer at a time: a model whose weights stay in their safetensors shards.

:class:`CheckpointReader` reads the tensors of one decoder layer (or of everything outside
the layers: embeddings, final norm, LM head) from a Hugging Face checkpoint directory. Each
read opens the shards it needs with ``safetensors.safe_open`` (memory-mapped) and closes them
before returning, so no mapping outlives the layer. Checkpoint names are converted to the
module's names with transformers' own conversion mapping (per-expert ``gate_proj``/``up_proj``
/``down_proj`` on disk become stacked ``gate_up_proj``/``down_proj``), and back again with
``revert_weight_conversion`` when writing.

:class:`LayerModel` is the model built on the ``meta`` device (no storage): its structure, its
config and its :class:`~flexc.ir.groups.ExpertGroup` records are all there, and
:meth:`LayerModel.materialise` loads one decoder layer's tensors into it (:meth:`free` puts
it back on ``meta``). :meth:`LayerModel.layer_inputs` runs the model's own forward up to the
first decoder layer (embeddings materialised for that call only) and records what the model
passes each decoder layer: the hidden states and the keyword arguments (causal mask, rotary
embeddings, position ids).

:class:`LayerGraph` is the part of a :class:`~flexc.ir.graph.FlexGraph`'s interface that
:func:`flexc.passes.calibrate.calibrate` and ``permute_expert_channels`` use (``groups``,
``model``, ``experts_module``, ``expert_weights``, ``logits``), for one decoder layer, so the
streamed compile runs those functions unchanged.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from flexc.ir import experts_impl
from flexc.ir.experts_impl import canonical_weights
from flexc.ir.groups import ExpertGroup, find_expert_groups

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
REST = -1  # the key of everything outside the decoder layers


class StreamingError(ValueError):
    """A checkpoint cannot be streamed (no safetensors, missing or unexpected tensors)."""


def layer_of(name: str) -> int:
    """The decoder layer a tensor name belongs to, or :data:`REST`."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else REST


def _conversions(model: nn.Module, *, legacy: bool):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conversions = get_model_conversion_mapping(model, add_legacy=legacy) or []
    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def to_model_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (one layer's, whole) converted to ``model``'s parameter names and layout.

    The forward direction of transformers' ``revert_weight_conversion``: the same renamings and
    converters ``from_pretrained`` applies, on a subset of the checkpoint.
    """
    from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key

    renamings, converters = _conversions(model, legacy=True)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    mapping: dict[str, Any] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            transform = mapping.setdefault(renamed, deepcopy(by_pattern[pattern]))
        else:
            transform = mapping.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        transform.add_tensor(renamed, key, pattern, tensor)
    out = {}
    for name, transform in mapping.items():
        for target, value in transform.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


def to_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``-named tensors in the checkpoint's on-disk names and layout (what ``save_pretrained`` writes)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


@dataclass
class CheckpointReader:
    """The safetensors shards of a checkpoint directory, read one decoder layer at a time."""

    directory: Path
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        elif (self.directory / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                self.files = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise StreamingError(f"{self.directory}: streamed execution reads safetensors checkpoints "
                                 f"({SINGLE_FILE} or {INDEX_FILE}); found neither")
        self.by_layer: dict[int, list[str]] = {}
        for name in self.files:
            self.by_layer.setdefault(layer_of(name), []).append(name)

    def read(self, layer: int) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (on-disk names) of decoder ``layer`` (:data:`REST`: the others)."""
        from safetensors import safe_open

        names = self.by_layer.get(layer, [])
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, keys in by_file.items():
            with safe_open(str(self.directory / file), framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key).clone()  # owned memory: the mapping closes here
        return out


# A garbage collection costs 0.1-0.2 s with transformers loaded: two per layer and step in a streamed
# training pass. Freed layers are released by reference counting (measured: resident memory flat over
# repeated loads, nothing for a collection to find), so one runs only when memory did not come back.
COLLECT_BYTES = 64 << 20
_after_last_release: list[int] = []  # resident bytes after the previous release


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: unknown


def _trim() -> None:
    import ctypes
    import ctypes.util

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def release_memory(freed_bytes: int = COLLECT_BYTES) -> None:
    """Hand freed memory back to the system: a layer's tensors are large, and glibc's allocator
    otherwise keeps what they occupied (its mmap threshold grows after large frees), so resident
    memory would creep up layer after layer. After a large free (``freed_bytes``), if resident
    memory grew by more than half of it since the previous release (or cannot be read), something
    still holds the tensors: a garbage collection frees what reference cycles keep."""
    import gc

    _trim()
    now = _resident_bytes()
    if freed_bytes >= COLLECT_BYTES and (now is None or not _after_last_release
                                         or now > _after_last_release[0] + freed_bytes // 2):
        gc.collect()
        _trim()
        now = _resident_bytes()
    _after_last_release[:] = [] if now is None else [now]


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its inputs, returns the hidden states unchanged."""

    def __init__(self, index: int, layer: nn.Module, calls: list, last: bool):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise StreamingError("a decoder layer received positional arguments beyond the hidden states; "
                                 "streamed execution does not support this model family yet")
        self.calls.append((hidden_states, {k: v for k, v in kwargs.items() if k not in ("cache", "use_cache")}))
        if self.last:
            raise _Stop
        return hidden_states


class _Stop(Exception):
    pass


class LayerModel:
    """A causal LM on the ``meta`` device whose decoder layers are loaded one at a time."""

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader = CheckpointReader(Path(directory))
        self.config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        self.dtype = dtype or getattr(self.config, "dtype", None) or torch.float32
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
        self.device = torch.device(device)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        experts_impl.use_flexc_experts(self.model)
        self.groups: list[ExpertGroup] = find_expert_groups(self.model)
        self.base = self.model.get_submodule(self.model.base_model_prefix)
        self.layers: nn.ModuleList = self.base.layers
        self.num_layers = len(self.layers)
        self.materialised_count = 0
        self.peak_live = 0  # most decoder layers holding real tensors at once, checked on the modules

    # ---- sizes -------------------------------------------------------------------------
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def layer_bytes(self, layer: int) -> int:
        return sum(p.numel() * p.element_size() for p in self.layers[layer].parameters())

    def group_at(self, layer: int) -> ExpertGroup | None:
        for g in self.groups:
            if g.layer == layer:
                return g
        return None

    # ---- loading -----------------------------------------------------------------------
    def module_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Decoder ``layer``'s tensors (:data:`REST`: the others), in the model's names, dtype and device."""
        tensors = to_model_names(self.model, self.reader.read(layer))
        return {k: (v.to(self.dtype) if v.is_floating_point() else v).to(self.device) for k, v in tensors.items()}

    def live_layers(self) -> list[int]:
        """Decoder layers with any tensor off the meta device (measured on the modules)."""
        return [i for i, layer in enumerate(self.layers)
                if any(t.device.type != "meta" for t in list(layer.parameters()) + list(layer.buffers()))]

    def materialise(self, layer: int) -> nn.Module:
        """Load decoder ``layer`` from the shards; the other layers stay on ``meta``."""
        module = self.layers[layer]
        prefix = f"{self.model.base_model_prefix}.layers.{layer}."
        tensors = self.module_tensors(layer)
        local = {k.removeprefix(prefix): v for k, v in tensors.items()}
        expected = {k for k, _ in module.named_parameters()} | {
            k for k, _ in module.named_buffers() if k.rsplit(".", 1)[-1] != experts_impl.WIDTHS_BUFFER}
        if set(local) != expected:
            missing, extra = sorted(expected - set(local)), sorted(set(local) - expected)
            raise StreamingError(f"{self.reader.directory}: decoder layer {layer}: the checkpoint does not match the "
                                 f"model (missing {missing[:4]}, unexpected {extra[:4]})")
        module.load_state_dict(local, strict=False, assign=True)
        group = self.group_at(layer)
        if group is not None:
            experts = self.model.get_submodule(group.path)
            experts_impl.set_widths(experts, None)
            experts_impl.set_widths(experts, torch.full((group.num_experts,), group.intermediate_size,
                                                        dtype=torch.int32))
        leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if leftover:
            raise StreamingError(f"decoder layer {layer}: tensors not in the checkpoint: {leftover[:4]}")
        self.materialised_count += 1
        self.peak_live = max(self.peak_live, len(self.live_layers()))
        return module

    def frozen_layer(self, layer: int, kwargs_by_shape=None, transform=None) -> "LayerGraph":
        """Decoder ``layer`` materialised with its weights frozen, as a :class:`LayerGraph` (run with
        ``kwargs_by_shape``), after ``transform(layer, graph)`` (a streamed compile's permutation)."""
        module = self.materialise(layer)
        module.requires_grad_(False)
        graph = LayerGraph(module, self, self.group_at(layer), kwargs_by_shape, index=layer)
        if transform is not None:
            transform(layer, graph)
        return graph

    def free(self, layer: int) -> None:
        """Put decoder ``layer`` back on ``meta`` (its storage is released)."""
        self.layers[layer].to_empty(device="meta")
        release_memory(self.layer_bytes(layer))

    # ---- running -----------------------------------------------------------------------
    def layer_inputs(self, batches) -> tuple[list[torch.Tensor], dict[tuple, list[dict]]]:
        """Hidden states entering decoder layer 0 for each batch of token ids (on the CPU), and
        per input shape the keyword arguments the model passes each decoder layer.

        The model's own forward runs with recorders in place of the decoder layers, so masks
        and rotary embeddings are built by the model's code; the embeddings are materialised for
        this call only. The keyword arguments depend on the batch's shape alone (packed
        calibration windows carry no attention mask), so one set per shape is kept.
        """
        embed = self.model.get_input_embeddings()
        rest = self.module_tensors(REST)
        prefix = self._module_prefix(embed)
        embed.load_state_dict({k.removeprefix(prefix): v for k, v in rest.items() if k.startswith(prefix)},
                              assign=True)
        del rest
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is not None:  # its buffers are computed from the config, never stored
            with torch.device(self.device):
                self.base.rotary_emb = type(rotary)(config=self.base.config)
        calls: list = []
        recorders = nn.ModuleList([_Recorder(i, layer, calls, i == self.num_layers - 1)
                                   for i, layer in enumerate(self.layers)])
        self.base.layers = recorders
        hidden: list[torch.Tensor] = []
        kwargs_by_shape: dict[tuple, list[dict]] = {}
        try:
            with torch.no_grad():
                for ids in batches:
                    calls.clear()
                    try:
                        self.model(input_ids=ids.to(self.device), use_cache=False)
                    except _Stop:
                        pass
                    hidden.append(calls[0][0].detach().to("cpu"))
                    kwargs_by_shape.setdefault(tuple(ids.shape), [kw for _, kw in calls])
        finally:
            self.base.layers = self.layers
            embed.to_empty(device="meta")
        return hidden, kwargs_by_shape

    @contextmanager
    def head(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """The model's final norm and LM head (``lm_head(norm(h))``, what the families flexc streams
        compute), materialised until the context exits, their weights frozen: yields the function
        from the last decoder layer's output to the logits."""
        norm, head = self.base.norm, self.model.get_output_embeddings()
        rest = self.module_tensors(REST)
        for module in (norm, head):
            prefix = self._module_prefix(module)
            own = {k.removeprefix(prefix): v for k, v in rest.items() if k.startswith(prefix)}
            if module is head and not own and getattr(self.config, "tie_word_embeddings", False):
                embed_prefix = self._module_prefix(self.model.get_input_embeddings())
                own = {k.removeprefix(embed_prefix): v for k, v in rest.items() if k.startswith(embed_prefix)}
            missing = {k for k, _ in module.named_parameters()} - set(own)
            if missing:
                raise StreamingError(f"{self.reader.directory}: the checkpoint has no {sorted(missing)} for "
                                     f"{prefix.rstrip('.')}")
            module.load_state_dict(own, strict=False, assign=True)
            module.requires_grad_(False)
        del rest
        try:
            yield lambda h: head(norm(h))
        finally:
            freed = sum(p.numel() * p.element_size() for m in (norm, head) for p in m.parameters())
            norm.to_empty(device="meta")
            head.to_empty(device="meta")
            release_memory(freed)

    def head_gradients(self, hidden: list[torch.Tensor], batches: list[torch.Tensor],
                       loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """Per batch, the gradient of ``loss(logits, ids)`` with respect to the last decoder layer's
        output ``hidden[b]`` (on the CPU), through :meth:`head`."""
        grads = []
        with self.head() as logits_of:
            for h, ids in zip(hidden, batches):
                h = h.to(self.device).requires_grad_(True)
                loss(logits_of(h), ids.to(self.device)).backward()
                grads.append(h.grad.detach().to("cpu"))
        return grads

    def _module_prefix(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name + "."
        raise StreamingError(f"{type(module).__name__} is not a submodule of the model")


class LayerGraph:
    """One materialised decoder layer, with the interface of a FlexGraph that calibration and
    ``permute_expert_channels`` use. ``logits(hidden)`` runs the layer on a batch of hidden
    states (with the keyword arguments recorded for that shape) and keeps the output, on the
    CPU, in :attr:`outputs`."""

    def __init__(self, layer: nn.Module, model: LayerModel, group: ExpertGroup | None,
                 kwargs_by_shape: dict[tuple, list[dict]] | None = None, index: int = 0):
        self.model = layer  # calibrate() reads parameters from here
        self.root = model.model
        self.groups = [group] if group is not None else []
        self.kwargs_by_shape = kwargs_by_shape or {}
        self.index = index
        self.outputs: list[torch.Tensor] = []

    def experts_module(self, group: ExpertGroup) -> nn.Module:
        return self.root.get_submodule(group.path)

    def expert_weights(self, group: ExpertGroup) -> tuple[torch.Tensor, torch.Tensor]:
        return canonical_weights(self.experts_module(group))

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output for a batch of hidden states (nothing kept)."""
        kwargs = self.kwargs_by_shape[tuple(hidden.shape[:2])][self.index]
        out = self.model(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.run(hidden)
        self.outputs.append(out.detach().to("cpu"))
        return out

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """Recompute the layer on ``hidden`` and back-propagate ``grad_output`` (the gradient at its
        output) through it; return the gradient at its input, on the CPU. The layer's weights are
        frozen: the expert op hands its weight gradients to observers (``observe_expert_grads``)."""
        device = next(self.model.parameters()).device
        hidden = hidden.to(device).requires_grad_(True)
        self.run(hidden).backward(grad_output.to(device))
        return hidden.grad.detach().to("cpu")
