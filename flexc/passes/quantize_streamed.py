"""``quantize`` in a layer-streamed compile (``execution.stream: layers``, docs/scale.md).

Each decoder layer is loaded as the exports will write it (the ranking's permutation, then the weight
changes earlier passes left to the exports, e.g. a streamed ``recover``'s adapters) and its routed
experts quantized as in memory: by round-to-nearest, or (``gptq``) on the Hessians of the calibration
batches pushed through the decoder layers one at a time at full width, unquantized, as the in-memory
pass computes them on the whole model. The codes (int8 storage) go to the stage folder, one file per
MoE layer, and the scales to the compile state; the exports read both back into each layer as they
load it (:func:`layer_merger`). Peak memory: one decoder layer and that layer's Hessians.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexc.passes.quantize_layers import HessianSums, finish, layer_cuts, quantize_layer
from flexc.utils.atomic import atomic_path
from flexc.utils.distributed import shard
from flexc.utils.progress import progress_bar

CODES_KEY = "quantize_codes"  # state.extras: the folder of each MoE layer's integer codes
CODES_DIR = "codes"


def codes_file(folder: str | Path, layer: int) -> Path:
    return Path(folder) / f"layer{layer}.safetensors"


def quantize_streamed(p, lm, ctx) -> None:
    """``quantize`` one decoder layer at a time: the same report and compile state as :meth:`Quantize.run`,
    plus each MoE layer's codes in ``<stage>/codes/``; no source weight is changed."""
    from flexc.ir.streaming import LayerGraph
    from flexc.passes.calibrate import calibrate

    opts = p.options
    scheme = opts.quant_scheme()
    tables = ctx.state.checked_width_tables()
    transform = _earlier_changes(lm, ctx, type(p))
    folder = Path(ctx.workdir) / CODES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    gptq = opts.method == "gptq"
    hidden, kwargs = lm.layer_inputs(list(shard(ctx.calibration_batches()))) if gptq else (None, None)

    scales, layers = {}, []
    for i in progress_bar(range(lm.num_layers), description=f"quantize ({scheme.name}, {opts.method}), streamed",
                          disable=ctx.quiet):
        group = lm.group_at(i)
        if group is None and not gptq:
            continue  # round-to-nearest reads the MoE layers only
        module = lm.materialise(i)
        try:
            graph = LayerGraph(module, lm, group, kwargs, index=i)
            transform(i, graph)
            if group is None:  # a dense layer: its outputs are the next layer's inputs
                with torch.no_grad():
                    for h in hidden:
                        graph.logits(h.to(lm.device))
            else:
                hessians = None
                if gptq:
                    sums = HessianSums([group])
                    calibrate(graph, hidden, on_forward=sums.on_forward, quiet=True,
                              description=f"quantize: Hessians, layer {i + 1}/{lm.num_layers}")
                    hessians = sums.all_reduced()[0]
                gate_up, down = graph.expert_weights(group)
                q_gate_up, q_down, report = quantize_layer(opts, group, gate_up, down,
                                                           layer_cuts(tables, lm.groups.index(group), group, scheme),
                                                           hessians)
                layers.append(report)
                scales[f"layer{group.layer}"] = {"gate_up": q_gate_up.scales, "down": q_down.scales}
                with atomic_path(codes_file(folder, group.layer)) as tmp:
                    save_file({"gate_up": q_gate_up.codes.contiguous(), "down": q_down.codes.contiguous()}, str(tmp))
            hidden = graph.outputs if gptq else None  # each layer's unquantized outputs, as in memory
        finally:
            lm.free(i)
    finish(opts, ctx, scales, layers)
    ctx.state.extras[CODES_KEY] = str(folder.resolve())


def _earlier_changes(lm, ctx, own):
    """What the exports do to a loaded layer before this pass's codes: the permutation and the weight
    changes of the spec's other passes that merge at export (a streamed ``recover``)."""
    from flexc.passes.streamed import export_transform

    classes = [e.pass_class for e in ctx.spec.pipeline] if ctx.spec is not None else []
    return export_transform(lm, ctx.state, [c for c in classes if c is not own])


def layer_merger(lm, state):
    """``f(layer, layer_graph)`` writing a streamed ``quantize``'s dequantized codes into each loaded MoE
    layer (the weights the in-memory pass leaves in the graph), or None where no streamed quantize ran."""
    from flexc.ir.quant.nested import QuantizedWeight

    folder = state.extras.get(CODES_KEY) if state.quantization is not None else None
    if folder is None:
        return None

    def merge(layer: int, graph) -> None:
        group = lm.group_at(layer)
        if group is None:
            return
        path = codes_file(folder, group.layer)
        if not path.is_file():
            raise FileNotFoundError(f"quantize: the codes of MoE layer {group.layer} are missing ({path}); the "
                                    "quantize stage's folder was moved or deleted. Run the compile again from "
                                    "its quantize stage (remove the stage's folder and state, or compile into a new "
                                    "directory)")
        codes, scales = load_file(str(path)), state.quantization["scales"][f"layer{group.layer}"]
        gate_up, down = graph.expert_weights(group)
        with torch.no_grad():
            gate_up.copy_(QuantizedWeight(codes["gate_up"], scales["gate_up"]).dequantized(gate_up.dtype))
            down.copy_(QuantizedWeight(codes["down"], scales["down"]).dequantized(down.dtype))

    return merge
