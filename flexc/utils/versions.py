"""Versions of flexc and the libraries it runs on (recorded in manifests)."""

from __future__ import annotations

import platform
from importlib import metadata

_LIBRARIES = ("torch", "transformers", "pydantic", "safetensors", "datasets", "tokenizers", "triton", "numpy")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("flexc",) + _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["flexc"] is None:
        from flexc import __version__  # the version string only (allowed from every layer)

        out["flexc"] = __version__
    return out
