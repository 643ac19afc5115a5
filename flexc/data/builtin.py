"""The corpora shipped with flexc, by the name a spec's ``data.*.builtin`` and a zoo recipe use.

- ``python-stdlib``: the running interpreter's standard-library sources (:mod:`flexc.data.corpus`);
- ``python-docs``: English prose it carries, the language reference's help topics and the standard
  library's docstrings (:mod:`flexc.data.prose`).

Both split into ``train`` and ``heldout`` by whole document.
"""

from __future__ import annotations

BUILTIN_CORPORA = ("python-stdlib", "python-docs")


def builtin_documents(name: str, split: str) -> list:
    """The documents (``.name``, ``.text``) of one split of the builtin corpus ``name``."""
    if name == "python-docs":
        from flexc.data.prose import docs_documents

        return docs_documents(split)
    if name == "python-stdlib":
        from flexc.data.corpus import stdlib_documents

        return stdlib_documents(split)
    raise ValueError(f"unknown builtin corpus {name!r}; expected one of {', '.join(BUILTIN_CORPORA)}")


def builtin_identity(name: str) -> dict:
    """What identifies the builtin corpus ``name`` (manifests, cache keys)."""
    if name == "python-docs":
        from flexc.data.prose import docs_identity

        return docs_identity()
    if name == "python-stdlib":
        from flexc.data.corpus import stdlib_identity

        return stdlib_identity()
    raise ValueError(f"unknown builtin corpus {name!r}; expected one of {', '.join(BUILTIN_CORPORA)}")
