"""The builtin ``python-stdlib`` corpus: the running interpreter's own standard library.

flexc must work without any network access, yet calibration, evaluation and the reference
model zoo all need real text. Every Python installation carries several megabytes of real,
varied, human-written code: the ``.py`` files of its standard library. This module turns them
into a small, reproducible corpus with a fixed train / held-out split.

Selection (all relative to ``sysconfig.get_paths()["stdlib"]``):

* every ``*.py`` file, read as UTF-8 (PEP 263 coding cookies are honoured as a fallback);
* excluded directories (any path component): ``site-packages`` (third-party code, differs per
  environment), ``test``/``tests`` (the regression suite is huge, repetitive, and full of
  deliberately odd code), ``idlelib``, ``lib2to3``, ``turtledemo`` (applications and demos,
  not library code), ``pydoc_data`` (one generated 750 kB file of English help text),
  ``encodings`` (mostly generated character-map tables), ``__pycache__`` and ``config-*``
  (build artefacts);
* excluded files: ``_sysconfigdata*.py`` (build variables that differ per machine) and empty
  files.

Split: a document goes to ``heldout`` when a stable hash (SHA-256) of its relative POSIX path
falls in the lowest ``HELDOUT_FRACTION`` of the hash space, else to ``train``. The split is by
whole file, so no text is shared between the two, it does not depend on the order files are
listed in, and adding or removing one file never moves any other file across the split.
Documents are returned sorted by relative path.

The corpus differs between Python versions; :func:`stdlib_identity` gives what a manifest
needs to tell which one was used.

Example::

    from flexc.data.corpus import stdlib_documents, stdlib_identity
    train = stdlib_documents("train")
    heldout = stdlib_documents("heldout")
    print(len(train), len(heldout), stdlib_identity()["list_sha256"])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import platform
import sys
import sysconfig
import tokenize
from pathlib import Path

__all__ = [
    "CORPUS_NAME",
    "EXCLUDED_DIRS",
    "HELDOUT_FRACTION",
    "SPLITS",
    "Document",
    "digests",
    "split_of",
    "stdlib_documents",
    "stdlib_identity",
    "stdlib_root",
]

#: Name under which specs, manifests and the CLI refer to this corpus.
CORPUS_NAME = "python-stdlib"

#: Names of the splits :func:`stdlib_documents` accepts.
SPLITS = ("train", "heldout")

#: Fraction of the hash space (and so, in expectation, of the files) that is held out.
HELDOUT_FRACTION = 0.05

#: Directory names skipped wherever they appear in a path (see the module docstring for why).
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "pydoc_data",
        "encodings",
        "__pycache__",
    }
)

_EXCLUDED_DIR_PREFIXES = ("config-",)
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: a source file.

    Attributes:
        name: the file's path relative to the standard-library root, with ``/`` separators
            (e.g. ``"json/decoder.py"``); unique within the corpus.
        text: the file's full text.
    """

    name: str
    text: str


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """The split (``"train"`` or ``"heldout"``) a document with relative path ``name`` belongs to.

    Depends only on ``name``: a stable function of the path's SHA-256 digest.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def _excluded_dir(part: str) -> bool:
    return part in EXCLUDED_DIRS or part.startswith(_EXCLUDED_DIR_PREFIXES)


def _read_source(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A file with a PEP 263 coding cookie (none in recent CPython releases).
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding, errors="replace")


@functools.lru_cache(maxsize=4)
def _scan(root: str) -> tuple[Document, ...]:
    """All selected documents under ``root``, sorted by name (cached per root)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"standard-library directory not found: {base}")
    docs: list[Document] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Prune excluded directories in place so os.walk does not descend into them.
        dirnames[:] = sorted(d for d in dirnames if not _excluded_dir(d))
        for filename in filenames:
            if not filename.endswith(".py") or filename.startswith(_EXCLUDED_FILE_PREFIXES):
                continue
            path = Path(dirpath) / filename
            if path.is_symlink() or not path.is_file():
                continue
            text = _read_source(path)
            if not text.strip():
                continue
            docs.append(Document(name=path.relative_to(base).as_posix(), text=text))
    docs.sort(key=lambda d: d.name)
    return tuple(docs)


def stdlib_documents(split: str, *, root: str | os.PathLike | None = None) -> list[Document]:
    """The documents of one split of the ``python-stdlib`` corpus, sorted by name.

    Args:
        split: ``"train"`` or ``"heldout"``.
        root: directory to read instead of the running interpreter's standard library
            (for tests and for reproducing a corpus from another installation).

    Returns:
        A new list of :class:`Document` (the documents themselves are immutable and shared).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    docs = _scan(str(Path(root) if root is not None else stdlib_root()))
    return [d for d in docs if split_of(d.name) == split]


def stdlib_identity(*, root: str | os.PathLike | None = None) -> dict:
    """What identifies the corpus, for manifests and cache keys.

    Returns a JSON-serialisable dict: the corpus name, Python implementation and version,
    the number of files in total and per split, the held-out fraction, ``list_sha256`` (the
    SHA-256 of the newline-joined sorted file list) and ``content_sha256`` (the SHA-256 over
    every file's name and text, so an edited file changes it too).
    """
    base = Path(root) if root is not None else stdlib_root()
    docs = _scan(str(base))
    names = [d.name for d in docs]
    list_sha, content_sha = digests(docs)
    heldout = sum(1 for n in names if split_of(n) == "heldout")
    return {
        "name": CORPUS_NAME,
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "python_version_info": list(sys.version_info[:3]),
        "files": len(names),
        "train_files": len(names) - heldout,
        "heldout_files": heldout,
        "heldout_fraction": HELDOUT_FRACTION,
        "list_sha256": list_sha,
        "content_sha256": content_sha,
    }


def digests(docs) -> tuple[str, str]:
    """SHA-256 of the newline-joined document names, and over every document's name and text."""
    content = hashlib.sha256()
    for d in docs:
        for part in (d.name, d.text):
            data = part.encode("utf-8", errors="surrogatepass")
            content.update(len(data).to_bytes(8, "little"))
            content.update(data)
    return hashlib.sha256("\n".join(d.name for d in docs).encode("utf-8")).hexdigest(), content.hexdigest()
