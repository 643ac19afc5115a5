"""The ``nested`` export: one checkpoint that holds every budget.

Layout of ``<out>/nested/``::

    config.json, model*.safetensors, generation_config.json, tokenizer files
                          an ordinary Hugging Face checkpoint of the original architecture
                          with the channel-ranked weights (loads without flexc; at full
                          width it computes what the original model computes)
    flexc_widths.safetensors   the width table [layers, experts] of every budget
    flexc_manifest.json        budgets, achieved keep ratios, parameters and bytes per budget,
                               quality figures when measured, provenance; after ``quantize`` its
                               scheme (the expert weights are stored as their dequantized values)
    flexc_quant_scales.safetensors   after ``quantize``: the group scales, from which
                               ``flexc.load`` recovers the integer codes it runs on

:func:`flexc.load` reads it back at any budget and switches budgets in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flexc.errors import FlexcError
from flexc.export.context import ExportContext
from flexc.ir.adaptive import POLICY_FILE, AdaptivePolicy
from flexc.ir.tables import WIDTHS_FILE, WidthTables, expert_weights, keep_ratio, per_layer_keep

MANIFEST_FILE = "flexc_manifest.json"
KIND = "nested"
FORMAT_VERSION = 1
# After ``quantize``: each MoE layer's group scales (``flexc_quant.layer{L}.gate_up`` / ``.down``, canonical
# layout), with which the runtime recovers the integer codes from the stored dequantized weights.
QUANT_FILE = "flexc_quant_scales.safetensors"
QUANT_KEY_PREFIX = "flexc_quant."


def budget_sizes(groups, tables: WidthTables, total_params: int, bytes_per_param: int) -> list[dict[str, Any]]:
    """Per budget: achieved keep ratio (parameters), routed and total parameter counts and bytes."""
    full = torch.tensor(tables.full)
    weights = expert_weights(groups, "params")
    routed_full = sum(g.routed_params for g in groups)
    rows = []
    for budget, table in zip(tables.budgets, tables.tables):
        # A channel carries the same parameters in every expert of a layer (gate row, up row,
        # down column and their biases).
        routed = sum(int(table[i].sum()) * g.params_per_channel
                     + (g.num_experts * g.hidden_size if g.has_bias else 0)
                     for i, g in enumerate(groups))
        total = total_params - routed_full + routed
        rows.append({
            "keep": budget,
            "keep_achieved": keep_ratio(table, full, weights),
            "per_layer_keep": per_layer_keep(table, full),
            "routed_params": routed,
            "total_params": total,
            "bytes": total * bytes_per_param,
        })
    return rows


def write_nested(target: Path, model, groups, tables: WidthTables, *, tokenizer=None,
                 provenance: dict[str, Any] | None = None, quality: dict[str, Any] | None = None,
                 max_shard_size: str = "2GB", quantization: dict[str, Any] | None = None,
                 adaptive_policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the nested artifact of ``model`` (ranked weights) and ``tables`` into ``target``, with the
    token-adaptive policy ``adaptive_policy`` (:mod:`flexc.ir.adaptive`) where the compile made one. After
    ``quantize`` (``quantization``: its scheme) the expert weights are written as their dequantized values:
    every budget computes what the quantized model computes, in the checkpoint's dtype and size."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    tables.save(target / WIDTHS_FILE)
    first = next(model.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    manifest = nested_manifest(model.config, type(model).__name__, first.dtype, total_params, groups, tables,
                               provenance=provenance, quality=quality)
    if quantization is not None:
        manifest["quantization"] = write_quant_scales(target, quantization)
    if adaptive_policy is not None:
        (target / POLICY_FILE).write_text(json.dumps(adaptive_policy, indent=2) + "\n")
        manifest["adaptive"] = {"file": POLICY_FILE, "rule": adaptive_policy["rule"],
                                "target": adaptive_policy["target"]}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_quant_scales(target: Path, quantization: dict[str, Any]) -> dict[str, Any]:
    """``quantize``'s scales (the compile state's) in ``target``'s scales file; returns the manifest's entry."""
    from safetensors.torch import save_file

    scales = {f"{QUANT_KEY_PREFIX}{layer}.{part}": t.contiguous()
              for layer, parts in quantization["scales"].items() for part, t in parts.items()}
    save_file(scales, str(Path(target) / QUANT_FILE))
    return {**{k: v for k, v in quantization.items() if k != "scales"}, "stored": "dequantized", "scales": QUANT_FILE}


def nested_manifest(config, class_name: str, dtype: torch.dtype, total_params: int, groups, tables: WidthTables, *,
                    provenance: dict[str, Any] | None = None, quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``flexc_manifest.json`` of a nested artifact (also written by the streamed export)."""
    size = torch.empty((), dtype=dtype).element_size()
    return {
        "kind": KIND,
        "format": FORMAT_VERSION,
        "architecture": (config.architectures or [class_name])[0],
        "model_type": config.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "metric": tables.metric,
        "layers": [g.to_dict() for g in groups],
        "full": {"total_params": total_params, "routed_params": sum(g.routed_params for g in groups),
                 "bytes": total_params * size},
        "budgets": budget_sizes(groups, tables, total_params, size),
        "quality": quality or {},
        "provenance": provenance or {},
    }


class ArtifactError(FlexcError):
    """A compiled artifact on disk is corrupt or inconsistent; the message names the file."""


class NotAnArtifactError(ArtifactError, FileNotFoundError):
    """No flexc artifact where one was expected (still a FileNotFoundError for older callers)."""


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; an :class:`ArtifactError` naming the file if it is anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read the {what} ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: the {what} is not valid JSON ({exc.msg}, line {exc.lineno} column "
                            f"{exc.colno}); expected a JSON object: re-export the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: the {what} must be a JSON object; found a {type(data).__name__}")
    return data


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The artifact's ``flexc_manifest.json`` (None if there is none), checked to be a JSON object."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    return read_json_object(path, "flexc manifest")


def load_tables(directory: str | Path, manifest: dict[str, Any] | None = None) -> WidthTables:
    """The width tables of an artifact, with clear errors naming the file; when ``manifest`` is
    given its budgets must be the tables' (an edited or mismatched manifest is refused)."""
    path = Path(directory) / WIDTHS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: a nested artifact keeps its width tables there")
    try:
        tables = WidthTables.load(path)
    except Exception as exc:  # safetensors, JSON metadata and shape errors alike: name the file
        raise ArtifactError(f"{path}: not a readable flexc width table ({type(exc).__name__}: {exc}); expected "
                            "a safetensors file with a 'widths' tensor [budgets, layers, experts] and metadata "
                            "budgets/layers/full/metric: re-export the artifact") from None
    listed = [row.get("keep") for row in (manifest or {}).get("budgets", []) if isinstance(row, dict)]
    if manifest is not None and (len(listed) != len(tables.budgets) or not all(
            isinstance(k, (int, float)) and abs(k - b) < 1e-6 for k, b in zip(listed, tables.budgets))):
        raise ArtifactError(f"{Path(directory) / MANIFEST_FILE} lists budgets {listed} but {path} holds "
                            f"{tables.budgets}: the two files do not belong together; re-export the artifact")
    return tables


def load_policy(directory: str | Path, manifest: dict[str, Any] | None, tables: WidthTables):
    """The artifact's token-adaptive policy (None if its manifest names none), checked against ``tables``."""
    record = (manifest or {}).get("adaptive")
    if record is None:
        return None
    path = Path(directory) / str(record.get("file") if isinstance(record, dict) else POLICY_FILE)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the manifest names it as the artifact's adaptive policy")
    try:
        return AdaptivePolicy.load(path, tables)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


def export_nested(ctx: ExportContext) -> None:
    groups = ctx.expert_groups()
    tables = ctx.width_tables("nested")
    manifest = write_nested(ctx.target, ctx.model, groups, tables, tokenizer=ctx.tokenizer,
                            provenance=ctx.provenance(), quantization=ctx.state.quantization,
                            adaptive_policy=ctx.state.adaptive_policy)
    if ctx.state.quantization is not None:
        ctx.logger.info("nested: the %s expert weights are stored dequantized (%s); the sliced export stores "
                        "their packed codes", ctx.state.quantization["scheme"], manifest["dtype"])
    for row in manifest["budgets"]:
        ctx.logger.info("nested: keep %.2f → achieved %.3f, %s parameters", row["keep"], row["keep_achieved"],
                        f"{row['total_params']:,}")
