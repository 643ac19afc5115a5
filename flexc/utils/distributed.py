"""Data-parallel compile under torchrun: the process group and the few collectives flexc uses.

``torchrun --nproc_per_node N flexc compile spec.yaml`` starts N processes with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous address in their environment. :func:`session`
joins them into one ``torch.distributed`` process group (gloo on CPU, NCCL when the model runs
on CUDA), with a timeout after which a collective that a peer never joins fails the run
(``FLEXC_DIST_TIMEOUT`` seconds, default 1800). Rank 0 is the writer. In one process (no
torchrun) every helper here is a no-op: rank 0 of a world of one.

The calibration passes deal whole batches to ranks (:func:`shard`); the training passes
(``anneal``, ``recover``), whose every step is one batch, split each batch's sequences instead
(:func:`row_share`).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import signal
import threading
from collections.abc import Iterable, Iterator

from flexc.errors import FlexcError

TIMEOUT_ENV = "FLEXC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(FlexcError):
    """A rank stopped, or did not answer within the timeout: the whole run fails (exit status 2)."""


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun); readable before and after a session."""
    return int(os.environ.get("RANK", "0"))


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    if not _group_active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    if not _group_active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def is_writer() -> bool:
    """Whether this process writes the output directory (rank 0; the only process without torchrun)."""
    return rank() == 0


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise FlexcError(f"{TIMEOUT_ENV} must be a positive number of seconds; found {raw!r}")
    return value


@contextlib.contextmanager
def session(device: str) -> Iterator[None]:
    """Join torchrun's process group for the block (nothing without torchrun, or when a caller
    already joined one); ``device`` is the spec's ``model.device``: CUDA picks NCCL, else gloo."""
    import torch
    import torch.distributed as dist

    if _launched_world() <= 1 or _group_active():
        yield
        return
    timeout = timeout_seconds()
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_cuda else "gloo"
    if backend == "nccl":  # one GPU per rank on a node; a plain "cuda" then means this rank's
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {launched_rank()}: cannot join the torchrun process group ({backend}) within "
                               f"{timeout:g}s: {exc}") from None
    main_thread = threading.current_thread() is threading.main_thread()  # where Python allows signal handlers
    previous = signal.signal(signal.SIGTERM, _stopped_by_torchrun) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def _stopped_by_torchrun(signum, frame) -> None:
    # torchrun ends every rank with SIGTERM when one fails: raise, so the stage is recorded as failed.
    raise DistributedError(f"rank {rank()}: stopped by torchrun, which ends every rank when one fails (its summary "
                           "names the rank); run the same command again to resume after the last completed stage")


def _collective_failed(doing: str, exc: BaseException) -> DistributedError:
    return DistributedError(
        f"rank {rank()}: {doing} failed: another rank stopped, or did not answer within {timeout_seconds():g}s "
        f"({TIMEOUT_ENV}); run the same command again to resume after the last completed stage "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def _all_reduce(tensor, doing: str):
    import torch
    import torch.distributed as dist

    here = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tensor if tensor.device == here else tensor.to(here)  # NCCL reduces CUDA tensors, gloo CPU ones
    try:
        dist.all_reduce(buffer)
    except RuntimeError as exc:
        raise _collective_failed(doing, exc) from None
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_sum(tensor, what: str):
    """Sum ``tensor`` over every rank, in place (and return it); ``what`` names it in an error."""
    return _all_reduce(tensor, f"summing {what} over ranks") if world_size() > 1 else tensor


def broadcast(value, what: str):
    """Rank 0's ``value`` (anything picklable) on every rank; ``what`` names it in an error."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:
        raise _collective_failed(f"sending {what} to every rank", exc) from None
    return box[0]


def barrier(where: str) -> None:
    """Wait until every rank gets ``where`` (a one-element sum: the same timeout and error as any collective)."""
    if world_size() > 1:
        import torch

        _all_reduce(torch.zeros(1), f"waiting for every rank at {where}")


class Shard:
    """This rank's share of a sized iterable of batches: batch ``i`` goes to rank ``i % world``."""

    def __init__(self, batches: Iterable, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.batches), self.rank, None, self.world)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.world))


def shard(batches: Iterable) -> Iterable:
    """This rank's calibration batches (all of them in one process). Every rank must get one:
    fewer batches than ranks is a user error."""
    world = world_size()
    if world == 1:
        return batches
    if not hasattr(batches, "__len__"):
        return itertools.islice(iter(batches), rank(), None, world)
    if len(batches) < world:
        raise FlexcError(f"{len(batches)} calibration batch(es) for {world} ranks: every rank needs at least one; "
                         "raise data.calibration.num_samples or lower batch_size, or start fewer processes")
    return Shard(batches, rank(), world)


def row_share(rows: int, what: str) -> slice:
    """This rank's sequences of a batch of ``rows``: rank ``r`` gets ``[r * rows // world, (r + 1) * rows //
    world)``, so the ranks' shares in rank order are the batch in order (all of it in one process).
    Every rank must get one: fewer rows than ranks is a user error (``what`` names the batch)."""
    world, here = world_size(), rank()
    if rows < world:
        raise FlexcError(f"{what} has {rows} sequence(s) for {world} ranks, and each rank needs at least one of "
                         "every batch: raise data.calibration.batch_size (the last batch holds what is left of "
                         "num_samples), or start fewer processes")
    return slice(here * rows // world, (here + 1) * rows // world)
