"""flexc's MoE block for vLLM models: the router, the routed experts on the flexc op, a width table.

The routed experts are stored in flexc's canonical layout (``gate_up [E, 2I, H]`` gate rows then
up rows, ``down [E, H, I]``) and run ``flexc.ir.op.run_experts`` with a per-expert width
buffer ``widths [E]`` on the weights' device: the op's CPU path on CPU, flexc's Triton kernels on
CUDA (installed by :func:`flexc.ir.backends.use_backend`). Switching budget copies one int row
into that buffer; nothing else changes.

The block is built where the vLLM decoder layer builds its own MoE block (see
:mod:`flexc.serving.models`); it reads what it needs from the :class:`BlockPlan` of the model
being built, whatever arguments the decoder layer passes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexc.ir.families import FAMILIES as IR_FAMILIES
from flexc.ir.op import ExpertLayout, ExpertWeights, run_experts
from flexc.serving.artifact import Artifact
from flexc.serving.buckets import BucketedExperts
from flexc.serving.families import ServedFamily, ServingError


@dataclass
class BlockPlan:
    """What every flexc MoE block of the model being built needs to know."""

    family: ServedFamily
    config: object  # the Hugging Face text config
    artifact: Artifact
    blocks: dict[int, "FlexcMoeBlock"] = field(default_factory=dict)  # decoder layer -> block


_PLAN: list[BlockPlan] = []  # the plan of the model under construction (a stack of at most one)


@contextmanager
def building(plan: BlockPlan) -> Iterator[BlockPlan]:
    _PLAN.append(plan)
    try:
        yield plan
    finally:
        _PLAN.pop()


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BUCKET = re.compile(r"bucket_(\d+)_(gate_up|down)(_bias|_packed|_scale)?")


class _Linear(nn.Module):
    """A bias-free linear layer with uninitialised weights (the checkpoint fills them)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SharedExpert(nn.Module):
    """A dense gated FFN (``down(act(gate(x)) * up(x))``), Qwen2-MoE's shared expert."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = _Linear(hidden, intermediate)
        self.up_proj = _Linear(hidden, intermediate)
        self.down_proj = _Linear(intermediate, hidden)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FlexcExperts(nn.Module):
    """One layer's routed experts of a nested artifact at the widths in ``self.widths`` (a sliced
    checkpoint's are :class:`flexc.serving.buckets.BucketedExperts`).

    The engine's budget runs on vLLM's CPU experts kernel where it can (``vllm_kernel``; the kept
    prefixes packed at each switch by :meth:`widths_set`, :mod:`flexc.serving.packed`), else on the
    flexc op. Calls with widths of their own (per-request budgets, the adaptive policy) run on the experts
    packed in pieces once :meth:`pack_pieces` made them and they cover the call's widths, else on the
    flexc op. ``capacity`` is the channels stored per expert: the full intermediate size.
    """

    def __init__(self, num_experts: int, hidden: int, capacity: int, activation: tuple[str, float, float],
                 top_k: int, vllm_kernel: bool = True):
        super().__init__()
        self.num_experts, self.hidden, self.capacity, self.top_k = num_experts, hidden, capacity, top_k
        self.activation, self.alpha, self.limit = activation
        self.vllm_kernel = vllm_kernel
        self._packed = None  # the engine budget's PackedLayer, where vLLM's CPU kernel runs it
        self._pieces = None  # the experts in pieces (PackedPieces) for calls with widths per pair, once one came
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * capacity, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, capacity), requires_grad=False)
        initial = torch.full((num_experts,), capacity, dtype=torch.int32)  # full width until a budget is set
        self.register_buffer("widths", initial.to(self.down_proj.device), persistent=False)
        self._loaded: set[tuple[int, str]] = set()  # (expert, part) pieces loaded from per-expert names

    @property
    def device(self) -> torch.device:
        return self.down_proj.device

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                widths: torch.Tensor | None = None) -> torch.Tensor:
        """The experts at ``widths`` (default: the width buffer, the engine's budget)."""
        if widths is None and self._packed is not None:
            return self._packed(hidden, topk_ids, topk_weights)
        if widths is not None and self._pieces is not None:
            out = self._pieces(hidden, topk_ids, topk_weights, widths)
            if out is not None:
                return out
        weights = ExpertWeights(self.gate_up_proj, self.down_proj,
                                layout=ExpertLayout(self.activation, False, self.alpha, self.limit))
        return run_experts(hidden, topk_ids, topk_weights, weights, self.widths if widths is None else widths)

    @property
    def kernel(self) -> str:
        """Which kernel runs the engine's budget: ``vllm`` (its CPU experts kernel) or ``flexc`` (the op)."""
        return "vllm" if self._packed is not None else "flexc"

    def packed_bytes(self) -> int:
        """Bytes of the engine budget's packed copy (0: none)."""
        return 0 if self._packed is None else self._packed.nbytes()

    def pieces_bytes(self) -> int:
        """Bytes of the experts packed in pieces (0: not packed)."""
        return 0 if self._pieces is None else self._pieces.nbytes()

    def _isa(self) -> str | None:
        from flexc.serving.packed import cpu_kernel_isa

        return cpu_kernel_isa(self.down_proj.dtype, self.hidden, self.activation, self.device) \
            if self.vllm_kernel else None

    def packs(self) -> bool:
        """Whether budgets are packed for vLLM's CPU kernel here (asked for, on CPU, a layer it runs)."""
        return self._isa() is not None

    def pieces_nbytes(self, rows: list[list[int]]) -> int:
        from flexc.serving.packed import pieces_nbytes

        return pieces_nbytes(rows, self.capacity, self.hidden, self.down_proj.dtype) if self.packs() else 0

    def pack_pieces(self, rows: list[list[int]]) -> None:
        """Pack the experts in pieces cut at every 32 channels and every width of ``rows`` (the per-expert
        width tables) for vLLM's CPU kernel, so calls whose pairs take widths on those cuts (per-request
        budgets mixed in a batch, the adaptive policy) run on it."""
        from flexc.serving.packed import PackedPieces

        isa = self._isa()
        if isa is not None:
            self._pieces = PackedPieces(self.gate_up_proj, self.down_proj, rows, isa, self.activation)

    def widths_set(self, pack: bool = True) -> None:
        """The width buffer changed (a budget switch): pack its kept prefixes for vLLM's CPU kernel
        (``pack``: whether the engine's budget runs on the width buffer, not on widths per pair)."""
        from flexc.serving.packed import PackedLayer

        self._packed = None  # the old budget's copy goes before the new one is made
        isa = self._isa() if pack else None
        if isa is not None:
            self._packed = PackedLayer(self.gate_up_proj, self.down_proj, self.widths.tolist(), self.top_k, isa,
                                       self.activation)

    # -- weight loading ------------------------------------------------------------------

    def _check(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != shape:
            raise ServingError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)}, expected {shape}")

    def load_expert(self, name: str, expert: int, part: str, tensor: torch.Tensor) -> None:
        """One expert's ``gate`` / ``up`` ``[I, H]`` or ``down`` ``[H, I]`` (per-expert checkpoint names)."""
        if not 0 <= expert < self.num_experts:
            raise ServingError(f"checkpoint tensor {name}: expert {expert} of {self.num_experts}")
        cap, hid = self.capacity, self.hidden
        if part == "down":
            self._check(name, tensor, (hid, cap))
            self.down_proj.data[expert].copy_(tensor)
        else:
            self._check(name, tensor, (cap, hid))
            start = 0 if part == "gate" else cap
            self.gate_up_proj.data[expert, start:start + cap].copy_(tensor)
        self._loaded.add((expert, part))

    def load_stacked(self, name: str, which: str, tensor: torch.Tensor) -> None:
        """The whole layer in transformers' stacked layout (``gate_up_proj`` / ``down_proj``)."""
        param = self.gate_up_proj if which == "gate_up_proj" else self.down_proj
        self._check(name, tensor, tuple(param.shape))
        param.data.copy_(tensor)
        parts = ("gate", "up") if which == "gate_up_proj" else ("down",)
        self._loaded.update((e, p) for e in range(self.num_experts) for p in parts)

    def missing(self) -> list[str]:
        return [f"expert {e} {p}" for e in range(self.num_experts) for p in ("gate", "up", "down")
                if (e, p) not in self._loaded]


def _routed_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    layer_name: str) -> torch.Tensor:
    from vllm.forward_context import get_forward_context

    return get_forward_context().no_compile_layers[layer_name].routed(hidden, topk_ids, topk_weights)


def _routed_experts_fake(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden)


def replays_graphs(vllm_config) -> bool:
    """Whether a compiled engine may replay captured CUDA graphs, which would freeze the Python inside flexc's
    op (the grouping of a pass by budget, the adaptive policy's branch): compiled, and not on CPU (vLLM's
    CPU build captures none)."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    return vllm_config.compilation_config.mode != CompilationMode.NONE and not current_platform.is_cpu()


_OP_LIBRARY: list = []  # the torch library holding flexc's op, once registered (it lives as long as this)


def compiled_op_name(block: nn.Module, name: str) -> str | None:
    """Under torch.compile (vLLM's default mode) a block's routed experts run as the opaque custom op
    ``torch.ops.flexc.routed_experts``, as vLLM runs its own fused-MoE layers: the compiled graph calls it
    and the op runs the block's Python each time, so a budget switch, the kernels packed for it, the
    per-request grouping of a pass and the adaptive policy all act in a compiled engine as in an eager one
    (a traced graph would keep the tensors and branches it saw). Registers the block in vLLM's forward
    context under ``name`` (where the op finds it) and returns the name; None in an eager engine (or
    outside vLLM: flexc's own tests of the block)."""
    try:
        from vllm.config import CompilationMode, get_current_vllm_config_or_none
    except ImportError:
        return None
    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or vllm_config.compilation_config.mode == CompilationMode.NONE:
        return None
    config = vllm_config.compilation_config
    if not _OP_LIBRARY:
        from torch.library import Library
        from vllm.utils.torch_utils import direct_register_custom_op

        _OP_LIBRARY.append(Library("flexc", "FRAGMENT"))
        direct_register_custom_op("routed_experts", _routed_experts, mutates_args=[], fake_impl=_routed_experts_fake,
                                  target_lib=_OP_LIBRARY[0])
    if name in config.static_forward_context:
        raise ServingError(f"duplicate layer name {name!r} in the model's forward context")
    config.static_forward_context[name] = block
    return name


class FlexcMoeBlock(nn.Module):
    """Router + routed experts on the flexc op (+ the family's shared expert).

    Accepts (and ignores) whatever the vLLM decoder layer passes its own MoE block; only
    ``prefix`` matters. Exposes the expert-count attributes vLLM's MoE model classes read.
    """

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__()
        if not _PLAN:
            raise RuntimeError("FlexcMoeBlock is built only inside a flexc vLLM model (flexc.serving.models)")
        plan = _PLAN[-1]
        family, config, artifact = plan.family, plan.config, plan.artifact
        match = _LAYER.search(prefix + ".")
        if match is None:
            raise RuntimeError(f"cannot tell the decoder layer of MoE block {prefix!r}")
        self.layer = int(match.group(1))
        self.prefix = prefix
        self.family = family
        num_experts = int(getattr(config, family.num_experts_attr))
        hidden = int(config.hidden_size)
        self.full = int(getattr(config, family.intermediate_attr))
        self.top_k = int(config.num_experts_per_tok)
        self.renormalize = (bool(getattr(config, "norm_topk_prob", False)) if family.renormalize is None
                            else family.renormalize)
        activation = IR_FAMILIES[family.model_type].activation(None, config)
        self.sliced = artifact.kind == "sliced"
        quantization = (artifact.sliced or {}).get("quantization") if self.sliced else None
        self.quantized = quantization is not None  # packed codes and scales (dequantized as they load where
        # vLLM's quantized kernel does not take them: BucketedExperts.takes_codes)
        self.quant_bits = quantization["bits"] if quantization else None
        self.quant_group = quantization["group_size"] if quantization else None
        self._pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.gate = _Linear(hidden, num_experts)
        if self.sliced:
            widths = artifact.sliced_widths(self.layer)
            if len(widths) != num_experts or min(widths) < 0 or max(widths) > self.full:
                raise ServingError(f"{artifact.directory}: {prefix}.experts has widths {widths}; expected "
                                   f"{num_experts} values in [0, {self.full}]")
            self.experts = BucketedExperts(widths, hidden, activation, f"{prefix}.experts", self.top_k,
                                           quantization=quantization)
        else:
            self.experts = FlexcExperts(num_experts, hidden, self.full, activation, self.top_k,
                                        vllm_kernel=artifact.experts_kernel == "vllm")
        self.shared_expert = self.shared_expert_gate = None
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        if family.shared_expert and shared > 0:
            self.shared_expert = SharedExpert(hidden, shared, config.hidden_act)
            self.shared_expert_gate = _Linear(hidden, 1)
        # Read by vLLM's MoE model classes (expert-parallel load balancing is refused).
        self.n_routed_experts = self.n_logical_experts = num_experts
        self.n_physical_experts = self.n_local_physical_experts = num_experts
        self.n_redundant_experts = 0
        self.control = None  # the model's BudgetControl (set once the model is built)
        self.op_name = compiled_op_name(self, f"{prefix}.flexc_experts")
        plan.blocks[self.layer] = self

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids, topk_weights) as the family's transformers router computes them."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.family.cast_weights:
            weights = weights.to(logits.dtype)
        return ids, weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        if self.op_name is None:
            out = self.routed(x, ids, weights)
        else:  # a compiled model: the routed experts stay Python, run as one opaque op (see routed_experts_op)
            out = torch.ops.flexc.routed_experts(x, ids, weights, self.op_name)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for tokens ``x`` routed to ``ids`` with ``weights``: at the engine's
        budget, or each pair at its own width (per-request budgets mixed in this pass, the adaptive policy)."""
        groups = None if self.control is None else self.control.groups(x.shape[0])
        if groups is None and self.control is not None and self.control.adaptive:  # widths per pair, by weight
            return self.experts(x, ids, weights, self.control.adaptive_widths(self.layer, ids, weights))
        if groups is None:
            return self.experts(x, ids, weights)
        # per-request budgets in one call: each routed pair at the widths of its token's budget (and mode)
        return self.experts(x, ids, weights, self.control.pair_widths(self.layer, ids, weights))

    def _dequantized(self, index: int, part: str, kind: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """A quantized bucket's weights (``codes * scale``) once its packed codes and its scales have both
        been read (None until then), for buckets built unquantized: where vLLM has no quantized MoE kernel
        for the checkpoint's scheme (docs/quantization.md), they run on its unquantized kernels."""
        from flexc.export.remote.modeling_flexc_sliced import unpack_codes
        from flexc.ir.quant.nested import dequantize

        halves = self._pending.setdefault((index, part), {})
        halves[kind] = tensor
        if len(halves) < 2:
            return None
        del self._pending[(index, part)]
        scale = halves["_scale"].float()
        codes = unpack_codes(halves["_packed"], self.quant_bits, scale.shape[-1] * self.quant_group)
        return dequantize(codes, scale, self.quant_group, torch.float32)

    def load(self, local: str, tensor: torch.Tensor, full_name: str) -> str:
        """Load the checkpoint tensor ``full_name`` (``local`` relative to this block); returns the
        parameter name it filled, relative to the block."""
        fam = self.family
        parts = local.split(".")
        if parts[0] == "experts":
            if len(parts) == 4 and parts[1].isdigit() and parts[3] == "weight" and not self.sliced:
                part = {fam.gate_name: "gate", fam.up_name: "up", fam.down_name: "down"}.get(parts[2])
                if part is not None:
                    self.experts.load_expert(full_name, int(parts[1]), part, tensor)
                    return "experts.down_proj" if part == "down" else "experts.gate_up_proj"
            bucket = _BUCKET.fullmatch(parts[1]) if len(parts) == 2 else None
            if self.sliced:
                if bucket is None or bucket.group(3) == "_bias" or bool(bucket.group(3)) != self.quantized:
                    raise ServingError(f"{full_name}: a sliced checkpoint's experts are stored by width bucket "
                                       "(bucket_N_gate_up, bucket_N_down; bucket_N_gate_up_packed and _scale when "
                                       "quantized, as its config says; no expert biases in the families flexc "
                                       "serves); re-export it")
                index, part = int(bucket.group(1)), bucket.group(2)
                if self.quantized and self.experts.takes_codes:  # vLLM's quantized method takes them as stored
                    return "experts." + self.experts.load_bucket(full_name, index, part, tensor, bucket.group(3))
                if self.quantized:
                    tensor = self._dequantized(index, part, bucket.group(3), tensor)
                    if tensor is None:  # the other half (codes or scales) is still to come
                        return "experts." + self.experts.param_name(index, part)
                return "experts." + self.experts.load_bucket(full_name, index, part, tensor)
            if bucket is not None:
                raise ServingError(f"{full_name}: bucketed (sliced) experts in a checkpoint whose config has no "
                                   "flexc_sliced section; re-export it")
            if len(parts) == 2 and parts[1] in ("gate_up_proj", "down_proj"):
                self.experts.load_stacked(full_name, parts[1], tensor)
                return local
        params = dict(self.named_parameters())
        if local in params and not local.startswith("experts."):
            if tuple(params[local].shape) != tuple(tensor.shape):
                raise ServingError(f"checkpoint tensor {full_name}: shape {tuple(tensor.shape)}, expected "
                                   f"{tuple(params[local].shape)}")
            params[local].data.copy_(tensor)
            return local
        raise ServingError(f"checkpoint tensor {full_name} has no place in flexc's {fam.display} MoE block "
                           f"(parameters: {sorted(params)})")
