"""Resumable training checkpoints of the runs that train (``anneal``, ``recover``: :mod:`flexc.utils.training`).

A checkpoint holds tensors, numbers, strings, lists and dicts only; it is read with
``torch.load(weights_only=True)``, which refuses anything else, so a crafted file in a stage
folder cannot run code when a compile resumes. Each checkpoint carries the fingerprint of the
options it was made with; one made with other options is not resumed from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from flexc.errors import FlexcError
from flexc.utils.atomic import atomic_path


class CheckpointError(FlexcError):
    """A checkpoint file exists but is not one this pass wrote."""


class TrainingDiverged(FlexcError):
    """A training pass's loss or parameters became non-finite; its last good checkpoint is kept."""


def how_to_go_on(what: str, options: str) -> str:
    """The end of a divergence message: what to change, and what a change means for resuming."""
    return (f"Lower {options} of the {what} pass and compile again (with --force, or into another --out: the spec "
            f"changed). The {what} then starts over: its checkpoint belongs to the options that diverged.")


def save(path: Path, fingerprint: str, step: int, **payload: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save({"fingerprint": fingerprint, "step": step, **payload}, tmp)


def load(path: Path, fingerprint: str, what: str, logger: logging.Logger) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and was made with ``fingerprint``, else None."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling refused, truncated file, not a torch file at all
        raise CheckpointError(
            f"{path}: not a readable {what} checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"delete it to start {what} over"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("fingerprint"), str) or not isinstance(
            ckpt.get("step"), int):
        raise CheckpointError(f"{path}: not a {what} checkpoint (no fingerprint and step); delete it to start over")
    if ckpt["fingerprint"] != fingerprint:
        logger.warning("%s: ignoring a checkpoint made with other options (%s)", what, path)
        return None
    logger.info("%s: resuming from step %d (%s)", what, ckpt["step"], path)
    return ckpt
