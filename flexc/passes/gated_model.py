"""The model ``anneal`` trains its action gates through: a graph in memory, or a streamed model.

Both give the same three things: the gates (one :class:`GatedExperts` per MoE layer, in
``groups`` order), the logits of a sequence of batches without gradients (the teacher, the
held-out losses), and a loss's gradient in the gates' logits (a training step).

- :class:`GraphModel`: a :class:`~flexc.ir.graph.FlexGraph` whose expert nodes call the gates
  (``insert_action_gates`` rewrote them).
- :class:`StreamedGatedModel`: a :class:`~flexc.ir.streaming.LayerModel`, one decoder layer in
  memory at a time, each loaded layer permuted into the ranked channel order (the ranking's
  ``channel_perms``: the gates keep a prefix of the ranked channels), its experts modules calling
  the gates in place of the flexc op (:func:`flexc.ir.experts_impl.override_op`). The logits of several batches take one sweep over
  the layers (each layer loaded once, every batch through it). A training step runs the batch
  forward through the layers keeping each layer's input (the boundary states, host memory),
  takes the gradient at the last layer's output from the final norm and LM head, and walks back
  from the last layer to the first, reloading and recomputing each one to back-propagate
  through it: the gates' logits gather the same gradient as from one backward through the whole
  model (the sampled actions are a function of the logits and the step's fixed noise, so the
  recomputation samples the same widths). Two loads of every layer per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from flexc.ir import experts_impl
from flexc.passes.action_gates import GatedExperts, gates_of, streamed_gates

LossFn = Callable[[torch.Tensor], torch.Tensor]


class GraphModel:
    """A graph whose expert nodes call the gates; its weights frozen."""

    def __init__(self, graph):
        self.graph = graph
        self.gates: list[GatedExperts] = gates_of(graph)
        for p in graph.model.parameters():
            p.requires_grad_(False)

    def logits(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        with torch.no_grad():
            for ids in batches:
                yield self.graph.logits(ids)

    def loss_backward(self, ids: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """``loss_fn(logits of ids)``, its gradient accumulated in the gates' logits; returns its value."""
        loss = loss_fn(self.graph.logits(ids))
        loss.backward()
        return loss.detach()

    def close(self) -> None:
        pass


class StreamedGatedModel:
    """A layer-streamed model whose experts modules call the gates; its weights frozen (never loaded
    with gradients)."""

    def __init__(self, lm, gates: list[GatedExperts], channel_perms: torch.Tensor | None):
        from flexc.ir.permute import layer_permuter

        self.lm, self.gates = lm, gates
        # The gates keep a prefix of the ranked channels: each loaded layer is put in ranked order.
        self.transform = None if channel_perms is None else layer_permuter(lm.groups, channel_perms)
        for group, gate in zip(lm.groups, gates):
            experts_impl.override_op(lm.model.get_submodule(group.path), gate)

    def close(self) -> None:
        for group in self.lm.groups:
            experts_impl.override_op(self.lm.model.get_submodule(group.path), None)

    def _sweep(self, batches: list[torch.Tensor], keep_inputs: bool):
        """The batches through every decoder layer (no gradients): the last layer's outputs, each
        layer's inputs if ``keep_inputs`` (else an empty list), and the layers' keyword arguments."""
        lm = self.lm
        hidden, kwargs = lm.layer_inputs(batches)
        inputs = []
        for i in range(lm.num_layers):
            if keep_inputs:
                inputs.append(hidden)
            graph = self.lm.frozen_layer(i, kwargs, self.transform)
            with torch.no_grad():
                for h in hidden:
                    graph.logits(h.to(lm.device))
            hidden = graph.outputs
            lm.free(i)
        return hidden, inputs, kwargs

    def logits(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        hidden, _, _ = self._sweep(list(batches), keep_inputs=False)
        with self.lm.head() as head, torch.no_grad():
            for h in hidden:
                yield head(h.to(self.lm.device))

    def loss_backward(self, ids: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """``loss_fn(logits of ids)``, its gradient accumulated in the gates' logits; returns its value."""
        lm = self.lm
        last, inputs, kwargs = self._sweep([ids], keep_inputs=True)
        values: list[torch.Tensor] = []

        def loss(logits: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
            value = loss_fn(logits)
            values.append(value.detach())
            return value

        grad = lm.head_gradients(last, [ids], loss)[0]
        for i in reversed(range(lm.num_layers)):
            graph = self.lm.frozen_layer(i, kwargs, self.transform)
            grad = graph.backward(inputs[i][0], grad)
            inputs[i] = None  # this layer's boundary state is spent
            lm.free(i)
        return values[0]


GatedModel = GraphModel | StreamedGatedModel


def gated_model(graph, ctx) -> GatedModel:
    """The gated model of ``graph``: the graph itself, or (a streamed compile's graph) its layer model
    with the gates the streamed ``insert_action_gates`` recorded in the state."""
    from flexc.ir.streaming import LayerModel

    model = getattr(graph, "model", None)
    if isinstance(model, LayerModel):
        return StreamedGatedModel(model, streamed_gates(model.groups, ctx.state), ctx.state.channel_perms)
    return GraphModel(graph)
