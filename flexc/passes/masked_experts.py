"""The routed experts under a channel mask ``[E, I]``, differentiable in the mask: the forward
and backward an anneal step runs through every MoE layer.

The action gates' mask is a prefix of each expert's ranked channels: in the forward pass of a
straight-through sample it is exactly zero past the sampled width ``S`` of the expert, and only
its first ``U`` channels can reach an allowed action (``U``: the widest action the nesting lets
the expert take). :func:`masked_experts` computes what that structure needs and no more:

- forward: gate/up projections of the first ``U`` channels (their activations give the mask's
  gradient), the down projection of the first ``S``;
- backward: the gradient in the mask's first ``U`` channels, in the hidden states (through the
  first ``S`` channels) and in the routing weights; none in the model weights (they are frozen
  while actions train).

It equals :func:`masked_experts_reference` (plain autograd over full-width GEMMs) up to float
rounding, in the values and in every gradient that reaches an allowed action. On ``small``'s
shape (E=16, H=I=256, top-4, 1,024 tokens) a layer's forward and backward takes the reference's
time at full width and 24 / 19 ms against its ~31 at ``U``/``S`` = 192/128 and 128/64
(``benchmarks/anneal_step.py``).
"""

from __future__ import annotations

import torch

from flexc.ir.layout import ExpertWeights
from flexc.ir.routing import ExpertRouting, route_by_expert


def masked_experts(hidden, topk_ids, topk_weights, weights: ExpertWeights, mask, upper, sampled) -> torch.Tensor:
    """``[T, H]``: the experts' output with channel ``c`` of expert ``e`` scaled by ``mask[e, c]``.

    ``upper[e]`` / ``sampled[e]`` (ints): the channels that can reach an allowed action, and the
    prefix where the mask is nonzero (``sampled[e] <= upper[e]``; the mask must be zero from
    ``sampled[e]`` on). Gradients flow to ``hidden``, ``topk_weights`` and ``mask[:, :upper]``."""
    routing = route_by_expert(topk_ids, weights.num_experts)
    return _MaskedExperts.apply(hidden, topk_weights, mask, routing, weights.gate_up, weights.down,
                                weights.gate_up_bias, weights.down_bias, [int(u) for u in upper],
                                [int(s) for s in sampled], weights.layout)


class _MaskedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, topk_weights, mask, routing: ExpertRouting, gate_up, down, gate_up_bias, down_bias,
                upper, sampled, layout):
        num_tokens, hidden_size = hidden.shape
        xs = hidden[routing.token].split(routing.counts)
        ws = routing.sorted_weights(topk_weights).split(routing.counts)
        pre, outs, pieces = [], [], []
        for e, n in enumerate(routing.counts):
            u, s = upper[e], sampled[e]
            if n == 0 or u == 0:
                pre.append(None)
                outs.append(None)
                if n:
                    pieces.append(hidden.new_zeros(n, hidden_size))
                continue
            gate = xs[e] @ layout.rows(gate_up[e], 0)[:u].t()
            up = xs[e] @ layout.rows(gate_up[e], 1)[:u].t()
            if gate_up_bias is not None:
                gate = gate + layout.rows(gate_up_bias[e], 0)[:u]
                up = up + layout.rows(gate_up_bias[e], 1)[:u]
            act = layout.act(gate, up)
            y = (act[:, :s] * mask[e, :s]) @ down[e][:, :s].t()
            if down_bias is not None and s > 0:  # a fully pruned expert contributes nothing, bias included
                y = y + down_bias[e]
            pre.append((gate, up, act))
            outs.append(y)
            pieces.append((y.to(ws[e].dtype) * ws[e][:, None]).to(hidden.dtype))
        ctx.routing, ctx.upper, ctx.sampled, ctx.layout = routing, upper, sampled, layout
        ctx.pre, ctx.outs = pre, outs
        ctx.weights = (gate_up, down)
        ctx.save_for_backward(topk_weights, mask)
        ctx.hidden_shape = hidden.shape
        y_sorted = torch.cat(pieces) if pieces else hidden.new_zeros(0, hidden_size)
        return routing.combine(y_sorted, num_tokens)

    @staticmethod
    def backward(ctx, grad_out):
        topk_weights, mask = ctx.saved_tensors
        routing, layout = ctx.routing, ctx.layout
        gate_up, down = ctx.weights
        num_tokens, hidden_size = ctx.hidden_shape
        gos = grad_out[routing.token].split(routing.counts)  # each sorted slot's output gradient
        ws = routing.sorted_weights(topk_weights).split(routing.counts)
        grad_mask = torch.zeros_like(mask)
        grad_w, grad_x = [], []
        for e, n in enumerate(routing.counts):
            if n == 0:
                continue
            if ctx.pre[e] is None:
                grad_w.append(ws[e].new_zeros(n))
                grad_x.append(grad_out.new_zeros(n, hidden_size))
                continue
            u, s = ctx.upper[e], ctx.sampled[e]
            gate, up, act = ctx.pre[e]
            go = gos[e]
            grad_w.append((go.to(ctx.outs[e].dtype) * ctx.outs[e]).sum(-1).to(ws[e].dtype))
            scaled = (go.to(ws[e].dtype) * ws[e][:, None]).to(act.dtype)
            grad_inner = scaled @ down[e][:, :u]  # [n, U]: every allowed channel's share, kept or not
            grad_mask[e, :u] = (grad_inner * act).sum(0).to(mask.dtype)
            if not ctx.needs_input_grad[0]:  # the first MoE layer's input: nothing below it trains
                continue
            if s == 0:
                grad_x.append(grad_out.new_zeros(n, hidden_size))
                continue
            with torch.enable_grad():  # the activation's vector-Jacobian product, any family's activation
                g, v = gate[:, :s].detach().requires_grad_(), up[:, :s].detach().requires_grad_()
                grad_gate, grad_up = torch.autograd.grad(layout.act(g, v), (g, v), grad_inner[:, :s] * mask[e, :s])
            grad_x.append(grad_gate @ layout.rows(gate_up[e], 0)[:s] + grad_up @ layout.rows(gate_up[e], 1)[:s])
        grad_hidden = grad_topk = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (routing.combine(torch.cat(grad_x), num_tokens) if grad_x
                           else grad_out.new_zeros(num_tokens, hidden_size))
        if ctx.needs_input_grad[1] and grad_w:
            grad_topk = routing.unsort(torch.cat(grad_w)).view_as(topk_weights)
        return grad_hidden, grad_topk, grad_mask, None, None, None, None, None, None, None, None


def masked_experts_reference(hidden, topk_ids, topk_weights, weights: ExpertWeights, mask) -> torch.Tensor:
    """:func:`masked_experts` in plain autograd over full-width GEMMs (what tests compare it with)."""
    num_tokens, hidden_size = hidden.shape
    gate_up, down, gate_up_bias, down_bias, layout = (weights.gate_up, weights.down, weights.gate_up_bias,
                                                      weights.down_bias, weights.layout)
    routing = route_by_expert(topk_ids, down.shape[0])
    xs = hidden[routing.token].split(routing.counts)
    ws = routing.sorted_weights(topk_weights).split(routing.counts)
    pieces = []
    for e, n in enumerate(routing.counts):
        if n == 0:
            continue
        gate = xs[e] @ layout.rows(gate_up[e], 0).t()
        up = xs[e] @ layout.rows(gate_up[e], 1).t()
        if gate_up_bias is not None:
            gate = gate + layout.rows(gate_up_bias[e], 0)
            up = up + layout.rows(gate_up_bias[e], 1)
        y = (layout.act(gate, up) * mask[e]) @ down[e].t()
        if down_bias is not None:
            y = y + down_bias[e] * (mask[e].amax() > 0)
        pieces.append((y.to(ws[e].dtype) * ws[e][:, None]).to(hidden.dtype))
    y_sorted = torch.cat(pieces) if pieces else hidden.new_zeros(0, hidden_size)
    return routing.combine(y_sorted, num_tokens)
