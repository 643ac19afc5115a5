"""The expert op's backends: which implementation runs ``torch.ops.flexc.moe_experts`` where.

The op keeps a registry per device type (:func:`flexc.ir.op.register_backend`): the torch
reference everywhere, its grouped-GEMM path on CPU, and what is installed here: the Triton
kernels (:mod:`flexc.kernels`) on CUDA. Every transformers model reaches the op through the one
flexc experts implementation (:mod:`flexc.ir.experts_impl`), so installing a backend here
changes what lowered graphs, nested runtimes and plain ``set_experts_implementation("flexc")``
models run. The op's autograd always uses the reference backward.
"""

from __future__ import annotations

import torch

from flexc.ir.op import moe_experts_reference, register_backend
from flexc.kernels.dispatch import resolve_backend, triton_forward


def install_cuda_backend(enable: bool = True) -> None:
    """Route ``torch.ops.flexc.moe_experts`` on CUDA tensors to the kernels (``False`` undoes it)."""
    register_backend("cuda", triton_forward if enable else None)


def use_backend(backend: str, device: torch.device | str) -> str:
    """Resolve ``backend`` (auto | triton | reference) for ``device``; on CUDA, install the kernels if Triton."""
    resolved = resolve_backend(backend, device)
    if resolved == "triton" and torch.device(device).type == "cuda":
        install_cuda_backend()
    return resolved


def backend_forward(backend: str, device: torch.device | str):
    """The forward of ``backend`` (auto | triton | reference) on ``device``, with a backend's signature
    ``(hidden, topk_ids, topk_weights, weights, widths)``; forward only for ``"triton"``."""
    return triton_forward if resolve_backend(backend, device) == "triton" else moe_experts_reference
