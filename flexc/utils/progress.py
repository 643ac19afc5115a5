"""Progress bars for long loops (rich), silenced by ``--quiet`` or when not on a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.progress import Progress, TextColumn, track

T = TypeVar("T")


def _shown(disable: bool) -> bool:
    return not disable and sys.stderr.isatty()


def progress_bar(items: Iterable[T], *, total: int | None = None, description: str = "",
                 disable: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar (on a terminal, unless disabled)."""
    return track(items, total=total, description=description, disable=not _shown(disable), transient=True)


@contextlib.contextmanager
def loss_progress(total: int, *, completed: int = 0, description: str = "",
                  disable: bool = False) -> Iterator[Callable[[float], None]]:
    """A training-loop bar showing the latest loss; yields ``advance(loss)`` to call once per step."""
    if not _shown(disable):
        yield lambda loss: None
        return
    columns = (*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, completed=completed, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4g}")
