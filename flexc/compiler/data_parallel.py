"""What a compile does differently under torchrun (docs/scale.md, "Several processes").

Every rank loads the model and runs every pass. The passes that calibrate take only their
rank's batches (:func:`flexc.utils.distributed.shard`) and sum what they collect over ranks
(routing statistics, channel scores, expert norms), so every rank then holds the state one
process would have over all the batches, and the passes after it (uniform, coverage,
fold_masks) compute the same thing on every rank without talking. The training passes,
``anneal`` and ``recover``, split the sequences of each of their batches over the ranks instead
and sum their gradients every step (:mod:`flexc.passes.anneal`, :mod:`flexc.passes.recover`),
so every rank trains the same action logits or LoRA adapters.

Rank 0 alone writes the output directory (manifest, stage folders, ``state/``, exports, the
report); the other ranks read its manifest and ``state/`` to resume where it resumes, put
their passes' stage folders in a scratch folder of their own, and stop after the last pass.
A barrier ends every pass stage, so that no rank starts a stage before every rank finished
the one before, and rank 0 never rewrites ``state/`` while another rank reads it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flexc.compiler.artifacts import RunDir, read_manifest
from flexc.compiler.errors import FlexcError
from flexc.utils import distributed


def data_parallel_problems(spec) -> list[str]:
    """Why ``spec`` cannot compile with several processes (empty when it can)."""
    problems = []
    if spec.model.device.startswith("cuda:"):
        problems.append(f"model.device {spec.model.device!r} puts every rank on one GPU; use device: cuda (each rank "
                        "then runs on cuda:LOCAL_RANK)")
    if not spec.pipeline:
        problems.append("an empty pipeline only copies the model: there is nothing to split across processes")
    for i, entry in enumerate(spec.pipeline, 1):
        why = entry.pass_class.data_parallel_problem(entry.pass_options)
        if why:
            problems.append(f"pipeline step {i}: {why}")
    return problems


def check_data_parallel(spec) -> None:
    """Refuse, in one message, what a compile with several processes cannot do (nothing in one process)."""
    if distributed.world_size() == 1:
        return
    problems = data_parallel_problems(spec)
    if problems:
        raise FlexcError(f"this spec cannot compile with {distributed.world_size()} processes (torchrun): "
                         + "; ".join(problems) + "; run it in one process (plain `flexc compile`)")


@dataclass
class FollowerRun(RunDir):
    """Rank 0's output directory as another rank sees it: its manifest, read once; the records
    this rank makes stay in memory (:meth:`save` writes nothing). ``scratch`` holds this rank's
    stage folders and is deleted by :meth:`close`."""

    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=f"flexc-rank{distributed.rank()}-")))

    def save(self) -> None:
        pass

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def open_run(out_dir: Path, fingerprint: str, *, force: bool, protected: dict[str, Path]) -> RunDir:
    """Rank 0 opens (creates, resumes or clears) the output directory; the other ranks wait for it,
    then read its manifest. With several nodes the directory must be on a filesystem they all mount."""
    if distributed.is_writer():
        run = RunDir.open(out_dir, fingerprint, force=force, protected=protected)
        distributed.barrier("the opening of the output directory")
        return run
    distributed.barrier("the opening of the output directory")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise distributed.DistributedError(
            f"rank {distributed.rank()} cannot see the output directory {out_dir} that rank 0 opened: on several "
            "nodes, --out (export.dir) must be on a filesystem every node mounts, at the same path")
    return FollowerRun(Path(out_dir), manifest, resumed=bool(manifest.get("stages")))


def stages_dir(run: RunDir) -> Path:
    """Where the passes' stage folders go: ``<out>/stages`` on rank 0, the scratch folder elsewhere."""
    return run.scratch if isinstance(run, FollowerRun) else run.path / "stages"
