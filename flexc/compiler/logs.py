"""Logging for the CLI and the driver: rich on the terminal, a plain log file per run."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler

LOGGER = "flexc"
_console: Console | None = None


def console() -> Console:
    """The terminal console (stderr, so stdout stays clean for `flexc schema`)."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def out_console() -> Console:
    """Console for a command's results (stdout): tables, summaries, confirmations.

    Piped output gets a wide console, so tables are not cut to 80 columns.
    """
    c = Console()
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(width=160)
    return c


def setup(verbosity: int = 0) -> logging.Logger:
    """Terminal logging: ``-1`` quiet (warnings and errors), ``0`` info, ``1`` debug."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_flexc_terminal", False):
            logger.removeHandler(h)
    handler = RichHandler(console=console(), show_time=False, show_path=verbosity > 0, markup=False)
    handler.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    handler._flexc_terminal = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return logger


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[logging.Handler]:
    """Append everything (debug included) to ``path`` while the block runs."""
    logger = logging.getLogger(LOGGER)
    if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        handler.close()
