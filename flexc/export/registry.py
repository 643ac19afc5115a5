"""The export-format registry (the ``flexc.export`` side: exporters and the driver both import it).

A spec's ``export.formats`` names formats from :data:`KNOWN_FORMATS`. A format is usable
once an exporter is registered for it, either in code with :func:`register_exporter`
(the built-in formats are listed in :mod:`flexc.export.builtin`, imported on first use)
or by an installed plugin through the entry-point group ``flexc.exporters``.

An exporter is a callable ``fn(ctx: ExportContext) -> None`` (:mod:`flexc.export.context`) that writes into
``ctx.target``, a fresh directory; the driver renames it into place only when the exporter
returns, so a crash never leaves a half-written export.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable

from flexc.export.context import ExportContext

ENTRY_POINT_GROUP = "flexc.exporters"

#: Every format name a spec may mention, with what it will produce.
KNOWN_FORMATS: dict[str, str] = {
    "nested": "one set of permuted weights plus the width table: every budget, switchable at run time",
    "sliced": "one ordinary Hugging Face checkpoint per budget, experts sliced to their widths",
    "hf": "the compiled weights at full width as a plain Hugging Face checkpoint (save_pretrained + tokenizer)",
    "onnx": "ONNX graphs of the compiled model",
    "graph": "the FlexGraph after each pass, as text and pictures",
}


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
    from flexc.export.builtin import BUILTIN_EXPORTERS

    for name, fn in BUILTIN_EXPORTERS.items():
        _EXPORTERS.setdefault(name, fn)  # one registered in code before keeps its format
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
