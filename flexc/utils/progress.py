"""Progress bars for long loops (rich), silenced by ``--quiet`` or when not on a terminal.

Bars draw on the same console as flexc's log handler (:func:`console`), so log lines print
above a live bar instead of being glued onto it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import Progress, TextColumn, track

T = TypeVar("T")
_console: Console | None = None


def console() -> Console:
    """The terminal console (stderr, so stdout stays clean for `flexc schema`)."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def _shown(disable: bool) -> bool:
    return not disable and sys.stderr.isatty()


def progress_bar(items: Iterable[T], *, total: int | None = None, description: str = "",
                 disable: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar (on a terminal, unless disabled)."""
    return track(items, total=total, description=description, disable=not _shown(disable), transient=True,
                 console=console())


class StepBar:
    """A training loop's bar: ``advance(**fields)`` once per step shows the latest values;
    ``set_total(n)`` when the loop's length changes (a continuation that was not planned)."""

    def __init__(self, progress: Progress | None, task: Any, fields: tuple[str, ...]):
        self._progress, self._task, self._fields = progress, task, fields

    def advance(self, **values: float) -> None:
        if self._progress is not None:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}
            self._progress.update(self._task, advance=1, **shown)

    def set_total(self, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)


@contextlib.contextmanager
def step_progress(total: int, *, completed: int = 0, description: str = "", fields: tuple[str, ...] = ("loss",),
                  disable: bool = False) -> Iterator[StepBar]:
    """A bar for a training loop, with one column per name in ``fields``."""
    if not _shown(disable):
        yield StepBar(None, None, fields)
        return
    columns = (*Progress.get_default_columns(), *(TextColumn(f"{f} {{task.fields[{f}]}}") for f in fields))
    with Progress(*columns, transient=True, console=console()) as bar:
        task = bar.add_task(description, total=total, completed=completed, **{f: "-" for f in fields})
        yield StepBar(bar, task, fields)
