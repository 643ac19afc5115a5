"""Modeling code of a flexc *sliced* checkpoint: a Mixture-of-Experts causal LM whose routed
experts keep only their first ``w`` intermediate channels, each expert its own ``w``.

This file is self-contained (torch and transformers only) so that

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

loads the checkpoint it ships with. ``config.json`` holds the original architecture's config
plus ``flexc_sliced``: the transformers class the model derives from and, per experts module
(by module path), the expert widths and the gated activation.

Each experts module stores its experts in **width buckets**: the experts of one width, stacked in
the layout fused-MoE kernels take (vLLM's ``w13`` / ``w2``), so that a serving engine runs a layer
as one fused-MoE call per bucket. Bucket ``i`` (widest first; its experts in ascending id order,
listed in the config entry's ``buckets``) holds

- ``bucket_{i}_gate_up [n, 2w, H]``: each expert's gate rows then its up rows;
- ``bucket_{i}_down [n, H, w]``;
- where the family has biases, ``bucket_{i}_gate_up_bias [n, 2w]`` and ``bucket_{i}_down_bias [n, H]``.

A quantized checkpoint (``quantization`` in ``flexc_sliced``: ``bits`` 4 or 8, ``group_size``) stores
each bucket's ``gate_up`` and ``down`` in compressed-tensors' ``pack-quantized`` layout instead:
``bucket_{i}_gate_up_packed`` (int32, the signed codes offset by ``2**(bits-1)`` and packed densely
along the input dimension, element ``c`` of a row at bits ``[c*bits, (c+1)*bits)``) and
``bucket_{i}_gate_up_scale [n, 2w, H/group]`` (one symmetric scale per group of input channels); likewise
``bucket_{i}_down_packed`` and ``bucket_{i}_down_scale [n, H, w/group]``. The codes are unpacked to
int8 once (a non-persistent buffer, one byte per weight) and an expert's weights are dequantized when
it runs (``codes * scale``), so the model holds no float expert weights.

No key looks like the per-expert keys transformers converts when loading MoE families
(``experts.N.gate_proj.weight``, ``experts.N.w1.weight``, ...). The router is unchanged: a bucket
names its experts by id. An expert of width 0 is in no bucket and contributes nothing (its bias
included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

CONFIG_KEY = "flexc_sliced"
CLASS_PREFIX = "FlexcSliced"
FORMAT_VERSION = 2  # 2: width buckets (1: experts packed along the channel axis)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str, alpha: float, limit: float) -> torch.Tensor:
    """``act(gate) * up``; ``swiglu_clamped`` is GPT-OSS's clamped SwiGLU."""
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu":
        return F.gelu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if kind == "relu":
        return F.relu(gate) * up
    if kind == "swiglu_clamped":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown expert activation {kind!r}; expected one of {ACTIVATIONS}")


def width_buckets(widths: list[int]) -> list[tuple[int, list[int]]]:
    """``(width, expert ids)`` of each nonzero width, widest first, ids ascending."""
    by_width: dict[int, list[int]] = {}
    for e, w in enumerate(widths):
        if int(w) > 0:
            by_width.setdefault(int(w), []).append(e)
    return sorted(by_width.items(), reverse=True)


def check_buckets(widths: list[int], buckets) -> None:
    """Refuse a config entry whose ``buckets`` are not the buckets of its ``widths``."""
    expected = [[w, ids] for w, ids in width_buckets(widths)]
    well_formed = isinstance(buckets, list) and all(isinstance(b, dict) for b in buckets)
    found = [[b.get("width"), b.get("experts")] for b in buckets] if well_formed else buckets
    if found != expected:
        raise ValueError(f"the config's buckets {found} are not the width buckets of its widths {widths} "
                         f"(expected {expected}); re-export the sliced checkpoint")


class SlicedExperts(nn.Module):
    """One MoE layer's routed experts at their own widths, stored by width bucket; a drop-in for
    transformers' experts modules: ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    def __init__(self, widths: list[int], hidden_size: int, activation: str = "silu", alpha: float = 1.702,
                 limit: float = 7.0, has_bias: bool = False, quantization: dict | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {activation!r}; expected one of {ACTIVATIONS}")
        if any(int(w) < 0 for w in widths):
            raise ValueError(f"expert widths must be non-negative, got {widths}")
        self.widths = [int(w) for w in widths]
        self.num_experts = len(self.widths)
        self.hidden_size = hidden_size
        self.activation, self.alpha, self.limit = activation, float(alpha), float(limit)
        self.has_bias = has_bias
        self.buckets = width_buckets(self.widths)
        self.bits, self.group = _quantization(quantization, hidden_size, self.widths)
        self._unpacked: dict[str, tuple] = {}  # codes buffer -> the packed tensor's version it was unpacked from
        self.slot = {}  # expert -> (bucket, index within it)
        for i, (w, ids) in enumerate(self.buckets):
            for name, rows, cols in (("gate_up", 2 * w, hidden_size), ("down", hidden_size, w)):
                if self.bits is None:
                    self.register_parameter(f"bucket_{i}_{name}", nn.Parameter(torch.empty(len(ids), rows, cols)))
                else:
                    words = -(-cols * self.bits // 32)
                    self.register_parameter(f"bucket_{i}_{name}_packed", nn.Parameter(
                        torch.empty(len(ids), rows, words, dtype=torch.int32), requires_grad=False))
                    self.register_parameter(f"bucket_{i}_{name}_scale",
                                            nn.Parameter(torch.empty(len(ids), rows, cols // self.group)))
            if has_bias:
                self.register_parameter(f"bucket_{i}_gate_up_bias", nn.Parameter(torch.empty(len(ids), 2 * w)))
                self.register_parameter(f"bucket_{i}_down_bias", nn.Parameter(torch.empty(len(ids), hidden_size)))
            self.slot.update({e: (i, j) for j, e in enumerate(ids)})

    def extra_repr(self) -> str:
        buckets = ", ".join(f"{len(ids)}x{w}" for w, ids in self.buckets)
        quantized = "" if self.bits is None else f", int{self.bits} group {self.group}"
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, buckets=[{buckets}], "
                f"activation={self.activation}, bias={self.has_bias}{quantized}")

    def parameter_count(self) -> int:
        """Weights and biases of the routed experts, each quantized code counting as one parameter."""
        count = sum(len(ids) * 3 * w * self.hidden_size for w, ids in self.buckets)
        return count + sum(p.numel() for n, p in self.named_parameters() if n.endswith("_bias"))

    def weight(self, i: int, j: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``j`` of bucket ``i``: its ``gate_up [2w, H]`` or ``down [H, w]`` (dequantized if packed)."""
        if self.bits is None:
            return getattr(self, f"bucket_{i}_{name}")[j]
        scale = getattr(self, f"bucket_{i}_{name}_scale")[j]
        codes = self._codes(i, name, scale.shape[-1] * self.group)[j]
        return (codes.to(scale.dtype) * scale.repeat_interleave(self.group, dim=-1)).to(dtype)

    def _codes(self, i: int, name: str, cols: int) -> torch.Tensor:
        """Bucket ``i``'s ``name`` codes as int8, unpacked once (one byte per weight; the packed tensor
        stays the checkpoint's) and again only if the packed weights change."""
        packed = getattr(self, f"bucket_{i}_{name}_packed")
        key = f"bucket_{i}_{name}_codes"
        stamp = (packed._version, packed.device, packed.data_ptr())
        if self._buffers.get(key) is None or self._unpacked.get(key) != stamp:
            self.register_buffer(key, unpack_codes(packed.detach(), self.bits, cols), persistent=False)
            self._unpacked[key] = stamp
        return self._buffers[key]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` (width > 0) on its tokens ``x [n, H]``: one GEMM for gate and up together."""
        i, j = self.slot[e]
        w = self.widths[e]
        gate_up = x @ self.weight(i, j, "gate_up", x.dtype).t()
        if self.has_bias:
            gate_up = gate_up + getattr(self, f"bucket_{i}_gate_up_bias")[j]
        inner = gated_activation(gate_up[:, :w], gate_up[:, w:], self.activation, self.alpha, self.limit)
        out = inner @ self.weight(i, j, "down", inner.dtype).t()
        if self.has_bias:
            out = out + getattr(self, f"bucket_{i}_down_bias")[j]
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, hidden = hidden_states.shape
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        # Group the token-slots by expert so each expert runs one batched GEMM on its own tokens.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        weights = top_k_weights.reshape(-1)
        out = hidden_states.new_zeros(num_tokens * k, hidden)
        start = 0
        for e, n in enumerate(counts):
            if n and self.widths[e]:
                slots = order[start : start + n]
                y = self.expert(e, hidden_states[slots // k])
                out[slots] = (y.to(weights.dtype) * weights[slots, None]).to(hidden_states.dtype)
            start += n
        # Sum over the k slots of each token in a fixed order (deterministic, no scatter-add).
        return out.view(num_tokens, k, hidden).sum(dim=1)


def _quantization(settings: dict | None, hidden_size: int, widths: list[int]) -> tuple[int | None, int | None]:
    """(bits, group size) of a quantized checkpoint's experts, checked; (None, None) when not quantized."""
    if settings is None:
        return None, None
    bits, group = settings.get("bits"), settings.get("group_size")
    if bits not in (4, 8) or not isinstance(group, int) or group < 1:
        raise ValueError(f"quantization {settings}: expected bits 4 or 8 and a positive group_size")
    bad = [w for w in (hidden_size, *widths) if w % group]
    if bad:
        raise ValueError(f"quantization group {group} does not divide the widths {sorted(set(bad))}")
    return bits, group


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Signed integer codes ``[..., cols]`` from compressed-tensors' dense int32 packing of ``bits``-bit values."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (values.flatten(-2)[..., :cols] - (1 << (bits - 1))).to(torch.int8)


def _settings(config) -> dict:
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict) or "experts" not in settings:
        raise ValueError(f"config has no {CONFIG_KEY!r} section: not a flexc sliced checkpoint")
    if int(settings.get("format", 1)) != FORMAT_VERSION:
        raise ValueError(f"sliced checkpoint format {settings.get('format', 1)} is not this code's format "
                         f"{FORMAT_VERSION}; re-export it (or load it with the modeling file it shipped with)")
    return settings


def install_sliced_experts(model: nn.Module, config) -> None:
    """Replace every experts module named in ``config.flexc_sliced`` by a :class:`SlicedExperts`."""
    hidden = config.get_text_config().hidden_size if hasattr(config, "get_text_config") else config.hidden_size
    for path, spec in _settings(config)["experts"].items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not hasattr(parent, name):
            raise ValueError(f"{type(model).__name__} has no module {path!r} to hold sliced experts")
        check_buckets([int(w) for w in spec["widths"]], spec.get("buckets"))
        setattr(parent, name, SlicedExperts(spec["widths"], hidden, spec.get("activation", "silu"),
                                            spec.get("alpha", 1.702), spec.get("limit", 7.0),
                                            bool(spec.get("bias", False)), _settings(config).get("quantization")))


def sliced_class(base: type) -> type:
    """The sliced variant of a transformers causal-LM class (e.g. ``Qwen3MoeForCausalLM``)."""

    class Sliced(base):
        # vLLM's Transformers backend runs any class that declares its attention interface with
        # vLLM's own fused MoE layers: the slicing would be ignored and the tokens silently
        # wrong. Declared incompatible, the class is refused by vLLM ("architectures ... are not
        # supported"); flexc's vLLM plugin serves sliced checkpoints at their widths.
        _supports_attention_backend = False

        @classmethod
        def _can_set_attn_implementation(cls) -> bool:
            return False

        def post_init(self):
            # Swap the experts before the base class initialises weights and gathers its
            # static properties, so full-size experts are never initialised.
            install_sliced_experts(self, self.config)
            super().post_init()

    Sliced.__name__ = Sliced.__qualname__ = CLASS_PREFIX + base.__name__
    Sliced.__module__ = __name__
    Sliced.__doc__ = f"{base.__name__} with routed experts sliced to per-expert widths (flexc sliced export)."
    return Sliced


def __getattr__(name: str):
    # ``FlexcSliced<TransformersClass>`` resolves on first use, so this one file serves every
    # MoE family; config.json's auto_map names the class of its checkpoint.
    if name.startswith(CLASS_PREFIX):
        base = getattr(transformers, name[len(CLASS_PREFIX):], None)
        if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
            cls = sliced_class(base)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
