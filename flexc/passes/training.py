"""What every training pass needs to be resumable: :class:`TrainingRun`.

A pass that trains (``anneal``, ``recover``) describes its run once — its name, its checkpoint
file, the fingerprint of everything the checkpoint depends on, how often to checkpoint — and
gets:

- :meth:`TrainingRun.resume`: the checkpoint, if one was made with this fingerprint (one made
  with other options is ignored, with a warning; a file that is not a checkpoint is an error);
  :func:`restore` copies its saved tensors back into the parameters;
- :meth:`TrainingRun.due` and :meth:`TrainingRun.save`: an atomic checkpoint every ``every``
  steps (:mod:`flexc.passes.checkpoint`: tensors and plain values only, read back with
  ``weights_only``);
- :meth:`TrainingRun.check_finite` and :meth:`TrainingRun.check_finite_params`: a non-finite
  loss or gradient norm, or parameters made non-finite by an update, stop the run with the
  pass's :class:`~flexc.passes.checkpoint.TrainingDiverged` error, saying where the last good
  checkpoint is and what to change;
- :meth:`TrainingRun.progress`: the step bar, starting where a resumed run left off.

Under torchrun (``anneal``, ``recover``), rank 0 alone writes the checkpoint, and every rank resumes from it.

The loop itself stays in the pass, so a reader sees its steps (its schedule) in order::

    run = TrainingRun("recover", workdir / CHECKPOINT, fingerprint(options, seed), every=25, ...)
    ckpt = run.resume()                       # restore parameters, optimizer, history from it
    with run.progress(start, total) as bar:
        for step in range(start, total):
            loss = ...
            run.check_finite(loss, "the loss", step)
            ...
            bar.advance(loss=loss.item())
            if run.due(step + 1):
                run.save(step + 1, params=..., optimizer=..., history=...)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from flexc.passes import checkpoint
from flexc.utils import distributed
from flexc.utils.progress import StepBar, step_progress


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able ``parts`` (options, budgets, seed, shapes): what a checkpoint belongs to."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:16]


class TrainingRun:
    """The checkpointing, resuming and divergence checks of one training pass's run.

    ``diverged`` is the pass's error class; ``advice`` names the options to lower when it
    diverges; ``unchanged`` says what a divergence leaves untouched (e.g. the weights).
    """

    def __init__(self, name: str, path: Path, fingerprint: str, *, every: int, logger: logging.Logger,
                 diverged: type[checkpoint.TrainingDiverged] = checkpoint.TrainingDiverged, advice: str = "lr",
                 unchanged: str = "", quiet: bool = False):
        self.name, self.path, self.fingerprint, self.every = name, Path(path), fingerprint, every
        self.logger, self.diverged, self.advice, self.unchanged, self.quiet = logger, diverged, advice, unchanged, quiet

    def resume(self) -> dict[str, Any] | None:
        """The saved checkpoint (with its ``step``) if it belongs to this run, else None. Under
        torchrun, rank 0's, sent to every rank: they resume in lockstep."""
        ckpt = checkpoint.load(self.path, self.fingerprint, self.name, self.logger) if distributed.is_writer() else None
        return distributed.broadcast(ckpt, f"the {self.name} checkpoint")

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step`` completed steps."""
        return step % self.every == 0

    def save(self, step: int, **payload: Any) -> None:
        """Checkpoint the run after ``step`` completed steps (atomically; under torchrun, rank 0 alone)."""
        if distributed.is_writer():
            checkpoint.save(self.path, self.fingerprint, step, **payload)

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
        raise self.diverged(
            f"{self.name}: {what_happened}; {self.unchanged}the last good checkpoint is kept at {self.path}. "
            + checkpoint.how_to_go_on(self.name, self.advice))

    @contextlib.contextmanager
    def progress(self, start: int, total: int, description: str | None = None,
                 fields: tuple[str, ...] = ("loss",)) -> Iterator[StepBar]:
        """The step bar of steps ``[start, total)`` (silent with ``quiet`` or off a terminal)."""
        with step_progress(total, completed=start, description=description or self.name, fields=fields,
                           disable=self.quiet) as bar:
            yield bar


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
