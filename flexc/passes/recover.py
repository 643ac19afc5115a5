"""``recover``: one LoRA fine-tune at a mid budget, merged into the nested weights.

The pass picks one exported width table (the budget nearest ``keep``), applies it, and trains
LoRA adapters (``peft``) on the routed experts' stacked weights (and optionally on the
attention projections) with every base weight frozen. The loss is the KL divergence from the
unpruned model (``distill``: the same model at full width with the adapters disabled, one
batch of teacher logits at a time) or the next-token loss. The adapters are then added into
the base weights in place, so the graph, which shares those tensors, and every budget use the
recovered weights; the width tables are untouched.

Merge rule: an expert's update is kept only on the channels the fine-tune used
(``[0, widths[e])`` of the chosen table) and dropped beyond them. Those channels got no
gradient: a ``gate_up`` row beyond the width keeps its zero-initialised LoRA factor, but a
``down`` column beyond it is ``B_e @ A_e[:, c]`` with a trained ``B_e`` and an untrained random
``A_e[:, c]``, i.e. noise. Masked, every channel beyond the fine-tuned prefix keeps its original
weights, budgets at or below the chosen one run exactly the fine-tuned model, and wider budgets
run the fine-tuned prefix plus the original remaining channels. Channel order is never changed.

Training runs on the eager Hugging Face model, not on the fx graph: peft applies a LoRA update
to an ``nn.Parameter`` by parametrizing the attribute on its module during forward, and the
exported graph reads the parameter tensors directly, so it would never see the update. The
eager model routes its experts through the same flexc op with the same width buffers (see
:mod:`flexc.ir.experts_impl`), so it computes what the graph computes at that table.

In a layer-streamed compile (``execution: {stream: layers}``) the same adapters train one decoder
layer at a time and are merged by the exports as they write each layer
(:mod:`flexc.passes.recover_streamed`): the same losses and weights.

Training state (adapters, optimizer, loss history) is checkpointed atomically in the stage's
folder every ``checkpoint_every`` steps; a re-run on the same pre-recovery weights resumes and
gives the same result as an uninterrupted run (adapters are initialised from the seed and
batches are indexed by step). A non-finite loss stops the run with a clear error, leaves the
weights untouched and keeps the last good checkpoint.

Under torchrun (docs/scale.md, "Several processes") every step still trains on one whole
calibration batch, as ``anneal`` does: each rank takes a contiguous share of its sequences
(:func:`flexc.utils.distributed.row_share`), computes the teacher targets and the loss on them,
and weights its loss by its share of the sequences (a batch's sequences are equally long, so the
weighted shares add up to the loss over the whole batch). The loss values and the adapters'
gradients are summed over ranks before the gradient is clipped (so the clip sees the whole
batch's gradient norm) and before the Adam step. Every rank starts from the same adapters (a
function of the seed) and makes the same update, so the ranks stay in lockstep, merge the same
adapters, and a non-finite loss or gradient norm stops all of them at the same step. Rank 0
alone writes the checkpoint; every rank resumes from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from flexc.ir.experts_impl import set_widths
from flexc.ir.tables import WidthTables, expert_weights, keep_ratio
from flexc.passes.anneal import quality_loss
from flexc.passes.base import MAX_STEPS, Pass, PassContext, PassOptions, PassResult
from flexc.passes.distill import TeacherTargets
from flexc.passes.lora import adapter_parameters, attach_adapters, merge_adapters
from flexc.utils import checkpoint, distributed
from flexc.utils.atomic import atomic_write_text
from flexc.utils.training import TrainingRun, fingerprint, restore, restore_optimizer

CHECKPOINT = "recover_checkpoint.pt"
REPORT = "recover.json"
HISTORY = "recover_history.json"


class RecoverDiverged(checkpoint.TrainingDiverged):
    pass


class RecoverOptions(PassOptions):
    keep: float = Field(0.6, gt=0, le=1, description="Keep ratio to fine-tune at: the exported budget nearest to it.")
    keep_tolerance: float = Field(0.05, ge=0, description="Largest allowed distance from keep to that budget.")
    steps: int = Field(100, ge=1, le=MAX_STEPS, description="Training steps (one calibration batch each).")
    lr: float = Field(1e-3, gt=0, description="Peak Adam learning rate (cosine decay to a tenth of it).")
    rank: int = Field(8, ge=1, description="LoRA rank (per expert for stacked expert weights).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: updates are scaled by alpha / rank.")
    targets: list[Literal["experts", "attention"]] = Field(
        ["experts"], min_length=1, description="What gets adapters: routed experts' stacked weights, attention.")
    loss: Literal["distill", "next_token"] = Field("distill", description="Distillation from the unpruned model, "
                                                   "or next-token loss.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the adapters' gradient norm (None: no clip).")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return sorted(set(v))

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        return True


def select_budget(tables: WidthTables, keep: float, tolerance: float) -> float:
    """The exported budget nearest ``keep`` (ties go to the smaller); an error if none is within ``tolerance``."""
    nearest = min(tables.budgets, key=lambda b: (round(abs(b - keep), 9), b))  # rounding: exact ties
    if abs(nearest - keep) > tolerance + 1e-9:
        listed = ", ".join(f"{b:g}" for b in tables.budgets)
        raise ValueError(
            f"recover: no exported budget within {tolerance:g} of keep {keep:g} (nearest: {nearest:g}); exported "
            f"budgets: {listed}. Set recover's keep to one of them, add {keep:g} to the spec's budgets, or raise "
            "keep_tolerance."
        )
    return nearest


def apply_widths(experts: list[nn.Module], groups, table: torch.Tensor | None) -> None:
    """Set the eager experts modules' width buffers (None: full width)."""
    for i, (module, g) in enumerate(zip(experts, groups)):
        row = torch.full((g.num_experts,), g.intermediate_size) if table is None else table[i]
        set_widths(module, row)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Cosine decay from ``peak`` to ``peak / 10``; a function of the step, so resuming needs no scheduler state."""
    frac = min(step / max(steps - 1, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Recover(Pass):
    """Fine-tune LoRA adapters at one budget's widths, then merge them into the nested weights."""

    name = "recover"
    streams = True  # trains through the layer model (recover_streamed.py); the exports merge its adapters
    reads_source_weights = True
    merges_at_export = True
    Options = RecoverOptions
    requires = frozenset({"channels_ranked", "width_tables"})
    guarantees = frozenset({"recovered"})
    preserves_computation = False
    packages = ("peft",)

    @classmethod
    def check_spec(cls, options, site) -> list:
        """recover fine-tunes at the exported budget nearest its keep: one must lie within keep_tolerance."""
        pipeline = site.spec.pipeline
        width = [j for j in range(site.index) if "width_tables" in pipeline[j].build().guarantees]
        if not width:
            return []  # the pass order check reports it
        budgets, _ = site.spec.budgets_for(width[-1])
        if not budgets:
            return []
        nearest = min(budgets, key=lambda b: abs(b - options.keep))
        if abs(nearest - options.keep) <= options.keep_tolerance + 1e-9:
            return []
        listed = ", ".join(f"{b:g}" for b in budgets)
        return [(site.loc, f"recover's keep {options.keep:g} is not within keep_tolerance {options.keep_tolerance:g} "
                 f"of any budget ({listed}); set keep to one of them or raise keep_tolerance")]

    @classmethod
    def export_merger(cls, model, state):
        from flexc.passes.recover_streamed import layer_merger

        return layer_merger(model, state)

    # Test hook: called as on_step(step, adapters) after each optimizer step (gradients still set):
    # the peft model in memory, the LayerAdapters in a streamed compile.
    on_step: Callable[[int, object], None] | None = None

    def run(self, graph, ctx: PassContext) -> PassResult:
        from flexc.ir.streaming import LayerModel

        opts = self.options
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        tables = ctx.state.checked_width_tables()
        budget = select_budget(tables, opts.keep, opts.keep_tolerance)
        table = tables.table(budget)
        whole = list(ctx.calibration_batches())
        if not whole:
            raise ValueError("recover: the calibration data yielded no batches")
        shares = [distributed.row_share(len(b), f"recover: calibration batch {i + 1} of {len(whole)}")
                  for i, b in enumerate(whole)]
        # this rank's sequences of each batch, and their share of it (all of them, and 1, in one process)
        batches = [(b[share], (share.stop - share.start) / len(b)) for b, share in zip(whole, shares)]

        if isinstance(getattr(graph, "model", None), LayerModel):
            history, stats = self._run_streamed(graph.model, table, batches, budget, ctx)
        else:
            history, stats = self._run_in_memory(graph, table, batches, budget, ctx)

        full = torch.tensor([g.intermediate_size for g in graph.groups])
        report = {
            "keep_requested": opts.keep, "keep_trained": budget,
            "params_keep_of_table": keep_ratio(table, full, expert_weights(graph.groups, "params")),
            "options": opts.model_dump(mode="json"), "steps": len(history),
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            "merge": stats,
        }
        atomic_write_text(workdir / REPORT, json.dumps(report, indent=2))
        atomic_write_text(workdir / HISTORY, json.dumps(history))
        ctx.state.recovered_keep = budget
        ctx.logger.info("recover: fine-tuned at keep %g for %d steps, loss %.4g -> %.4g; adapters merged", budget,
                        len(history), report["loss_first"] or float("nan"), report["loss_last"] or float("nan"))
        return PassResult(graph=graph, modified=True, changed_nodes=set())

    def _run_in_memory(self, graph, table, batches, budget, ctx) -> tuple[list[dict], list[dict]]:
        """Train peft's adapters on the eager model and merge them into its weights in place."""
        opts = self.options
        model = graph.model
        experts = [graph.experts_module(g) for g in graph.groups]  # before peft wraps them
        saved_widths = graph.widths()
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        model.eval()  # no dropout: teacher and student see the same function of the weights
        peft_model = attach_adapters(model, graph.groups, rank=opts.rank, alpha=opts.alpha, targets=opts.targets,
                                     seed=ctx.seed)
        try:
            adapters = adapter_parameters(peft_model)
            step = EagerRecoverModel(peft_model, experts, graph.groups, table, opts.loss)
            history = self._train(step, peft_model, adapters, table, batches, budget, ctx)
            stats = merge_adapters(peft_model, experts, graph.groups, table)
        finally:
            peft_model.unload()  # the original modules come back; with a merge, their weights are recovered
            graph.set_widths(saved_widths)
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)
        return history, stats

    def _run_streamed(self, lm, table, batches, budget, ctx) -> tuple[list[dict], list[dict]]:
        """Train the adapters one decoder layer at a time; they go into the state, and the exports merge
        them into each layer they write (:mod:`flexc.passes.recover_streamed`)."""
        from flexc.ir.permute import layer_permuter
        from flexc.passes.recover_streamed import STATE_KEY, LayerAdapters, StreamedRecoverModel, merge_norms

        opts = self.options
        adapters = LayerAdapters(lm, rank=opts.rank, alpha=opts.alpha, targets=opts.targets, seed=ctx.seed)
        transform = layer_permuter(lm.groups, ctx.state.channel_perms)
        step = StreamedRecoverModel(lm, adapters, table, opts.loss, transform)
        history = self._train(step, adapters, adapters.params, table, batches, budget, ctx)
        ctx.state.extras[STATE_KEY] = adapters.state(table)
        return history, merge_norms(adapters, table)

    def _train(self, model, hooked, adapters, table, batches, budget, ctx) -> list[dict]:
        """Train ``adapters`` (name -> parameter) through ``model`` (its ``forward_loss``); ``hooked`` is
        what ``on_step`` receives."""
        opts = self.options
        params = list(adapters.values())
        optimizer = torch.optim.Adam(params, lr=opts.lr)
        run = TrainingRun(
            "recover", Path(ctx.workdir) / CHECKPOINT,
            fingerprint(opts.model_dump(mode="json"), budget, table.tolist(), ctx.seed,
                        {n: list(p.shape) for n, p in adapters.items()}),
            every=opts.checkpoint_every, logger=ctx.logger, diverged=RecoverDiverged, advice="lr",
            unchanged="the weights are unchanged and ", quiet=ctx.quiet)
        history: list[dict] = []

        def restore_from(ckpt: dict) -> None:
            nonlocal history
            restore(adapters.values(), [ckpt["adapters"][name] for name in adapters])
            restore_optimizer(optimizer, ckpt["optimizer"])
            history = ckpt["history"]

        ckpt = run.resume(restore_from)
        start = ckpt["step"] if ckpt is not None else 0

        def save_checkpoint(step: int) -> None:
            run.save(step, optimizer=optimizer.state_dict(),
                     adapters={n: p.detach().clone() for n, p in adapters.items()}, history=history)

        def train_step(step: int) -> dict:
            ids, weight = batches[step % len(batches)]
            part, backward = model.forward_loss(ids, weight)  # this rank's part of the loss
            optimizer.zero_grad(set_to_none=True)
            backward()
            loss = run.sum_over_ranks(part, params, "the recover loss")
            del part, backward
            run.check_finite(loss, "the loss", step)  # the whole batch's: every rank stops at the same step
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm or math.inf)
            run.check_finite(grad_norm, "the adapters' gradient norm", step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, opts.steps, opts.lr)
            optimizer.step()
            history.append({"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
            return {"loss": loss.item()}

        with run.progress(start, opts.steps, f"recover (keep {budget:g})") as bar:
            run.steps(train_step, start, opts.steps, bar=bar, save=save_checkpoint,
                      on_step=lambda step: self.on_step(step, hooked) if self.on_step is not None else None)
        optimizer.zero_grad(set_to_none=True)
        if start < opts.steps or not run.path.is_file():
            save_checkpoint(opts.steps)
        return history


class EagerRecoverModel:
    """``recover``'s training step on the eager model with peft's adapters: the teacher is the same
    model at full width with the adapters disabled (one batch at a time), the student the model at
    the table's widths with them."""

    def __init__(self, peft_model, experts, groups, table: torch.Tensor, loss_kind: str):
        self.peft_model, self.experts, self.groups, self.table, self.loss_kind = (peft_model, experts, groups, table,
                                                                                 loss_kind)

    def forward_loss(self, ids: torch.Tensor, weight: float) -> tuple[torch.Tensor, Callable[[], None]]:
        """This rank's share of the loss on ``ids`` (weighted by ``weight``) and its backward."""
        teacher = None
        if self.loss_kind == "distill":
            apply_widths(self.experts, self.groups, None)
            with torch.no_grad(), self.peft_model.disable_adapter():
                teacher = TeacherTargets.from_logits(self.peft_model(input_ids=ids, use_cache=False).logits, None)
        apply_widths(self.experts, self.groups, self.table)
        student = self.peft_model(input_ids=ids, use_cache=False).logits
        part = quality_loss(self.loss_kind, student, teacher, ids) * weight
        return part, part.backward

