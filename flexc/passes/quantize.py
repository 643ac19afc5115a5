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

from typing import Literal

import torch
from pydantic import Field

from flexc.ir.quant.scheme import GROUP_SIZES, SCHEMES, QuantScheme
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult
from flexc.passes.quantize_layers import HessianSums, finish, layer_cuts, quantize_layer
from flexc.utils.distributed import shard
from flexc.utils.progress import progress_bar
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

