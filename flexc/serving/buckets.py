"""A sliced checkpoint's routed experts on vLLM's own fused-MoE kernels, one call per width bucket.

vLLM's fused-MoE layer takes one intermediate size per call. A sliced checkpoint stores each
layer's experts by **width bucket** (the experts of one width, stacked as vLLM's ``w13`` / ``w2``;
:mod:`flexc.export.remote.modeling_flexc_sliced`), so a layer is one vLLM ``RoutedExperts`` per
bucket (built by vLLM's ``FusedMoEFactory``: its kernel choice for the platform, its weight
prepacking after loading; on CPU its grouped-GEMM ``cpu_fused_moe``, on CUDA its Triton fused
MoE). A forward pass sorts the (token, slot) pairs by bucket, runs each bucket's pairs as rows of
top-1 routing (the routing weight applied by the kernel), and sums each token's slots in a fixed
order. A layer with one bucket and no removed expert runs as one call on the original routing.

A quantized sliced checkpoint's buckets (compressed-tensors ``pack-quantized`` int4, group scales)
are built with vLLM's compressed-tensors config (:func:`vllm_quant_config`), so vLLM's own WNA16
MoE method takes their packed codes and scales as they are and repacks them for its kernel. Where
vLLM has no such kernel for them (on CPU its int4 kernel needs AMX and groups of 64 or 128; no
8-bit one), the layer's buckets are built unquantized and the codes are dequantized as they load.

Without vLLM (flexc's own tests of the block) or for an activation vLLM's kernels lack, a bucket
runs flexc's expert op on the same stacked weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from flexc.export.remote.modeling_flexc_sliced import width_buckets
from flexc.ir.op import ExpertLayout, ExpertWeights, run_experts
from flexc.serving.families import ServingError

logger = logging.getLogger("flexc.serving")

# Up to this many (token, slot) pairs a call is planned on the host (decode sizes).
HOST_PLANNED_PAIRS = 64
# flexc's activation names -> vLLM's MoEActivation names, where vLLM's fused kernels have them (also the
# names its CPU kernel takes: flexc.serving.packed).
VLLM_ACTIVATIONS = {"silu": "silu", "gelu": "gelu"}


class _TorchBucket(nn.Module):
    """One bucket on flexc's expert op (no vLLM)."""

    def __init__(self, num_experts: int, width: int, hidden: int, activation: tuple[str, float, float]):
        super().__init__()
        self.activation, self.alpha, self.limit = activation
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * width, hidden), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, width), requires_grad=False)

    def takes_any_k(self) -> bool:
        return True

    def param(self, part: str, kind: str = "") -> torch.Tensor:
        return self.w13_weight if part == "gate_up" else self.w2_weight

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        experts = ExpertWeights(self.w13_weight, self.w2_weight,
                                layout=ExpertLayout(self.activation, False, self.alpha, self.limit))
        return run_experts(x, ids, weights, experts)


def vllm_quant_config(quantization: dict):
    """vLLM's compressed-tensors config for a sliced checkpoint's quantization record (its ``flexc_sliced``
    section): the scheme's weight arguments, as ``quantization_config`` in compressed-tensors' format."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig)

    from flexc.ir.quant.scheme import QuantScheme

    scheme = QuantScheme(quantization["scheme"], int(quantization["group_size"]))
    return CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors", "format": scheme.to_dict()["format"], "ignore": [],
        "config_groups": {"experts": {"targets": ["Linear"], "weights": scheme.args().model_dump(),
                                      "input_activations": None}}})


class _VllmBucket(nn.Module):
    """One bucket on vLLM's fused-MoE kernels: a ``RoutedExperts`` from vLLM's ``FusedMoEFactory`` (with
    ``quant_config``: vLLM's quantized MoE method for it, which raises where no kernel runs it)."""

    def __init__(self, num_experts: int, width: int, hidden: int, activation: str, prefix: str, top_k: int,
                 quant_config=None):
        super().__init__()
        from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

        self.runner = FusedMoEFactory(num_experts=num_experts, top_k=top_k, hidden_size=hidden,
                                      intermediate_size=width, renormalize=False, prefix=prefix, activation=activation,
                                      quant_config=quant_config)
        self.quantized = quant_config is not None
        self._direct = None  # vLLM's CPU experts kernel, once weights are prepacked (see forward)

    @property
    def experts(self) -> nn.Module:
        return self.runner.routed_experts

    def _cpu_kernel(self):
        """vLLM's unquantized CPU experts implementation where it runs this bucket, else None.

        Its modular wrapper (prepare, workspaces, finalize: all no-ops for unquantized CPU experts)
        costs about as much as the kernel itself at decode sizes (measured by hand at one token on
        zoo `small`'s shape: ~90 us through the wrapper, ~50 us for the kernel alone), and a
        bucketed layer makes several calls; the kernel is called directly there. The same holds for its
        int4 CPU experts (quantized buckets), whose ``apply`` takes the same arguments and reads its
        scales from the layer's quant config.
        """
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4, CPUUnquantizedExperts

        kernel = getattr(getattr(self.experts.quant_method, "moe_kernel", None), "impl", None)
        impl = getattr(kernel, "fused_experts", None)
        if isinstance(impl, CPUExpertsInt4):
            return impl
        return impl if isinstance(impl, CPUUnquantizedExperts) and not impl._use_zentorch else None

    def param(self, part: str, kind: str = "") -> torch.Tensor:
        """The parameter a checkpoint's ``gate_up`` / ``down`` tensor fills (``kind``: ``_packed`` codes or
        ``_scale`` of a quantized bucket, as vLLM's compressed-tensors MoE method names them)."""
        return getattr(self.experts, ("w13_weight" if part == "gate_up" else "w2_weight") + kind)

    def fill_shape_params(self, width: int, hidden: int) -> list[torch.Tensor]:
        """Fill the parameters vLLM's quantized method registers that no checkpoint of flexc's carries (the
        unpacked weights' shapes; its CPU kernels do not read them); returns them."""
        filled = []
        for name, shape in (("w13_weight_shape", (2 * width, hidden)), ("w2_weight_shape", (hidden, width))):
            param = getattr(self.experts, name, None)
            if param is not None:
                param.data.copy_(torch.tensor(shape, dtype=param.dtype).expand_as(param))
                filled.append(param)
        return filled

    def takes_any_k(self) -> bool:
        """Whether a call may route each row to any number of this bucket's experts (vLLM's CPU kernel
        reads k from the ids; other kernels are built for the block's k)."""
        if self._direct is None:
            self._direct = self._cpu_kernel() or False
        return bool(self._direct)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if weights.dtype != torch.float32 or not weights.is_contiguous():
            weights = weights.float().contiguous()
        if ids.dtype != torch.int32 or not ids.is_contiguous():
            ids = ids.to(torch.int32).contiguous()
        dtype = x.dtype
        if self.quantized and dtype != torch.bfloat16:  # vLLM's int4 kernels take bf16 activations
            x = x.to(torch.bfloat16)
        if not self.takes_any_k():
            return self.experts.forward_modular(x, weights, ids).to(dtype)
        out = torch.empty_like(x)
        experts = self.experts
        self._direct.apply(out, x, experts.w13_weight, experts.w2_weight, weights, ids,
                           experts.moe_config.activation, experts.global_num_experts, None, None, None, None, None,
                           None, False)
        return out.to(dtype)


def _vllm_available() -> bool:
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return False
    return get_current_vllm_config_or_none() is not None


class BucketRouting(nn.Module):
    """Which bucket, and which expert within it, serves each routed pair of one layer's experts at fixed
    ``widths [E]`` (width 0: removed); runs a forward over a list of bucket kernels, each
    ``kernel(x, weights, ids)`` with ids local to its bucket and ``kernel.takes_any_k()``."""

    def __init__(self, widths: list[int], top_k: int):
        super().__init__()
        self.num_experts = len(widths)
        self.buckets = width_buckets(widths)
        bucket_of = torch.full((self.num_experts,), len(self.buckets), dtype=torch.long)  # removed: last
        local = torch.zeros(self.num_experts, dtype=torch.int32)
        for i, (_, ids) in enumerate(self.buckets):
            bucket_of[ids] = i
            local[ids] = torch.arange(len(ids), dtype=torch.int32)
        self.register_buffer("bucket_of", bucket_of, persistent=False)
        self.register_buffer("local", local, persistent=False)
        self._bucket_list, self._local_list = bucket_of.tolist(), local.tolist()  # host copies: decode planning
        self.whole = len(self.buckets) == 1 and len(self.buckets[0][1]) == self.num_experts
        # A bucket's calls take top-k rows (one bucket holding every expert: the routing as it is) or
        # top-1 rows (each bucket gets its (token, slot) pairs as rows of their own).
        self.call_k = top_k if self.whole else 1

    def forward(self, kernels: list, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        if self.whole:  # one bucket holding every expert: the routing as it is
            return kernels[0](hidden, topk_weights, self.local[topk_ids])
        num_tokens, k = topk_ids.shape
        if num_tokens * k <= HOST_PLANNED_PAIRS:
            return self._few_pairs(kernels, hidden, topk_ids, topk_weights)
        flat = topk_ids.reshape(-1)
        bucket = self.bucket_of[flat]
        order = torch.argsort(bucket, stable=True)  # the pairs of bucket 0, 1, ..., then removed experts'
        counts = torch.bincount(bucket, minlength=len(self.buckets) + 1).tolist()
        rows = order[: num_tokens * k - counts[-1]]
        x = hidden[rows // k]
        weights = topk_weights.reshape(-1)[rows, None]
        ids = self.local[flat[rows]][:, None]
        out = hidden.new_zeros(num_tokens * k, hidden.shape[1])
        start = 0
        for i, n in enumerate(counts[:-1]):
            if n:
                part = slice(start, start + n)
                out[rows[part]] = kernels[i](x[part], weights[part], ids[part]).to(hidden.dtype)
            start += n
        # Sum over the k slots of each token in a fixed order (deterministic, no scatter-add).
        return out.view(num_tokens, k, -1).sum(dim=1)

    def _few_pairs(self, kernels: list, hidden: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
        """Decode sizes: the pairs grouped on the host (a dozen small tensor ops cost more than the kernels
        here). Where the kernels take any k (vLLM's CPU kernel), each bucket runs once over the tokens that
        have a pair in it, each routed to its own experts of the bucket (padded to the bucket's most pairs
        per token with zero-weight repeats of one of them: compute on weights already read, no extra
        weights), and the buckets' outputs are summed. (Running every bucket over every token padded
        tokens without a pair in it to the bucket's k: four times the compute in a batch whose requests
        mix four budgets.)"""
        num_tokens, k = topk_ids.shape
        experts = topk_ids.reshape(-1).tolist()
        plan: dict[int, list[int]] = {}
        for slot, expert in enumerate(experts):
            bucket = self._bucket_list[expert]
            if bucket < len(self.buckets):
                plan.setdefault(bucket, []).append(slot)
        device = hidden.device
        if all(kernels[b].takes_any_k() for b in plan):
            weights = topk_weights.reshape(-1).tolist()
            out = None
            for bucket, slots in sorted(plan.items()):
                by_token: dict[int, list[tuple[int, float]]] = {}
                for s in slots:
                    by_token.setdefault(s // k, []).append((self._local_list[experts[s]], weights[s]))
                tokens = sorted(by_token)
                rows = [by_token[t] for t in tokens]
                width = max(len(r) for r in rows)
                for r in rows:
                    r.extend([(r[0][0], 0.0)] * (width - len(r)))
                ids = torch.tensor([[e for e, _ in r] for r in rows], dtype=torch.int32, device=device)
                routed = torch.tensor([[w for _, w in r] for r in rows], device=device)
                if len(tokens) == num_tokens:
                    y = kernels[bucket].forward(hidden, routed, ids)
                    out = y if out is None else out.add_(y)
                    continue
                index = torch.tensor(tokens, device=device)
                y = kernels[bucket].forward(hidden[index], routed, ids)
                out = torch.zeros_like(hidden, dtype=y.dtype) if out is None else out
                out.index_add_(0, index, y)
            return hidden.new_zeros(hidden.shape) if out is None else out.to(hidden.dtype)
        flat_weights = topk_weights.reshape(-1)
        out = hidden.new_zeros(num_tokens * k, hidden.shape[1])
        for bucket, slots in sorted(plan.items()):
            index = torch.tensor(slots, device=device)
            ids = torch.tensor([[self._local_list[experts[s]]] for s in slots], dtype=torch.int32, device=device)
            y = kernels[bucket](hidden[index // k], flat_weights[index][:, None], ids)
            out.index_copy_(0, index, y.to(hidden.dtype))
        return out.view(num_tokens, k, -1).sum(dim=1)


class BucketedExperts(nn.Module):
    """One layer's routed experts of a sliced checkpoint: fixed ``widths [E]``, one kernel per bucket.

    ``quantization``: the checkpoint's quantization record; ``takes_codes`` says whether the buckets
    take its packed codes and scales (vLLM's quantized kernel) or dequantized weights."""

    def __init__(self, widths: list[int], hidden: int, activation: tuple[str, float, float], prefix: str,
                 top_k: int, quantization: dict | None = None):
        super().__init__()
        self.num_experts, self.hidden = len(widths), hidden
        self.routing = BucketRouting(widths, top_k)
        self.buckets = self.routing.buckets
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.int32), persistent=False)
        name = activation[0]
        on_vllm = _vllm_available() and name in VLLM_ACTIVATIONS
        self.kernel = "vllm" if on_vllm else "flexc"
        k = self.routing.call_k
        kernels = (self._quantized_buckets(quantization, hidden, VLLM_ACTIVATIONS[name], prefix, k)
                   if on_vllm and quantization is not None else None)
        self.takes_codes = kernels is not None
        if self.takes_codes:
            self.kernel = "vllm-" + quantization["scheme"]
        else:
            kernels = [_VllmBucket(len(ids), w, hidden, VLLM_ACTIVATIONS[name], f"{prefix}.buckets.{i}", k)
                       if on_vllm else _TorchBucket(len(ids), w, hidden, activation)
                       for i, (w, ids) in enumerate(self.buckets)]
        self.kernels = nn.ModuleList(kernels)
        self._kernel_list = list(self.kernels)  # plain list: the routing indexes it per call
        self._loaded: set[tuple[int, str]] = set()
        # parameters no checkpoint tensor fills (vLLM's quantized method's shape records)
        self.filled = [self._name_of(i, p) for i, kernel in enumerate(kernels) if self.takes_codes
                       for p in kernel.fill_shape_params(self.buckets[i][0], hidden)]

    def _quantized_buckets(self, quantization: dict, hidden: int, activation: str, prefix: str,
                           k: int) -> list | None:
        """The buckets on vLLM's quantized MoE method for ``quantization``, or None (logged once) where vLLM
        has no kernel for it here."""
        try:
            config = vllm_quant_config(quantization)
            return [_VllmBucket(len(ids), w, hidden, activation, f"{prefix}.buckets.{i}", k, quant_config=config)
                    for i, (w, ids) in enumerate(self.buckets)]
        except (NotImplementedError, ValueError) as err:
            if not _FALLBACK_LOGGED:
                _FALLBACK_LOGGED.append(True)
                logger.warning("flexc: vLLM has no quantized MoE kernel here for %s (group %s): %s; the experts' "
                               "codes are dequantized as they load and run on its unquantized kernels",
                               quantization.get("scheme"), quantization.get("group_size"), err)
            return None

    @property
    def device(self) -> torch.device:
        return self.widths.device

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                widths: torch.Tensor | None = None) -> torch.Tensor:
        if widths is not None:
            raise ServingError("a sliced checkpoint's widths are fixed; per-request budgets need the nested artifact")
        return self.routing(self._kernel_list, hidden, topk_ids, topk_weights)

    # -- weight loading ------------------------------------------------------------------

    def load_bucket(self, name: str, index: int, part: str, tensor: torch.Tensor, kind: str = "") -> str:
        """Bucket ``index``'s ``gate_up [n, 2w, H]`` or ``down [n, H, w]``, as the checkpoint stores them (with
        ``kind`` ``_packed`` / ``_scale``: its packed int32 codes or group scales, where ``takes_codes``);
        returns the name of the parameter it filled, relative to this module."""
        if not 0 <= index < len(self.buckets):
            raise ServingError(f"checkpoint tensor {name}: bucket {index}, but the config's widths give "
                               f"{len(self.buckets)} buckets ({self._described()}); re-export the sliced checkpoint")
        width, ids = self.buckets[index]
        param = self.kernels[index].param(part, kind)
        shape = tuple(param.shape)  # built from the config's widths: [n, 2w, H] / [n, H, w] (codes: packed, groups)
        if tuple(tensor.shape) != shape:
            raise ServingError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)}, but the config's bucket "
                               f"{index} ({len(ids)} experts of width {width}) needs {shape}: the checkpoint's buckets "
                               "disagree with its config; re-export the sliced checkpoint")
        param.data.copy_(tensor)
        self._loaded.add((index, part + kind))
        return self._name_of(index, param)

    def _name_of(self, index: int, param: torch.Tensor) -> str:
        return next(f"kernels.{index}.{n}" for n, p in self.kernels[index].named_parameters() if p is param)

    def param_name(self, index: int, part: str, kind: str = "") -> str:
        """The name (relative to this module) of the parameter bucket ``index``'s ``part`` fills."""
        return self._name_of(index, self.kernels[index].param(part, kind))

    def _described(self) -> str:
        return ", ".join(f"{len(ids)} x width {w}" for w, ids in self.buckets)

    def missing(self) -> list[str]:
        kinds = ("_packed", "_scale") if self.takes_codes else ("",)
        return [f"bucket {i} {p}{k}" for i in range(len(self.buckets)) for p in ("gate_up", "down") for k in kinds
                if (i, p + k) not in self._loaded]


_FALLBACK_LOGGED: list[bool] = []  # the fallback's warning is logged once per process
