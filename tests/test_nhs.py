from __future__ import annotations

import pytest

from imagebridge.nhs import is_valid_nhs_number, normalise_nhs_number


def with_check_digit(stem: str) -> str | None:
    """The NHS number for a nine-digit stem, computed here independently; None if the check
    digit would be 10 (no such number)."""
    remainder = sum(int(d) * w for d, w in zip(stem, range(10, 1, -1), strict=True)) % 11
    check = (11 - remainder) % 11
    return None if check == 10 else stem + str(check)


def test_known_valid_and_invalid() -> None:
    assert is_valid_nhs_number("9434765919")
    assert not is_valid_nhs_number("9434765918")


@pytest.mark.parametrize("stem", ["401023213", "123456788", "999000001", "485777345", "000000001"])
def test_computed_numbers_are_valid_and_every_other_last_digit_is_not(stem: str) -> None:
    number = with_check_digit(stem)
    assert number is not None
    assert is_valid_nhs_number(number)
    for digit in "0123456789":
        if digit != number[9]:
            assert not is_valid_nhs_number(stem + digit)


def test_check_digit_eleven_becomes_zero() -> None:
    # A weighted sum that is a multiple of 11 gives 11, which is written 0.
    stem = next(f"{n:09d}" for n in range(1, 10_000) if with_check_digit(f"{n:09d}") == f"{n:09d}0")
    assert is_valid_nhs_number(stem + "0")


def test_stem_with_check_digit_ten_has_no_valid_number() -> None:
    stem = next(f"{n:09d}" for n in range(1, 10_000) if with_check_digit(f"{n:09d}") is None)
    assert not any(is_valid_nhs_number(stem + d) for d in "0123456789")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "943476591",
        "94347659190",
        "943476591X",
        "943 476 5919",
        "".join(chr(0xFF10 + int(d)) for d in "9434765919"),  # full-width digits
        " 9434765919",
    ],
)
def test_not_ten_ascii_digits(value: str) -> None:
    assert not is_valid_nhs_number(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9434765919", "9434765919"),
        ("943 476 5919", "9434765919"),
        ("943-476-5919", "9434765919"),
        ("  943 476 5919 ", "9434765919"),
        ("943 476 5918", None),
        ("943 476 591", None),
        ("NHS9434765919", None),
        ("", None),
    ],
)
def test_normalise(value: str, expected: str | None) -> None:
    assert normalise_nhs_number(value) == expected
