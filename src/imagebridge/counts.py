"""Whole numbers that callers give as text: query parameters and path segments."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

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


# A row's id in a path: the database's integers end at 2**31 - 1 (PostgreSQL's integer), and a
# larger number must be "not valid" (422), not an error of the database (500).
RowId = Annotated[int, Path(ge=1, le=INT32_MAX)]
