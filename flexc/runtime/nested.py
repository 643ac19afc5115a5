"""The nested runtime: a transformers model whose budget switches in place.

:func:`load` returns an ordinary ``PreTrainedModel`` (``generate()``, pipelines, … work) whose
experts run ``torch.ops.flexc.moe_experts`` with a per-layer width buffer. Switching budget
copies one small int32 row per layer into those buffers: no weight is copied, reloaded or
recompiled, and on CUDA the Triton kernels read only the kept channels.
"""

from __future__ import annotations

import contextlib
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexc.errors import FlexcError
from flexc.utils.numbers import parses_as_number
from flexc.ir.tables import BudgetError, WidthTables
from flexc.ir.adaptive import AdaptiveLayer, AdaptivePolicy, policy_layers, running
from flexc.ir.experts_impl import WIDTHS_BUFFER, set_adaptive, set_widths, use_flexc_experts
from flexc.ir.groups import ExpertGroup, find_expert_groups


class BudgetTypeError(FlexcError, TypeError):
    """A budget argument that is not a number (e.g. the string ``"0.5"``)."""


def checked_budget(budget: Any, argument: str = "budget") -> float | None:
    """``budget`` as a float (None stays None); a :class:`BudgetTypeError` naming ``argument`` if it is not a number."""
    if budget is None:
        return None
    if isinstance(budget, torch.Tensor) and budget.numel() == 1 and not budget.dtype == torch.bool:
        return float(budget.item())
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        found = f"the string {budget!r}" if isinstance(budget, str) else f"{type(budget).__name__} {budget!r}"[:200]
        hint = f" (write {budget.strip()} without quotes)" if isinstance(budget, str) and parses_as_number(budget) else ""
        raise BudgetTypeError(f"{argument} must be a number, the keep ratio of an exported budget (e.g. 0.5, or 1.0 "
                              f"for full width); found {found}{hint}")
    return float(budget)


class NestedRuntime:
    """Budget control of a loaded nested model (``model.flexc``)."""

    def __init__(self, model: nn.Module, groups: list[ExpertGroup], tables: WidthTables,
                 policy: AdaptivePolicy | None = None):
        self.model = model
        self.groups = groups
        self.tables = tables
        self.policy = policy  # the artifact's token-adaptive policy, if it has one
        self.budget: float | None = None
        self.adaptive = False  # whether the current budget runs the adaptive policy
        self._adaptive_layers: dict[float, list[AdaptiveLayer]] = {}
        for g in groups:  # allocate every width buffer once; switching only copies into them
            set_widths(self._experts(g), torch.full((g.num_experts,), g.intermediate_size, dtype=torch.int32))
        # Every budget's rows, already on the buffers' device: a switch is one tiny copy per layer.
        device = next(model.parameters()).device
        self._rows = {b: [row.to(device) for row in tables.table(b)] for b in self.budgets}
        self._rows.setdefault(1.0, [row.to(device) for row in tables.full_table()])

    @property
    def budgets(self) -> list[float]:
        """Exported budgets (keep ratios, descending); 1.0 (full width) is always available too."""
        return list(self.tables.budgets)

    def _experts(self, group: ExpertGroup) -> nn.Module:
        return self.model.get_submodule(group.path)

    def set_budget(self, budget: float, overrides: dict[int, Any] | None = None, *, adaptive: bool = False) -> None:
        """Switch every layer to ``budget``'s widths; ``overrides`` maps layer → widths ``[E]``.

        ``adaptive=True`` runs the artifact's token-adaptive policy at ``budget`` instead of its static
        table: each routed pair's width follows its routing weight (:mod:`flexc.ir.adaptive`)."""
        budget = checked_budget(budget, "set_budget(budget)")
        if budget is None:
            raise BudgetTypeError("set_budget(budget) needs a keep ratio (e.g. 0.5, or 1.0 for full width); found None")
        key = self._closest(budget)
        if key is None:
            raise BudgetError(f"no width table for budget {budget}; available budgets: "
                              f"{', '.join(f'{b:g}' for b in self.budgets)} (and 1.0 for full width)")
        layers = self._adaptive_for(key) if adaptive else None
        for i, (g, row) in enumerate(zip(self.groups, self._rows[key])):
            experts = self._experts(g)
            getattr(experts, WIDTHS_BUFFER).copy_(row)
            set_adaptive(experts, None if layers is None else layers[i])
        self.budget, self.adaptive = key, layers is not None
        if overrides:
            self.set_layer_widths(overrides)

    def _adaptive_for(self, budget: float) -> list[AdaptiveLayer] | None:
        """Each layer's adaptive widths at ``budget`` (None at full width, where every level is full)."""
        if self.policy is None:
            raise BudgetError("set_budget(adaptive=True): this artifact has no token-adaptive policy; compile with "
                              "the adaptive_widths pass after the widths are chosen (docs/adaptive.md)")
        if abs(budget - 1.0) < 1e-6:
            return None
        if budget not in self._adaptive_layers:
            self._adaptive_layers[budget] = policy_layers(self.policy, self.tables, budget,
                                                          next(self.model.parameters()).device)
        return self._adaptive_layers[budget]

    @contextlib.contextmanager
    def measure_active_keep(self):
        """While active, count the adaptive layers' routed pairs and their widths; yields a function giving the
        realised active keep so far (mean over routed pairs of width / full width). Needs adaptive widths."""
        if not self.adaptive:
            raise BudgetError("measure_active_keep() measures the adaptive policy: call set_budget(b, adaptive=True) "
                              "first")
        with running([self._experts(g) for g in self.groups], self._adaptive_layers[self.budget]) as keep:
            yield keep

    def set_layer_widths(self, overrides: dict[int, Any]) -> None:
        """Set some layers' widths ``[E]`` directly (``{layer index: widths}``)."""
        by_layer = {g.layer: g for g in self.groups}
        for layer, widths in overrides.items():
            if layer not in by_layer:
                raise KeyError(f"no MoE layer {layer}; MoE layers: {sorted(by_layer)}")
            g = by_layer[layer]
            row = torch.as_tensor(widths, dtype=torch.int32)
            if row.shape != (g.num_experts,) or int(row.min()) < 0 or int(row.max()) > g.intermediate_size:
                raise ValueError(f"layer {layer}: widths must be {g.num_experts} values in "
                                 f"[0, {g.intermediate_size}]; found shape {tuple(row.shape)}")
            experts = self._experts(g)
            getattr(experts, WIDTHS_BUFFER).copy_(row)
            set_adaptive(experts, None)
        self.budget, self.adaptive = None, False  # no longer one exported budget

    def widths(self) -> torch.Tensor:
        """Current widths ``[layers, experts]``."""
        return torch.stack([getattr(self._experts(g), WIDTHS_BUFFER).cpu() for g in self.groups])

    def _closest(self, budget: float) -> float | None:
        for b in self._rows:
            if abs(b - budget) < 1e-6:
                return b
        return None


def attach(model: nn.Module, tables: WidthTables, budget: float | None = None, *,
           policy: AdaptivePolicy | None = None, adaptive: bool = False) -> nn.Module:
    """Make ``model`` a nested model: flexc experts, width buffers, ``model.set_budget`` (with ``policy``, the
    token-adaptive one too; ``adaptive``: start on it)."""
    from flexc.ir.families import detect_family

    use_flexc_experts(model)
    groups = find_expert_groups(model, detect_family(model.config))
    if [g.layer for g in groups] != tables.layers or [g.intermediate_size for g in groups] != tables.full:
        raise ValueError(f"the width tables (layers {tables.layers}) do not match this model's MoE layers "
                         f"({[g.layer for g in groups]})")
    runtime = NestedRuntime(model, groups, tables, policy)
    # Plain attributes (not submodules): the model stays an ordinary transformers model.
    model.flexc = runtime
    model.set_budget = runtime.set_budget
    if budget is not None:
        runtime.set_budget(budget, adaptive=adaptive)
    elif adaptive:
        raise BudgetError("adaptive=True needs a budget (e.g. budget=0.5): at full width every pair runs whole")
    return model


def load_nested(directory: str | Path, budget: float | None = None, *, dtype: Any = None,
                device: str | torch.device | None = None, backend: str = "auto",
                quantized: bool | None = None, adaptive: bool = False) -> nn.Module:
    """Load a nested artifact at ``budget`` (None: full width); a quantized one holding int8 codes unless
    ``quantized`` is False; ``adaptive``: on its token-adaptive policy (see :func:`flexc.load`)."""
    from transformers import AutoModelForCausalLM

    from flexc.export.nested import ArtifactError, load_policy, load_tables, read_manifest

    directory = Path(directory)
    budget = checked_budget(budget)
    manifest = read_manifest(directory)
    # Checked against the manifest's budgets, with errors that name the file.
    tables = load_tables(directory, manifest)
    policy = load_policy(directory, manifest, tables)
    if adaptive and policy is None:
        raise ArtifactError(f"{directory}: flexc.load(adaptive=True), but this nested artifact has no token-adaptive "
                            "policy (compile with the adaptive_widths pass; docs/adaptive.md)")
    record = (manifest or {}).get("quantization")
    if quantized and record is None:
        raise ArtifactError(f"{directory}: flexc.load(quantized=True), but this nested artifact was not compiled "
                            "with quantize (its manifest has no 'quantization')")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    check_weights(directory)
    with weights_errors(directory):
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    _install_backend(backend, next(model.parameters()).device)
    try:
        model = attach(model, tables, budget, policy=policy, adaptive=adaptive)
    except ValueError as exc:  # tables of another model: say which file
        from flexc.ir.tables import WIDTHS_FILE

        raise ArtifactError(f"{directory / WIDTHS_FILE}: {exc}") from None
    if record is not None and quantized is not False:
        hold_codes(model, model.flexc.groups, directory, record)
    return model


def hold_codes(model: nn.Module, groups, directory: Path, record: dict) -> None:
    """Replace every MoE layer's float expert weights by the int8 codes they hold (``codes * scale``, the
    scales from the artifact's scales file) and those scales (:func:`flexc.ir.experts_impl.hold_quantized`)."""
    from safetensors.torch import load_file

    from flexc.export.nested import QUANT_KEY_PREFIX, ArtifactError
    from flexc.ir.experts_impl import canonical_weights, hold_quantized
    from flexc.ir.quant.nested import codes_of
    from flexc.ir.quant.scheme import QuantScheme

    path = directory / str(record.get("scales"))
    try:
        scheme = QuantScheme(record["scheme"], record["group_size"])
        scales = load_file(str(path))
    except (KeyError, ValueError, OSError, TypeError) as exc:
        raise ArtifactError(f"{path}: cannot read the quantization scales ({type(exc).__name__}: {exc}); expected "
                            "the file the export wrote: re-export the artifact") from None
    for g in groups:
        experts = model.get_submodule(g.path)
        gate_up, down = canonical_weights(experts)
        pair = [scales.get(f"{QUANT_KEY_PREFIX}layer{g.layer}.{part}") for part in ("gate_up", "down")]
        expected = [(*gate_up.shape[:2], gate_up.shape[2] // scheme.group_size),
                    (*down.shape[:2], down.shape[2] // scheme.group_size)]
        if any(t is None or tuple(t.shape) != e for t, e in zip(pair, expected)):
            raise ArtifactError(f"{path}: no scales of shapes {expected} for MoE layer {g.layer}; re-export the "
                                "artifact")
        su, sd = (t.to(gate_up.device) for t in pair)
        with torch.no_grad():
            hold_quantized(experts, codes_of(gate_up, su, scheme), su, codes_of(down, sd, scheme), sd,
                           scheme.group_size)


def check_weights(directory: Path) -> None:
    """Refuse an artifact whose weight files are truncated or corrupt (headers and sizes only), naming the file."""
    from flexc.export.nested import ArtifactError
    from flexc.utils.weights import check_weight_files

    problems = check_weight_files(directory)
    if problems:
        raise ArtifactError(f"{problems[0]}; expected the weights the export wrote: re-export the artifact "
                            "(compile again with --force, or copy it again)")


@contextlib.contextmanager
def weights_errors(directory: Path):
    """Turn safetensors' own errors while loading weights (``SafetensorError``, ``HeaderTooLarge``: a file
    damaged in a way its header does not show) into an :class:`~flexc.export.nested.ArtifactError`
    naming the weight files."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ not in ("SafetensorError", "HeaderTooLarge") or isinstance(exc, FlexcError):
            raise
        from flexc.export.nested import ArtifactError

        files = sorted(directory.glob("*.safetensors"))
        named = ", ".join(str(f) for f in _unreadable(files) or files) or str(directory)
        raise ArtifactError(f"{named}: cannot load the artifact's weights ({type(exc).__name__}: {exc}); expected "
                            "the weights the export wrote: re-export the artifact (compile again with --force, or "
                            "copy it again)") from None


def _unreadable(files: list[Path]) -> list[Path]:
    """Those of ``files`` whose safetensors header the library refuses (it reads the header only)."""
    from safetensors import safe_open

    bad = []
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception:  # noqa: BLE001 - any refusal marks the file
            bad.append(f)
    return bad


def _install_backend(backend: str, device: torch.device) -> None:
    """``auto``: Triton kernels on CUDA, the reference op elsewhere (see :mod:`flexc.ir.backends`)."""
    from flexc.ir.backends import use_backend

    use_backend(backend, device)
