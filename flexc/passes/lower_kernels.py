"""``lower_kernels``: specialise the expert kernels to the model and point the graph at them.

For every distinct expert shape (E, H, I, top-k, dtype) the Triton kernels are specialised
(:func:`flexc.kernels.specialize`: block configurations tuned on the GPU when asked or when the
shipped table has no entry, from the table otherwise); the kernel source and configuration are
written under ``kernels/<shape>/`` in the pass's folder. With the Triton backend, each expert op
node is replaced by a call to a :class:`PlannedExperts` submodule that runs its layer's plan
(inference only: the kernels have no backward). The width buffers stay graph inputs, so
switching budgets never recompiles. With the reference backend (``auto`` on a CPU) the nodes
keep the torch op and the plan is still written, for deployment elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from flexc.ir.graph import is_expert_node
from flexc.ir.op import ExpertWeights, run_experts
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult, check_granule
from flexc.utils.atomic import atomic_write_text

KERNEL_PREFIX = "flexc_kernels_"


class PlannedExperts(nn.Module):
    """A graph node's routed experts through a specialised Triton kernel plan."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def forward(self, hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                activation, interleaved, alpha, limit):
        if torch.is_grad_enabled() and (hidden.requires_grad or gate_up.requires_grad):
            # The kernels have no backward: keep training on the reference op.
            weights = ExpertWeights.of(gate_up, down, gate_up_bias, down_bias, activation, interleaved, alpha, limit)
            return run_experts(hidden, topk_ids, topk_weights, weights, widths)
        return self.plan.forward(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, widths,
                                 activation, interleaved, alpha, limit)


class LowerKernelsOptions(PassOptions):
    backend: Literal["auto", "triton", "reference"] = Field(
        "auto", description="auto: Triton on CUDA, the torch reference op on CPU. triton on a machine without "
                            "CUDA is an error unless TRITON_INTERPRET=1.")
    tune: bool | None = Field(None, description="Autotune block configs on the GPU: true, false, or null "
                                                "(only when the shipped table has no entry).")
    granule: int | None = Field(None, ge=1, description="Width granule the kernels may assume (default: the "
                                                        "action gates' granule, else none).")
    _granule = field_validator("granule")(classmethod(lambda cls, v: check_granule(v)))


def _graph_granule(graph) -> int | None:
    for rewrite in graph.rewrites:
        if rewrite["pass"] == "insert_action_gates":
            return int(rewrite["options"]["granule"])
    return None


class LowerKernels(Pass):
    """Specialise Triton expert kernels to the model and rewrite expert nodes to use them."""

    name = "lower_kernels"
    not_streamed_because = "it rewrites the in-memory graph"
    Options = LowerKernelsOptions
    requires = frozenset({"lowered"})
    guarantees = frozenset({"kernels_lowered"})
    preserves_computation = True  # within kernel precision; tests compare with the reference

    @classmethod
    def check_spec(cls, options, site) -> list:
        """backend: triton needs the package, and CUDA tensors unless Triton's interpreter is on."""
        from flexc.kernels.dispatch import interpret_mode, triton_available

        if options.backend != "triton":
            return []
        if not triton_available():
            return [(site.loc, "lower_kernels backend 'triton' needs the triton package, which is not importable "
                     "here; use backend 'auto' or 'reference'")]
        if site.device is None or site.device.startswith("cuda") or interpret_mode():
            return []  # an unknown device is reported by the device check
        return [(site.loc, f"lower_kernels backend 'triton' needs CUDA tensors; model.device is "
                 f"{site.spec.model.device!r}. Use backend 'auto' or 'reference', device: cuda, or TRITON_INTERPRET=1")]

    def run(self, graph, ctx: PassContext) -> PassResult:
        from flexc.ir.backends import install_cuda_backend
        from flexc.kernels.dispatch import resolve_backend
        from flexc.kernels.specialize import specialize

        param = next(graph.model.parameters())
        backend = resolve_backend(self.options.backend, param.device)
        granule = self.options.granule or _graph_granule(graph)
        plans, layers = {}, {}
        for g in graph.groups:
            shape = (g.num_experts, g.hidden_size, g.intermediate_size, g.top_k)
            if shape not in plans:
                plan = specialize(*shape, dtype=param.dtype, granule=granule, device=param.device,
                                  tune=self.options.tune if backend == "triton" else False)
                plans[shape] = plan
                plan.write(Path(ctx.workdir) / "kernels" / plan.key)
            layers[str(g.layer)] = plans[shape].key
        changed = set()
        if backend == "triton":
            if param.device.type == "cuda":
                install_cuda_backend()  # op calls that stay (e.g. inside action gates) use the kernels too
            by_node = {g.node: g for g in graph.groups}
            for node in list(graph.module.graph.nodes):
                if not is_expert_node(node) or node.name not in by_node:
                    continue
                group = by_node[node.name]
                shape = (group.num_experts, group.hidden_size, group.intermediate_size, group.top_k)
                new = graph.replace_expert_node(node, group, KERNEL_PREFIX + str(group.layer),
                                                submodule=PlannedExperts(plans[shape]))
                changed.add(new.name)
            graph.record_rewrite(self.name, self.options.model_dump(mode="json"))
        summary = {"backend": backend, "granule": granule, "layers": layers,
                   "plans": {p.key: p.spec_dict() for p in plans.values()}}
        atomic_write_text(Path(ctx.workdir) / "kernel_plan.json", json.dumps(summary, indent=2))
        ctx.state.kernel_backend = backend
        ctx.logger.info("lower_kernels: backend %s, %d kernel plan(s)%s", backend, len(plans),
                        "" if changed else " (expert nodes keep the reference op)")
        return PassResult(graph=graph, modified=bool(changed), changed_nodes=changed)
