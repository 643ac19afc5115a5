"""An example flexc pass: remove experts that calibration data (almost) never routes to.

Copy this file, rename the class, and name it in a spec's pipeline as ``cold_experts:DropColdExperts``
(the module must be importable: put its folder on PYTHONPATH, or package it and register it
under the ``flexc.passes`` entry-point group).
"""

from __future__ import annotations

import json

from pydantic import Field

from flexc.passes import Pass, PassContext, PassOptions, PassResult


class DropColdExpertsOptions(PassOptions):
    # Options are a pydantic model: a spec's typo or wrong type is reported at its line.
    min_share: float = Field(0.01, gt=0, lt=1, description="Drop experts that get less than this share of a "
                                                           "layer's routed token-slots.")


class DropColdExperts(Pass):
    name = "drop_cold_experts"
    Options = DropColdExpertsOptions
    requires = frozenset({"routing_stats"})  # provided by rank_channels; the pipeline is checked before running
    guarantees = frozenset({"cold_experts_dropped"})
    preserves_computation = False  # it changes outputs (tests check passes that claim otherwise)

    def run(self, graph, ctx: PassContext) -> PassResult:
        counts = ctx.state.routing_counts  # [MoE layers, experts], from rank_channels' calibration
        share = counts / counts.sum(dim=1, keepdim=True)
        widths = graph.widths()  # [MoE layers, experts]; the graph reads these buffers, no re-export
        cold = share[:, : widths.shape[1]] < self.options.min_share
        widths[cold] = 0  # width 0: the expert contributes nothing
        graph.set_widths(widths)
        ctx.state.extras["cold_experts"] = cold  # for later passes: saved with the compile state
        report = {f"layer {g.layer}": cold[i].nonzero().flatten().tolist() for i, g in enumerate(graph.groups)}
        (ctx.workdir / "cold_experts.json").write_text(json.dumps(report, indent=2))
        ctx.logger.info("drop_cold_experts: removed %d experts", int(cold.sum()))
        changed = {g.node for i, g in enumerate(graph.groups) if cold[i].any()}
        return PassResult(graph=graph, modified=bool(changed), changed_nodes=changed)
