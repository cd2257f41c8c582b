"""Two-factor login: TOTP codes (RFC 6238) and one-time recovery codes.

The clock is always passed in, so the caller decides what "now" is and tests never sleep.
A code is accepted once: ``verify_code`` returns the time step it matched, the caller stores
it, and any code of that step or an earlier one is refused from then on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from urllib.parse import quote, urlencode

import segno

DIGITS = 6
PERIOD = 30  # seconds per time step
SECRET_BYTES = 20  # 160 bits, the length RFC 4226 recommends for HMAC-SHA-1
MIN_SECRET_BYTES = 16  # RFC 4226 section 4: at least 128 bits

# Recovery codes: 12 symbols of Crockford's base 32 (no I, L, O, U), 60 bits, as xxxx-xxxx-xxxx.
RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
RECOVERY_SYMBOLS = 12
RECOVERY_GROUP = 4
# Letters people misread for digits are read as the digits, as Crockford's decoding does.
_LOOKALIKES = str.maketrans({"o": "0", "i": "1", "l": "1"})
_RECOVERY_CODE = re.compile(f"[{RECOVERY_ALPHABET}]{{{RECOVERY_SYMBOLS}}}")


def new_secret() -> str:
    """A new shared secret: 160 random bits in base 32 (32 characters, no padding)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def provisioning_uri(secret: str, account: str, issuer: str = "ImageBridge") -> str:
    """The otpauth:// URI an authenticator app reads from the enrolment QR code."""
    _decode_secret(secret)
    if not account or ":" in account or ":" in issuer:
        raise ValueError("account and issuer must be non-empty and must not contain ':'")
    label = quote(f"{issuer}:{account}", safe=":@")
    query = urlencode(
        {
            "secret": secret,
            "issuer": issuer,
            "algorithm": "SHA1",
            "digits": DIGITS,
            "period": PERIOD,
        },
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{query}"


def qr_svg(uri: str, *, scale: int = 4) -> str:
    """``uri`` as a QR code: an inline <svg> element, black on white, with its quiet zone."""
    # Error correction level M survives a smudged screen without making the code too dense.
    qr = segno.make(uri, error="m", micro=False)
    svg: str = qr.svg_inline(scale=scale, dark="#000", light="#fff")
    return svg


def code_at(secret: str, at: float, *, digits: int = DIGITS) -> str:
    """The code an authenticator shows at Unix time ``at``."""
    return _hotp(_decode_secret(secret), int(at // PERIOD), digits)


def verify_code(
    secret: str,
    code: str,
    *,
    at: float,
    last_step: int | None,
    window: int = 1,
    digits: int = DIGITS,
) -> int | None:
    """The time step ``code`` belongs to, or None if it is wrong, replayed or malformed.

    Steps up to ``window`` before or after the one of ``at`` are accepted, for clock drift
    and slow typing. Steps at or before ``last_step`` (the value returned by the last
    successful call for this user) are not, so a code works once.
    """
    code = code.replace(" ", "")
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return None
    try:
        key = _decode_secret(secret)
    except ValueError:
        return None
    now = int(at // PERIOD)
    matched = None
    for step in range(now - window, now + window + 1):
        if step < 0 or (last_step is not None and step <= last_step):
            continue
        # Every candidate is compared, in constant time, whatever matched before.
        if hmac.compare_digest(_hotp(key, step, digits), code):
            matched = step
    return matched


def new_recovery_codes(count: int = 10) -> list[str]:
    """``count`` new recovery codes like ``7kq2-m9xd-4hv0``, each of 60 random bits."""
    if count < 1:
        raise ValueError("at least one recovery code")
    codes = []
    for _ in range(count):
        symbols = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_SYMBOLS))
        groups = [
            symbols[i : i + RECOVERY_GROUP] for i in range(0, RECOVERY_SYMBOLS, RECOVERY_GROUP)
        ]
        codes.append("-".join(groups))
    return codes


def hash_recovery_code(code: str) -> str:
    """The SHA-256 (hex) of a recovery code, whatever its case, dashes and spaces.

    No salt and no slow hash: a code carries 60 random bits, beyond any guessing.
    """
    digest = _recovery_digest(code)
    if digest is None:
        raise ValueError("not a recovery code")
    return digest


def match_recovery_code(code: str, hashes: list[str]) -> str | None:
    """The hash in ``hashes`` that ``code`` matches (the caller then removes it), or None."""
    digest = _recovery_digest(code)
    if digest is None:
        return None
    matched = None
    for stored in hashes:
        if hmac.compare_digest(stored.encode("ascii", "replace"), digest.encode("ascii")):
            matched = stored
    return matched


def _recovery_digest(code: str) -> str | None:
    """SHA-256 (hex) of the code's symbols, or None if it is no recovery code."""
    symbols = re.sub(r"[\s-]", "", code).lower().translate(_LOOKALIKES)
    if not _RECOVERY_CODE.fullmatch(symbols):
        return None
    return hashlib.sha256(symbols.encode("ascii")).hexdigest()


def _decode_secret(secret: str) -> bytes:
    """The key bytes of a base-32 secret; ValueError if it is not one."""
    text = secret.replace(" ", "").upper()
    try:
        key = base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error as exc:
        raise ValueError("the TOTP secret is not base 32") from exc
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError("the TOTP secret is too short")
    return key


def _hotp(key: bytes, counter: int, digits: int) -> str:
    """RFC 4226 HOTP with HMAC-SHA-1: dynamic truncation, then the low decimal digits."""
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)
