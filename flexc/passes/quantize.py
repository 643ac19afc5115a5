"""``quantize``: weight-only int8/int4 quantization of the routed experts, every budget still a prefix.

Runs after the widths are final (``anneal`` or a baseline, ``fold_masks``, ``recover``). Each
expert's ``gate_up`` and ``down`` are quantized per group of ``group_size`` input channels
(:mod:`flexc.ir.quant`): by round-to-nearest (``method: rtn``) or by GPTQ-style error compensation on
calibration inputs (``method: gptq``), whose compensation in ``down`` never crosses a width one of
the compile's budgets cuts at. Every width must be a whole number of groups (``budgets.grid`` a
multiple of ``group_size``), so each budget's prefix is whole groups and quantizing then slicing
equals slicing then quantizing.

The graph's expert weights become their dequantized values (what every budget then computes);
the scales go to the compile state (``state.quantization``), from which the exports recover the
integer codes, and ``quantize.json`` reports the scheme and each layer's weight and output error.
Biases, attention and shared experts stay as they are.

In a layer-streamed compile (``execution.stream: layers``) the same quantization runs one decoder
layer at a time (:mod:`flexc.passes.quantize_streamed`): the codes go to the stage folder and the
exports write them into each layer as they load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.ir.quant.nested import QuantizedWeight, quantize_gptq, quantize_rtn
from flexc.ir.quant.scheme import GROUP_SIZES, SCHEMES, QuantScheme
from flexc.utils.atomic import atomic_write_text
from flexc.utils.distributed import all_reduce_sum, shard
from flexc.utils.progress import progress_bar

REPORT = "quantize.json"
# Passes that change weights or widths: after quantize they would undo it or cut inside a group.
_CHANGES_AFTER = ("rank_channels", "anneal", "uniform", "coverage", "expert_prune", "recover")


class QuantizeOptions(PassOptions):
    scheme: Literal[tuple(SCHEMES)] = Field("w4a16", description="Weight-only symmetric int: w8a16 (int8) or w4a16 "
                                            "(int4). Activations stay in the model's dtype.")
    group_size: Literal[GROUP_SIZES] = Field(128, description="Input channels per scale (32, 64 or 128, as vLLM's "
                                             "quantized MoE kernels take); budgets.grid must be a multiple of it.")
    method: Literal["gptq", "rtn"] = Field("gptq", description="gptq: error compensation on calibration inputs, "
                                           "never across a budget's cut; rtn: round to nearest (no data).")
    dampening: float = Field(0.01, gt=0, lt=1, description="gptq: fraction of the Hessian's mean diagonal added "
                             "to it.")

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        return self.method == "gptq"

    def quant_scheme(self) -> QuantScheme:
        return QuantScheme(self.scheme, self.group_size)


class Quantize(Pass):
    """Quantize the routed experts' weights per group of input channels, keeping every budget a prefix."""

    name = "quantize"
    Options = QuantizeOptions
    requires = frozenset({"channels_ranked", "width_tables"})
    guarantees = frozenset({"quantized"})
    preserves_computation = False
    streams = True  # run_streamed: one decoder layer at a time (quantize_streamed.py); the exports write its codes
    merges_at_export = True
    packages = ("compressed_tensors",)

    @classmethod
    def check_spec(cls, options, site) -> list:
        """Every width a whole number of groups (an integer ``budgets.grid``, a multiple of the group size,
        dividing the expert width), and no pass after this one that changes weights or widths."""
        problems = []
        g = options.group_size
        grid = getattr(getattr(site.spec, "budgets", None), "grid", None)
        if not isinstance(grid, int) or grid % g:
            problems.append((("budgets", "grid"), f"quantize (group_size {g}) needs every expert width to be a whole "
                             f"number of quantization groups: set budgets.grid to a multiple of {g} (found {grid!r})"))
        width = getattr(site.shape, "intermediate_size", None)
        if isinstance(width, int) and width % g:
            problems.append((site.loc, f"quantize: the experts' intermediate size {width} is not a multiple of "
                             f"group_size {g}; choose a group_size that divides it"))
        later = [e.name for e in site.spec.pipeline[site.index + 1:] if e.name in _CHANGES_AFTER]
        if later:
            problems.append((site.loc, f"quantize must come after every pass that changes weights or widths; move "
                             f"{', '.join(later)} before it"))
        return problems

    def run(self, graph, ctx: PassContext) -> PassResult:
        opts = self.options
        scheme = opts.quant_scheme()
        tables = ctx.state.checked_width_tables()
        hessians = _hessians(graph, ctx) if opts.method == "gptq" else None

        scales, layers = {}, []
        for i, g in enumerate(progress_bar(graph.groups, description=f"quantize ({scheme.name}, {opts.method})",
                                           disable=ctx.quiet)):
            gate_up, down = graph.expert_weights(g)
            q_gate_up, q_down, report = quantize_layer(opts, g, gate_up, down, layer_cuts(tables, i, g, scheme),
                                                       hessians[i] if hessians else None)
            layers.append(report)
            with torch.no_grad():
                gate_up.copy_(q_gate_up.dequantized(gate_up.dtype))
                down.copy_(q_down.dequantized(down.dtype))
            scales[f"layer{g.layer}"] = {"gate_up": q_gate_up.scales, "down": q_down.scales}
        finish(opts, ctx, scales, layers)
        return PassResult(graph=graph, modified=True, changed_nodes=set())

    def run_streamed(self, lm, ctx: PassContext) -> None:
        from flexc.passes.quantize_streamed import quantize_streamed

        quantize_streamed(self, lm, ctx)

    @classmethod
    def export_merger(cls, model, state):
        from flexc.passes.quantize_streamed import layer_merger

        return layer_merger(model, state)


def quantize_layer(opts: QuantizeOptions, group, gate_up: torch.Tensor, down: torch.Tensor, cuts: list[list[int]],
                   hessians) -> tuple[QuantizedWeight, QuantizedWeight, dict]:
    """One MoE layer's quantized ``gate_up`` and ``down`` (GPTQ's compensation in ``down`` stopping at ``cuts``)
    and its report entry; ``hessians``: the layer's (inputs, gated activations, token counts), None for RTN."""
    scheme = opts.quant_scheme()
    if group.hidden_size % scheme.group_size:
        raise ValueError(f"quantize: layer {group.layer}'s hidden size {group.hidden_size} is not a multiple of "
                         f"group_size {scheme.group_size}")
    if hessians is None:
        q_gate_up, q_down = quantize_rtn(gate_up, scheme), quantize_rtn(down, scheme)
    else:
        h_in, h_inner, _ = hessians
        q_gate_up = quantize_gptq(gate_up, h_in, scheme, dampening=opts.dampening)
        q_down = quantize_gptq(down, h_inner, scheme, cuts=cuts, dampening=opts.dampening)
    return q_gate_up, q_down, _layer_report(group, gate_up, down, q_gate_up, q_down, hessians, scheme)


def finish(opts: QuantizeOptions, ctx: PassContext, scales: dict, layers: list[dict]) -> None:
    """``quantize.json``, the scheme and scales in the compile state, and the log line."""
    scheme = opts.quant_scheme()
    workdir = Path(ctx.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {**scheme.to_dict(), "method": opts.method, "targets": "routed experts"}
    atomic_write_text(workdir / REPORT, json.dumps({**record, "options": opts.model_dump(mode="json"),
                                                    "layers": layers}, indent=2))
    ctx.state.quantization = {**record, "scales": scales}
    worst = max(max(r["gate_up_output_error"] or 0, r["down_output_error"] or 0) for r in layers)
    ctx.logger.info("quantize: %s (%s, group %d) over %d MoE layers; worst relative output error on "
                    "calibration inputs %.3g", scheme.name, opts.method, scheme.group_size, len(layers), worst)


def layer_cuts(tables, index: int, group, scheme: QuantScheme) -> list[list[int]]:
    """Each expert's distinct widths over the budgets (where GPTQ's compensation must stop); refuses a
    width that is not a whole number of groups."""
    full = group.intermediate_size
    if full % scheme.group_size:
        raise ValueError(f"quantize: layer {group.layer}'s expert width {full} is not a multiple of group_size "
                         f"{scheme.group_size}")
    widths = torch.stack([t[index] for t in tables.tables])  # [budgets, E]
    bad = sorted({int(w) for w in widths.flatten().tolist() if w % scheme.group_size})
    if bad:
        raise ValueError(f"quantize: layer {group.layer} has expert widths {bad[:5]} that are not whole quantization "
                         f"groups of {scheme.group_size}; set budgets.grid to a multiple of {scheme.group_size} so the "
                         "width-choosing pass keeps to it")
    return [sorted({int(w) for w in widths[:, e].tolist()} - {0, full}) for e in range(widths.shape[1])]


def _hessians(graph, ctx: PassContext) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per MoE layer, each expert's ``X^T X`` of its inputs ``[E, H, H]`` and of its full-width gated
    activations ``[E, I, I]`` (the inputs of ``down``), and its calibration token counts ``[E]``."""
    from flexc.passes.calibrate import calibrate

    sums = HessianSums(graph.groups)
    widths = graph.widths()
    graph.set_widths(None)  # the Hessian of every channel, at full width
    try:  # this rank's batches (all of them in one process); the sums are reduced below
        calibrate(graph, shard(ctx.calibration_batches()), on_forward=sums.on_forward,
                  description="quantize: Hessians", quiet=ctx.quiet)
    finally:
        graph.set_widths(widths)
    return sums.all_reduced()


class HessianSums:
    """Calibration's expert observer summing, per MoE layer of ``groups``, each expert's ``X^T X`` of its
    inputs ``[E, H, H]`` and of its gated activations ``[E, I, I]``, and its token counts ``[E]``."""

    def __init__(self, groups):
        self.groups = groups
        self.sums = [(torch.zeros(g.num_experts, g.hidden_size, g.hidden_size, dtype=torch.float64),
                      torch.zeros(g.num_experts, g.intermediate_size, g.intermediate_size, dtype=torch.float64),
                      torch.zeros(g.num_experts, dtype=torch.long)) for g in groups]

    def on_forward(self, layer: int, info: dict) -> None:
        if info["event"] != "expert":
            return
        h_in, h_inner, count = self.sums[layer]
        x, inner = info["x"].detach().double().cpu(), info["inner"].detach().double().cpu()
        h_in[info["expert"]] += x.t() @ x
        h_inner[info["expert"]] += inner.t() @ inner
        count[info["expert"]] += x.shape[0]

    def all_reduced(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The sums over every rank (under torchrun every rank then quantizes the same weights)."""
        for group, tensors in zip(self.groups, self.sums):
            for t in tensors:
                all_reduce_sum(t, f"quantize's Hessians of MoE layer {group.layer}")
        return self.sums


def _layer_report(group, gate_up, down, q_gate_up: QuantizedWeight, q_down: QuantizedWeight, hessians,
                  scheme: QuantScheme) -> dict:
    """Relative weight error of both projections, and (with calibration) relative output error
    ``||dW X|| / ||W X||`` over the calibration inputs, beside round-to-nearest's on the same inputs."""
    def weight_error(w, q):
        w = w.detach().float()
        return float((q.dequantized() - w).norm() / w.norm().clamp_min(1e-12))

    def output_error(w, q, h):
        w = w.detach().double()
        dw = q.dequantized().double() - w
        num = torch.einsum("eri,eij,erj->", dw, h, dw)  # sum_e ||dW_e X_e||^2
        den = torch.einsum("eri,eij,erj->", w, h, w)
        return float((num / den.clamp_min(1e-30)).sqrt()) if den > 0 else None

    report = {"layer": group.layer, "gate_up_weight_error": weight_error(gate_up, q_gate_up),
              "down_weight_error": weight_error(down, q_down), "gate_up_output_error": None, "down_output_error": None}
    if hessians is not None:
        h_in, h_inner, count = hessians
        report.update(gate_up_output_error=output_error(gate_up, q_gate_up, h_in),
                      down_output_error=output_error(down, q_down, h_inner),
                      gate_up_output_error_rtn=output_error(gate_up, quantize_rtn(gate_up, scheme), h_in),
                      down_output_error_rtn=output_error(down, quantize_rtn(down, scheme), h_inner),
                      experts_without_tokens=int((count == 0).sum()))
    return report
