"""Whole numbers that callers give as text: query parameters and path segments."""

from __future__ import annotations

INT32_MAX = 2**31 - 1


def whole_number(text: str, low: int = 0, high: int = INT32_MAX) -> int | None:
    """The number ``text`` spells in ASCII digits, if it is from ``low`` to ``high``.

    ``str.isdigit`` alone lets through digits such as "²", which ``int`` refuses, and
    thousands of digits, which ``int`` refuses too or the database cannot hold.
    """
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if low <= value <= high else None
