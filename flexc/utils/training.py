"""The one training loop: :class:`TrainingRun`, used by ``anneal``, ``recover`` and the zoo trainer.

A method that trains (the anneal's schedules, recover's fine-tune, the zoo's pre-training)
describes its run once — its name, its checkpoint file and the fingerprint of everything the
checkpoint depends on, how often to checkpoint — and hands the loop one function that trains
one step. The run owns the rest:

- :meth:`TrainingRun.resume`: the checkpoint, if one was made with this fingerprint (one made
  with other options is ignored, with a warning; a file that is not a checkpoint is an error),
  applied by the method's ``restore`` inside :meth:`TrainingRun.restoring`; :func:`restore`
  copies saved tensors back into parameters, :func:`restore_optimizer` an optimizer's state;
- :meth:`TrainingRun.steps`: steps ``[start, total)`` in order — the step function, the progress
  bar, an atomic checkpoint every ``every`` steps (:mod:`flexc.utils.checkpoint`: tensors and
  plain values only, read back with ``weights_only``), the test hook, an early stop;
- :meth:`TrainingRun.sum_over_ranks`: under torchrun, a step's loss and gradients summed over
  the processes, so every rank takes the same step (rank 0 alone writes the checkpoint, every
  rank resumes from it);
- :meth:`TrainingRun.check_finite` and :meth:`TrainingRun.check_finite_params`: a non-finite
  loss or gradient norm, or parameters made non-finite by an update, stop the run with the
  method's :class:`~flexc.utils.checkpoint.TrainingDiverged` error, saying where the last good
  checkpoint is and what to change.

A reader still sees a method's schedule in order, in its step function::

    run = TrainingRun("recover", workdir / CHECKPOINT, fingerprint(options, seed), every=25, ...)
    ckpt = run.resume(lambda ckpt: restore(params, ckpt["params"]))
    def step(i):
        loss = run.sum_over_ranks(part_of_the_loss(i), params, "the loss")
        run.check_finite(loss, "the loss", i)
        optimizer.step()
        return {"loss": loss.item()}
    with run.progress(start, total) as bar:
        run.steps(step, start, total, bar=bar, save=lambda done: run.save(done, params=...))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from flexc.utils import checkpoint, distributed
from flexc.utils.progress import StepBar, step_progress

#: Below this many gradient values, a step's loss and gradients travel in one collective; above
#: it, each gradient is summed in place (no second copy of every gradient). The environment
#: variable FLEXC_PACKED_REDUCTION_LIMIT overrides it (the tests run both ways under torchrun).
PACKED_REDUCTION_LIMIT = 1 << 20


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able ``parts`` (options, budgets, seed, shapes): what a checkpoint belongs to."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:16]


class TrainingRun:
    """One training run: its loop, checkpoints, resume, divergence checks, progress and reductions.

    ``path`` is the checkpoint file (None: a run that is never checkpointed, such as a zoo model's
    pre-training); ``diverged`` is the method's error class; ``advice`` names the options to lower
    when it diverges; ``unchanged`` says what a divergence leaves untouched (e.g. the weights).
    """

    def __init__(self, name: str, path: Path | None, fingerprint: str = "", *, every: int | None = None,
                 logger: logging.Logger | None = None,
                 diverged: type[checkpoint.TrainingDiverged] = checkpoint.TrainingDiverged, advice: str = "lr",
                 unchanged: str = "", quiet: bool = False):
        self.name, self.path, self.fingerprint, self.every = name, Path(path) if path else None, fingerprint, every
        self.logger = logger or logging.getLogger("flexc")
        self.diverged, self.advice, self.unchanged, self.quiet = diverged, advice, unchanged, quiet

    # ------------------------------------------------------------------ resume and checkpoints
    def resume(self, restore: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """The saved checkpoint (with its ``step``) if it belongs to this run, else None; ``restore(ckpt)``
        applies it, inside :meth:`restoring`. Under torchrun, rank 0's, sent to every rank: they resume
        in lockstep."""
        if self.path is None:
            return None
        ckpt = checkpoint.load(self.path, self.fingerprint, self.name, self.logger) if distributed.is_writer() else None
        ckpt = distributed.broadcast(ckpt, f"the {self.name} checkpoint")
        if ckpt is not None and restore is not None:
            with self.restoring():
                restore(ckpt)
        return ckpt

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step`` completed steps."""
        return self.path is not None and self.every is not None and step % self.every == 0

    def save(self, step: int, **payload: Any) -> None:
        """Checkpoint the run after ``step`` completed steps (atomically; under torchrun, rank 0 alone)."""
        if self.path is not None and distributed.is_writer():
            checkpoint.save(self.path, self.fingerprint, step, **payload)

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Apply a resumed checkpoint: a payload of the wrong kind, shape or range (edited, or another
        run's) is an error naming the file, not a raw traceback or a silently broadcast tensor."""
        try:
            yield
        except checkpoint.CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as exc:
            why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise checkpoint.CheckpointError(
                f"{self.path}: does not fit this {self.name} run ({why}); delete it to start {self.name} over"
            ) from None

    # ------------------------------------------------------------------ the loop
    @contextlib.contextmanager
    def progress(self, start: int, total: int, description: str | None = None,
                 fields: tuple[str, ...] = ("loss",)) -> Iterator[StepBar]:
        """The step bar of steps ``[start, total)`` (silent with ``quiet`` or off a terminal)."""
        with step_progress(total, completed=start, description=description or self.name, fields=fields,
                           disable=self.quiet) as bar:
            yield bar

    def steps(self, step: Callable[[int], dict[str, Any]], start: int, total: int, *, bar: StepBar,
              save: Callable[[int], None] | None = None, on_step: Callable[[int], None] | None = None,
              until: Callable[[], bool] | None = None) -> int:
        """Steps ``[start, total)`` in order: ``step(i)`` trains step ``i`` and returns what the bar shows;
        then, when a checkpoint is due after ``i + 1`` steps, ``save(i + 1)``; then ``on_step(i)`` (a test
        hook). Stops before a step when ``until()`` holds. Returns the number of steps done."""
        done = start
        for i in range(start, total):
            if until is not None and until():
                break
            bar.advance(**step(i))
            done = i + 1
            if save is not None and self.due(done):
                save(done)
            if on_step is not None:
                on_step(i)
        return done

    # ------------------------------------------------------------------ torchrun and divergence
    def sum_over_ranks(self, loss: torch.Tensor, params: Iterable[torch.Tensor], what: str) -> torch.Tensor:
        """This rank's part of a step's ``loss`` and the gradients it left in ``params``, summed over the
        processes (nothing to do in one): the whole batch's loss is returned, the gradients replaced."""
        params = [p for p in params if p.grad is not None]  # None on every rank alike (the same graph)
        if distributed.world_size() == 1:
            return loss.detach().clone()
        limit = int(os.environ.get("FLEXC_PACKED_REDUCTION_LIMIT", PACKED_REDUCTION_LIMIT))
        if sum(p.numel() for p in params) <= limit:  # one collective
            summed = distributed.all_reduce_sum(
                torch.cat([loss.detach().reshape(1), *(p.grad.flatten() for p in params)]), f"{what} and its gradient")
            for p, grad in zip(params, summed[1:].split([p.numel() for p in params])):
                p.grad = grad.view_as(p).clone()
            return summed[0]
        whole = distributed.all_reduce_sum(loss.detach().clone(), what)
        for p in params:  # in place, one at a time
            distributed.all_reduce_sum(p.grad, f"the gradients of {what}")
        return whole

    def check_finite(self, value: torch.Tensor, what: str, step: int, detail: str = "") -> None:
        """Stop the run if ``value`` (a loss, a gradient norm) is not finite; ``detail`` (e.g. the
        loss's terms) is added to the message in parentheses."""
        if not torch.isfinite(value):
            detail = f" ({detail})" if detail else ""
            self._diverged(f"{what} became {value.item()} at step {step}{detail}")

    def check_finite_params(self, params: Iterable[torch.Tensor], what: str, step: int) -> None:
        """Stop the run if an optimizer update made any of ``params`` non-finite (the loss before it was finite)."""
        if not all(torch.isfinite(p).all() for p in params):
            self._diverged(f"{what} became non-finite after the update of step {step}")

    def _diverged(self, what_happened: str) -> None:
        kept = f"the last good checkpoint is kept at {self.path}. " if self.path is not None else ""
        raise self.diverged(f"{self.name}: {what_happened}; {self.unchanged}{kept}"
                            + checkpoint.how_to_go_on(self.name, self.advice))


@torch.no_grad()
def restore(params: Iterable[torch.Tensor], saved: Iterable[torch.Tensor]) -> None:
    """Copy a checkpoint's saved tensors back into ``params``, in order (in place: optimizers keep them).
    Each must have its parameter's exact shape (``copy_`` would broadcast a smaller one) and be finite."""
    params, saved = list(params), list(saved)
    if len(saved) != len(params):
        raise ValueError(f"it holds {len(saved)} trained tensors; this run trains {len(params)}")
    for i, (p, value) in enumerate(zip(params, saved)):
        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
            found = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"trained tensor {i} is {found}; expected {list(p.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"trained tensor {i} holds non-finite values")
    for p, value in zip(params, saved):
        p.copy_(value)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state; its moment tensors must have their parameters' shapes
    (``load_state_dict`` checks only the number of parameters)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"the optimizer's {key} of trained tensor {i} is {list(value.shape)}; "
                                     f"expected {list(p.shape)}")
