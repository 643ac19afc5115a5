"""User-facing errors.

Everything a user can get wrong (a spec, a model directory, an output directory) raises a
:class:`FlexcError`. The CLI prints its message, without a traceback, and exits with status 2.
The base classes live in the leaf module :mod:`flexc.errors` (every layer raises them); this
module adds the spec errors and re-exports those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from flexc.compiler.yamlpos import Position
from flexc.errors import FlexcError, ModelError, OutputDirError  # noqa: F401 -- re-exported

MAX_SOURCE_WIDTH = 120  # characters of the offending source line shown under a message
MAX_MESSAGE = 1000  # characters of one problem's line
MAX_ISSUES = 20  # problems listed in full; a generated spec can have thousands


def format_path(loc: Iterable[Any]) -> str:
    """``("budgets", "keep", 2)`` -> ``budgets.keep[2]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


@dataclass
class SpecIssue:
    """One problem in a spec: where it is, and what is wrong."""

    loc: tuple[Any, ...]
    message: str
    position: Position | None = None
    show_field: bool = True

    @property
    def field(self) -> str:
        return format_path(self.loc)


@dataclass
class SpecError(FlexcError):
    """A spec is invalid. ``issues`` are sorted by position; ``str()`` is the full report."""

    issues: list[SpecIssue]
    filename: str | None = None
    text: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.issues.sort(key=lambda i: (i.position.line, i.position.column) if i.position else (0, 0))
        super().__init__(self.render())

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        lines_of_text = self.text.splitlines() if self.text else []
        n = len(self.issues)
        where = self.filename or "spec"
        out = [f"{where}: invalid spec ({n} problem{'s' if n != 1 else ''})"]
        for issue in self.issues[:MAX_ISSUES]:
            pos = issue.position
            prefix = where
            if pos is not None:
                prefix += f":{pos.line}:{pos.column}"
            field_text = f"{issue.field}: " if issue.show_field else ""
            line = f"{prefix}: {field_text}{issue.message}"
            out.append(line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "...")  # e.g. a huge key
            if pos is not None and 0 < pos.line <= len(lines_of_text):
                src, column = source_excerpt(lines_of_text[pos.line - 1].rstrip(), pos.column)
                gutter = f"{pos.line:>5} | "
                out.append(gutter + src)
                out.append(" " * (len(gutter) - 2) + "| " + " " * (column - 1) + "^")
        if n > MAX_ISSUES:
            out.append(f"{where}: ... and {n - MAX_ISSUES} more problems")
        return "\n".join(out)


def source_excerpt(line: str, column: int, width: int = MAX_SOURCE_WIDTH) -> tuple[str, int]:
    """At most ``width`` characters of ``line`` around ``column``, and the column within them.

    A one-line spec of megabytes must not be echoed whole; cut parts are marked with "...".
    """
    if len(line) <= width:
        return line, column
    start = max(0, min(column - 1 - width // 2, len(line) - width))
    excerpt = line[start : start + width]
    column -= start
    if start > 0:
        excerpt, column = "..." + excerpt, column + 3
    if start + width < len(line):
        excerpt += "..."
    return excerpt, column
