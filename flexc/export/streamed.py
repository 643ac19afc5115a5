"""The nested, sliced and hf exports of a streamed compile: written shard by shard, one decoder layer at a time.

Same files as :mod:`flexc.export.nested`, :mod:`flexc.export.sliced` and :mod:`flexc.export.hf`
(same tensor names, in
the checkpoint's on-disk layout, same manifests), but the model is a
:class:`~flexc.ir.streaming.LayerModel`: each decoder layer is loaded from the source shards,
transformed by the caller (``transform(layer, graph)``: the compile applies its channel
permutation there), written as one shard of its own and freed before the next. The
embeddings, final norm and LM head form the last shard. Peak memory: one decoder layer (plus,
for the last shard, the embeddings and LM head).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexc.export.nested import MANIFEST_FILE, nested_manifest, write_quant_scales
from flexc.export.sliced import (KIND as SLICED_KIND, FORMAT_VERSION as SLICED_FORMAT, MODELING_FILE, _layer_entry,
                                 _transformers_base, modeling_source, pack_layer, quantization_record,
                                 sliced_class_for, sliced_counts, sliced_manifest)
from flexc.export.slicing import slice_experts, slice_scales
from flexc.ir.quant.scheme import QuantScheme
from flexc.ir.experts_impl import WIDTHS_BUFFER
from flexc.ir.streaming import INDEX_FILE, REST, LayerGraph, LayerModel, layer_of, to_checkpoint_names
from flexc.ir.tables import WIDTHS_FILE, WidthTables, budget_key

Transform = Callable[[int, LayerGraph], None]


class ShardWriter:
    """Writes ``model-0000i-of-0000n.safetensors`` shards one call at a time, then the index."""

    def __init__(self, target: Path, num_shards: int):
        self.target, self.num_shards = Path(target), num_shards
        self.target.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.bytes_written = 0
        self.count = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self.count += 1
        if self.count > self.num_shards:
            raise RuntimeError(f"more shards written than the {self.num_shards} announced")
        name = f"model-{self.count:05d}-of-{self.num_shards:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.target / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.bytes_written += (self.target / name).stat().st_size

    def close(self) -> None:
        if self.count != self.num_shards:
            raise RuntimeError(f"{self.count} shards written, {self.num_shards} announced")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _layer_state(lm: LayerModel, layer: int) -> dict[str, torch.Tensor]:
    prefix = f"{lm.model.base_model_prefix}.layers.{layer}."
    return {prefix + k: v for k, v in lm.layers[layer].state_dict().items() if not k.endswith(WIDTHS_BUFFER)}


def _rest_state(lm: LayerModel) -> dict[str, torch.Tensor]:
    tensors = lm.module_tensors(REST)
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(text, "tie_word_embeddings", False):  # save_pretrained drops tied copies
        out = lm.model.get_output_embeddings()
        name = next((n + ".weight" for n, m in lm.model.named_modules() if m is out), None)
        tensors.pop(name, None)
    return tensors


def _each_layer(lm: LayerModel, transform: Transform | None):
    """Materialise, transform, yield and free every decoder layer in turn."""
    for i in range(lm.num_layers):
        module = lm.materialise(i)
        try:
            graph = LayerGraph(module, lm, lm.group_at(i), index=i)
            if transform is not None:
                transform(i, graph)
            yield i, graph
        finally:
            lm.free(i)


def _save_configs(target: Path, lm: LayerModel, config, tokenizer) -> None:
    from transformers import GenerationConfig

    config.save_pretrained(target)
    source = lm.reader.directory
    try:
        generation = GenerationConfig.from_pretrained(str(source), local_files_only=True)
    except OSError:
        generation = lm.model.generation_config
    if generation is not None:
        generation.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)


def write_checkpoint_streamed(target: Path, lm: LayerModel, *, transform: Transform | None = None,
                              tokenizer=None) -> int:
    """The full-width checkpoint (the ``hf`` export: transformed weights, config, tokenizer), one
    decoder layer at a time; returns the bytes of weights written."""
    target = Path(target)
    writer = ShardWriter(target, lm.num_layers + 1)
    for i, _graph in _each_layer(lm, transform):
        writer.write(to_checkpoint_names(lm.model, _layer_state(lm, i)))
    writer.write(to_checkpoint_names(lm.model, _rest_state(lm)))
    writer.close()
    _save_configs(target, lm, lm.model.config, tokenizer)
    return writer.bytes_written


def write_nested_streamed(target: Path, lm: LayerModel, tables: WidthTables, *, transform: Transform | None = None,
                          tokenizer=None, provenance: dict[str, Any] | None = None,
                          quality: dict[str, Any] | None = None, quantization: dict | None = None) -> dict[str, Any]:
    """The nested artifact (ranked weights + width tables), one decoder layer at a time; after ``quantize``
    (``quantization``: the compile state's) with its scales, as :func:`flexc.export.nested.write_nested`."""
    target = Path(target)
    written = write_checkpoint_streamed(target, lm, transform=transform, tokenizer=tokenizer)
    tables.save(target / WIDTHS_FILE)
    manifest = nested_manifest(lm.model.config, type(lm.model).__name__, lm.dtype, lm.parameter_count(), lm.groups,
                               tables, provenance=provenance, quality=quality)
    if quantization is not None:
        manifest["quantization"] = write_quant_scales(target, quantization)
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["_bytes_written"] = written
    return manifest


def _sliced_skeleton(lm: LayerModel, widths: torch.Tensor, budget: float, quantization: dict | None = None):
    """The sliced model of ``widths`` on ``meta`` (its tensor names and config), as ``build_sliced_model`` makes it."""
    base = _transformers_base(lm.model)
    cls = sliced_class_for(base)
    entries = {}
    for group, row in zip(lm.groups, widths):  # slicing meta tensors allocates nothing
        entries[group.path] = _layer_entry(slice_experts(lm.model.get_submodule(group.path), row[: group.num_experts]))
    config = copy.deepcopy(lm.model.config)
    config.flexc_sliced = {"format": SLICED_FORMAT, "base_class": base.__name__, "budget": budget, "experts": entries}
    if quantization is not None:
        config.flexc_sliced["quantization"] = quantization_record(quantization)
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    config.architectures = [cls.__name__]
    with torch.device("meta"):
        sliced = cls(config)
    return base, sliced


def write_sliced_streamed(target: Path, lm: LayerModel, widths: torch.Tensor, *, budget: float,
                          transform: Transform | None = None, tokenizer=None,
                          provenance: dict[str, Any] | None = None, quantization: dict | None = None) -> dict[str, Any]:
    """One budget's sliced checkpoint (``write_sliced``'s files), one decoder layer at a time; after
    ``quantize`` (``quantization``: the compile state's) its experts as packed codes and scales."""
    target = Path(target)
    base, sliced = _sliced_skeleton(lm, widths, budget, quantization)
    scheme = None if quantization is None else QuantScheme(quantization["scheme"], quantization["group_size"])
    names: dict[int, list[str]] = {}
    for name in sorted(_kept_names(sliced)):
        names.setdefault(layer_of(name), []).append(name)
    rows = {g.layer: row for g, row in zip(lm.groups, widths)}
    writer = ShardWriter(target, lm.num_layers + 1)

    def pick(layer: int, available: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        wanted = names.get(layer, [])
        missing = [n for n in wanted if n not in available]
        if missing:
            raise RuntimeError(f"sliced export: decoder layer {layer} has no tensor {missing[0]!r}")
        return {n: available[n] for n in wanted}

    for i, graph in _each_layer(lm, transform):
        state = _layer_state(lm, i)
        group = lm.group_at(i)
        if group is not None:
            experts = graph.experts_module(group)
            row = rows[i][: group.num_experts]
            scales = None
            if scheme is not None:
                layer = quantization["scales"][f"layer{group.layer}"]
                scales = slice_scales(experts, layer["gate_up"], layer["down"], row.tolist(), scheme.group_size)
            packed = pack_layer(slice_experts(experts, row), scales, scheme)
            state.update({f"{group.path}.{k}": v for k, v in packed.items()})
        writer.write(to_checkpoint_names(sliced, pick(i, state)))
        del state, graph  # nothing of this layer may outlive it: the next one loads now
    writer.write(to_checkpoint_names(sliced, pick(REST, lm.module_tensors(REST))))
    writer.close()
    _save_configs(target, lm, sliced.config, tokenizer)
    shutil.copyfile(modeling_source(), target / MODELING_FILE)
    manifest = sliced_manifest(target, budget, base.__name__, type(sliced).__name__, lm.config.model_type, lm.dtype,
                               lm.groups, widths, full_total=lm.parameter_count(), provenance=provenance,
                               quantization=quantization_record(quantization), **sliced_counts(sliced))
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["_bytes_written"] = writer.bytes_written
    return manifest


def _kept_names(model: torch.nn.Module) -> set[str]:
    """Tensor names ``save_pretrained`` keeps: parameters and persistent buffers, tied copies dropped."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    names = set(model.state_dict())
    if getattr(text, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        names -= {n + ".weight" for n, m in model.named_modules() if m is out}
    return names


def export_sliced_streamed(target: Path, lm: LayerModel, tables: WidthTables, *, transform: Transform | None = None,
                           tokenizer=None, provenance: dict[str, Any] | None = None, logger=None,
                           quantization: dict | None = None) -> int:
    """Every budget's sliced checkpoint and the export's top manifest; returns bytes written."""
    target = Path(target)
    index, written = [], 0
    for budget in tables.budgets:
        key = budget_key(budget)
        m = write_sliced_streamed(target / key, lm, tables.table(budget), budget=budget, transform=transform,
                                  tokenizer=tokenizer, provenance=provenance, quantization=quantization)
        written += m.pop("_bytes_written")
        index.append({"keep": budget, "dir": key, "total_params": m["params"]["total"],
                      "routed_keep": m["params"]["routed_keep"], "bytes": m["bytes"]["weights"]})
        if logger is not None:
            logger.info("sliced (streamed): keep %.2f → %s/ (%s parameters, %.1f MB)", budget, key,
                        f"{m['params']['total']:,}", m["bytes"]["weights"] / 1e6)
    top = {"kind": SLICED_KIND, "format": SLICED_FORMAT, "metric": tables.metric, "budgets": index}
    (target / MANIFEST_FILE).write_text(json.dumps(top, indent=2) + "\n")
    return written
