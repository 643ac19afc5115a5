"""What vLLM was asked to serve: a flexc nested artifact, a sliced checkpoint, or neither.

vLLM hands a model class its ``VllmConfig``; the model directory and the Hugging Face config
say which flexc artifact it is:

- **nested**: ``flexc_manifest.json`` of kind ``nested`` and ``flexc_widths.safetensors`` beside
  the weights: every budget's width table; the budget is chosen at load and switched live.
- **sliced**: the config's ``flexc_sliced`` section (one budget, experts packed at their widths):
  served at that budget, no switching.
- neither: a stock checkpoint; flexc's model classes then behave exactly like vLLM's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexc.export.nested import KIND as NESTED_KIND
from flexc.export.nested import ArtifactError, load_policy, load_tables, read_manifest
from flexc.export.remote.modeling_flexc_sliced import CONFIG_KEY as SLICED_KEY
from flexc.export.remote.modeling_flexc_sliced import FORMAT_VERSION as SLICED_FORMAT
from flexc.export.remote.modeling_flexc_sliced import check_buckets
from flexc.ir.tables import WIDTHS_FILE, WidthTables
from flexc.serving.families import ServingError

# hf_overrides / config key choosing the nested artifact's budget at load (a keep ratio).
BUDGET_KEY = "flexc_budget"
# hf_overrides / config key choosing what runs a nested artifact's engine budget on CPU:
# "vllm" (vLLM's CPU experts kernel on a packed copy of the kept prefixes) or "flexc" (flexc's op).
KERNEL_KEY = "flexc_experts_kernel"
KERNELS = ("vllm", "flexc")


@dataclass
class Artifact:
    kind: str  # "nested" or "sliced"
    directory: Path | None
    tables: WidthTables | None = None  # nested
    sliced: dict[str, Any] | None = None  # sliced: the config's flexc_sliced section
    budget: float | None = None  # nested: the budget asked for at load (None: full width)
    policy: Any = None  # nested: its token-adaptive policy (flexc.ir.adaptive.AdaptivePolicy), if it has one
    experts_kernel: str = "vllm"  # nested: what runs the engine's budget on CPU (KERNEL_KEY)

    def sliced_widths(self, layer: int) -> list[int]:
        """A sliced checkpoint's per-expert widths in decoder layer ``layer``. The config names the
        experts module by its transformers path (``model.layers.3.mlp.experts``), which may differ
        from the checkpoint's and vLLM's names (Mixtral: ``block_sparse_moe``); the layer decides."""
        entries = [entry for path, entry in (self.sliced or {}).get("experts", {}).items()
                   if re.search(rf"(?:^|\.)layers\.{layer}\.", path)]
        if len(entries) != 1 or not isinstance(entries[0], dict) or not isinstance(entries[0].get("widths"), list):
            raise ServingError(f"{self._where()}: the config's {SLICED_KEY!r} section has no (single) widths entry "
                               f"for decoder layer {layer}; re-export the sliced checkpoint")
        widths = [int(w) for w in entries[0]["widths"]]
        try:
            check_buckets(widths, entries[0].get("buckets"))
        except ValueError as exc:
            raise ServingError(f"{self._where()}/config.json, decoder layer {layer}: {exc}") from None
        return widths

    def _where(self) -> str:
        return str(self.directory) if self.directory is not None else "the sliced checkpoint"


def _budget_asked(hf_config) -> float | None:
    value = getattr(hf_config, BUDGET_KEY, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ServingError(f"{BUDGET_KEY} must be a keep ratio in (0, 1] (e.g. hf_overrides="
                           f'{{"{BUDGET_KEY}": 0.5}}); found {value!r}')
    return float(value)


def _kernel_asked(hf_config) -> str:
    value = getattr(hf_config, KERNEL_KEY, None)
    if value is None:
        return KERNELS[0]
    if value not in KERNELS:
        raise ServingError(f"{KERNEL_KEY} must be one of {', '.join(KERNELS)} (e.g. hf_overrides="
                           f'{{"{KERNEL_KEY}": "flexc"}}); found {value!r}')
    return value


def detect(model_path: str | Path | None, hf_config) -> Artifact | None:
    """The flexc artifact at ``model_path`` (a local directory) with config ``hf_config``, or None."""
    directory = Path(model_path) if model_path is not None and Path(model_path).is_dir() else None
    settings = getattr(hf_config, SLICED_KEY, None)
    if settings is not None:
        if not isinstance(settings, dict) or not isinstance(settings.get("experts"), dict):
            raise ServingError(f"{directory or 'the model'}: config.json's {SLICED_KEY!r} section is malformed; "
                               "re-export the sliced checkpoint")
        if int(settings.get("format", 1)) != SLICED_FORMAT:
            raise ServingError(f"{directory}: sliced format {settings.get('format', 1)}; this flexc serves format "
                               f"{SLICED_FORMAT} (experts stored by width bucket): re-export the sliced checkpoint "
                               "with this flexc (or update flexc)")
        quantization = settings.get("quantization")
        if quantization is not None and (not isinstance(quantization, dict) or quantization.get("bits") not in (4, 8)
                                         or not isinstance(quantization.get("group_size"), int)
                                         or quantization["group_size"] < 1):
            raise ServingError(f"{directory}: config.json's {SLICED_KEY}.quantization is {quantization!r}; expected "
                               "bits 4 or 8 and a positive group_size: re-export the sliced checkpoint")
        if getattr(hf_config, KERNEL_KEY, None) is not None:
            raise ServingError(f"{directory}: {KERNEL_KEY} applies to nested artifacts only; a sliced checkpoint's "
                               "width buckets always run on vLLM's fused-MoE kernels")
        if getattr(hf_config, BUDGET_KEY, None) is not None:
            raise ServingError(f"{directory}: a sliced checkpoint holds one budget (keep "
                               f"{settings.get('budget')}); {BUDGET_KEY} applies to nested artifacts only. "
                               "Serve the nested artifact to choose or switch budgets.")
        return Artifact("sliced", directory, sliced=settings)
    if directory is None:
        if getattr(hf_config, BUDGET_KEY, None) is not None:
            raise ServingError(f"{BUDGET_KEY} was given but {model_path!r} is not a local directory; flexc serves "
                               "nested artifacts from a local path (e.g. runs/x/nested)")
        return None
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("kind") != NESTED_KIND:
        if (directory / WIDTHS_FILE).is_file():
            raise ArtifactError(f"{directory / WIDTHS_FILE} is present but {directory}/flexc_manifest.json does "
                                "not describe a nested artifact; re-export the artifact")
        if getattr(hf_config, BUDGET_KEY, None) is not None:
            raise ServingError(f"{BUDGET_KEY} was given but {directory} is not a flexc nested artifact "
                               "(no flexc_manifest.json of kind 'nested')")
        return None
    tables = load_tables(directory, manifest)
    return Artifact("nested", directory, tables=tables, budget=_budget_asked(hf_config),
                    policy=load_policy(directory, manifest, tables), experts_kernel=_kernel_asked(hf_config))
