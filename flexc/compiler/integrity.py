"""What a run directory's manifest vouches for: a digest of every file a stage wrote.

A stage's files are hashed when it completes and the digests recorded in its manifest record
(``files``: path relative to the run directory → sha256); the compile state is hashed before it
replaces ``state/`` (``manifest["state"]``, with the state it replaced kept as ``state_before``
so a run killed between the two writes still resumes). Before a resume skips a stage, loads the
state, or reports a run up to date, and before ``flexc compare`` reuses a run, the files are
hashed again: a file edited, truncated or deleted since is an error naming it and the remedy,
never a run that completes with different artifacts.

What a digest cannot see (a state flexc itself wrote wrong, a run of an older flexc) the loaders
check by meaning: :meth:`flexc.ir.state.CompileState.check`, the graph's permutations and widths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flexc.compiler.errors import OutputDirError

CHUNK = 1 << 20


class RunIntegrityError(OutputDirError):
    """A file of a run directory differs from what its manifest recorded."""


def remedy(run_dir: Path) -> str:
    return f"compile again with --force to start {run_dir} over, or choose another directory (--out)"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digests(folder: Path, root: Path, prefix: str | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its path relative to ``root`` (or, when
    ``prefix`` is given, by ``prefix/<path relative to folder>``: a folder hashed before it is
    renamed into place)."""
    folder = Path(folder)
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = f"{prefix}/{f.relative_to(folder).as_posix()}" if prefix is not None else f.relative_to(root).as_posix()
        out[rel] = sha256(f)
    return out


def verify(root: Path, files: dict[str, Any], what: str) -> None:
    """Each of ``files`` (relative to ``root``) still has its recorded digest; ``what`` names who wrote them."""
    root = Path(root)
    if not isinstance(files, dict):
        raise RunIntegrityError(f"{root / 'manifest.json'}: the record of {what} is damaged (its 'files' is not a "
                                f"mapping); {remedy(root)}")
    for rel, digest in files.items():
        if not isinstance(rel, str) or ".." in Path(rel).parts or Path(rel).is_absolute():
            raise RunIntegrityError(f"{root / 'manifest.json'}: {what} records a file outside the run ({rel!r}); "
                                    f"{remedy(root)}")
        path = root / rel
        if not path.is_file():
            raise RunIntegrityError(f"{path}: written by {what}, now missing; {remedy(root)}")
        if sha256(path) != digest:
            raise RunIntegrityError(f"{path}: changed since {what} wrote it (its sha256 no longer matches "
                                    f"{root / 'manifest.json'}); {remedy(root)}")


def verify_stages(run_dir: Path, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """The files of each done stage in ``names`` (those a resume skips) are as recorded."""
    records = {r.get("name"): r for r in manifest.get("stages", []) if isinstance(r, dict)}
    for name in names:
        record = records.get(name)
        if record is None or record.get("status") != "done":
            continue
        if "files" not in record:
            raise RunIntegrityError(f"{Path(run_dir) / 'manifest.json'}: stage {name} is recorded as done but lists "
                                    f"no files (the manifest was edited, or written by an older flexc); "
                                    f"{remedy(Path(run_dir))}")
        verify(run_dir, record["files"], f"stage {name}")


def record_state(manifest: dict[str, Any], stage: str, files: dict[str, str]) -> None:
    """Record the digests of the state ``stage`` is about to move into ``state/`` (keeping the
    current state's, for a run killed before the move)."""
    if isinstance(manifest.get("state"), dict):
        manifest["state_before"] = manifest["state"]
    manifest["state"] = {"stage": stage, "files": files}


def verify_state(run_dir: Path, manifest: dict[str, Any], stage: str) -> None:
    """``state/`` holds the state ``stage`` saved, as recorded (before it is loaded on a resume)."""
    for key in ("state", "state_before"):
        record = manifest.get(key)
        if isinstance(record, dict) and record.get("stage") == stage:
            verify(run_dir, record.get("files"), f"stage {stage}")
            return
    raise RunIntegrityError(f"{Path(run_dir) / 'state'}: holds the state of stage {stage}, which "
                            f"{Path(run_dir) / 'manifest.json'} does not record (edited, or written by an older "
                            f"flexc); {remedy(Path(run_dir))}")
