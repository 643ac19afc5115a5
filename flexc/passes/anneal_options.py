"""``anneal``'s options: the training run at the top, ``schedule`` (how the action logits train) and
``selection`` (how each budget's table is chosen on held-out text) as groups.

    anneal:
      steps: 60
      schedule: {kind: track, start_margin: 0.5}     # or just `schedule: ramp`
      selection: {samples: 64, z: 1.0}

The flat names of earlier releases (``validation_samples``, ``start_margin``, ...) are refused with
the new name to use.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flexc.passes.base import MAX_STEPS, PassOptions, check_keep_ratios, reject_bool_numbers

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

#: Flat option names of earlier releases and where they went.
MOVED = {
    "validation": "selection: {share: ...}",
    "validation_samples": "selection: {samples: ...}",
    "validation_z": "selection: {z: ...}",
    "validation_early_z": "selection: {early_z: ...}",
    "validation_loss": "selection: {loss: ...}",
    "tau": "schedule: {tau: ...}",
    "beta": "schedule: {beta: ...}",
    "lambda": "schedule: {lambda: ...}",
    "warm_start": "schedule: {warm_start: ...}",
    "start_margin": "schedule: {start_margin: ...}",
    "extra_steps": "schedule: {extra_steps: ...}",
    "lambda_lr": "schedule: {lambda_lr: ...}",
}


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


class TrainingSchedule(BaseModel):
    """How the action logits train."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    kind: Literal["track", "ramp"] = Field(
        "track", description="track: one phase per budget, high to low, warm-started and held at the budget by a "
                             "price on the actions; ramp: one lambda ramp, tables exported as the deployed keep "
                             "crosses each budget.")
    tau: Schedule = Field(Schedule(start=1.0, end=0.1, kind="exponential"),
                          description="Gumbel temperature (track: over each budget's phase).")
    beta: Schedule = Field(Schedule(start=0.02, end=0.0, kind="cosine"),
                           description="Weight of the entropy bonus (track: over each budget's phase).")
    lambda_: Schedule = Field(Schedule(start=0.0, end=0.5, kind="linear"), alias="lambda",
                              description="ramp: weight of the cost term.")
    warm_start: Literal["coverage", "full"] = Field(
        "coverage", description="track: each phase starts from the coverage table at its budget (within the "
                                "previous budget's table), or from full width.")
    start_margin: float = Field(0.5, ge=0, description="track: initial logit advantage of the warm-start action "
                                "(small: training explores the neighbouring widths).")
    binding: Literal["dual", "price"] = Field(
        "dual", description="track: how the budget binds. dual: lambda follows the expected keep by dual ascent "
        "(the deployed table may drift above the budget; the budget fit cuts it back); price: every step the "
        "actions are priced so the sampled tables keep the budget in expectation, and at the phase's end so the "
        "deployed table is at it (measured worse on the prose zoo models, docs/evaluation.md).")
    lambda_lr: float = Field(5.0, ge=0, description="track, binding dual: dual ascent rate of lambda on (expected "
                             "keep - budget).")
    extra_steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="ramp: bounded continuation if budgets "
                                    "remain, with lambda doubling and fresh optimizer moments (default: half of steps).")

    _no_bools = field_validator("*", mode="before")(classmethod(reject_bool_numbers))

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, data):
        return {"kind": data} if isinstance(data, str) else data  # `schedule: ramp`


class Selection(BaseModel):
    """track: how each budget's table is chosen, on held-out text from documents no training batch came from."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    _no_bools = field_validator("*", mode="before")(classmethod(reject_bool_numbers))

    share: float = Field(0.25, ge=0, lt=1, description="Share of calibration batches held out to choose, per "
                         "budget, between the trained table and the one-shot ones (their windows that share a "
                         "document with a training batch are left out).")
    samples: int = Field(
        VALIDATION_SAMPLES, ge=0, description="Sequences read from the calibration source's documents after the "
        "last one the calibration set touched, the first window of each (text the anneal never trains on, from as "
        "many documents; a one-document source: the text after the set's) and added to the held-out check (with share: 0, the only held-out text). Left at the "
        "default, a source with fewer gives what it has (with a warning); set, a shortfall is an error. 0: none.")
    z: float = Field(1.0, ge=0, description="The trained table is exported only if its held-out loss is below the "
                     "best one-shot table's by more than this many standard errors of the per-sequence paired "
                     "difference (0: any lower mean).")
    early_z: float | None = Field(
        EARLY_Z, ge=0, description="The check looks at its losses after 30%, 50% and 70% of its sequences and stops "
        "at the first look where every comparison is past this many standard errors (the trained table winning on "
        "both losses, or losing on one); otherwise it reads them all. null: read them all before deciding (one "
        "sweep per candidate in a streamed compile).")
    loss: Literal["quality", "next_token", "both"] = Field(
        "both", description="What the choice compares: the quality term of the loss, the next-token loss on the "
                            "held-out text (what perplexity measures), or both (the trained table must win on the "
                            "quality term by z standard errors and not lose on the next-token loss).")


class AnnealOptions(PassOptions):
    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="Training steps (one calibration batch each). "
                              "track: shared equally by the budgets, default 20 per budget (0: the warm start's "
                              "tables); ramp: the scheduled steps, default 200.")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of the action logits.")
    quality: Literal["distill", "next_token"] = Field("distill", description="Quality term of the loss.")
    teacher_topk: int | None = Field(64, ge=1, description="distill: the teacher's top-k next-token "
                                     "probabilities cached per batch (null: the whole distribution).")
    schedule: TrainingSchedule = Field(TrainingSchedule(), description="How the action logits train (`kind`: track "
                                       "or ramp, and its settings); a bare `track` / `ramp` is the kind.")
    selection: Selection = Field(Selection(), description="track: the held-out check that chooses each budget's "
                                 "table.")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")
    budgets: list[float] | None = Field(None, description="Keep ratios to export (default: the spec's budgets).")
    metric: Literal["params", "flops"] | None = Field(None, description="Budget metric (default: the spec's).")

    @model_validator(mode="before")
    @classmethod
    def _moved_and_removed(cls, data):
        if not isinstance(data, dict):
            return data
        moved = [name for name in MOVED if name in data]
        if moved:
            raise ValueError("anneal's options are grouped now; use " + "; ".join(f"{name} -> {MOVED[name]}"
                                                                                  for name in moved))
        return data

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, v: list[float] | None) -> list[float] | None:
        return check_keep_ratios(v)

    @model_validator(mode="after")
    def _ramp_needs_steps(self):
        if self.schedule.kind == "ramp" and self.steps is not None and self.steps < 1:
            raise ValueError("the ramp schedule needs steps >= 1")
        if self.schedule.kind == "ramp" and "selection" in self.model_fields_set:
            raise ValueError("selection is for the track schedule (the ramp exports at crossings, with no held-out "
                             "check)")
        return self

    def total_steps(self, budgets: int) -> int:
        if self.steps is not None:
            return self.steps
        return STEPS_PER_BUDGET * budgets if self.schedule.kind == "track" else RAMP_STEPS

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        return True
