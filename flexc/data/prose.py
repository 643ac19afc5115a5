"""The builtin ``python-docs`` corpus: English prose the running interpreter carries.

A second offline corpus, unlike ``python-stdlib`` (source code): the zoo's prose-trained models
are judged on text of another kind than the one the method's defaults were tuned on. Two sources,
both in every CPython installation:

* the language reference's help topics (``pydoc_data.topics``, the text ``help("if")`` prints):
  one document per topic, named ``topics/<name>``;
* the docstrings of every standard-library module :mod:`flexc.data.corpus` selects: one document
  per module, its module, class and function docstrings of at least ``MIN_DOCSTRING`` characters
  joined by blank lines, named ``docstrings/<path>``; modules with less than ``MIN_DOCUMENT``
  characters of them are left out.

About 1.9 MB of text on CPython 3.12. The split is :func:`flexc.data.corpus.split_of` on the
document name (whole documents, stable under additions), as for ``python-stdlib``.
"""

from __future__ import annotations

import ast
import functools
import os
import platform
from pathlib import Path

from flexc.data.corpus import SPLITS, Document, digests, split_of, stdlib_documents, stdlib_root

CORPUS_NAME = "python-docs"
MIN_DOCSTRING = 80  # shorter ones are mostly one-line summaries ("Return x.")
MIN_DOCUMENT = 500


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return "\n\n".join(s for s in map(ast.get_docstring, nodes) if s and len(s) >= MIN_DOCSTRING)


@functools.lru_cache(maxsize=4)
def _collect(root: str) -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    docs = [Document(name=f"topics/{name}", text=text) for name, text in topics.items() if text.strip()]
    for module in sorted(stdlib_documents("train", root=root) + stdlib_documents("heldout", root=root),
                         key=lambda d: d.name):
        text = _docstrings(module.text)
        if len(text) >= MIN_DOCUMENT:
            docs.append(Document(name=f"docstrings/{module.name}", text=text))
    docs.sort(key=lambda d: d.name)
    return tuple(docs)


def docs_documents(split: str, *, root: str | os.PathLike | None = None) -> list[Document]:
    """The documents of one split (``"train"`` or ``"heldout"``) of the ``python-docs`` corpus, by name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    docs = _collect(str(Path(root) if root is not None else stdlib_root()))
    return [d for d in docs if split_of(d.name) == split]


def docs_identity(*, root: str | os.PathLike | None = None) -> dict:
    """What identifies the corpus, for manifests and cache keys (as :func:`flexc.data.corpus.stdlib_identity`)."""
    docs = _collect(str(Path(root) if root is not None else stdlib_root()))
    list_sha, content_sha = digests(docs)
    heldout = sum(1 for d in docs if split_of(d.name) == "heldout")
    return {
        "name": CORPUS_NAME,
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "files": len(docs),
        "train_files": len(docs) - heldout,
        "heldout_files": heldout,
        "list_sha256": list_sha,
        "content_sha256": content_sha,
    }
