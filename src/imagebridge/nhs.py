"""NHS numbers: the 10-digit patient identifier shared by every NHS institution in England.

The last digit is a modulus 11 check digit over the first nine, so a mistyped or truncated
number is recognised as invalid instead of matching some other patient.
"""

from __future__ import annotations

from operator import mul

_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)
# The weighted sum of nine "0" characters: what the character codes add beyond the digits.
_ZEROS = ord("0") * sum(_WEIGHTS)


def is_valid_nhs_number(value: str) -> bool:
    """True if ``value`` is exactly 10 ASCII digits with a correct check digit."""
    # isascii() first: str.isdigit() also accepts digits like "²" that int() would refuse.
    if len(value) != 10 or not value.isascii() or not value.isdigit():
        return False
    # On the character codes: a C-level sum (a C-FIND may check a thousand numbers).
    codes = value.encode("ascii")
    total: int = sum(map(mul, codes[:9], _WEIGHTS)) - _ZEROS
    check = 11 - total % 11
    if check == 11:
        check = 0
    # A check digit of 10 is never issued: such a nine-digit stem is not an NHS number.
    return check != 10 and check == codes[9] - ord("0")


def normalise_nhs_number(value: str) -> str | None:
    """The 10 digits of an NHS number written as people write it ("943 476 5919",
    "943-476-5919"), or None if it is not a valid NHS number."""
    digits = value.strip().replace(" ", "").replace("-", "")
    return digits if is_valid_nhs_number(digits) else None
