"""Logging for the CLI and the driver: rich on the terminal, a plain log file per run."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler

# One terminal console for log lines and progress bars, so a log line prints above a live bar.
from flexc.utils.progress import console

LOGGER = "flexc"


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
    library_progress_bars(verbosity >= 0)
    return logger


# Other libraries' tqdm bars (transformers' "Loading weights" and "Writing model shards", hub
# downloads, datasets, lm-eval): (module, disable, enable) for libraries already imported, and
# the variables that the ones imported later read at import time.
_BAR_SWITCHES = (
    ("huggingface_hub.utils", "disable_progress_bars", "enable_progress_bars"),
    ("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar"),
    ("datasets", "disable_progress_bars", "enable_progress_bars"),
)
_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")
_env_set_by_us: set[str] = set()


def library_progress_bars(enabled: bool) -> None:
    """Show or hide library progress bars, without importing a library that is not loaded yet."""
    for module, off, on in _BAR_SWITCHES:
        if module.partition(".")[0] not in sys.modules:
            continue  # not imported: the environment below decides when it is
        with warnings.catch_warnings():  # "cannot enable: the variable has priority": fine
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):
                getattr(importlib.import_module(module), on if enabled else off)()
    for name in _BAR_ENV:
        if not enabled and name not in os.environ:  # a user's own setting wins
            os.environ[name] = "1"
            _env_set_by_us.add(name)
        elif enabled and name in _env_set_by_us:
            os.environ.pop(name, None)
            _env_set_by_us.discard(name)


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
