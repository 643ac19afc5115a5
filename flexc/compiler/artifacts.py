"""The output directory of a compile: layout, manifest, atomic writes, resume.

Layout of ``<out>/``::

    manifest.json    what ran: flexc and library versions, seed, spec fingerprint,
                     one record per stage (status, seconds, outputs), the outputs
    spec.yaml        the spec as run
    compile.log      the full log (appended by every run)
    report.md        budgets, sizes, held-out perplexity, widths, stage times (figures in report/)
    base/            the loaded model as a Hugging Face checkpoint (empty pipeline only)
    state/           graph + compile state after the last completed pass (for resume)
    <format>/        one directory per export format
    stages/          one folder per pass: its scores, tables, plots, training checkpoints
    compare/         what ``flexc compare`` writes when given this run
    .flexc.lock      held by the compile writing the directory (a second one is refused);
                     kept after release, since deleting a lock file races with a new locker

Every file is written to a temporary sibling and renamed into place; every directory is
built in a temporary sibling and renamed. ``--force`` deletes only what a flexc run wrote
(:func:`check_clearable`): never a directory without a flexc manifest, one holding other
files, one that contains the working directory, the spec, the model or the data, or one
inside a version-controlled tree that does not ignore it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flexc.compiler.errors import OutputDirError
from flexc.utils.atomic import atomic_path, default_mode
from flexc.utils.versions import library_versions  # noqa: F401 -- artifacts.library_versions()

MANIFEST = "manifest.json"
SPEC_FILE = "spec.yaml"
LOG_FILE = "compile.log"
REPORT_FILE = "report.md"
STATE_DIR = "state"
BASE_DIR = "base"
MANIFEST_KIND = "flexc-compile-run"
MANIFEST_VERSION = 2  # 2: stage records list the digests of their files (integrity.py)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically, with ordinary permissions."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it becomes ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        default_mode(tmp)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, target: Path) -> None:
    """Rename ``src`` to ``target``, replacing a previous ``target`` (moved aside, then deleted)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(src, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, target)


# --------------------------------------------------------------------------- run directory

LOCK_FILE = ".flexc.lock"
# Top-level entries a compile writes besides its manifest's outputs (export folders).
_RUN_ENTRIES = frozenset({MANIFEST, SPEC_FILE, LOG_FILE, REPORT_FILE, STATE_DIR, BASE_DIR, LOCK_FILE,
                          "report", "stages", "graphs", "compare"})
_VCS_MARKERS = (".git", ".hg", ".svn")


def _written_by_flexc(name: str, manifest: dict[str, Any]) -> bool:
    exports = {r["name"].removeprefix("export:") for r in manifest.get("stages", [])
               if isinstance(r, dict) and str(r.get("name", "")).startswith("export:")}
    outputs = {str(v) for v in manifest.get("outputs", {}).values()} if isinstance(manifest.get("outputs"), dict) else set()
    temporary = name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)
    return name in _RUN_ENTRIES or name in exports or name in outputs or temporary


def _version_control_root(p: Path) -> Path | None:
    for d in (p, *p.parents):
        if any((d / m).exists() for m in _VCS_MARKERS):
            return d
    return None


def _git_ignores(p: Path, root: Path) -> bool:
    """Whether git ignores ``p`` (a run folder under an ignored ``runs/`` is fine to clear)."""
    import subprocess

    if not (root / ".git").exists():
        return False  # Mercurial, Subversion: no cheap answer, so never clear inside them
    try:
        done = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(p)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def check_clearable(path: Path, manifest: dict[str, Any] | None, protected: dict[str, Path]) -> None:
    """Raise unless deleting ``path``'s contents can lose nothing but what a flexc run wrote.

    ``protected`` names paths that must survive (the working directory, the spec, the model
    and data files): a directory that is or contains one of them is never cleared.
    """
    p = path.resolve()

    def refuse(why: str) -> OutputDirError:
        return OutputDirError(f"refusing to clear output directory {path}: {why}; flexc only deletes what a flexc "
                              "run wrote — choose another directory (--out) or empty it yourself")

    if p in {Path.home().resolve(), Path(p.anchor)}:
        raise refuse("it is a home or root directory")
    for what, q in protected.items():
        q = Path(q).expanduser().resolve()
        if q == p or p in q.parents:
            raise refuse(f"it contains the {what} ({q})")
    root = _version_control_root(p)
    if root is not None and (root == p or not _git_ignores(p, root)):
        raise refuse(f"it lies inside the version-controlled tree {root} (and is not ignored by it)")
    if manifest is None:
        raise refuse(f"it holds files and no flexc {MANIFEST}")
    foreign = sorted(c.name for c in p.iterdir() if not _written_by_flexc(c.name, manifest))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise refuse(f"it holds files that no flexc run wrote ({shown})")


def _has_results(manifest: dict[str, Any]) -> bool:
    """Whether a run finished anything worth keeping (a stage beyond loading and lowering)."""
    return manifest.get("status") == "complete" or any(
        r.get("status") == "done" and r.get("name") not in ("load", "lower")
        for r in manifest.get("stages", []) if isinstance(r, dict))


@dataclass
class RunDir:
    """An output directory and its manifest, locked for one compile at a time."""

    path: Path
    manifest: dict[str, Any]
    resumed: bool = False
    lock: Any = None
    made: str | None = None  # "folder": this run created the directory; "contents": it was empty

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Path, fingerprint: str, *, force: bool = False,
             protected: dict[str, Path] | None = None) -> "RunDir":
        """Open ``path`` for a run of the spec with ``fingerprint``; release with :meth:`close`.

        A new or empty directory starts a fresh run; a flexc run of the same spec resumes; a
        failed run of another spec that finished no stage is replaced; anything else needs
        ``force``, which clears only what flexc wrote (see :func:`check_clearable`).
        """
        path = Path(path)
        protected = protected or {}
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"output path {path} exists and is not a directory")
        existing = read_manifest(path)
        has_files = path.exists() and any(c.name != LOCK_FILE for c in path.iterdir())
        if existing is None and has_files:
            if not force:
                raise OutputDirError(
                    f"output directory {path} is not empty and is not a flexc run (no flexc {MANIFEST}); "
                    "flexc will not overwrite it — choose another directory (--out)"
                )
            check_clearable(path, None, protected)  # always refuses: nothing there is flexc's
        made = "folder" if not path.exists() else "contents" if not has_files else None
        clear = False
        if existing is not None and existing.get("spec_fingerprint") != fingerprint:
            if not force and _has_results(existing):
                raise OutputDirError(
                    f"output directory {path} holds a flexc run of a different spec "
                    f"(see {path / SPEC_FILE}); choose another directory (--out) or pass --force to replace it"
                )
            clear = True  # forced, or a failed run of another spec that left nothing to keep
        elif existing is not None and force:
            clear = True
        if clear:
            check_clearable(path, existing, protected)
        path.mkdir(parents=True, exist_ok=True)
        lock = _acquire(path)
        try:
            if clear:
                cls._clear(path)
            elif existing is not None:
                return cls(path, read_manifest(path) or existing, resumed=True, lock=lock)
            manifest = {
                "kind": MANIFEST_KIND,
                "manifest_version": MANIFEST_VERSION,
                "spec_fingerprint": fingerprint,
                "created": now(),
                "updated": now(),
                "status": "running",
                "runs": 0,
                "stages": [],
                "outputs": {},
            }
            run = cls(path, manifest, lock=lock, made=made)
            run.save()
            return run
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def worth_keeping(self) -> bool:
        """Whether a failed run leaves anything to resume: a completed stage beyond loading and
        lowering, or a training checkpoint of the stage that stopped."""
        return _has_results(self.manifest) or any((self.path / "stages").glob("*/*checkpoint*"))

    def discard(self) -> None:
        """Remove what this run created (call holding the lock, on failure, when nothing is worth
        keeping): the directory if it made it, else its contents. The lock file goes last, after
        release (a compile waiting for it then finds the directory gone or empty)."""
        if self.made is None:
            return
        self._clear(self.path)
        self.close()
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        if self.made == "folder":
            with contextlib.suppress(OSError):  # another compile may have started writing into it
                self.path.rmdir()

    @staticmethod
    def _clear(path: Path) -> None:
        for child in path.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # ---------------------------------------------------------------- manifest
    def save(self) -> None:
        self.manifest["updated"] = now()
        write_json(self.path / MANIFEST, self.manifest)

    def stage(self, name: str) -> dict[str, Any] | None:
        for record in self.manifest["stages"]:
            if record["name"] == name:
                return record
        return None

    def done(self, name: str) -> bool:
        record = self.stage(name)
        return record is not None and record.get("status") == "done"

    def record(self, name: str, **fields: Any) -> dict[str, Any]:
        record = self.stage(name)
        if record is None:
            record = {"name": name}
            self.manifest["stages"].append(record)
        record.update(fields)
        self.save()
        return record

    def set_plan(self, names: list[str]) -> None:
        """Order the stage records as the plan says (keeping what earlier runs recorded)."""
        known = {r["name"]: r for r in self.manifest["stages"]}
        self.manifest["stages"] = [known.get(n, {"name": n, "status": "pending"}) for n in names]
        self.save()


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The flexc manifest in ``path``, or None if there is none (or it is not flexc's)."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND else None


def _acquire(path: Path):
    """An exclusive lock on the output directory, or a clear error if another compile holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputDirError(
            f"another flexc compile is writing to {path} (it holds {path / LOCK_FILE}); wait for it to finish "
            "or choose another directory (--out)"
        ) from None
    return lock
