"""``anneal``: train only the action logits; export one nested width table per budget.

Loss = quality + lambda * cost - beta * entropy, where

- quality is the KL divergence from the full-width model's next-token distribution
  (``distill``, default; the teacher's outputs are computed once per calibration batch, see
  :mod:`flexc.passes.distill`) or the next-token loss (``next_token``);
- cost = sum over experts of weight[l, e] * sum_a p_e(a) * r_a: the expected keep ratio under
  the clean action distribution, weighted in the budget metric (parameters, or load-weighted
  FLOPs — see :mod:`flexc.passes.width_tables`);
- entropy is the mean entropy of the clean action distributions.

Two schedules:

- ``track`` (default): one phase per budget, high to low, ``steps`` shared equally. A phase
  starts from a warm-start table at its budget (the ``coverage`` baseline's, within the
  previous budget's table; or full width), with the logits favouring it by ``start_margin``
  and every action above the previous budget's table excluded. The budget binds through a price:
  every action's logit is lowered by ``price * (its share of the keep ratio)``. After every step
  the price is set so that the sampled tables keep the budget in expectation (what is trained is
  at the budget), and at the phase's end so that the deployed table, each expert's argmax action,
  is at the budget (:func:`flexc.ir.tables.expected_price`, :func:`~flexc.ir.tables.budget_price`:
  bisection, exact each step, no dual rate to tune). A dual step on the expected keep alone let the
  deployed keep drift 0.75 -> 0.94 while the expected keep stayed under the budget, so the budget
  never acted and the fit cut the trained table back. ``tau`` and ``beta`` run their schedules
  within the phase. At the phase's end the deployed table is fitted to the budget (a step of an
  expert or two) and scored on held-out text from documents no training batch came from: the
  calibration batches no phase trains on (``validation``, a quarter; windows that share a document
  with a training batch left out) and ``validation_samples`` (64) sequences packed from the
  documents after the calibration set's (:meth:`flexc.data.calibration.CalibrationSet.following`).
  The candidates beside it are the one-shot
  tables: the warm start and, where it nests within the previous budget's table, the
  unconstrained ``coverage`` table at the budget. The one-shot candidate with the lower
  held-out loss is the fallback; the trained table is exported only if its held-out loss is
  lower by more than ``validation_z`` standard errors of the per-sequence paired difference (a
  lower mean on a few sequences can be noise) and (``validation_loss: both``, the default) its
  held-out next-token loss is not higher (the KL and perplexity can disagree by a hair). The
  check looks at the losses after 30%, 50% and 70% of the held-out sequences and stops at the
  first look where every comparison is past ``validation_early_z`` standard errors (a clear win
  or loss needs no more text); otherwise it reads them all. So training is spent at every
  budget, no table is chosen on the batches it was trained on, and a trained table replaces the
  one-shot answer only where held-out text says it is better.
- ``ramp``: ``lambda`` rises, ``tau`` and ``beta`` fall over ``steps``; after every step the
  deployed keep ratio (argmax actions) is compared with the next requested budget, from high
  to low, and a budget's table is exported when the deployed keep first reaches it. If the
  schedule ends first, training continues for at most ``extra_steps`` with lambda doubling;
  budgets still missing then are completed greedily.

Nesting rule (both): a budget's table is capped elementwise by the previous (larger) budget's
table and fitted to the budget by :func:`fit_to_budget` (experts step down where the lower
action loses the least log-probability, or up where the higher one gains the most, never above
the cap). So for every expert, widths never grow as the budget falls, and each table's keep
ratio is at most the budget and short of it by less than one level step of one expert. The
report (``width_tables.json``) says for each budget at which step and how its table was chosen.
Every table a phase starts from, compares or exports is first projected onto the spec's width grid
and bucket bound (``budgets: {grid, max_buckets}``, :mod:`flexc.ir.buckets`), within the budget
and the cap, so the held-out check judges the tables that will be served.

The run checkpoints its state every ``checkpoint_every`` steps (atomically); re-running resumes
from the checkpoint and gives the same tables as an uninterrupted run (the Gumbel noise of step
``t`` is drawn from a generator seeded by (seed, t), batches are indexed by step). A
non-finite loss or logit stops the run with a clear error and keeps the last good checkpoint.
The loop — checkpoints, resume, the divergence checks, the sums over torchrun's processes and the
step bar — is :class:`flexc.utils.training.TrainingRun`'s, as in ``recover``: this module is the
schedules, each a step function.
The model the gates train through is a :mod:`flexc.passes.gated_model`: the graph in memory, or
in a streamed compile the layer model, one decoder layer at a time (same steps, same tables).
Through either, a training step's experts run :func:`flexc.passes.masked_experts.masked_experts`:
only the channels the sample keeps and the actions the nesting allows are computed.

Under torchrun (docs/scale.md, "Several processes") every step still trains on one whole
calibration batch: each rank takes a contiguous share of its sequences
(:func:`flexc.utils.distributed.row_share`; its teacher targets too) and computes its share of
the batch's quality loss, weighted by its share of the sequences (a batch's sequences are equally
long, so the weighted shares add up to the mean over the batch's positions). The loss values and
the logits' gradients are summed over ranks before every update, so every rank makes the same
update; cost and entropy depend on the logits alone, the Gumbel noise on (seed, step) and lambda
on the logits, so the ranks stay in lockstep and a non-finite loss stops all of them at the same
step. The held-out choice sums every rank's per-sequence losses into one process's order, so
every rank chooses the same table. Rank 0 alone writes the checkpoint; every rank resumes from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flexc.ir.buckets import count_buckets
from flexc.ir.tables import WidthTables, budget_price, expected_price
from flexc.passes.action_gates import set_modes
from flexc.passes.base import (MAX_STEPS, Pass, PassContext, PassOptions, PassResult, check_keep_ratios,
                               reject_bool_numbers)
from flexc.passes.distill import TeacherTargets, distill_kl, distill_loss
from flexc.passes.gated_model import GatedModel, gated_model
from flexc.passes.width_tables import expert_weights, fit_to_budget, keep_ratio, per_layer_keep
from flexc.utils import checkpoint, distributed
from flexc.utils.atomic import atomic_path, atomic_write_text
from flexc.utils.training import TrainingRun, fingerprint, restore, restore_optimizer

CHECKPOINT = "anneal_checkpoint.pt"
TABLES_FILE = "width_tables.safetensors"
TABLES_JSON = "width_tables.json"
CURVES_PNG = "anneal_curves.png"
CONTINUATION_DOUBLINGS = 8  # lambda doubles this many times over the extra steps
STEPS_PER_BUDGET = 20  # track's default; on `tiny`, 40 per budget gained little (docs/evaluation.md)
RAMP_STEPS = 200
# Held-out sequences read after the calibration set for the track schedule's choice: on 16
# held-out calibration sequences alone the check could not tell a 0.04% loss (docs/evaluation.md).
VALIDATION_SAMPLES = 64
# Early looks of the held-out check (shares of its sequences) and the default standard errors a
# decision needs there: replayed on the losses of 58 phases (benchmarks/held_out_looks.py) they
# read 44-56% of the text and chose differently from reading it all in 3 (docs/evaluation.md).
EARLY_LOOKS = (0.3, 0.5, 0.7)
EARLY_Z = 2.5


def continuation_lambda(end: float, step: int, extra: int) -> float:
    """The ramp's cost weight at step ``step`` of its ``extra`` continuation steps: double it
    ``CONTINUATION_DOUBLINGS`` times over them. The quality cost of pruning grows steeply at low
    budgets; a linear ramp to 3x the final lambda stalled at keep 0.27 of a 0.2 target on `tiny`."""
    return end * 2 ** (CONTINUATION_DOUBLINGS * (step + 1) / max(extra, 1))


class AnnealDiverged(checkpoint.TrainingDiverged):
    pass


class Schedule(BaseModel):
    """A value that moves from ``start`` to ``end`` over the run's steps."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    start: float
    end: float
    kind: Literal["linear", "cosine", "exponential"] = "linear"

    _no_bools = field_validator("*", mode="before")(classmethod(reject_bool_numbers))

    @model_validator(mode="after")
    def _positive_for_exponential(self):
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError("an exponential schedule needs start > 0 and end > 0")
        return self

    def at(self, step: int, steps: int) -> float:
        frac = min(max(step / max(steps - 1, 1), 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * frac))
        return self.start * (self.end / self.start) ** frac


class AnnealOptions(PassOptions):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schedule: Literal["track", "ramp"] = Field(
        "track", description="track: one phase per budget, high to low, warm-started and held at the budget; "
                             "ramp: one lambda ramp, tables exported as the deployed keep crosses each budget.")
    steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="Training steps (one calibration batch each). track: "
                              "shared equally by the budgets, default 20 per budget (0: the warm start's tables); "
                              "ramp: the scheduled steps, default 200.")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of the action logits.")
    quality: Literal["distill", "next_token"] = Field("distill", description="Quality term of the loss.")
    teacher_topk: int | None = Field(64, ge=1, description="distill: the teacher's top-k next-token "
                                     "probabilities cached per batch (null: the whole distribution).")
    tau: Schedule = Field(Schedule(start=1.0, end=0.1, kind="exponential"),
                          description="Gumbel temperature (track: over each budget's phase).")
    lambda_: Schedule = Field(Schedule(start=0.0, end=0.5, kind="linear"), alias="lambda",
                              description="ramp: weight of the cost term.")
    beta: Schedule = Field(Schedule(start=0.02, end=0.0, kind="cosine"),
                           description="Weight of the entropy bonus (track: over each budget's phase).")
    warm_start: Literal["coverage", "full"] = Field(
        "coverage", description="track: each phase starts from the coverage table at its budget (within the "
                                "previous budget's table), or from full width.")
    start_margin: float = Field(0.5, ge=0, description="track: initial logit advantage of the warm-start action "
                                "(small: training explores the neighbouring widths).")
    validation: float = Field(0.25, ge=0, lt=1, description="track: share of calibration batches held out to "
                              "choose, per budget, between the trained table and the one-shot ones (their windows "
                              "that share a document with a training batch are left out).")
    validation_samples: int = Field(
        VALIDATION_SAMPLES, ge=0, description="track: sequences packed from the calibration source's documents "
        "after the last one the calibration set touched (text the anneal never trains on; a one-document source: "
        "the text after the set's) and added to the held-out check (with validation: 0, the only held-out text). "
        "Left at the default, a source with fewer gives what it has (with a warning); set, a shortfall is an "
        "error. 0: none.")
    validation_z: float = Field(1.0, ge=0, description="track: the trained table is exported only if its held-out "
                                "loss is below the best one-shot table's by more than this many standard errors of "
                                "the per-sequence paired difference (0: any lower mean).")
    validation_early_z: float | None = Field(
        EARLY_Z, ge=0, description="track: the held-out check looks at its losses after 30%, 50% and 70% of its "
        "sequences and stops at the first look where every comparison is past this many standard errors (the "
        "trained table winning on both losses, or losing on one); otherwise it reads them all. null: read them all "
        "before deciding (one sweep per candidate in a streamed compile).")
    validation_loss: Literal["quality", "next_token", "both"] = Field(
        "both", description="track: what the held-out choice compares: the quality term of the loss, the "
                               "next-token loss on the held-out text (what perplexity measures), or both (the "
                               "trained table must win on the quality term by validation_z standard errors and "
                               "not lose on the next-token loss).")
    extra_steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="ramp: bounded continuation if budgets remain, with "
                                    "lambda doubling and fresh optimizer moments (default: half of steps).")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")
    budgets: list[float] | None = Field(None, description="Keep ratios to export (default: the spec's budgets).")
    metric: Literal["params", "flops"] | None = Field(None, description="Budget metric (default: the spec's).")

    @model_validator(mode="before")
    @classmethod
    def _removed_options(cls, data):
        if isinstance(data, dict) and "lambda_lr" in data:
            raise ValueError("lambda_lr was removed: the track schedule sets the budget's price exactly at every "
                             "step (no dual rate to tune); delete the option")
        return data

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, v: list[float] | None) -> list[float] | None:
        return check_keep_ratios(v)

    @model_validator(mode="after")
    def _ramp_needs_steps(self):
        if self.schedule == "ramp" and self.steps is not None and self.steps < 1:
            raise ValueError("the ramp schedule needs steps >= 1")
        if self.schedule == "ramp" and self.validation_samples and "validation_samples" in self.model_fields_set:
            raise ValueError("validation_samples is for the track schedule (the ramp exports at crossings, with no "
                             "held-out check)")
        return self

    def total_steps(self, budgets: int) -> int:
        if self.steps is not None:
            return self.steps
        return STEPS_PER_BUDGET * budgets if self.schedule == "track" else RAMP_STEPS

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        return True


def _budgets(options: AnnealOptions, ctx: PassContext) -> tuple[list[float], str]:
    spec_budgets = getattr(ctx.spec, "budgets", None)
    keep = options.budgets if options.budgets is not None else getattr(spec_budgets, "keep_ratios", None)
    metric = options.metric or getattr(spec_budgets, "metric", None) or "params"
    if not keep:
        raise ValueError("anneal needs budgets: set budgets in the spec or the pass's 'budgets' option")
    return sorted({float(b) for b in keep}, reverse=True), metric


def _noise(seed: int, step: int, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Gumbel noise for ``step``: a function of (seed, step) only, so resumed runs match."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    out = []
    for shape in shapes:
        u = torch.rand(shape, generator=generator).clamp(1e-10, 1 - 1e-10)
        out.append(-torch.log(-torch.log(u)))
    return out


def _held_out_text(calibration, count: int, required: bool, logger) -> list[torch.Tensor]:
    """``validation_samples``: the ``count`` sequences after the calibration set in its own source
    (``required``: set in the spec, so a source without them is an error; else what there is)."""
    following = getattr(calibration, "following", None)  # a CalibrationSet, or one loaded into memory
    if following is None:
        if not required:  # batches given directly (an API caller's): nothing to read past them
            return []
        raise ValueError("anneal: validation_samples reads the sequences that follow the calibration set in "
                         "data.calibration; this run's calibration batches were given directly, with no source "
                         "to read more from")
    batches = following(count, strict=required)
    found = sum(len(b) for b in batches)
    if found < count:
        logger.warning("anneal: the calibration source has %d sequences after the calibration set, not the %d "
                       "validation_samples asks for; the held-out check reads those %d", found, count, found)
    return batches


def _split_by_document(batches: list[torch.Tensor], training: int, calibration, logger) -> list[torch.Tensor]:
    """The calibration batches with the held-out ones (``batches[training:]``) cut to the windows whose
    documents no training batch touched. Batches given directly (no document record), or a set that
    is one document (a single text file), are split by contiguous spans as they are."""
    spans = getattr(calibration, "window_documents", None)
    spans = spans() if spans is not None else None
    if not spans or spans[-1][1] == spans[0][0]:
        return batches
    boundary = spans[sum(len(b) for b in batches[:training]) - 1][1]  # the last training window's last document
    out, offset, dropped = list(batches[:training]), sum(len(b) for b in batches[:training]), 0
    for batch in batches[training:]:
        keep = [r for r in range(len(batch)) if spans[offset + r][0] > boundary]
        offset += len(batch)
        dropped += len(batch) - len(keep)
        if keep:
            out.append(batch[keep])
    if dropped:
        logger.info("anneal: %d held-out calibration sequences share a document with a training batch; the "
                    "held-out check leaves them out", dropped)
    return out


def quality_loss(kind: str, student: torch.Tensor, teacher: TeacherTargets | None, ids: torch.Tensor) -> torch.Tensor:
    if kind == "next_token":
        return F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return distill_loss(student, teacher)


def sequence_losses(kind: str, student: torch.Tensor, teacher: TeacherTargets | None,
                    ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch]`` each: the quality loss and the next-token loss of every sequence (means over its
    positions), from one normalisation of the logits (the vocabulary-wide work of a held-out check)."""
    logp = F.log_softmax(student.float(), dim=-1)
    next_token = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
    return (next_token if kind == "next_token" else distill_kl(logp, teacher, reduction="none").mean(-1)), next_token


def phase_lengths(steps: int, phases: int) -> list[int]:
    """``steps`` shared by ``phases`` budgets, the remainder going to the first (highest) ones."""
    return [steps // phases + (i < steps % phases) for i in range(phases)]


def look_ends(sizes: list[int], shares) -> list[int]:
    """The held-out check's looks, for batches of ``sizes`` sequences: the number of batches that
    first hold each of ``shares`` of the sequences (increasing, short of all), then all of them."""
    total, ends = sum(sizes), []
    for share in shares:
        seen, k = 0, 0
        while seen < share * total:
            seen, k = seen + sizes[k], k + 1
        if (not ends or k > ends[-1]) and k < len(sizes):
            ends.append(k)
    return ends + [len(sizes)]


def snap_to_levels(widths: torch.Tensor, level_widths: torch.Tensor) -> torch.Tensor:
    """``[L, E]`` level indices of the widest action of each layer no wider than ``widths``."""
    return ((level_widths[:, None, :] <= widths[..., None]).sum(-1) - 1).clamp_min(0)


@dataclass
class _Setup:
    """What both schedules work with: the gates, the budget arithmetic and the data."""

    model: GatedModel  # the graph, or the streamed model, the gates are trained through
    gates: list
    logits: list[torch.Tensor]
    budgets: list[float]
    metric: str
    full: torch.Tensor  # [L] intermediate sizes
    weights: torch.Tensor  # [L, E] weight of each expert's width in the keep ratio
    level_widths: torch.Tensor  # [L, A] widths of the actions, ascending
    batches: list[torch.Tensor]  # this rank's sequences of each calibration batch (all of them in one process)
    training: int  # batches[:training] are trained on; the rest are held out (documents no training batch has)
    rows: list[tuple[slice, int]]  # where they lie in their batch, and its number of sequences
    teachers: list[TeacherTargets | None]
    run: TrainingRun  # checkpoints, resume, divergence checks, the step bar

    @property
    def ratios(self) -> torch.Tensor:
        return self.level_widths.float() / self.full[:, None].float()

    def widths(self, levels: torch.Tensor) -> torch.Tensor:
        return self.level_widths[torch.arange(len(self.gates))[:, None], levels]

    def keep(self, levels: torch.Tensor) -> float:
        return keep_ratio(self.widths(levels), self.full, self.weights)

    def deployed_levels(self) -> torch.Tensor:
        return torch.stack([g.deployed_levels() for g in self.gates])

    def check_levels(self, exported: dict, *more: torch.Tensor | None) -> None:
        """A checkpoint's exported tables and saved levels are ``[layers, experts]`` action indices of
        these gates (else ValueError: the checkpoint is another run's, or edited)."""
        shape, actions = tuple(self.deployed_levels().shape), self.level_widths.shape[1]
        tables = [(f"the table of keep {b}", r["levels"]) for b, r in exported.items()]
        for name, levels in [*tables, *(("the saved levels", m) for m in more if m is not None)]:
            if not isinstance(levels, torch.Tensor) or tuple(levels.shape) != shape:
                found = list(levels.shape) if isinstance(levels, torch.Tensor) else type(levels).__name__
                raise ValueError(f"{name} is {found}; expected {list(shape)} (layers, experts)")
            if levels.is_floating_point() or int(levels.min()) < 0 or int(levels.max()) >= actions:
                raise ValueError(f"{name} holds action indices outside 0..{actions - 1}")

    def bind(self, budget: float, deployed: bool = False) -> float:
        """Price every action by its share of the keep ratio so that the sampled tables keep ``budget``
        in expectation (:func:`flexc.ir.tables.expected_price`) or, ``deployed``, the deployed table
        (each expert's argmax action) is at it (:func:`flexc.ir.tables.budget_price`); returns the
        price. The priced logits are what the gates sample, deploy and take probabilities from."""
        for gate in self.gates:
            gate.price = None
        logits = torch.stack([g.masked_logits().detach() for g in self.gates])
        cost = self.weights[:, :, None] * self.ratios[:, None, :]
        price = (budget_price if deployed else expected_price)(logits, cost, budget)
        for gate, row in zip(self.gates, cost):
            gate.price = price * row
        return price

    def preference(self) -> torch.Tensor:
        return torch.stack([F.log_softmax(g.masked_logits().detach(), dim=-1) for g in self.gates])

    def expected_cost_and_entropy(self) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.stack([g.probs() for g in self.gates])  # [L, E, A]
        cost = (self.weights * (probs * self.ratios[:, None, :]).sum(-1)).sum()
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
        return cost, entropy


class Anneal(Pass):
    """Train the action logits and export nested width tables, one per budget."""

    name = "anneal"
    streams = True  # trains the gates through the layer model (gated_model.py)
    reads_source_weights = True
    Options = AnnealOptions
    requires = frozenset({"action_gates"})
    guarantees = frozenset({"width_tables"})
    preserves_computation = True  # gates are left in "full" mode

    # Test hook: called as on_step(step) after each completed step (e.g. to simulate a kill).
    on_step: Callable[[int], None] | None = None

    def run(self, graph, ctx: PassContext) -> PassResult:
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model = gated_model(graph, ctx)
        try:
            setup = self._setup(model, graph, ctx, workdir)
            if self.options.schedule == "track":
                exported, history = self._run_track(graph, ctx, setup)
            else:
                exported, history = self._run_ramp(graph, ctx, setup)
        finally:
            model.close()
            set_modes(model.gates, "full")
            for gate in model.gates:
                gate.noise = None
                gate.max_levels = None
                gate.price = None
                gate.logits.requires_grad_(False)
        self._write_outputs(graph, ctx, workdir, setup, exported, history)
        return PassResult(graph=graph, modified=True, changed_nodes=set())

    # ------------------------------------------------------------------ shared
    def _setup(self, model: GatedModel, graph, ctx: PassContext, workdir: Path) -> _Setup:
        opts = self.options
        budgets, metric = _budgets(opts, ctx)
        gates = model.gates
        logits = [g.logits for g in gates]
        for p in logits:
            p.requires_grad_(True)
        calibration = ctx.calibration_batches()
        whole = list(calibration)
        if not whole:
            raise ValueError("anneal: the calibration data yielded no batches")
        training = len(whole)
        if opts.schedule == "track" and opts.validation > 0:
            held = min(max(round(training * opts.validation), 1), training - 1)
            whole, training = _split_by_document(whole, training - held, calibration, ctx.logger), training - held
        if opts.validation_samples and opts.schedule == "track":
            whole += _held_out_text(calibration, opts.validation_samples,
                                    "validation_samples" in opts.model_fields_set, ctx.logger)
        rows = [(distributed.row_share(len(b), f"anneal: calibration batch {i + 1} of {len(whole)}"), len(b))
                for i, b in enumerate(whole)]
        batches = [b[share] for b, (share, _) in zip(whole, rows)]
        full = torch.tensor([g.intermediate_size for g in graph.groups])
        weights = expert_weights(graph.groups, metric, ctx.state.routing_counts)
        level_widths = torch.stack([g.level_widths for g in gates])  # [L, A]
        lowest = keep_ratio(level_widths[:, :1].expand(-1, weights.shape[1]), full, weights)
        if budgets[-1] < lowest - 1e-9:
            raise ValueError(
                f"anneal: budget keep {budgets[-1]:g} is below the lowest keep ratio the action set reaches "
                f"({lowest:.4g}, every expert at its smallest width); raise the budget, or use more levels or a "
                "smaller granule in insert_action_gates"
            )
        teachers: list[TeacherTargets | None] = [None] * len(batches)
        if opts.quality == "distill":
            # The weights are frozen, so the full-width model's outputs are computed once per batch.
            set_modes(gates, "full")
            teachers = [TeacherTargets.from_logits(out, opts.teacher_topk) for out in model.logits(batches)]
        run = TrainingRun("anneal", workdir / CHECKPOINT,
                          fingerprint(opts.model_dump(mode="json", by_alias=True), budgets, metric, ctx.seed),
                          every=opts.checkpoint_every, logger=ctx.logger, diverged=AnnealDiverged,
                          advice="lr or the lambda schedule", quiet=ctx.quiet)
        return _Setup(model, gates, logits, budgets, metric, full, weights, level_widths, batches, training, rows,
                      teachers, run)

    def _sampled_loss(self, ctx, setup: _Setup, step: int, batch: int, tau: float) -> torch.Tensor:
        """This rank's share of the quality loss of one straight-through sample of actions on calibration
        batch ``batch`` (its loss on its sequences, weighted by their share of the batch's); its gradient
        is left in the logits' ``grad`` (cleared first)."""
        for gate, noise in zip(setup.gates, _noise(ctx.seed, step, [p.shape for p in setup.logits])):
            gate.noise = noise
        set_modes(setup.gates, "sample", tau)
        ids = setup.batches[batch]
        share, rows = setup.rows[batch]
        weight = (share.stop - share.start) / rows
        for p in setup.logits:
            p.grad = None
        return setup.model.loss_backward(
            ids, lambda logits: quality_loss(self.options.quality, logits, setup.teachers[batch], ids) * weight)

    @staticmethod
    def _update(optimizer, quality: torch.Tensor, penalty: torch.Tensor, setup: _Setup, step: int, parts: str) -> float:
        """One optimizer step on the loss ``quality + penalty``; returns the batch's quality loss.

        ``quality`` is this rank's share (:meth:`_sampled_loss`, its gradient already in the logits'
        ``grad``): its value and its gradient are summed over ranks before the step. ``penalty`` (cost
        and entropy) depends on the logits alone, the same on every rank. A non-finite loss or logit
        stops the run on every rank (the last checkpoint stays)."""
        whole = setup.run.sum_over_ranks(quality, setup.logits, "the anneal's quality loss")
        setup.run.check_finite(whole + penalty.detach(), "the loss", step, detail=f"quality {whole.item():.4g}, {parts}")
        penalty.backward()  # adds the penalty's gradient
        optimizer.step()
        setup.run.check_finite_params(setup.logits, "the action logits", step)
        return whole.item()

    def _table_losses(self, setup: _Setup, levels: torch.Tensor, batches: list[int]) -> dict[str, torch.Tensor]:
        """Per-sequence held-out losses of the given calibration batches under the fixed table ``levels``:
        ``"quality"`` (the loss's quality term) and ``"next_token"``, every rank's sequences in one
        process's order (each rank fills its own places; the sum over ranks fills them all)."""
        widths = setup.widths(levels).to(torch.int32)
        for gate, row in zip(setup.gates, widths):
            gate.table = row
        set_modes(setup.gates, "table")
        out = torch.zeros(2, sum(setup.rows[i][1] for i in batches), dtype=torch.float64)
        offset = 0
        with torch.no_grad():
            for i, logits in zip(batches, setup.model.logits(setup.batches[i] for i in batches)):
                ids, (share, rows) = setup.batches[i], setup.rows[i]
                mine = slice(offset + share.start, offset + share.stop)
                quality, next_token = sequence_losses(self.options.quality, logits, setup.teachers[i], ids)
                out[0, mine], out[1, mine] = quality.double(), next_token.double()
                offset += rows
        for gate in setup.gates:
            gate.table = None
        distributed.all_reduce_sum(out, "the held-out losses")
        return {"quality": out[0], "next_token": out[1]}

    # ------------------------------------------------------------------ track
    def _warm_start(self, graph, ctx, setup: _Setup, budget: float, upper: torch.Tensor | None) -> torch.Tensor:
        """The level table training starts from at ``budget``, within ``upper`` (nesting)."""
        if self.options.warm_start == "full":
            levels = torch.full(setup.weights.shape, setup.level_widths.shape[1] - 1, dtype=torch.long)
            levels = levels if upper is None else torch.minimum(levels, upper)
            flat = torch.zeros(*levels.shape, setup.level_widths.shape[1])  # no preference: fill by index order
            levels = fit_to_budget(levels, setup.level_widths, budget, setup.full, setup.weights, flat, upper)
            return self._bucketed(ctx, setup, levels, budget, upper)
        return self._coverage_levels(graph, ctx, setup, budget, upper)

    def _bucketed(self, ctx, setup: _Setup, levels: torch.Tensor, budget: float,
                  upper: torch.Tensor | None) -> torch.Tensor:
        """``levels`` projected onto the spec's width grid and bucket bound (:mod:`flexc.ir.buckets`),
        within ``budget`` and ``upper``: every table a phase exports or compares is a servable one."""
        from flexc.passes.baselines import bucket_bound, bucketed

        bound = bucket_bound(ctx)
        if not bound.active:
            return levels
        granule = math.gcd(*setup.level_widths.flatten().tolist())
        widths = bucketed(setup.widths(levels), bound, granule, budget, setup.full, setup.weights,
                          None if upper is None else setup.widths(upper))
        snapped = snap_to_levels(widths, setup.level_widths)
        return snapped if upper is None else torch.minimum(snapped, upper)

    def _coverage_levels(self, graph, ctx, setup: _Setup, budget: float, upper: torch.Tensor | None) -> torch.Tensor:
        """The ``coverage`` baseline's table at ``budget`` on the actions' grid, within ``upper`` if given."""
        from flexc.passes.baselines import Coverage, granules

        # Coverage on the actions' own grid: widths in multiples of the levels' common divisor.
        grid = math.gcd(*setup.level_widths.flatten().tolist())
        upper_widths = None if upper is None else setup.widths(upper)
        table = Coverage({"granule": grid}).choose(graph, ctx, budget, setup.full, setup.weights,
                                                   granules(graph.groups, grid), upper_widths)
        levels = snap_to_levels(table, setup.level_widths)
        flat = torch.zeros(*levels.shape, setup.level_widths.shape[1])  # no preference: fill by index order
        levels = fit_to_budget(levels, setup.level_widths, budget, setup.full, setup.weights, flat, upper)
        return self._bucketed(ctx, setup, levels, budget, upper)

    def _run_track(self, graph, ctx, setup: _Setup) -> tuple[dict, list]:
        """One phase per budget, high to low: start from the warm-start table (within the previous
        budget's table), train with the budget priced into the logits, then keep the
        trained table or the warm start, whichever has the lower loss on held-out calibration batches."""
        opts = self.options
        train, val = list(range(setup.training)), list(range(setup.training, len(setup.batches)))
        lengths = phase_lengths(opts.total_steps(len(setup.budgets)), len(setup.budgets))

        exported: dict[float, dict] = {}
        history: list[dict] = []
        phase, t, start_levels = 0, 0, None
        optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)

        def restore_from(ckpt: dict) -> None:
            nonlocal exported, history, phase, t, start_levels
            exported, history = ckpt["exported"], ckpt["history"]
            phase, t, start_levels = ckpt["phase"], ckpt["phase_step"], ckpt["start_levels"]
            restore(setup.logits, ckpt["logits"])
            restore_optimizer(optimizer, ckpt["optimizer"])
            setup.check_levels(exported, start_levels)

        setup.run.resume(restore_from)

        def save(step: int) -> None:
            setup.run.save(step, logits=[p.detach().clone() for p in setup.logits], optimizer=optimizer.state_dict(),
                           exported=exported, history=history, phase=phase, phase_step=t, start_levels=start_levels)

        step = sum(lengths[:phase]) + t
        with setup.run.progress(step, sum(lengths), fields=("loss", "keep", "budget")) as bar:
            while phase < len(setup.budgets):
                budget, steps = setup.budgets[phase], lengths[phase]
                upper = exported[setup.budgets[phase - 1]]["levels"] if phase else None
                for gate, row in zip(setup.gates, upper if upper is not None else [None] * len(setup.gates)):
                    gate.max_levels = row
                phase_started = time.perf_counter()
                if start_levels is None:  # a new phase: logits favour the warm start, fresh moments
                    start_levels = self._warm_start(graph, ctx, setup, budget, upper)
                    with torch.no_grad():
                        for p, row in zip(setup.logits, start_levels):
                            p.zero_().scatter_(1, row[:, None], opts.start_margin)
                    optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)
                first = step - t  # the phase's first step, counted over all phases
                setup.bind(budget)  # a function of the logits: the same after a resume

                def train_step(i: int) -> dict:  # the phase's step i
                    nonlocal t
                    tau, beta = opts.tau.at(i, steps), opts.beta.at(i, steps)
                    quality = self._sampled_loss(ctx, setup, first + i, train[(first + i) % len(train)], tau)
                    cost, entropy = setup.expected_cost_and_entropy()
                    quality = self._update(optimizer, quality, -beta * entropy, setup, first + i,
                                           f"cost {cost.item():.4g}, budget {budget:g}")
                    price = setup.bind(budget)  # the deployed table back at the budget
                    deployed = setup.keep(setup.deployed_levels())
                    history.append({"step": first + i, "budget": budget, "price": price, "tau": tau, "beta": beta,
                                    "quality": quality, "cost": cost.item(), "entropy": entropy.item(),
                                    "deployed_keep": deployed})
                    t = i + 1
                    return {"loss": quality, "keep": deployed, "budget": budget}

                setup.run.steps(train_step, t, steps, bar=bar, save=lambda done: save(first + done),  # due: within the phase
                                on_step=lambda i: self.on_step(first + i) if self.on_step is not None else None)
                step = first + steps
                exported[budget] = self._choose(graph, ctx, setup, budget, start_levels, upper, val, step, steps)
                exported[budget]["seconds"] = time.perf_counter() - phase_started  # this run's share, if resumed
                phase, t, start_levels = phase + 1, 0, None
                save(step)
        return exported, history

    def _choose(self, graph, ctx, setup: _Setup, budget, start_levels, upper, val, step, steps) -> dict:
        """The phase's table, from the trained one fitted to the budget and the one-shot candidates: the
        warm start and, where it nests within the previous budget's table, the unconstrained ``coverage``
        table. The one-shot candidate with the lower held-out loss is the fallback; the trained table is
        exported only if its held-out loss is below the fallback's by more than ``validation_z`` standard
        errors of the per-sequence paired difference (a lower mean alone can be noise)."""
        opts = self.options
        setup.bind(budget, deployed=True)
        deployed = setup.deployed_levels()
        fitted = fit_to_budget(deployed, setup.level_widths, budget, setup.full, setup.weights, setup.preference(),
                               upper)
        trained = self._bucketed(ctx, setup, fitted, budget, upper)
        record = {"levels": trained, "step": step, "how": "trained" if steps else "warm start (no steps)",
                  "held_out_sequences": sum(setup.rows[i][1] for i in val),
                  # What training ended with, and how far the budget fit and the bucket bound moved it.
                  "deployed_keep": setup.keep(deployed), "fit_moves": int((fitted != deployed).sum()),
                  "bucket_moves": int((trained != fitted).sum())}
        if not steps:
            return self._log_choice(ctx, budget, steps, record)
        one_shot = {"warm_start": start_levels}
        if upper is not None and opts.warm_start == "coverage":
            free = self._coverage_levels(graph, ctx, setup, budget, None)
            if bool((free <= upper).all()) and not torch.equal(free, start_levels):  # nests: a candidate
                one_shot["coverage"] = free
        same = next((name for name, levels in one_shot.items() if torch.equal(levels, trained)), None)
        if same is not None and len(one_shot) == 1:
            record["how"] = "trained (same table as the warm start)"
            return self._log_choice(ctx, budget, steps, record)
        if not val:
            record["how"] = "trained (no held-out batches to check it on)"
            return self._log_choice(ctx, budget, steps, record)
        scored = list(one_shot) + (["trained"] if same is None else [])
        tables = {**one_shot, "trained": trained}
        held_out: dict = {}
        done = 0
        for end in self._looks(setup, val):  # read the held-out batches up to each look until one decides
            part = {name: self._table_losses(setup, tables[name], val[done:end]) for name in scored}
            held_out = {name: {k: torch.cat([held_out[name][k], v]) if held_out else v for k, v in losses.items()}
                        for name, losses in part.items()}
            done = end
            final = end == len(val)
            verdict = self._verdict(held_out, list(one_shot), same,
                                    opts.validation_z if final else opts.validation_early_z, final=final)
            if verdict is not None:
                break
        read = len(next(iter(held_out.values()))["quality"])
        if same is not None:
            held_out["trained"] = held_out[same]
        ranked_on = "next_token" if opts.validation_loss == "next_token" else "quality"
        losses = {name: float(v[ranked_on].mean()) for name, v in held_out.items()}
        record["validation_loss"] = losses
        record["held_out_read"] = read
        if opts.validation_loss == "both":
            record["validation_next_token"] = {name: float(v["next_token"].mean()) for name, v in held_out.items()}
        if "difference" in verdict:
            record["validation_difference"] = verdict["difference"]
        choice = verdict["choice"]
        early = f" on the first {read} of {record['held_out_sequences']} held-out sequences" if read < \
            record["held_out_sequences"] else ""
        labels = {"trained": "trained table", "warm_start": "warm start", "coverage": "unconstrained coverage table"}
        if choice == "trained":
            notes = [] if same is None else [f"same table as the {labels[same]}"]
            if early:
                notes.append(f"{'won' if same is None else 'decided'}{early}")
            record["how"] = f"trained ({'; '.join(notes)})" if notes else "trained"
        else:
            names = {"warm_start": "warm start", "coverage": "coverage, unconstrained"}
            beaten = [labels[n] for n in losses if n != choice and losses[n] > losses[choice]]
            if len(beaten) == len(losses) - 1:
                why = f"lower held-out loss than the {' and the '.join(beaten)}{early}"
            elif verdict.get("lost_on_text"):
                why = f"the trained table's held-out next-token loss was higher{early}"
            else:
                why = f"the trained table's held-out loss was not lower by {opts.validation_z:g} standard errors"
            record.update(levels=one_shot[choice], how=f"{names[choice]} ({why})")
        return self._log_choice(ctx, budget, steps, record)

    def _looks(self, setup: _Setup, val: list[int]) -> list[int]:
        """How many of the held-out batches ``val`` are read at each look of the check (see
        :func:`look_ends`; one look at the end without ``validation_early_z``)."""
        if self.options.validation_early_z is None:
            return [len(val)]
        return look_ends([setup.rows[i][1] for i in val], EARLY_LOOKS)

    def _verdict(self, held_out: dict, one_shot: list[str], same: str | None, z: float,
                 final: bool = False) -> dict | None:
        """The held-out check on the sequences read so far: ``{"choice": name, ...}``, or (not
        ``final``: an early look) None where they do not decide it at ``z`` standard errors yet.

        The fallback is the one-shot candidate with the lower loss; the trained table replaces it if
        its loss is lower by more than ``z`` standard errors of the per-sequence paired difference
        and (``validation_loss: both``) its next-token loss is not higher. At an early look a choice
        needs every comparison it rests on to be past ``z`` standard errors: between the one-shot
        candidates, and the trained table against the fallback (winning on both losses, or losing
        on one)."""
        opts = self.options
        ranked_on = "next_token" if opts.validation_loss == "next_token" else "quality"

        def paired(a: str, b: str, loss: str) -> tuple[float, float]:  # mean and standard error of a - b
            diff = held_out[a][loss] - held_out[b][loss]
            return float(diff.mean()), float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0

        fallback = min(one_shot, key=lambda name: float(held_out[name][ranked_on].mean()))  # ties: the warm start
        if not final and len(one_shot) > 1:
            mean, se = paired(one_shot[0], one_shot[1], ranked_on)
            if abs(mean) <= z * se:
                return None
        if same is not None:
            return {"choice": "trained" if same == fallback else fallback}
        mean, se = paired("trained", fallback, ranked_on)
        out = {"difference": {"against": fallback, "mean": mean, "standard_error": se}}
        wins = mean < min(0.0, -z * se)
        loses = mean > z * se
        if opts.validation_loss == "both":  # it must not lose on the text itself either
            text_mean, text_se = paired("trained", fallback, "next_token")
            if final:
                out["lost_on_text"] = wins and text_mean > 0
                wins = wins and not out["lost_on_text"]
            else:
                out["lost_on_text"] = text_mean > z * text_se
                wins, loses = wins and text_mean < 0, loses or out["lost_on_text"]
        if wins:
            return {**out, "choice": "trained"}
        if final or loses:
            return {**out, "choice": fallback}
        return None

    @staticmethod
    def _log_choice(ctx, budget, steps, record) -> dict:
        ctx.logger.info("anneal: keep %.3f after %d steps: %s", budget, steps, record["how"])
        return record

    # ------------------------------------------------------------------ ramp
    def _run_ramp(self, graph, ctx, setup: _Setup) -> tuple[dict, list]:
        """One lambda ramp; each budget's table is exported when the deployed keep first reaches it."""
        opts = self.options
        budgets = setup.budgets
        steps = opts.total_steps(len(budgets))
        optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)
        extra = opts.extra_steps if opts.extra_steps is not None else steps // 2
        exported: dict[float, dict] = {}
        history: list[dict] = []

        def restore_from(ckpt: dict) -> None:
            nonlocal exported, history
            restore(setup.logits, ckpt["logits"])
            restore_optimizer(optimizer, ckpt["optimizer"])
            exported, history = ckpt["exported"], ckpt["history"]
            setup.check_levels(exported)

        ckpt = setup.run.resume(restore_from)
        start = ckpt["step"] if ckpt is not None else 0

        def export(budget: float, how: str, step: int) -> None:
            previous = [exported[b]["levels"] for b in sorted(exported) if b > budget]
            upper = previous[0] if previous else None  # the smallest larger budget's table
            levels = fit_to_budget(setup.deployed_levels(), setup.level_widths, budget, setup.full, setup.weights,
                                   setup.preference(), upper)
            levels = self._bucketed(ctx, setup, levels, budget, upper)
            exported[budget] = {"levels": levels, "how": how, "step": step}
            ctx.logger.info("anneal: exported keep %.3f at step %d (%s)", budget, step, how)

        def export_crossed(step: int, deployed_keep: float) -> None:
            for b in budgets:
                if b not in exported and deployed_keep <= b + 1e-9:
                    export(b, "crossing", step)

        def save_checkpoint(step: int) -> None:
            setup.run.save(step, logits=[p.detach().clone() for p in setup.logits], optimizer=optimizer.state_dict(),
                           exported=exported, history=history)

        if start == 0:
            export_crossed(0, setup.keep(setup.deployed_levels()))
        total = steps + extra

        def train_step(step: int) -> dict:
            nonlocal optimizer
            if step == steps and step > start:
                bar.set_total(total)  # the continuation runs: its steps join the bar
            sched = min(step, steps - 1)
            tau, beta = opts.tau.at(sched, steps), opts.beta.at(sched, steps)
            lam = opts.lambda_.at(sched, steps)
            if step == steps:
                # Fresh Adam moments for the continuation: the main phase's second moments keep
                # the now-peaked logits' steps tiny however hard the cost term pushes.
                optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)
            if step >= steps:
                lam = continuation_lambda(opts.lambda_.end, step - steps, extra)
            quality = self._sampled_loss(ctx, setup, step, step % setup.training, tau)
            cost, entropy = setup.expected_cost_and_entropy()
            quality = self._update(optimizer, quality, lam * cost - beta * entropy, setup, step,
                                   f"cost {cost.item():.4g}")
            deployed_keep = setup.keep(setup.deployed_levels())
            history.append({"step": step, "lambda": lam, "tau": tau, "beta": beta, "quality": quality,
                            "cost": cost.item(), "entropy": entropy.item(), "deployed_keep": deployed_keep})
            export_crossed(step, deployed_keep)
            pending = [b for b in budgets if b not in exported]
            return {"loss": quality, "keep": deployed_keep, "next": pending[0] if pending else "-"}

        with setup.run.progress(start, steps if start < steps else total, fields=("loss", "keep", "next")) as bar:
            setup.run.steps(train_step, start, total, bar=bar, save=save_checkpoint,
                            on_step=lambda step: self.on_step(step) if self.on_step is not None else None,
                            until=lambda: len(exported) == len(budgets))

        missing = [b for b in budgets if b not in exported]
        for b in missing:  # greedy completion, from the last (lowest) exported table
            export(b, "greedy", len(history))
        if missing:
            ctx.logger.warning("anneal: budgets %s were not reached by training and were completed greedily",
                               ", ".join(f"keep {b:g}" for b in missing))
        save_checkpoint(len(history))
        return exported, history

    # ------------------------------------------------------------------ outputs
    def _write_outputs(self, graph, ctx, workdir, setup: _Setup, exported, history):
        budgets, metric, full, weights = setup.budgets, setup.metric, setup.full, setup.weights
        chosen = WidthTables(budgets, torch.stack([setup.widths(exported[b]["levels"]) for b in budgets]), metric,
                             layers=[g.layer for g in graph.groups], full=[g.intermediate_size for g in graph.groups])
        chosen.save(workdir / TABLES_FILE)
        tables = chosen.tables
        report = {
            "metric": metric,
            "schedule": self.options.schedule,
            "granule_widths": setup.level_widths.tolist(),
            "budgets": [
                {
                    "keep_target": b,
                    "keep_achieved": keep_ratio(tables[i], full, weights),
                    "params_keep_achieved": keep_ratio(tables[i], full, expert_weights(graph.groups, "params")),
                    "per_layer_keep": per_layer_keep(tables[i], full),
                    "widths_per_layer": count_buckets(tables[i]),
                    "exported_at_step": exported[b]["step"],
                    "how": exported[b]["how"],
                    **{k: exported[b][k] for k in ("deployed_keep", "fit_moves", "bucket_moves",
                                                   "held_out_sequences", "held_out_read", "validation_loss",
                                                   "validation_next_token", "validation_difference", "seconds")
                       if k in exported[b]},
                }
                for i, b in enumerate(budgets)
            ],
        }
        atomic_write_text(workdir / TABLES_JSON, json.dumps(report, indent=2))
        atomic_write_text(workdir / "anneal_history.json", json.dumps(history))
        if history:
            plot_curves(history, budgets, workdir / CURVES_PNG)
        ctx.state.width_tables = chosen


def plot_curves(history: list[dict], budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.2))
    dual = "price" if "price" in history[0] else "lambda"  # track prices the budget; ramp weighs the cost
    for ax, key, title in zip(axes, (dual, "tau", "cost", "quality", "deployed_keep"),
                              (dual, "tau", "expected keep (cost)", "quality loss", "deployed keep ratio")):
        ax.plot(steps, [h[key] for h in history], linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "deployed_keep":
            for b in budgets:
                ax.axhline(b, color="gray", linestyle=":", linewidth=0.8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
