"""What a layer-streamed compile's passes run on, and how a pass runs there.

A pass declares whether a streamed compile can run it (:attr:`flexc.passes.base.Pass.streams`):
as it is (it reads the expert groups and the hand-off state, or trains through the layer model),
or in a form of its own (:meth:`~flexc.passes.base.Pass.run_streamed`, e.g. ``rank_channels``
scoring one decoder layer at a time). :func:`streamed_form` gives what the compile runs, and
:func:`export_transform` what the exports (and a pass that reads the layers as they will be written,
e.g. a streamed ``quantize``) do to each loaded layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexc.ir.streaming import LayerModel


@dataclass
class StreamedGraph:
    """What a streamed compile's passes run on, in place of a FlexGraph: the layer model, its expert
    groups (all the width passes read) and the properties that hold. Nothing is rewritten."""

    model: LayerModel
    properties: set[str]
    rewrites: list = field(default_factory=list)  # PassRunner reads it; streamed passes rewrite nothing

    @property
    def groups(self):
        return self.model.groups


class StreamedPass:
    """A pass with a streamed form of its own, run by PassRunner as the pass itself: same name, options
    and properties, so order checks and failure notes read alike."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.options = inner.name, inner.options
        self.requires, self.guarantees, self.invalidates = inner.requires, inner.guarantees, inner.invalidates

    def __call__(self, graph: StreamedGraph, ctx):
        from flexc.passes.base import PassResult

        self.inner.run_streamed(graph.model, ctx)
        return PassResult(graph=graph, modified=False)


def streamed_form(p):
    """``p`` as a streamed compile runs it: its :meth:`run_streamed` where it has one, else ``p``
    itself (the caller has checked :attr:`streams`)."""
    from flexc.passes.base import Pass

    return StreamedPass(p) if type(p).run_streamed is not Pass.run_streamed else p


def export_transform(lm, state, pass_classes):
    """What the exports do to each loaded decoder layer: the ranking's permutation, then the weight
    changes of the passes (``pass_classes``) that leave them to the exports (:meth:`flexc.passes.base.Pass.export_merger`,
    e.g. a streamed ``recover``'s adapters), in pipeline order as the in-memory compile applied them."""
    from flexc.ir.permute import layer_permuter

    steps = [layer_permuter(lm.groups, state.channel_perms)]
    steps += [m for cls in pass_classes if cls.merges_at_export and (m := cls.export_merger(lm, state)) is not None]
    if len(steps) == 1:
        return steps[0]

    def transform(layer: int, graph) -> None:
        for step in steps:
            step(layer, graph)

    return transform
