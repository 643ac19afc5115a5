"""Reading numbers a user wrote as text."""

from __future__ import annotations


def parses_as_number(text: str) -> bool:
    """Whether ``text`` reads as a number (``"0.5"``, ``"1e-4"``): a quoted number, not a word."""
    try:
        float(text)
    except ValueError:
        return False
    return True
