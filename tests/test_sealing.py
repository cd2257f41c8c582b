"""Second-factor secrets are kept sealed: the database alone gives none away, a sealed value
opens only for the row it was sealed for, and a hub with another key refuses to start."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select, update

from hubapp import OUTSIDE, PASSWORD, InProcessHub, Person
from imagebridge.accounts.models import User
from imagebridge.hub.state import Hub
from imagebridge.sealing import Sealer, SealingError, is_sealed, key_from_file, parse_key
from imagebridge.settings import HubSettings


@pytest.fixture
def net(tmp_path: Path) -> Iterator[InProcessHub]:
    t = InProcessHub(tmp_path / "hub")
    t.add_institution("SEG")
    t.add_user("SEG", "clerk", ["clerk"])
    t.add_user("SEG", "typist", ["clerk"])
    yield t
    t.close()


def _stored(net: InProcessHub, username: str) -> str | None:
    with net.hub.sessions() as session:
        return session.scalar(select(User.totp_secret).where(User.username == username))


def _store(net: InProcessHub, username: str, value: str | None) -> None:
    with net.hub.sessions() as session, session.begin():
        session.execute(update(User).where(User.username == username).values(totp_secret=value))


def _code_login(net: InProcessHub, person: Person) -> Any:
    """Password, then the second factor, as a new login from outside."""
    again = Person(person.username, net.client(OUTSIDE), secret=person.secret)
    again.take(
        again.client.post(
            "/api/v1/auth/login", json={"username": person.username, "password": PASSWORD}
        )
    )
    net.clock.advance(seconds=30)  # a new time step: the last code is spent
    return again.post("/api/v1/auth/totp", json={"code": net.code(again)})


def test_a_sealed_value_opens_for_its_context_and_key_only() -> None:
    sealer = Sealer(os.urandom(32))
    sealed = sealer.seal("JBSWY3DPEHPK3PXP", "user:1:totp")
    assert is_sealed(sealed) and "JBSWY3DPEHPK3PXP" not in sealed
    assert sealer.open(sealed, "user:1:totp") == "JBSWY3DPEHPK3PXP"
    assert sealer.seal("JBSWY3DPEHPK3PXP", "user:1:totp") != sealed  # a new nonce each time
    with pytest.raises(SealingError):
        sealer.open(sealed, "user:2:totp")  # copied onto another row
    with pytest.raises(SealingError, match="another key"):
        Sealer(os.urandom(32)).open(sealed, "user:1:totp")
    body = sealed[-10:]
    altered = sealed[:-10] + ("A" if body[0] != "A" else "B") + body[1:]
    for bad in (altered, "JBSWY3DPEHPK3PXP", sealed[:20], f"s1.{sealer.key_id}.!!"):
        with pytest.raises(SealingError):
            sealer.open(bad, "user:1:totp")


def test_keys_are_32_bytes_of_base64_and_the_file_is_the_owners_only(tmp_path: Path) -> None:
    key = key_from_file(tmp_path)
    assert len(key) == 32 and key_from_file(tmp_path) == key
    assert (tmp_path / "secret-key").stat().st_mode & 0o077 == 0
    for bad in ("short", base64.b64encode(os.urandom(16)).decode(), "not base64 at all!"):
        with pytest.raises(ValueError):
            parse_key(bad)
    with pytest.raises(ValueError, match="secret_key"):
        HubSettings(data_dir=tmp_path, secret_key="c2hvcnQ=")


def test_the_database_holds_the_second_factor_sealed(net: InProcessHub) -> None:
    person = net.log_in("clerk", OUTSIDE)  # enrols
    stored = _stored(net, "clerk")
    assert stored is not None and is_sealed(stored) and person.secret not in stored
    assert _code_login(net, person).status_code == 200


def test_a_sealed_secret_copied_onto_another_row_opens_nothing(net: InProcessHub) -> None:
    clerk = net.log_in("clerk", OUTSIDE)
    typist = net.log_in("typist", OUTSIDE)
    _store(net, "typist", _stored(net, "clerk"))
    # The typist, given the clerk's secret: refused, audited, no server error.
    stolen = Person("typist", typist.client, secret=clerk.secret)
    r = _code_login(net, stolen)
    assert r.status_code == 403 and "cannot be checked" in r.json()["detail"]
    r = net.admin("GET", "/api/v1/audit", params={"action": "user:totp:failure"})
    assert r.json()[-1]["actor"] == "typist"


def test_secrets_stored_before_sealing_are_sealed_at_start(net: InProcessHub) -> None:
    person = net.log_in("clerk", OUTSIDE)
    # As a database from before sealing holds it: the secret itself.
    _store(net, "clerk", person.secret)
    settings = net.hub.settings
    Hub.open(settings).engine.dispose()  # the next start, on the same database and key
    stored = _stored(net, "clerk")
    assert stored is not None and is_sealed(stored)
    assert _code_login(net, person).status_code == 200


def test_a_hub_with_another_key_refuses_to_start(net: InProcessHub, tmp_path: Path) -> None:
    other = HubSettings(
        data_dir=tmp_path / "elsewhere",
        database_url=net.hub.settings.resolved_database_url,
        secret_key=base64.b64encode(os.urandom(32)).decode(),
    )
    with pytest.raises(SealingError, match="same secret_key"):
        Hub.open(other)
    # The same key given in the settings, as every process of a network is given it.
    key = base64.b64encode(key_from_file(net.hub.settings.data_dir)).decode()
    same = other.model_copy(update={"secret_key": SecretStr(key)})
    Hub.open(same).engine.dispose()


def test_a_secret_stored_unsealed_meanwhile_works_and_is_sealed(net: InProcessHub) -> None:
    """During an upgrade, a process of the earlier version may still store a secret as it
    is: the login works, and the secret is sealed then."""
    person = net.log_in("clerk", OUTSIDE)
    _store(net, "clerk", person.secret)
    assert _code_login(net, person).status_code == 200
    stored = _stored(net, "clerk")
    assert stored is not None and is_sealed(stored)
