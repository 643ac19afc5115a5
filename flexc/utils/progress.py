"""Progress bars for long loops (rich), silenced by ``--quiet`` or when not on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import track

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, total: int | None = None, description: str = "",
                 disable: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar (on a terminal, unless disabled)."""
    return track(items, total=total, description=description, disable=disable or not sys.stderr.isatty(),
                 transient=True)
