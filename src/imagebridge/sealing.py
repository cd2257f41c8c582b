"""Secrets the hub must read back, kept sealed in the database (AES-256-GCM).

A second factor's shared secret cannot be hashed like a password: the hub computes codes
from it. Sealed under a key that lives beside the hub (``secret_key``, or data_dir/secret-key)
and never in the database, a copy of the database (a backup, a dump, a replica) gives away no
second factor. Each value is bound to what it is for (the context: whose, and which secret),
so a sealed value copied onto another row does not open there.

Every hub process and worker of a network needs the same key. The database records which key
its values are sealed with (its id, never the key), and a process with another key refuses
to start rather than fail each login it serves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from imagebridge.db import Base, UTCDateTime, utcnow
from imagebridge.fsutil import private_text

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "s1."  # the format: s1.<key id>.<base64url(nonce + ciphertext + tag)>
KEY_FILE = "secret-key"
CLAIM_LOCK_KEY = 0x49425345414C4B59  # pg_advisory_xact_lock key ("IBSEALKY")


class SealingError(ValueError):
    """A value that is not sealed, sealed under another key, or altered."""


class SealingKey(Base):
    """The key the database's sealed values are sealed with, by its id."""

    __tablename__ = "sealing_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        # Names the key without revealing it (an HMAC under the key of a fixed text).
        self.key_id = hmac.new(key, b"imagebridge sealing key id", hashlib.sha256).hexdigest()[:16]

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{PREFIX}{self.key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, value: str, context: str) -> str:
        if not is_sealed(value):
            raise SealingError("the value is not sealed")
        key_id, _, body = value.removeprefix(PREFIX).partition(".")
        if key_id != self.key_id:
            raise SealingError("the value is sealed under another key")
        try:
            raw = base64.urlsafe_b64decode(body)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
            return plain.decode()
        except (InvalidTag, ValueError) as exc:  # binascii.Error and bad lengths too
            raise SealingError("the sealed value does not open: altered, or not for this") from exc


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def parse_key(text: str) -> bytes:
    """A key as configured: 32 bytes in base64 (``openssl rand -base64 32``)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error as exc:
        raise ValueError("secret_key must be base64 (openssl rand -base64 32)") from exc
    if len(key) != KEY_BYTES:
        raise ValueError(f"secret_key must be {KEY_BYTES} bytes in base64, not {len(key)}")
    return key


def key_from_file(data_dir: Path) -> bytes:
    """The key in data_dir/secret-key, generated on first start and readable by root only."""
    path = data_dir / KEY_FILE
    try:
        return parse_key(private_text(path, new_key))
    except ValueError as exc:
        raise SealingError(f"{path}: {exc}") from exc


def new_key() -> str:
    """A new key, as the settings take it."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def claim_key(session: Session, sealer: Sealer) -> None:
    """Record this key as the database's, or refuse one other than the key recorded."""
    if session.get_bind().dialect.name == "postgresql":
        # Processes starting together with different keys: one records its key, and the
        # others, after it, find it recorded (SQLite's writers take turns already).
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
    recorded = session.scalars(select(SealingKey.key_id)).all()
    if not recorded:
        session.add(SealingKey(key_id=sealer.key_id))
        session.flush()
    elif list(recorded) != [sealer.key_id]:
        raise SealingError(
            f"this process's secret_key (id {sealer.key_id}) is not the one the database's "
            f"secrets are sealed with (id {', '.join(recorded)}): give every hub process and "
            "worker the same secret_key (IMAGEBRIDGE_HUB_SECRET_KEY), or the same "
            "data_dir/secret-key"
        )
