"""Password hashing (argon2id) and the password policy.

Passwords are normalised to Unicode NFKC before they are counted or hashed, so the same
password typed on two keyboards (composed or decomposed accents, full-width digits) is the
same password (NIST SP 800-63B 5.1.1.2).
"""

from __future__ import annotations

import unicodedata
from functools import cache
from importlib.resources import files

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 12
MAX_LENGTH = 128
# Longer input was never accepted by check_policy; refusing it before hashing keeps a
# request with megabytes of "password" from costing more than a normal login.
_MAX_INPUT = 4 * MAX_LENGTH
# A user name or e-mail local part shorter than this would forbid half the dictionary.
_MIN_NAME_LENGTH = 3

# OWASP Password Storage Cheat Sheet: argon2id, 19 MiB of memory, 2 passes, 1 lane.
_HASHER = PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
)


class WeakPassword(ValueError):
    """A password the policy refuses; ``reason`` can be shown to the user as it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _normalise(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def hash_password(password: str) -> str:
    """An argon2id hash string (PHC format) of ``password``, with a new random salt."""
    return _HASHER.hash(_normalise(password))


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches the ``stored`` hash; False otherwise, never an exception."""
    if len(password) > _MAX_INPUT:
        return False
    try:
        return _HASHER.verify(stored, _normalise(password))
    except (VerificationError, InvalidHashError, ValueError, TypeError):
        # VerifyMismatchError is a VerificationError; a hash of another kind or a
        # truncated one is an InvalidHashError or a ValueError from the decoder.
        return False


def needs_rehash(stored: str) -> bool:
    """True if ``stored`` was made with other parameters than today's (or is unreadable)."""
    try:
        return _HASHER.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return True


def check_policy(password: str, *, user_name: str = "", email: str = "") -> None:
    """Raise WeakPassword if ``password`` may not be used by this user."""
    normalised = _normalise(password)
    if len(normalised) < MIN_LENGTH:
        raise WeakPassword(f"the password must be at least {MIN_LENGTH} characters long")
    if len(normalised) > MAX_LENGTH:
        raise WeakPassword(f"the password must be at most {MAX_LENGTH} characters long")
    folded = normalised.casefold()
    if folded in _common_passwords():
        raise WeakPassword("this password is one of the most commonly used ones: choose another")
    local_part = email.rpartition("@")[0] if "@" in email else email
    for name, what in ((user_name, "user name"), (local_part, "e-mail address")):
        name = _normalise(name).strip().casefold()
        if len(name) >= _MIN_NAME_LENGTH and name in folded:
            raise WeakPassword(f"the password must not contain your {what}")


@cache
def _common_passwords() -> frozenset[str]:
    """The shipped list, lower case, read once on first use."""
    text = files("imagebridge.accounts").joinpath("common_passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
