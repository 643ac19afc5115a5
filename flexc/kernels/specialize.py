"""Specialising the expert kernels to one model: shapes, dtype, width granule, block configs.

:func:`specialize` returns a :class:`KernelPlan`; ``plan.write(dir)`` puts into an artifact

- ``experts_kernels.py``: the kernel module's source followed by a generated specialisation
  block (``SPEC``, ``CONFIGS``, ``config_for(num_tokens)``, ``forward(...)``); it imports only
  torch and triton, so a runtime can load it without flexc;
- ``kernel_config.json``: the same specialisation as data (shape, dtype, granule, device,
  per-bucket block configs, where the configs came from).

Configs come from, in order: a fresh autotune on the target GPU (``tune=True``, or
``tune=None`` when the GPU has no table entry for this shape), the shipped table, the
heuristics (CPUs, or no GPU at hand).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType

import torch

from flexc.kernels import triton_experts
from flexc.kernels.triton_experts import KernelConfig, default_config
from flexc.kernels.tuning import BUCKETS, autotune, device_name, shape_key, table_entries

SOURCE_NAME = "experts_kernels.py"
CONFIG_NAME = "kernel_config.json"
_MARK = "# ==== flexc specialisation (generated) ===="


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class KernelPlan:
    """The kernels specialised to one expert shape on one device."""

    num_experts: int
    hidden: int
    intermediate: int
    top_k: int
    dtype: str
    granule: int | None
    device: str
    configs: dict[int, KernelConfig]
    config_source: str = "heuristic"

    @property
    def key(self) -> str:
        return shape_key(self.num_experts, self.hidden, self.intermediate, self.top_k, self.dtype)

    def config_for(self, num_tokens: int) -> KernelConfig:
        ups = [b for b in self.configs if b >= num_tokens]
        return self.configs[min(ups)] if ups else self.configs[max(self.configs)]

    def forward(self, hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias=None, down_bias=None, widths=None,
                activation="silu", interleaved=False, alpha=1.702, limit=7.0):
        """Run the specialised kernels (through this process's kernel module)."""
        from flexc.kernels.dispatch import kernels_module

        if tuple(gate_up.shape) != (self.num_experts, 2 * self.intermediate, self.hidden):
            raise ValueError(f"plan for {self.key} got gate_up {tuple(gate_up.shape)}")
        if topk_ids.shape[1] != self.top_k:
            raise ValueError(f"plan for top_k={self.top_k} got topk_ids {tuple(topk_ids.shape)}")
        return kernels_module().moe_forward(
            hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths, activation, interleaved,
            alpha, limit, config=self.config_for(hidden.shape[0]), granule=self.granule)

    def spec_dict(self) -> dict:
        return {"num_experts": self.num_experts, "hidden": self.hidden, "intermediate": self.intermediate,
                "top_k": self.top_k, "dtype": self.dtype, "granule": self.granule, "device": self.device,
                "config_source": self.config_source}

    def to_json(self) -> dict:
        return {"format": 1, "spec": self.spec_dict(),
                "configs": {str(b): c.to_dict() for b, c in sorted(self.configs.items())}}

    def source(self) -> str:
        return kernel_source_for(self)

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write ``experts_kernels.py`` and ``kernel_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        src = directory / SOURCE_NAME
        cfg = directory / CONFIG_NAME
        src.write_text(self.source())
        cfg.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return {"source": src, "config": cfg}

    @classmethod
    def read(cls, directory: str | Path) -> KernelPlan:
        data = json.loads((Path(directory) / CONFIG_NAME).read_text())
        spec = data["spec"]
        return cls(num_experts=spec["num_experts"], hidden=spec["hidden"], intermediate=spec["intermediate"],
                   top_k=spec["top_k"], dtype=spec["dtype"], granule=spec["granule"], device=spec["device"],
                   configs={int(b): KernelConfig.from_dict(c) for b, c in data["configs"].items()},
                   config_source=spec.get("config_source", "file"))


def kernel_source_for(plan: KernelPlan) -> str:
    """Standalone source of the kernels specialised by ``plan`` (kernel module + generated block)."""
    base = inspect.getsource(triton_experts)
    if _MARK in base:  # already a generated module
        base = base.split(_MARK)[0]
    configs = ",\n".join(f"    {b}: KernelConfig(**{c.to_dict()!r})" for b, c in sorted(plan.configs.items()))
    footer = f'''

{_MARK}
# Expert kernels specialised to E={plan.num_experts}, H={plan.hidden}, I={plan.intermediate},
# top_k={plan.top_k}, dtype={plan.dtype}, width granule={plan.granule}, device={plan.device!r}.
# Block configs per batch bucket (tokens); source: {plan.config_source}.

SPEC = {plan.spec_dict()!r}

CONFIGS = {{
{configs}
}}


def config_for(num_tokens):
    ups = [b for b in CONFIGS if b >= num_tokens]
    return CONFIGS[min(ups)] if ups else CONFIGS[max(CONFIGS)]


def forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias=None, down_bias=None, widths=None,
            activation="silu", interleaved=False, alpha=1.702, limit=7.0):
    """The routed experts of one layer of this model (the op's positional signature)."""
    E, H, I, K = SPEC["num_experts"], SPEC["hidden"], SPEC["intermediate"], SPEC["top_k"]
    if tuple(gate_up.shape) != (E, 2 * I, H) or tuple(down.shape) != (E, H, I) or topk_ids.shape[1] != K:
        raise ValueError("inputs do not match this specialisation: " + repr(SPEC))
    return moe_forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                       activation, interleaved, alpha, limit, config=config_for(hidden.shape[0]),
                       granule=SPEC["granule"])
'''
    return base.rstrip() + "\n" + footer


def load_plan_module(directory: str | Path, name: str | None = None) -> ModuleType:
    """Import a written ``experts_kernels.py`` (its ``forward`` runs the specialised kernels)."""
    path = Path(directory) / SOURCE_NAME
    name = name or f"flexc_specialised_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


def specialize(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype: torch.dtype | str = "bfloat16",
               granule: int | None = None, device: torch.device | str = "cuda", tune: bool | None = None,
               batches=BUCKETS) -> KernelPlan:
    """Specialise the kernels to a model's expert shape.

    ``tune``: ``True`` autotunes on the device (CUDA only), ``False`` never does, ``None``
    autotunes only when the device is a CUDA GPU with no shipped table entry for this shape.
    """
    device = torch.device(device)
    dt = _dtype_name(dtype)
    key = shape_key(num_experts, hidden, intermediate, top_k, dt)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    name = device_name(device)
    configs: dict[int, KernelConfig] = {}
    source = "heuristic"
    if device.type == "cuda":
        known = table_entries(key, name)
        if tune or (tune is None and not known):
            configs = autotune(num_experts, hidden, intermediate, top_k, getattr(torch, dt), device, batches=batches)
            source = "autotuned"
        elif known:
            configs = dict(known)
            source = "table"
    if not configs:
        interp = device.type != "cuda"
        configs = {b: default_config(num_experts, top_k, b, interpret=interp) for b in batches}
    return KernelPlan(num_experts, hidden, intermediate, top_k, dt, granule, name, configs, source)


__all__ = ["CONFIG_NAME", "SOURCE_NAME", "KernelPlan", "kernel_source_for", "load_plan_module", "specialize"]
