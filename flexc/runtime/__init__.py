"""Serving compiled artifacts: :func:`load` a nested artifact (any budget, switchable in place)
or a sliced checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexc.runtime.nested import NestedRuntime, attach, load_nested

__all__ = ["NestedRuntime", "attach", "load", "load_nested"]


def _artifact_dir(path: Path) -> tuple[Path, dict[str, Any]]:
    """The artifact directory at ``path`` (a compile's output directory also works) and its manifest."""
    from flexc.export.nested import read_manifest

    for candidate in (path, path / "nested"):
        manifest = read_manifest(candidate)
        if manifest is not None:
            return candidate, manifest
    if (path / "sliced").is_dir():
        kept = sorted(p.name for p in (path / "sliced").iterdir() if p.is_dir())
        raise FileNotFoundError(f"{path} holds sliced checkpoints, one per budget: load one of "
                                f"{', '.join(str(path / 'sliced' / k) for k in kept)}")
    raise FileNotFoundError(f"{path} is not a flexc artifact (no flexc_manifest.json); expected the 'nested' "
                            "export of a compile, a sliced checkpoint, or a compile's output directory")


def load(path: str | Path, budget: float | None = None, **kwargs: Any):
    """Load a compiled model as a transformers model.

    - a nested artifact (``<out>/nested`` or ``<out>``): at ``budget`` (default full width);
      ``model.set_budget(b)`` switches in place, ``model.flexc`` has the budgets and widths;
    - a sliced checkpoint (``<out>/sliced/keep_0.50``): its one budget (``budget`` may name it).

    ``dtype``, ``device`` and ``backend`` (``auto``/``reference``/``triton``) are passed on.
    """
    directory, manifest = _artifact_dir(Path(path).expanduser())
    kind = manifest.get("kind")
    if kind == "nested":
        return load_nested(directory, budget, **kwargs)
    if kind == "sliced":
        own = manifest.get("budget")
        if budget is not None and own is not None and abs(float(own) - budget) > 1e-6:
            raise ValueError(f"{directory} is the sliced checkpoint of budget {own}, not {budget}; "
                             "load the nested artifact to choose any budget")
        from flexc.export.sliced import load_sliced

        return load_sliced(directory, **kwargs)
    raise ValueError(f"{directory}: unknown flexc artifact kind {kind!r} (expected 'nested' or 'sliced')")
