"""The ``sliced`` export: one ordinary-looking checkpoint per budget, pruned channels removed.

Layout of ``<out>/sliced/``::

    flexc_manifest.json      kind "sliced": the budgets and the folder of each
    keep_0.75/               one budget (folder name: :func:`flexc.ir.tables.budget_key`)
        config.json          the original architecture's config, plus
                               flexc_sliced: base class, and per experts module (by path) its
                                             expert widths, width buckets and gated activation
                               auto_map:     AutoModelForCausalLM -> the modeling file below
        model*.safetensors   weights; each MoE layer's experts stacked by width bucket
                             (``...experts.bucket_0_gate_up [n, 2w, H]``, ``bucket_0_down
                             [n, H, w]``, ...; with biases ``bucket_0_gate_up_bias``,
                             ``bucket_0_down_bias``): one fused-MoE call per bucket in vLLM.
                             After ``quantize``: ``bucket_0_gate_up_packed`` / ``_scale`` (and
                             ``down``), compressed-tensors' pack-quantized codes and group scales
        modeling_flexc_sliced.py   self-contained modeling code (torch + transformers only)
        generation_config.json, tokenizer files
        flexc_manifest.json  kind "sliced": budget, widths, parameter counts, bytes
    keep_0.50/ ...

A budget folder loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
without flexc, and with :func:`load_sliced` (or ``flexc.load``) without remote code. Its output
equals the nested runtime's at that budget. The config keeps the original ``model_type``, so
plain ``from_pretrained`` *without* ``trust_remote_code`` falls back to the stock class: it
reports the ``sliced_*`` keys as unexpected and the stacked expert weights as missing (and
randomly initialised). Load with ``trust_remote_code=True`` or with flexc.
"""

from __future__ import annotations

import copy
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexc.errors import FlexcError
from flexc.export.context import ExportContext
from flexc.export.remote import modeling_flexc_sliced as remote
from flexc.export.nested import ArtifactError, read_json_object, read_manifest
from flexc.export.slicing import LayerSlices, slice_experts, slice_scales
from flexc.ir.tables import BudgetError, WidthTables, budget_key
from flexc.ir.quant.nested import codes_of, pack_codes
from flexc.ir.quant.scheme import QuantScheme

KIND = "sliced"
FORMAT_VERSION = remote.FORMAT_VERSION
MANIFEST_FILE = "flexc_manifest.json"
MODELING_FILE = "modeling_flexc_sliced.py"


class SlicedExportError(FlexcError):
    """The sliced export or load cannot proceed (no width tables, unsupported model, ...)."""


# ---- the modeling file --------------------------------------------------------------------


def modeling_source() -> Path:
    """Path of the modeling file shipped with flexc (copied next to every sliced checkpoint)."""
    return Path(str(resources.files("flexc.export.remote") / MODELING_FILE))


def sliced_class_for(base: type) -> type:
    """flexc's in-package copy of the sliced class deriving from transformers class ``base``."""
    return getattr(remote, remote.CLASS_PREFIX + base.__name__)


def _transformers_base(model: nn.Module) -> type:
    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        raise SlicedExportError(f"the sliced export needs a transformers causal-LM class; {name} "
                                f"({type(model).__module__}) is not one")
    return type(model)


# ---- packing the experts ------------------------------------------------------------------


def pack_layer(slices: LayerSlices, scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               scheme: QuantScheme | None = None) -> dict[str, torch.Tensor]:
    """One layer's expert slices by width bucket, in the layout of ``SlicedExperts`` (fresh tensors);
    with a ``scheme`` (and each expert's sliced ``scales``), as packed integer codes and scales."""
    packed = {}
    has_bias = slices.experts[0].down_bias is not None
    for i, (width, ids) in enumerate(remote.width_buckets(slices.widths)):
        experts = [slices.experts[e] for e in ids]
        weights = {"gate_up": torch.stack([torch.cat([s.gate, s.up]) for s in experts]),
                   "down": torch.stack([s.down for s in experts])}
        for k, (name, w) in enumerate(weights.items()):
            if scheme is None:
                packed[f"bucket_{i}_{name}"] = w
                continue
            scale = torch.stack([scales[e][k] for e in ids])
            packed[f"bucket_{i}_{name}_packed"] = pack_codes(codes_of(w, scale, scheme), scheme)
            packed[f"bucket_{i}_{name}_scale"] = scale.to(w.dtype)
        if has_bias:
            packed[f"bucket_{i}_gate_up_bias"] = torch.stack([torch.cat([s.gate_bias, s.up_bias]) for s in experts])
            packed[f"bucket_{i}_down_bias"] = torch.stack([s.down_bias for s in experts])
    return packed


def _layer_entry(slices: LayerSlices) -> dict[str, Any]:
    buckets = [{"width": w, "experts": ids} for w, ids in remote.width_buckets(slices.widths)]
    return {"widths": slices.widths, "buckets": buckets, "activation": slices.activation, "alpha": slices.alpha,
            "limit": slices.limit, "bias": slices.experts[0].down_bias is not None}


def _check_tables(tables: WidthTables, groups) -> None:
    if tables.layers != [g.layer for g in groups] or tables.tables.shape[2] != max(g.num_experts for g in groups):
        raise SlicedExportError(f"width tables (layers {tables.layers}, {tables.tables.shape[2]} experts) do not "
                                f"match the model's MoE layers {[g.layer for g in groups]}")


# ---- building and writing one budget ------------------------------------------------------


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if is_param:
        owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    else:
        owner._buffers[leaf] = tensor


def quantization_record(quantization: dict | None) -> dict | None:
    """What a checkpoint's config and manifest say of ``quantize`` (its scheme; the scales are in the weights)."""
    return None if quantization is None else {k: v for k, v in quantization.items() if k != "scales"}


def build_sliced_model(model: nn.Module, groups, widths: torch.Tensor, budget: float | None = None,
                       quantization: dict | None = None) -> nn.Module:
    """The sliced model of ``model`` at ``widths [L, E]`` (rows in ``groups`` order); with ``quantization``
    (the compile state's, from ``quantize``) its experts hold packed integer codes and scales.

    Built on the meta device, then every tensor is filled in: experts from fresh slices, all
    others shared with ``model`` (no copy, ties kept). ``model`` is left unchanged.
    """
    base = _transformers_base(model)
    cls = sliced_class_for(base)
    scheme = None if quantization is None else QuantScheme(quantization["scheme"], quantization["group_size"])
    packed, entries = {}, {}
    for group, row in zip(groups, widths):
        experts = model.get_submodule(group.path)
        row = row[: group.num_experts]
        slices = slice_experts(experts, row)
        scales = None
        if scheme is not None:
            layer = quantization["scales"][f"layer{group.layer}"]
            scales = slice_scales(experts, layer["gate_up"], layer["down"], row.tolist(), scheme.group_size)
        entries[group.path] = _layer_entry(slices)
        packed.update({f"{group.path}.{k}": v for k, v in pack_layer(slices, scales, scheme).items()})

    config = copy.deepcopy(model.config)
    config.flexc_sliced = {"format": FORMAT_VERSION, "base_class": base.__name__, "budget": budget,
                           "experts": entries}
    if scheme is not None:
        config.flexc_sliced["quantization"] = quantization_record(quantization)
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    config.architectures = [cls.__name__]
    with torch.device("meta"):
        sliced = cls(config)

    sources = dict(model.named_parameters(remove_duplicate=False))
    sources.update(model.named_buffers(remove_duplicate=False))
    sources.update(packed)
    for names, is_param in ((sliced.named_parameters(remove_duplicate=False), True),
                            (sliced.named_buffers(remove_duplicate=False), False)):
        for name, _ in list(names):
            if name not in sources:
                raise SlicedExportError(f"cannot build the sliced model: {type(model).__name__} has no tensor "
                                        f"{name!r} (was the model restructured by a pass?)")
            _set_tensor(sliced, name, sources[name], is_param)
    sliced.generation_config = copy.deepcopy(model.generation_config)
    return sliced.eval()


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _widths_summary(groups, widths: torch.Tensor) -> dict[str, Any]:
    rows = [row[: g.num_experts] for g, row in zip(groups, widths)]
    flat = torch.cat(rows)
    return {
        "layers": [g.layer for g in groups],
        "full": [g.intermediate_size for g in groups],
        "min": int(flat.min()), "max": int(flat.max()), "mean": float(flat.float().mean()),
        "per_layer_mean": [float(r.float().mean()) for r in rows],
        "experts_removed": int((flat == 0).sum()),
        "experts_full": sum(int((r == g.intermediate_size).sum()) for g, r in zip(groups, rows)),
        "experts": int(flat.numel()),
    }


def sliced_counts(sliced: nn.Module) -> dict[str, int]:
    """A sliced model's parameter counts for its manifest (``routed``: its routed experts', each quantized code
    counting as one; ``total``) and its routed experts' bytes as stored (any device, ``meta`` included)."""
    expert_modules = [m for m in sliced.modules() if isinstance(m, remote.SlicedExperts)]
    routed = sum(m.parameter_count() for m in expert_modules)
    stored = [p for m in expert_modules for p in m.parameters()]
    return {"routed": routed, "total": routed + sum(p.numel() for p in sliced.parameters()) - sum(
        p.numel() for p in stored), "routed_bytes": sum(p.numel() * p.element_size() for p in stored)}


def write_sliced(target: str | Path, model: nn.Module, groups, widths: torch.Tensor, *, budget: float,
                 tokenizer=None, provenance: dict[str, Any] | None = None,
                 max_shard_size: str = "2GB", quantization: dict | None = None) -> dict[str, Any]:
    """Write the sliced checkpoint of ``model`` at ``widths [L, E]`` into ``target``; return its manifest."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    sliced = build_sliced_model(model, groups, widths, budget, quantization)
    sliced.save_pretrained(target, max_shard_size=max_shard_size)
    shutil.copyfile(modeling_source(), target / MODELING_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)

    full_total = sum(p.numel() for p in model.parameters())
    manifest = sliced_manifest(target, budget, _transformers_base(model).__name__, type(sliced).__name__,
                               model.config.model_type, next(model.parameters()).dtype, groups, widths,
                               full_total=full_total, provenance=provenance,
                               quantization=quantization_record(quantization), **sliced_counts(sliced))
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def sliced_manifest(target: Path, budget: float, architecture: str, model_class: str, model_type: str,
                    dtype: torch.dtype, groups, widths: torch.Tensor, *, routed: int, total: int, full_total: int,
                    provenance: dict[str, Any] | None = None, quantization: dict | None = None,
                    routed_bytes: int | None = None) -> dict[str, Any]:
    """One budget folder's ``flexc_manifest.json`` (also written by the streamed export). ``bytes``: the
    weight files', and (given ``routed_bytes``) the routed experts' as stored, beside the unpruned routed
    experts' in bf16 (the usual serving baseline)."""
    routed_full = sum(g.routed_params for g in groups)
    sizes = {"weights": _weights_bytes(target)}
    if routed_bytes is not None:
        sizes.update(routed_experts=routed_bytes, routed_experts_unpruned_bf16=2 * routed_full,
                     routed_experts_vs_unpruned_bf16=routed_bytes / (2 * routed_full) if routed_full else None)
    return {
        "kind": KIND,
        "format": FORMAT_VERSION,
        "budget": budget,
        "budget_key": budget_key(budget),
        "architecture": architecture,
        "model_class": model_class,
        "model_type": model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "widths": _widths_summary(groups, widths),
        "params": {"total": total, "routed": routed, "full_total": full_total, "full_routed": routed_full,
                   "routed_keep": routed / routed_full if routed_full else 1.0},
        "bytes": sizes,
        "quantization": quantization,
        "provenance": provenance or {},
    }


# ---- the exporter --------------------------------------------------------------------------


def _tables(ctx: ExportContext, groups) -> WidthTables:
    try:
        tables = ctx.width_tables("sliced")
    except ValueError as exc:
        raise SlicedExportError(str(exc)) from None
    _check_tables(tables, groups)
    return tables


def export_sliced(ctx: ExportContext) -> None:
    if ctx.model is None:
        raise SlicedExportError("the sliced export needs the compiled model")
    groups = ctx.expert_groups()
    tables = _tables(ctx, groups)
    provenance = ctx.provenance()
    index = []
    for budget in tables.budgets:
        key = budget_key(budget)
        m = write_sliced(ctx.target / key, ctx.model, groups, tables.table(budget), budget=budget,
                         tokenizer=ctx.tokenizer, provenance=provenance, quantization=ctx.state.quantization)
        index.append({"keep": budget, "dir": key, "total_params": m["params"]["total"],
                      "routed_keep": m["params"]["routed_keep"], "bytes": m["bytes"]["weights"]})
        ctx.logger.info("sliced: keep %.2f → %s/ (%s parameters, %.1f MB; routed experts %.3g× their unpruned "
                        "bf16 bytes)", budget, key, f"{m['params']['total']:,}", m["bytes"]["weights"] / 1e6,
                        m["bytes"]["routed_experts_vs_unpruned_bf16"])
    top = {"kind": KIND, "format": FORMAT_VERSION, "metric": tables.metric, "budgets": index}
    (Path(ctx.target) / MANIFEST_FILE).write_text(json.dumps(top, indent=2) + "\n")


# ---- loading inside flexc -------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest = read_manifest(directory)  # a corrupt or non-object manifest: an error naming the file
    if manifest is None:
        raise SlicedExportError(f"{directory} is not a flexc sliced export (no {MANIFEST_FILE})")
    if manifest.get("kind") != KIND:
        raise SlicedExportError(f"{directory} holds a flexc {manifest.get('kind')!r} artifact, not a sliced one")
    return manifest


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_budget(directory: Path, manifest: dict[str, Any], expected: float | None = None) -> float:
    """The keep ratio of one budget's folder, checked against its config (and ``expected``: what
    the export's top manifest says the folder holds), so that an edited manifest cannot hand
    back another budget's checkpoint."""
    path = directory / MANIFEST_FILE
    keep = manifest.get("budget")
    if not _number(keep):
        raise ArtifactError(f"{path}: 'budget' must be the folder's keep ratio (a number); found {keep!r}")
    if expected is not None and abs(keep - expected) > 1e-6:
        raise ArtifactError(f"{directory.parent / MANIFEST_FILE} lists {directory.name}/ as keep {expected:g}, but "
                            f"{path} says keep {keep:g}: the manifests disagree (edited?); re-export the artifact")
    config_path = directory / "config.json"
    settings = read_json_object(config_path, "model config").get(remote.CONFIG_KEY)
    if not isinstance(settings, dict):
        raise ArtifactError(f"{config_path} has no {remote.CONFIG_KEY!r} section: not a flexc sliced checkpoint")
    if settings.get("budget") is not None and (not _number(settings["budget"])
                                               or abs(settings["budget"] - keep) > 1e-6):
        raise ArtifactError(f"{config_path} is the checkpoint of keep {settings['budget']!r}, but {path} says "
                            f"keep {keep:g}: the files disagree (edited?); re-export the artifact")
    return float(keep)


def _budget_rows(directory: Path, manifest: dict[str, Any]) -> list[tuple[float, str]]:
    """(keep, folder name) of each budget the export's top manifest lists, checked for shape."""
    rows = manifest["budgets"]
    ok = isinstance(rows, list) and all(
        isinstance(r, dict) and _number(r.get("keep")) and isinstance(r.get("dir"), str)
        and r["dir"] and Path(r["dir"]).name == r["dir"] and r["dir"] not in (".", "..") for r in rows)
    if not ok:  # a folder name only: never a path out of the export
        raise ArtifactError(f"{directory / MANIFEST_FILE}: 'budgets' must be a list of {{keep: number, dir: folder "
                            f"name}}; found {json.dumps(rows)[:200]}")
    return [(float(r["keep"]), r["dir"]) for r in rows]


def resolve_budget_dir(path: str | Path, budget: float | None = None) -> Path:
    """The checkpoint folder of ``budget`` in a sliced export (or ``path`` itself if it is one),
    cross-checked against that folder's own manifest and config."""
    directory = Path(path)
    manifest = _read_manifest(directory)
    if "budgets" not in manifest:  # one budget's checkpoint
        keep = _checked_budget(directory, manifest)
        if budget is not None and abs(keep - budget) > 1e-6:
            raise BudgetError(f"{directory} is the sliced checkpoint of keep {keep:g}, "
                              f"not {budget:g}; load its parent folder to choose a budget")
        return directory
    rows = _budget_rows(directory, manifest)
    available = ", ".join(f"{keep:g}" for keep, _ in rows)
    if budget is None:
        if len(rows) != 1:
            raise BudgetError(f"{directory} holds several sliced budgets; pass budget= one of {available}")
        budget = rows[0][0]
    for keep, name in rows:
        if abs(keep - budget) < 1e-6:
            folder = directory / name
            _checked_budget(folder, _read_manifest(folder), keep)
            return folder
    raise BudgetError(f"no sliced checkpoint for budget {budget:g} in {directory}; available budgets: {available}")


def load_sliced(path: str | Path, budget: float | None = None, **kwargs):
    """Load a sliced checkpoint as a transformers model, with flexc's copy of its modeling code.

    ``path`` is one budget's folder, or the export's folder with ``budget=``; other keyword
    arguments go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoConfig

    directory = resolve_budget_dir(path, budget)
    config = AutoConfig.from_pretrained(directory)
    settings = getattr(config, remote.CONFIG_KEY, None)
    if not isinstance(settings, dict) or "base_class" not in settings:
        raise SlicedExportError(f"{directory}/config.json has no {remote.CONFIG_KEY!r} section")
    try:
        cls = getattr(remote, remote.CLASS_PREFIX + settings["base_class"])
    except AttributeError:
        raise SlicedExportError(f"{directory}: transformers has no model class {settings['base_class']!r} "
                                f"(exported with another transformers version?)") from None
    return cls.from_pretrained(directory, config=config, **kwargs)
