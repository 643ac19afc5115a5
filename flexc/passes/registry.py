"""Find passes by name: built-ins, ``package.module:ClassName``, and installed plugins.

Plugins register through the entry-point group ``flexc.passes``; the entry point's name is
the pass name a spec uses.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points

from flexc.passes.base import Pass

ENTRY_POINT_GROUP = "flexc.passes"

_BUILTINS: dict[str, type[Pass]] = {}
_builtins_loaded = False


class UnknownPassError(LookupError):
    """A pipeline names a pass that no registry source provides."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator for a user's passes registered in code (the built-ins are listed in
    :mod:`flexc.passes.builtin`)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty `name`")
    _BUILTINS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    """Register the built-in passes, once (a pass registered in code before keeps its name)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from flexc.passes.builtin import BUILTIN_PASSES

    for cls in BUILTIN_PASSES:
        _BUILTINS.setdefault(cls.name, cls)


def _plugin_entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_passes() -> list[str]:
    """Names usable in a spec's pipeline (built-ins and installed plugins)."""
    _load_builtins()
    return sorted(set(_BUILTINS) | set(_plugin_entry_points()))


def _import_qualified(name: str) -> type[Pass]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownPassError(name, f"cannot import module {module_name!r} for pass {name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UnknownPassError(name, f"module {module_name!r} has no attribute {attr!r} (pass {name!r})")
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise UnknownPassError(name, f"{name!r} is not a flexc.passes.Pass subclass")
    return cls


def resolve_pass(name: str) -> type[Pass]:
    """Return the pass class for a pipeline entry's name, or raise :class:`UnknownPassError`."""
    if ":" in name:
        return _import_qualified(name)
    _load_builtins()
    if name in _BUILTINS:
        return _BUILTINS[name]
    plugins = _plugin_entry_points()
    if name in plugins:
        cls = plugins[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise UnknownPassError(name, f"plugin entry point {name!r} does not name a flexc Pass subclass")
        return cls
    known = available_passes()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else "."
    raise UnknownPassError(
        name,
        f"unknown pass {name!r}{hint} Known passes: {', '.join(known) or '(none)'}; "
        "a pass of your own is named as 'package.module:ClassName'.",
    )
