"""``anneal``: train only the action logits; export one nested width table per budget.

Loss = quality + lambda * cost - beta * entropy, where

- quality is the KL divergence from the full-width model's next-token distribution
  (``distill``, default: the teacher is the same graph with every gate at full width, so no
  second model is held) or the next-token loss (``next_token``);
- cost = sum over experts of weight[l, e] * sum_a p_e(a) * r_a: the expected keep ratio under
  the clean action distribution, weighted in the budget metric (parameters, or load-weighted
  FLOPs — see :mod:`flexc.passes.width_tables`);
- entropy is the mean entropy of the clean action distributions.

``lambda`` rises while ``tau`` and ``beta`` fall on their schedules. After every step, the
deployed keep ratio (argmax actions, in the budget metric) is compared with the next requested
budget, from high to low; when it reaches it, that budget's width table is exported.

Nesting rule: the table exported for a budget is the deployed argmax table capped elementwise
by the previous (larger) budget's table, then fitted to the budget by :func:`fit_to_budget`
(experts step down where the lower action loses the least log-probability, or up where the
higher action gains the most, never above the cap). So for every expert, widths never grow as
the budget falls, and each table's keep ratio is at most the budget and short of it by less
than one level step of one expert.

If the schedule ends before the lowest budgets are reached, training continues for at most
``extra_steps`` with lambda growing linearly beyond its end value; budgets still missing then
are completed greedily from the last exported table by the same fitting rule. The report says
which budgets were exported by crossing and which by the greedy rule.

The run checkpoints its state every ``checkpoint_every`` steps (atomically); re-running resumes
from the checkpoint and gives the same tables as an uninterrupted run (the Gumbel noise of step
``t`` is drawn from a generator seeded by (seed, t), batches are indexed by step). A
non-finite loss stops the run with a clear error and keeps the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import save_file

from flexc.passes import checkpoint
from flexc.passes.action_gates import gates_of, set_gate_mode
from flexc.passes.base import Pass, PassContext, PassOptions, PassResult, check_keep_ratios, reject_bool_numbers
from flexc.passes.registry import register_pass
from flexc.passes.width_tables import expert_weights, fit_to_budget, keep_ratio, per_layer_keep
from flexc.utils.atomic import atomic_path, atomic_write_text
from flexc.utils.progress import step_progress

CHECKPOINT = "anneal_checkpoint.pt"
TABLES_FILE = "width_tables.safetensors"
TABLES_JSON = "width_tables.json"
CURVES_PNG = "anneal_curves.png"
CONTINUATION_DOUBLINGS = 8  # lambda doubles this many times over the extra steps


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

    steps: int = Field(200, ge=1, description="Scheduled training steps (one calibration batch each).")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of the action logits.")
    quality: Literal["distill", "next_token"] = Field("distill", description="Quality term of the loss.")
    tau: Schedule = Field(Schedule(start=1.0, end=0.1, kind="exponential"), description="Gumbel temperature.")
    lambda_: Schedule = Field(Schedule(start=0.0, end=0.5, kind="linear"), alias="lambda",
                              description="Weight of the cost term.")
    beta: Schedule = Field(Schedule(start=0.02, end=0.0, kind="cosine"), description="Weight of the entropy bonus.")
    extra_steps: int | None = Field(None, ge=0, description="Bounded continuation if budgets remain, with "
                                    "lambda doubling and fresh optimizer moments (default: half of steps).")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")
    budgets: list[float] | None = Field(None, description="Keep ratios to export (default: the spec's budgets).")
    metric: Literal["params", "flops"] | None = Field(None, description="Budget metric (default: the spec's).")

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, v: list[float] | None) -> list[float] | None:
        return check_keep_ratios(v)

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


def quality_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    if kind == "next_token":
        return F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


@register_pass
class Anneal(Pass):
    """Train the action logits on an annealed schedule and export nested width tables."""

    name = "anneal"
    Options = AnnealOptions
    requires = frozenset({"action_gates"})
    guarantees = frozenset({"width_tables"})
    preserves_computation = True  # gates are left in "full" mode

    # Test hook: called as on_step(step) after each completed step (e.g. to simulate a kill).
    on_step: Callable[[int], None] | None = None

    def _fingerprint(self, budgets, metric, ctx) -> str:
        payload = json.dumps([self.options.model_dump(mode="json", by_alias=True), budgets, metric, ctx.seed],
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def run(self, graph, ctx: PassContext) -> PassResult:
        opts = self.options
        workdir = Path(ctx.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        budgets, metric = _budgets(opts, ctx)
        gates = gates_of(graph)
        logits = [g.logits for g in gates]
        for p in graph.model.parameters():
            p.requires_grad_(False)
        for p in logits:
            p.requires_grad_(True)
        batches = [b for b in ctx.calibration_batches()]
        if not batches:
            raise ValueError("anneal: the calibration data yielded no batches")
        full = torch.tensor([g.intermediate_size for g in graph.groups])
        weights = expert_weights(graph.groups, metric, ctx.state.get("routing_counts"))
        level_widths = torch.stack([g.level_widths for g in gates])  # [L, A]
        ratios = level_widths.float() / full[:, None].float()
        optimizer = torch.optim.Adam(logits, lr=opts.lr)
        extra = opts.extra_steps if opts.extra_steps is not None else opts.steps // 2
        fingerprint = self._fingerprint(budgets, metric, ctx)
        lowest = keep_ratio(level_widths[:, :1].expand(-1, weights.shape[1]), full, weights)
        if budgets[-1] < lowest - 1e-9:
            raise ValueError(
                f"anneal: budget keep {budgets[-1]:g} is below the lowest keep ratio the action set reaches "
                f"({lowest:.4g}, every expert at its smallest width); raise the budget, or use more levels or a "
                "smaller granule in insert_action_gates"
            )

        exported: dict[float, dict] = {}
        history: list[dict] = []
        start = 0
        ckpt_path = workdir / CHECKPOINT
        ckpt = checkpoint.load(ckpt_path, fingerprint, "anneal", ctx.logger)
        if ckpt is not None:
            with torch.no_grad():
                for p, saved in zip(logits, ckpt["logits"]):
                    p.copy_(saved)
            optimizer.load_state_dict(ckpt["optimizer"])
            exported, history, start = ckpt["exported"], ckpt["history"], ckpt["step"]

        def deployed_levels() -> torch.Tensor:
            return torch.stack([g.deployed_levels() for g in gates])

        def preference() -> torch.Tensor:
            return torch.stack([F.log_softmax(p.detach(), dim=-1) for p in logits])

        def export(budget: float, how: str, step: int) -> None:
            previous = [exported[b]["levels"] for b in sorted(exported) if b > budget]
            upper = previous[0] if previous else None  # the smallest larger budget's table
            levels = fit_to_budget(deployed_levels(), level_widths, budget, full, weights, preference(), upper)
            exported[budget] = {"levels": levels, "how": how, "step": step}
            ctx.logger.info("anneal: exported keep %.3f at step %d (%s)", budget, step, how)

        def export_crossed(step: int, deployed_keep: float) -> None:
            for b in budgets:
                if b not in exported and deployed_keep <= b + 1e-9:
                    export(b, "crossing", step)

        def save_checkpoint(step: int) -> None:
            checkpoint.save(ckpt_path, fingerprint, step, logits=[p.detach().clone() for p in logits],
                            optimizer=optimizer.state_dict(), exported=exported, history=history)

        if start == 0:
            export_crossed(0, keep_ratio(level_widths[torch.arange(len(gates))[:, None], deployed_levels()],
                                         full, weights))
        total = opts.steps + extra
        with step_progress(opts.steps if start < opts.steps else total, completed=start, description="anneal",
                           fields=("loss", "keep", "next"), disable=ctx.quiet) as bar:
            try:
                for step in range(start, total):
                    if len(exported) == len(budgets):
                        break
                    if step == opts.steps and step > start:
                        bar.set_total(total)  # the continuation runs: its steps join the bar
                    sched = min(step, opts.steps - 1)
                    tau, beta = opts.tau.at(sched, opts.steps), opts.beta.at(sched, opts.steps)
                    lam = opts.lambda_.at(sched, opts.steps)
                    if step == opts.steps:
                        # Fresh Adam moments for the continuation: the main phase's second moments keep
                        # the now-peaked logits' steps tiny however hard the cost term pushes.
                        optimizer = torch.optim.Adam(logits, lr=opts.lr)
                    if step >= opts.steps:
                        # Bounded continuation: double the cost weight CONTINUATION_DOUBLINGS times over
                        # the extra steps. The quality cost of pruning grows steeply at low budgets; a
                        # linear ramp to 3x the final lambda stalled at keep 0.27 of a 0.2 target on `tiny`.
                        lam = opts.lambda_.end * 2 ** (CONTINUATION_DOUBLINGS * (step - opts.steps + 1) / max(extra, 1))
                    ids = batches[step % len(batches)]
                    teacher = None
                    if opts.quality == "distill":
                        set_gate_mode(graph, "full")
                        with torch.no_grad():
                            teacher = graph.logits(ids)
                    for gate, noise in zip(gates, _noise(ctx.seed, step, [p.shape for p in logits])):
                        gate.noise = noise
                    set_gate_mode(graph, "sample", tau)
                    student = graph.logits(ids)
                    quality = quality_loss(opts.quality, student, teacher, ids)
                    probs = torch.stack([F.softmax(p, dim=-1) for p in logits])  # [L, E, A]
                    cost = (weights * (probs * ratios[:, None, :]).sum(-1)).sum()
                    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
                    loss = quality + lam * cost - beta * entropy
                    if not torch.isfinite(loss):
                        raise AnnealDiverged(
                            f"anneal: the loss became {loss.item()} at step {step} (quality {quality.item():.4g}, "
                            f"cost {cost.item():.4g}); the last good checkpoint is kept at {ckpt_path}. "
                            + checkpoint.how_to_go_on("anneal", "lr or the lambda schedule")
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if not all(torch.isfinite(p).all() for p in logits):
                        raise AnnealDiverged(
                            f"anneal: the action logits became non-finite after the update of step {step}; the last "
                            f"good checkpoint is kept at {ckpt_path}. "
                            + checkpoint.how_to_go_on("anneal", "lr or the lambda schedule")
                        )
                    levels = deployed_levels()
                    deployed_keep = keep_ratio(level_widths[torch.arange(len(gates))[:, None], levels], full, weights)
                    history.append({"step": step, "lambda": lam, "tau": tau, "beta": beta, "quality": quality.item(),
                                    "cost": cost.item(), "entropy": entropy.item(), "deployed_keep": deployed_keep})
                    export_crossed(step, deployed_keep)
                    pending = [b for b in budgets if b not in exported]
                    bar.advance(loss=loss.item(), keep=deployed_keep, next=pending[0] if pending else "-")
                    if (step + 1) % opts.checkpoint_every == 0:
                        save_checkpoint(step + 1)
                    if self.on_step is not None:
                        self.on_step(step)
            finally:
                set_gate_mode(graph, "full")
                for gate in gates:
                    gate.noise = None
                for p in logits:
                    p.requires_grad_(False)

        missing = [b for b in budgets if b not in exported]
        for b in missing:  # greedy completion, from the last (lowest) exported table
            export(b, "greedy", len(history))
        if missing:
            ctx.logger.warning("anneal: budgets %s were not reached by training and were completed greedily",
                               ", ".join(f"keep {b:g}" for b in missing))
        save_checkpoint(len(history))
        self._write_outputs(graph, ctx, workdir, budgets, metric, exported, history, level_widths, full, weights)
        return PassResult(graph=graph, modified=True, changed_nodes=set())

    def _write_outputs(self, graph, ctx, workdir, budgets, metric, exported, history, level_widths, full, weights):
        rows = torch.arange(len(graph.groups))[:, None]
        tables = torch.stack([level_widths[rows, exported[b]["levels"]].to(torch.int32) for b in budgets])
        with atomic_path(workdir / TABLES_FILE) as tmp:
            save_file({"budgets": torch.tensor(budgets), "widths": tables}, str(tmp),
                      metadata={"metric": metric, "layers": json.dumps([g.layer for g in graph.groups])})
        report = {
            "metric": metric,
            "granule_widths": level_widths.tolist(),
            "budgets": [
                {
                    "keep_target": b,
                    "keep_achieved": keep_ratio(tables[i], full, weights),
                    "params_keep_achieved": keep_ratio(tables[i], full, expert_weights(graph.groups, "params")),
                    "per_layer_keep": per_layer_keep(tables[i], full),
                    "exported_at_step": exported[b]["step"],
                    "how": exported[b]["how"],
                }
                for i, b in enumerate(budgets)
            ],
        }
        atomic_write_text(workdir / TABLES_JSON, json.dumps(report, indent=2))
        atomic_write_text(workdir / "anneal_history.json", json.dumps(history))
        if history:
            plot_curves(history, budgets, workdir / CURVES_PNG)
        ctx.state["width_budgets"] = torch.tensor(budgets)
        ctx.state["width_tables"] = tables
        ctx.state["width_metric"] = metric


def plot_curves(history: list[dict], budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.2))
    for ax, key, title in zip(axes, ("lambda", "tau", "cost", "quality", "deployed_keep"),
                              ("lambda", "tau", "expected keep (cost)", "quality loss", "deployed keep ratio")):
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
