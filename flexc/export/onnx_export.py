"""The ``onnx`` export: one ONNX model per budget, experts stored at their pruned widths.

Layout of ``<out>/onnx/``::

    flexc_manifest.json      kind "onnx": the budgets and the folder of each
    keep_0.75/               one budget (folder name: :func:`flexc.ir.tables.budget_key`)
        model.onnx           inputs input_ids, attention_mask [batch, sequence] (int64, both
                             dynamic); output logits [batch, sequence, vocab] (float32).
                             Weights inside the file; as external data (model.onnx.data)
                             when the model passes ONNX's 2 GB protobuf limit.
        flexc_manifest.json  kind "onnx": budget, opset, validation max abs diff, bytes
        tokenizer files      when the compile had a tokenizer
    keep_0.50/ ...

How the graph is produced: for each budget, every experts module of the Hugging Face model is
swapped for a :class:`FusedExperts` holding only the kept channels, the model runs without
KV cache (``use_cache=False``), and ``torch.onnx.export(..., dynamo=True)`` traces it with
``torch.export`` and converts it with onnxscript. The modules are swapped back afterwards; the
compiled model is left as it was. The graph is float32 whatever the model's dtype (ONNX
Runtime's CPU provider has fast kernels for float32 only).

Why the dynamo exporter: ``torch.export`` traces symbolically, so batch and sequence stay
dynamic by construction and a Python branch on a tensor's value fails the export loudly instead
of being frozen into the graph; it handles transformers 5 models of every supported family as
they are (masks, rotary embeddings, routers, GPT-OSS sinks), and it is the exporter torch
develops (the TorchScript one is deprecated since torch 2.9). The legacy exporter also produces
correct graphs for the tiny models of every family and is about 10x faster to export, but it
records one concrete run: Python branches on shapes (transformers' SDPA code warns about two)
become constants, right only as far as the validation shapes show. It stays available as
``write_onnx(..., dynamo=False)``, guarded by the same validation.

Validation is part of the export: ONNX Runtime runs two random batches of shapes other than the
traced one (one of them left-padded) and must match the nested torch runtime at that budget
within :data:`TOLERANCE` (max abs diff of logits over unpadded positions), else the export fails.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from flexc.errors import FlexcError
from flexc.export.context import ExportContext
from flexc.export.slicing import LayerSlices, slice_experts
from flexc.ir.op import apply_activation
from flexc.ir.tables import budget_key

KIND = "onnx"
MANIFEST_FILE = "flexc_manifest.json"
MODEL_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4  # float32 logits, ONNX Runtime vs the torch nested runtime
TRACE_SHAPE = (2, 8)  # (batch, sequence) of the traced example; >1 so neither dim is specialised
CHECK_SHAPES = ((1, 1), (1, 5), (3, 21))  # validation shapes, all different from the traced one
LEGACY_OPSET = 18
INSTALL_HINT = "pip install 'flexc[onnx]'"


class OnnxExportError(FlexcError):
    """The ONNX export cannot proceed or its result does not match torch."""


def require_onnx() -> None:
    """Import the optional ONNX stack, or fail naming the extra that installs it."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OnnxExportError(f"the onnx export needs {', '.join(missing)}, which "
                              f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")


# ---- the export-friendly experts module -------------------------------------------------------


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


class FusedExperts(nn.Module):
    """One MoE layer's routed experts at their widths, as three dense GEMMs.

    The kept channels of all experts are concatenated, stored input-major so that the graph
    multiplies them as they are (no transposes to fold, initializer names stay readable):
    ``gate``/``up`` ``[H, W]`` and ``down`` ``[W, H]`` with ``W = sum of widths``, and
    ``channel_expert [W]`` names each channel's expert. A token's routing weights are scattered
    into a dense ``[T, E]`` matrix, gathered per channel, and multiply the activated channels
    before ``down``, so an expert the token was not routed to contributes exactly zero. No shape
    depends on the routing, so the graph exports with plain MatMul/Gather/ScatterElements.

    Cost: every token runs every kept channel, i.e. about ``E / k`` times the routed FLOPs of
    a sparse runtime (16x for 128 experts top-8). Fine for small models and for checking; a
    sparse ONNX graph (per-expert token gathers) would need data-dependent shapes.
    """

    def __init__(self, slices: LayerSlices, num_experts: int):
        super().__init__()
        kept = [(e, s) for e, s in enumerate(slices.experts) if s.width > 0]
        self.num_experts = num_experts
        self.activation = (slices.activation, slices.alpha, slices.limit)
        self.empty = not kept  # every expert pruned away: the layer adds nothing
        if self.empty:
            return
        self.gate = _frozen(torch.cat([s.gate for _, s in kept]).t())
        self.up = _frozen(torch.cat([s.up for _, s in kept]).t())
        self.down = _frozen(torch.cat([s.down for _, s in kept], dim=1).t())
        self.register_buffer("channel_expert", torch.cat([torch.full((s.width,), e) for e, s in kept]))
        self.has_bias = kept[0][1].gate_bias is not None
        if self.has_bias:
            self.gate_bias = _frozen(torch.cat([s.gate_bias for _, s in kept]))
            self.up_bias = _frozen(torch.cat([s.up_bias for _, s in kept]))
            # A pruned (width 0) expert contributes nothing, its down bias included.
            down_bias = torch.zeros(num_experts, self.down.shape[1], dtype=self.down.dtype)
            for e, s in kept:
                down_bias[e] = s.down_bias
            self.down_bias = _frozen(down_bias)

    @property
    def kept_channels(self) -> int:
        return 0 if self.empty else self.gate.shape[1]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return torch.zeros_like(hidden)
        routing = hidden.new_zeros(hidden.shape[0], self.num_experts)
        routing = routing.scatter_add(1, top_k_index.long(), top_k_weights.to(hidden.dtype))
        gate = hidden @ self.gate
        up = hidden @ self.up
        if self.has_bias:
            gate, up = gate + self.gate_bias, up + self.up_bias
        inner = apply_activation(gate, up, *self.activation) * routing[:, self.channel_expert]
        out = inner @ self.down
        if self.has_bias:
            out = out + routing @ self.down_bias  # each expert's bias, scaled by its routing weight
        return out


class _Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` without KV cache: the graph's signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# ---- temporary changes to the model, always undone -----------------------------------------


def _split_path(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


@contextmanager
def fused_experts(model: nn.Module, groups, widths: torch.Tensor) -> Iterator[list[FusedExperts]]:
    """Swap each group's experts module for its :class:`FusedExperts` at ``widths [L, E]``."""
    originals, fused = [], []
    try:
        for row, group in enumerate(groups):
            parent, name = _split_path(model, group.path)
            experts = getattr(parent, name)
            module = FusedExperts(slice_experts(experts, widths[row]), group.num_experts)
            setattr(parent, name, module)
            originals.append((parent, name, experts))
            fused.append(module)
        yield fused
    finally:
        for parent, name, experts in reversed(originals):
            setattr(parent, name, experts)


@contextmanager
def nested_runtime(model: nn.Module, groups, widths: torch.Tensor) -> Iterator[nn.Module]:
    """The model computing its experts at ``widths [L, E]`` with flexc's reference op (the oracle)."""
    from flexc.ir.experts_impl import WIDTHS_BUFFER, set_widths, use_flexc_experts

    previous_impl = model.config._experts_implementation
    modules = [model.get_submodule(g.path) for g in groups]
    previous_widths = [m._buffers.get(WIDTHS_BUFFER) for m in modules]
    previous_widths = [None if w is None else w.clone() for w in previous_widths]
    try:
        use_flexc_experts(model)
        for module, row in zip(modules, widths):
            set_widths(module, row)
        yield model
    finally:
        for module, row in zip(modules, previous_widths):
            set_widths(module, row)
        model.set_experts_implementation(previous_impl)


@contextmanager
def float32_eval(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with float32 weights; dtypes and mode restored exactly afterwards.

    Floating tensors are cast one by one (not ``model.float()`` then ``.to(dtype)``) so that a
    mixed-dtype model gets each tensor's own dtype back; bf16/fp16 -> fp32 -> back is lossless.
    """
    was_training = model.training
    casts = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    casts.append((t, t.data))
                    t.data = t.data.float()
    model.eval()
    try:
        yield model
    finally:
        for t, data in casts:
            t.data = data
        model.train(was_training)


# ---- one budget -----------------------------------------------------------------------------


def _example(vocab_size: int, shape: tuple[int, int], seed: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; the first row left-padded by ``pad`` positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _strip_debug_metadata(model) -> None:
    """Drop the per-node stack traces and fx names the dynamo exporter records: they hold the
    exporting machine's file paths and weigh more than a small model's weights."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()


def _trace(model: nn.Module, vocab_size: int, path: Path, dynamo: bool) -> None:
    """``torch.onnx.export`` of the (already swapped) model into ``path``, batch and sequence dynamic."""
    dims = {0: "batch", 1: "sequence"}
    example = _example(vocab_size, TRACE_SHAPE, seed=0)
    args = (example["input_ids"], example["attention_mask"])
    names = dict(input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME])
    try:
        with torch.no_grad():
            if dynamo:
                program = torch.onnx.export(_Logits(model), args, dynamo=True, dynamic_shapes=(dims, dims),
                                            optimize=True, verbose=False, **names)
                _strip_debug_metadata(program.model)
                program.save(str(path))  # external data only past the 2 GB protobuf limit
            else:
                axes = {name: dims for name in (*INPUT_NAMES, OUTPUT_NAME)}
                torch.onnx.export(_Logits(model), args, str(path), dynamo=False, dynamic_axes=axes,
                                  opset_version=LEGACY_OPSET, **names)
    except Exception as exc:  # the exporter's own report is long; keep its first lines
        first = "\n".join(str(exc).splitlines()[:6])
        raise OnnxExportError(f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'}) failed for "
                              f"{type(model).__name__}: {type(exc).__name__}: {first}") from exc


def validate(path: Path, model: nn.Module, groups, widths: torch.Tensor, vocab_size: int) -> float:
    """Max abs logit diff, ONNX Runtime vs the nested torch runtime, over :data:`CHECK_SHAPES`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    with nested_runtime(model, groups, widths), torch.no_grad():
        for i, shape in enumerate(CHECK_SHAPES):
            feed = _example(vocab_size, shape, seed=1 + i, pad=shape[1] // 3 if i else 0)
            (got,) = session.run([OUTPUT_NAME], {k: v.numpy() for k, v in feed.items()})
            want = model(**feed, use_cache=False).logits
            real = feed["attention_mask"].bool()  # padded positions' logits are meaningless
            diff = (torch.from_numpy(got) - want).abs()[real]
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def _opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith(MODEL_FILE))


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def write_onnx(target: str | Path, model: nn.Module, groups, widths: torch.Tensor, *, budget: float,
               tokenizer=None, tolerance: float = TOLERANCE, dynamo: bool = True) -> dict[str, Any]:
    """Export, save and validate the ONNX model of ``model`` at ``widths [L, E]``; return its manifest.

    ``dynamo=False`` uses the legacy TorchScript exporter (faster, deprecated by torch).
    """
    require_onnx()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    widths = torch.as_tensor(widths)
    vocab = _vocab_size(model)
    started = time.perf_counter()
    with float32_eval(model):
        path = target / MODEL_FILE
        with fused_experts(model, groups, widths) as fused:
            _trace(model, vocab, path, dynamo)
            kept = sum(f.kept_channels for f in fused)
        exported = time.perf_counter() - started
        diff = validate(path, model, groups, widths, vocab)
    if not diff <= tolerance:  # also catches NaN
        raise OnnxExportError(f"ONNX Runtime does not match torch at keep {budget:g}: max abs logit diff "
                              f"{diff:.3g} > {tolerance:g} (the graph was written to {path} for inspection)")
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    manifest = {
        "kind": KIND,
        "budget": budget,
        "budget_key": budget_key(budget),
        "model_type": model.config.model_type,
        "file": MODEL_FILE,
        "opset": _opset(path),
        "exporter": "dynamo" if dynamo else "torchscript",
        "inputs": list(INPUT_NAMES),
        "outputs": [OUTPUT_NAME],
        "dtype": "float32",
        "kept_channels": kept,
        "validation": {"max_abs_diff": diff, "tolerance": tolerance, "shapes": [list(s) for s in CHECK_SHAPES],
                       "reference": "flexc nested runtime (torch)"},
        "bytes": _bytes(target),
        "seconds": {"export": round(exported, 2), "total": round(time.perf_counter() - started, 2)},
    }
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---- the exporter ----------------------------------------------------------------------------


def export_onnx(ctx: ExportContext) -> None:
    require_onnx()
    if ctx.model is None:
        raise OnnxExportError("the onnx export needs the compiled model")
    groups = ctx.expert_groups()
    try:
        tables = ctx.width_tables("onnx")
    except ValueError as exc:
        raise OnnxExportError(str(exc)) from None
    index = []
    for budget in tables.budgets:
        key = budget_key(budget)
        m = write_onnx(Path(ctx.target) / key, ctx.model, groups, tables.table(budget), budget=budget,
                       tokenizer=ctx.tokenizer)
        index.append({"keep": budget, "dir": key, "bytes": m["bytes"], "opset": m["opset"],
                      "max_abs_diff": m["validation"]["max_abs_diff"]})
        ctx.logger.info("onnx: keep %.2f → %s/ (%.1f MB, max |diff| vs torch %.2g, %.1f s)", budget, key,
                        m["bytes"] / 1e6, m["validation"]["max_abs_diff"], m["seconds"]["total"])
    top = {"kind": KIND, "metric": tables.metric, "budgets": index}
    (Path(ctx.target) / MANIFEST_FILE).write_text(json.dumps(top, indent=2) + "\n")
