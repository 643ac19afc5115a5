"""One MoE layer's quantization, shared by ``quantize`` in memory (:mod:`flexc.passes.quantize`) and
streamed (:mod:`flexc.passes.quantize_streamed`): each expert's input Hessians summed as calibration
passes (:class:`HessianSums`), the layer's codes and scales with its report entry (:func:`quantize_layer`,
``opts``: the pass's options), the widths GPTQ must not compensate across (:func:`layer_cuts`), and the
pass's report and compile state (:func:`finish`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexc.ir.quant.nested import QuantizedWeight, quantize_gptq, quantize_rtn
from flexc.ir.quant.scheme import QuantScheme
from flexc.utils.atomic import atomic_write_text
from flexc.utils.distributed import all_reduce_sum

REPORT = "quantize.json"


def quantize_layer(opts, group, gate_up: torch.Tensor, down: torch.Tensor, cuts: list[list[int]],
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


def finish(opts, ctx, scales: dict, layers: list[dict]) -> None:
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
