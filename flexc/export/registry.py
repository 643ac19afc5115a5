"""The export-format registry (the ``flexc.export`` side: exporters and the driver both import it).

A spec's ``export.formats`` names formats from :data:`KNOWN_FORMATS`. A format is usable
once an exporter is registered for it, either in code with :func:`register_exporter`
(modules of the ``flexc.export`` package, imported on first use, register theirs this way)
or by an installed plugin through the entry-point group ``flexc.exporters``.

An exporter is a callable ``fn(ctx: ExportContext) -> None`` that writes into
``ctx.target``, a fresh directory; the driver renames it into place only when the exporter
returns, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from flexc.ir.state import CompileState

ENTRY_POINT_GROUP = "flexc.exporters"

#: Every format name a spec may mention, with what it will produce.
KNOWN_FORMATS: dict[str, str] = {
    "nested": "one set of permuted weights plus the width table: every budget, switchable at run time",
    "sliced": "one ordinary Hugging Face checkpoint per budget, experts sliced to their widths",
    "hf": "the compiled weights at full width as a plain Hugging Face checkpoint (save_pretrained + tokenizer)",
    "onnx": "ONNX graphs of the compiled model",
    "graph": "the FlexGraph after each pass, as text and pictures",
}


@dataclass
class ExportContext:
    """What an exporter receives."""

    target: Path
    spec: Any
    graph: Any = None
    model: Any = None
    tokenizer: Any = None
    state: CompileState = None  # type: ignore[assignment] -- an empty state when not given
    run_dir: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("flexc"))

    def __post_init__(self) -> None:
        from flexc.ir.state import CompileState  # here: validating a spec imports this module, not torch

        if self.state is None:
            self.state = CompileState()
        elif isinstance(self.state, dict):  # the dict form of older callers
            groups = self.expert_groups() if "width_tables" in self.state else None
            self.state = CompileState.from_mapping(self.state, groups)

    def expert_groups(self):
        """The MoE layers: the graph's records, or found on the model when there is no graph."""
        if self.graph is not None:
            return self.graph.groups
        from flexc.ir.groups import find_expert_groups

        return find_expert_groups(self.model)

    def width_tables(self, fmt: str):
        """The run's width tables, or an error saying what the ``fmt`` export needs."""
        if self.state.width_tables is None:
            raise ValueError(
                f"the {fmt} export needs width tables, and this run has none: add a pass that chooses widths "
                "(anneal after rank_channels and insert_action_gates, or a baseline) to the spec's pipeline")
        return self.state.checked_width_tables()

    def provenance(self) -> dict[str, Any]:
        """What an artifact's manifest records about how it was made: the spec, seed, library versions."""
        from flexc.utils.versions import library_versions

        return {"spec": self.spec.to_yaml() if self.spec is not None else None,
                "seed": getattr(self.spec, "seed", None), "versions": library_versions()}


Exporter = Callable[[ExportContext], Any]

_EXPORTERS: dict[str, Exporter] = {}
_loaded = False


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Decorator: ``@register_exporter("sliced")`` makes the format usable in specs."""
    if name not in KNOWN_FORMATS:
        raise ValueError(f"unknown export format {name!r}; known: {', '.join(KNOWN_FORMATS)}")

    def deco(fn: Exporter) -> Exporter:
        _EXPORTERS[name] = fn
        return fn

    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        importlib.import_module("flexc.export")
    except ModuleNotFoundError as exc:
        if exc.name not in ("flexc.export",):
            raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in KNOWN_FORMATS and ep.name not in _EXPORTERS:
            _EXPORTERS[ep.name] = ep.load()


def available_exports() -> list[str]:
    """Formats that have an exporter in this installation."""
    _load()
    return [name for name in KNOWN_FORMATS if name in _EXPORTERS]


def get_exporter(name: str) -> Exporter:
    _load()
    try:
        return _EXPORTERS[name]
    except KeyError:
        raise LookupError(not_available_message(name)) from None


def not_available_message(name: str) -> str:
    have = available_exports()
    return (
        f"export format {name!r} is not available in this version of flexc "
        f"(available: {', '.join(have) if have else 'none yet'})"
    )
