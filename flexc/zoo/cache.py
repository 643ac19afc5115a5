"""Where zoo models live, and how a build is installed there safely.

Layout under :func:`cache_root`::

    zoo/<key>/                 a complete checkpoint (config, weights, tokenizer, manifest.json)
    zoo/.<key>.lock            lock file held while <key> is being built
    zoo/.<key>.tmp-<id>/       a build in progress (removed if the build fails)
    zoo/.<key>.old-<id>/       a replaced checkpoint, deleted right after a forced rebuild

A build trains into a temporary directory next to its final place and renames it there only
once everything, ``manifest.json`` last, is written: a directory named ``<key>`` is always
complete. Builds of one key are serialised by an exclusive lock on ``.<key>.lock``; the second
builder waits, then finds the model already there. Leftover temporary directories from a
build that was killed are removed by the next build of the same key (it holds the lock, so
nobody else can be writing them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "MANIFEST",
    "build_lock",
    "cache_root",
    "install",
    "is_complete",
    "remove_stale_temps",
    "temp_dir",
    "zoo_root",
]

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """flexc's cache directory: ``$FLEXC_CACHE``, else ``$XDG_CACHE_HOME/flexc``, else ``~/.cache/flexc``."""
    env = os.environ.get("FLEXC_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flexc"


def zoo_root() -> Path:
    """Directory holding the zoo's checkpoints."""
    return cache_root() / "zoo"


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished checkpoint directory."""
    return (path / MANIFEST).is_file()


@contextlib.contextmanager
def build_lock(final: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock for building ``final`` (blocks while another process holds it).

    ``on_wait`` is called once, before blocking, if another process holds the lock.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: rely on install() tolerating races
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_stale_temps(final: Path) -> None:
    """Remove temporary build directories of ``final`` (call only while holding its lock)."""
    if not final.parent.is_dir():
        return
    for path in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temp_dir(final: Path) -> Iterator[Path]:
    """A fresh directory next to ``final`` for a build; removed on exit unless installed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync everywhere
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def install(tmp: Path, final: Path, *, replace: bool) -> Path:
    """Move the finished build ``tmp`` to ``final`` atomically and return ``final``.

    If ``final`` already holds a complete checkpoint, it is kept (and ``tmp`` discarded) unless
    ``replace`` is true, in which case the old one is moved aside and deleted after the swap.
    """
    if not is_complete(tmp):
        raise RuntimeError(f"refusing to install an incomplete build: {tmp}")
    _fsync_tree(tmp)
    old: Path | None = None
    if final.exists():
        if is_complete(final) and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        # Someone else installed a checkpoint in the meantime (only possible without locks).
        if is_complete(final):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
