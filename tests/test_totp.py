"""TOTP (RFC 6238) codes, enrolment URI and QR code, and one-time recovery codes.

The clock is an argument: every test says what time it is, none sleeps.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree

import numpy as np
import pytest
import zxingcpp

from imagebridge.accounts.totp import (
    PERIOD,
    code_at,
    hash_recovery_code,
    match_recovery_code,
    new_recovery_codes,
    new_secret,
    provisioning_uri,
    qr_svg,
    verify_code,
)

# RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890".
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
NOW = 1_700_000_000.0


@pytest.mark.parametrize(("at", "expected"), RFC_VECTORS)
def test_rfc_6238_test_vectors(at: int, expected: str) -> None:
    assert code_at(RFC_SECRET, at, digits=8) == expected
    step = verify_code(RFC_SECRET, expected, at=at, last_step=None, window=0, digits=8)
    assert step == at // PERIOD
    # Six digits, as authenticator apps show, are the low six of the same value.
    assert code_at(RFC_SECRET, at) == expected[-6:]
    assert verify_code(RFC_SECRET, expected[-6:], at=at, last_step=None) == at // PERIOD


def test_codes_from_neighbouring_steps_are_accepted_within_the_window() -> None:
    secret = new_secret()
    now_step = int(NOW // PERIOD)
    earlier = code_at(secret, NOW - PERIOD)  # typed slowly, or the phone is behind
    later = code_at(secret, NOW + PERIOD)  # the phone's clock is ahead
    assert verify_code(secret, earlier, at=NOW, last_step=None) == now_step - 1
    assert verify_code(secret, later, at=NOW, last_step=None) == now_step + 1
    assert verify_code(secret, earlier, at=NOW, last_step=None, window=0) is None
    too_old = code_at(secret, NOW - 2 * PERIOD)
    assert verify_code(secret, too_old, at=NOW, last_step=None) is None
    assert verify_code(secret, too_old, at=NOW, last_step=None, window=2) == now_step - 2


def test_a_code_works_once_and_older_codes_are_refused_after_it() -> None:
    secret = new_secret()
    code = code_at(secret, NOW)
    step = verify_code(secret, code, at=NOW, last_step=None)
    assert step == int(NOW // PERIOD)
    # Replayed a second later, inside its own window: refused.
    assert verify_code(secret, code, at=NOW + 1, last_step=step) is None
    # A code of the step before, still inside the window, is refused too.
    previous = code_at(secret, NOW - PERIOD)
    assert verify_code(secret, previous, at=NOW, last_step=step) is None
    # The next step's code works.
    following = code_at(secret, NOW + PERIOD)
    assert verify_code(secret, following, at=NOW + PERIOD, last_step=step) == step + 1


def test_wrong_and_malformed_codes_are_refused() -> None:
    secret = new_secret()
    right = code_at(secret, NOW)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    arabic_indic = right.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    for code in (wrong, "", "12345", "1234567", "abcdef", arabic_indic, right + "\n", "-12345"):
        assert verify_code(secret, code, at=NOW, last_step=None) is None, code
    # Spaces, as authenticators group the digits, are allowed.
    spaced = f"{right[:3]} {right[3:]}"
    assert verify_code(secret, spaced, at=NOW, last_step=None) == int(NOW // PERIOD)


@pytest.mark.parametrize("secret", ["", "not base 32!", "GEZDGNBV", "ABCDEFGH" * 3 + "1"])
def test_a_malformed_secret_refuses_every_code(secret: str) -> None:
    assert verify_code(secret, "123456", at=NOW, last_step=None) is None


def test_new_secrets_have_160_random_bits() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert len(base64.b32decode(secret)) == 20


def test_provisioning_uri_follows_the_key_uri_format() -> None:
    secret = new_secret()
    uri = provisioning_uri(secret, "zoë.smith@seg.nhs.uk", issuer="ImageBridge NHS")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert unquote(parts.path) == "/ImageBridge NHS:zoë.smith@seg.nhs.uk"
    assert " " not in uri and "ë" not in uri
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "secret": secret,
        "issuer": "ImageBridge NHS",
        "algorithm": "SHA1",
        "digits": "6",
        "period": "30",
    }
    with pytest.raises(ValueError, match="':'"):
        provisioning_uri(secret, "alice:admin")
    with pytest.raises(ValueError, match="base 32"):
        provisioning_uri("not base 32!", "alice")


def test_the_qr_code_reads_back_as_the_uri() -> None:
    uri = provisioning_uri(new_secret(), "alice@seg.nhs.uk")
    svg = qr_svg(uri)
    root = ElementTree.fromstring(svg)
    assert root.tag == "svg"
    # What a phone's camera sees, read by the ZXing decoder.
    (found,) = zxingcpp.read_barcodes(_rasterise(svg))
    assert found.format == zxingcpp.BarcodeFormat.QRCode
    assert found.text == uri


def _rasterise(svg: str) -> np.ndarray:
    """Draw segno's SVG: a white square, then dark modules as horizontal strokes."""
    size = int(re.search(r'd="M0 0h(\d+)v', svg).group(1))  # type: ignore[union-attr]
    path = re.search(r'class="qrline"[^>]* d="([^"]+)"', svg).group(1)  # type: ignore[union-attr]
    modules = np.full((size, size), 255, np.uint8)
    x = y = 0.0
    for command, a, b in re.findall(r"([Mmh])(-?[\d.]+)(?: (-?[\d.]+))?", path):
        if command == "M":
            x, y = float(a), float(b)
        elif command == "m":
            x, y = x + float(a), y + float(b)
        else:
            modules[int(y), int(x) : int(x + float(a))] = 0
            x += float(a)
    return np.kron(modules, np.ones((4, 4), np.uint8))


def test_recovery_codes_are_readable_and_have_60_bits() -> None:
    codes = new_recovery_codes()
    assert len(codes) == 10 and len(set(codes)) == 10
    for code in codes:
        # Crockford's base 32: no i, l, o or u to misread; 12 symbols of 5 bits.
        assert re.fullmatch(
            r"[0-9a-hjkmnp-tv-z]{4}-[0-9a-hjkmnp-tv-z]{4}-[0-9a-hjkmnp-tv-z]{4}", code
        )
    assert len(new_recovery_codes(3)) == 3
    with pytest.raises(ValueError):
        new_recovery_codes(0)


def test_a_recovery_code_matches_once_whatever_its_case_and_dashes() -> None:
    codes = new_recovery_codes()
    hashes = [hash_recovery_code(c) for c in codes]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    typed = " " + codes[3].upper().replace("-", " ") + " "
    matched = match_recovery_code(typed, hashes)
    assert matched == hashes[3]
    hashes.remove(matched)  # what the caller does: used once
    assert match_recovery_code(codes[3], hashes) is None
    assert match_recovery_code(codes[4].replace("-", ""), hashes) == hashes[3]


def test_letters_misread_as_digits_still_match() -> None:
    stored = hash_recovery_code("01ab-10cd-0011")
    assert match_recovery_code("Olab-lOcd-oOIi", [stored]) == stored


def test_wrong_and_malformed_recovery_codes_match_nothing() -> None:
    codes = new_recovery_codes()
    hashes = [hash_recovery_code(c) for c in codes]
    for attempt in ("", "abcd-efgh", codes[0] + "x", "uuuu-uuuu-uuuu", hashes[0], "ĳkm0-ab12-cd34"):
        assert match_recovery_code(attempt, hashes) is None, attempt
    with pytest.raises(ValueError):
        hash_recovery_code("not a code")
