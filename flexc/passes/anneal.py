"""``anneal``: train only the action logits; export one nested width table per budget.

Options (:mod:`flexc.passes.anneal_options`): the run (``steps``, ``lr``, ``quality``, ...),
``schedule`` (how the logits train) and ``selection`` (the held-out check, :mod:`flexc.passes.table_selection`).

Loss = quality + lambda * cost - beta * entropy, where

- quality is the KL divergence from the full-width model's next-token distribution
  (``distill``, default; the teacher's outputs are computed once per calibration batch, see
  :mod:`flexc.passes.distill`) or the next-token loss (``next_token``);
- cost = sum over experts of weight[l, e] * sum_a p_e(a) * r_a: the expected keep ratio under
  the clean action distribution, weighted in the budget metric (parameters, or load-weighted
  FLOPs — see :mod:`flexc.passes.width_tables`); the ramp's term (the track schedule prices it);
- entropy is the mean entropy of the clean action distributions.

Two schedules (``schedule.kind``):

- ``track`` (default): one phase per budget, high to low, ``steps`` shared equally. A phase
  starts from a warm-start table at its budget (the ``coverage`` baseline's, within the
  previous budget's table; or full width), with the logits favouring it by ``start_margin``
  and every action above the previous budget's table excluded. How the budget binds
  (``schedule.binding``):

  - ``dual`` (default): ``lambda`` follows the budget by dual ascent on the expected keep (rate
    ``lambda_lr``). The deployed table (argmax actions) can drift above the budget while the
    expected keep stays under it; the budget fit then cuts it back by log-probability.
  - ``price``: every action's logit is lowered by ``price * (its share of the keep ratio)``; after
    every step the price is set so that the sampled tables keep the budget in expectation, and at
    the phase's end so that the deployed table is at the budget
    (:func:`flexc.ir.tables.expected_price`, :func:`~flexc.ir.tables.budget_price`: bisection,
    exact each step). The deployed keep then ends each phase at the budget, but the tables it
    exports measured worse than ``dual``'s on the two prose zoo models kept out of tuning, so it
    is not the default (docs/evaluation.md).

  ``tau`` and ``beta`` run their schedules within the phase. At the phase's end the deployed table
  is fitted to the budget and the held-out check (:class:`~flexc.passes.table_selection.HeldOutCheck`)
  chooses between it and the one-shot tables on text from documents no training batch came from:
  the calibration batches no phase trains on (``selection.share``, a quarter; windows that share a
  document with a training batch left out) and ``selection.samples`` (64) sequences, the first window
  of each of the documents after the calibration set's. So training is spent at every budget, no table is chosen
  on the batches it was trained on, and a trained table replaces the one-shot answer only where
  held-out text says it is better.
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

import torch
import torch.nn.functional as F

from flexc.ir.buckets import count_buckets
from flexc.ir.tables import WidthTables, budget_price, expected_price
from flexc.passes.action_gates import set_modes
from flexc.passes.anneal_options import AnnealOptions
from flexc.passes.base import Pass, PassContext, PassResult
from flexc.passes.distill import TeacherTargets, distill_loss
from flexc.passes.gated_model import GatedModel, gated_model
from flexc.passes.table_selection import HeldOutCheck, held_out_text, split_by_document
from flexc.passes.width_tables import expert_weights, fit_to_budget, keep_ratio, per_layer_keep
from flexc.utils import checkpoint, distributed
from flexc.utils.atomic import atomic_path, atomic_write_text
from flexc.utils.training import TrainingRun, fingerprint, restore, restore_optimizer

CHECKPOINT = "anneal_checkpoint.pt"
TABLES_FILE = "width_tables.safetensors"
TABLES_JSON = "width_tables.json"
CANDIDATES_JSON = "held_out_candidates.json"
CURVES_PNG = "anneal_curves.png"
CONTINUATION_DOUBLINGS = 8  # lambda doubles this many times over the extra steps


def continuation_lambda(end: float, step: int, extra: int) -> float:
    """The ramp's cost weight at step ``step`` of its ``extra`` continuation steps: double it
    ``CONTINUATION_DOUBLINGS`` times over them. The quality cost of pruning grows steeply at low
    budgets; a linear ramp to 3x the final lambda stalled at keep 0.27 of a 0.2 target on `tiny`."""
    return end * 2 ** (CONTINUATION_DOUBLINGS * (step + 1) / max(extra, 1))


class AnnealDiverged(checkpoint.TrainingDiverged):
    pass


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


def quality_loss(kind: str, student: torch.Tensor, teacher: TeacherTargets | None, ids: torch.Tensor) -> torch.Tensor:
    if kind == "next_token":
        return F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return distill_loss(student, teacher)


def phase_lengths(steps: int, phases: int) -> list[int]:
    """``steps`` shared by ``phases`` budgets, the remainder going to the first (highest) ones."""
    return [steps // phases + (i < steps % phases) for i in range(phases)]


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
            if self.options.schedule.kind == "track":
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
        if opts.schedule.kind == "track" and opts.selection.share > 0:
            held = min(max(round(training * opts.selection.share), 1), training - 1)
            whole, training = split_by_document(whole, training - held, calibration, ctx.logger), training - held
        if opts.selection.samples and opts.schedule.kind == "track":
            whole += held_out_text(calibration, opts.selection.samples, "samples" in opts.selection.model_fields_set,
                                   ctx.logger)
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

    # ------------------------------------------------------------------ track
    def _warm_start(self, graph, ctx, setup: _Setup, budget: float, upper: torch.Tensor | None) -> torch.Tensor:
        """The level table training starts from at ``budget``, within ``upper`` (nesting)."""
        if self.options.schedule.warm_start == "full":
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

        priced = opts.schedule.binding == "price"
        exported: dict[float, dict] = {}
        history: list[dict] = []
        phase, t, lam, start_levels = 0, 0, 0.0, None
        optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)

        def restore_from(ckpt: dict) -> None:
            nonlocal exported, history, lam, phase, t, start_levels
            exported, history, lam = ckpt["exported"], ckpt["history"], ckpt["lambda"]
            phase, t, start_levels = ckpt["phase"], ckpt["phase_step"], ckpt["start_levels"]
            restore(setup.logits, ckpt["logits"])
            restore_optimizer(optimizer, ckpt["optimizer"])
            setup.check_levels(exported, start_levels)

        setup.run.resume(restore_from)

        def save(step: int) -> None:
            setup.run.save(step, logits=[p.detach().clone() for p in setup.logits], optimizer=optimizer.state_dict(),
                           exported=exported, history=history, phase=phase, phase_step=t, start_levels=start_levels,
                           **{"lambda": lam})

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
                            p.zero_().scatter_(1, row[:, None], opts.schedule.start_margin)
                    optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)
                first = step - t  # the phase's first step, counted over all phases
                if priced:
                    setup.bind(budget)  # a function of the logits: the same after a resume

                def train_step(i: int) -> dict:  # the phase's step i
                    nonlocal lam, t
                    tau, beta = opts.schedule.tau.at(i, steps), opts.schedule.beta.at(i, steps)
                    quality = self._sampled_loss(ctx, setup, first + i, train[(first + i) % len(train)], tau)
                    cost, entropy = setup.expected_cost_and_entropy()
                    quality = self._update(optimizer, quality, (0.0 if priced else lam) * cost - beta * entropy, setup,
                                           first + i, f"cost {cost.item():.4g}, budget {budget:g}")
                    if priced:
                        dual = {"price": setup.bind(budget)}  # the sampled tables back at the budget
                    else:  # dual ascent on the expected keep
                        lam = max(0.0, lam + opts.schedule.lambda_lr * (cost.item() - budget))
                        dual = {"lambda": lam}
                    deployed = setup.keep(setup.deployed_levels())
                    history.append({"step": first + i, "budget": budget, **dual, "tau": tau, "beta": beta,
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
        exported only if its held-out loss is below the fallback's by more than ``selection.z`` standard
        errors of the per-sequence paired difference (a lower mean alone can be noise)."""
        opts = self.options
        if opts.schedule.binding == "price":
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
        if upper is not None and opts.schedule.warm_start == "coverage":
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
        return self._log_choice(ctx, budget, steps, HeldOutCheck(opts.selection, opts.quality).choose(
            setup, record, trained, one_shot, same, val))

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
        extra = opts.schedule.extra_steps if opts.schedule.extra_steps is not None else steps // 2
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
            tau, beta = opts.schedule.tau.at(sched, steps), opts.schedule.beta.at(sched, steps)
            lam = opts.schedule.lambda_.at(sched, steps)
            if step == steps:
                # Fresh Adam moments for the continuation: the main phase's second moments keep
                # the now-peaked logits' steps tiny however hard the cost term pushes.
                optimizer = torch.optim.Adam(setup.logits, lr=opts.lr)
            if step >= steps:
                lam = continuation_lambda(opts.schedule.lambda_.end, step - steps, extra)
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
            "schedule": self.options.schedule.kind,
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
        candidates = [{"keep_target": b, "chosen": exported[b]["chosen"], "widths": exported[b]["candidate_widths"]}
                      for b in budgets if "candidate_widths" in exported[b]]
        if candidates:  # the tables each held-out check scored: flexc.compiler.held_out_check scores them on other text
            atomic_write_text(workdir / CANDIDATES_JSON, json.dumps({"budgets": candidates}))
        else:  # no check ran: an earlier run's candidates in this folder would describe other tables
            (workdir / CANDIDATES_JSON).unlink(missing_ok=True)
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
