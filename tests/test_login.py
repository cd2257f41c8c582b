"""Logging in: passwords, the second factor where the rules ask for it, lockout, sessions and
API tokens, all on the hub's real application with a clock the test moves (no sleeping)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hubapp import INSIDE, OUTSIDE, PASSWORD, InProcessHub, Person
from imagebridge.accounts import totp
from imagebridge.hub.auth import CSRF_HEADER, SESSION_COOKIE


@pytest.fixture
def net(tmp_path: Any) -> Iterator[InProcessHub]:
    t = InProcessHub(tmp_path / "hub")
    t.add_institution("SEG")
    t.add_user("SEG", "clerk", ["clerk"])
    t.add_user("SEG", "manager", ["pacs_manager"])
    t.add_user("SEG", "solicitor", [], external=True)
    yield t
    t.close()


def _password(net: InProcessHub, username: str, address: str, password: str = PASSWORD) -> Any:
    person = Person(username, net.client(address))
    r = person.take(
        person.client.post("/api/v1/auth/login", json={"username": username, "password": password})
    )
    return person, r


def _events(net: InProcessHub, action: str) -> list[dict[str, Any]]:
    r = net.admin("GET", "/api/v1/audit", params={"action": action})
    events: list[dict[str, Any]] = r.json()
    return events


def test_inside_the_trusted_network_a_password_is_enough(net: InProcessHub) -> None:
    person, r = _password(net, "clerk", INSIDE)
    assert r.status_code == 200 and r.json()["second_factor"] == ""
    assert person.get("/api/v1/transfers").status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "secure" in cookie and "samesite=strict" in cookie
    assert _events(net, "user:login:success")[-1]["actor"] == "clerk"


def test_outside_the_trusted_network_the_second_factor_is_required(net: InProcessHub) -> None:
    person, r = _password(net, "clerk", OUTSIDE)
    assert r.json()["second_factor"] == "enrol"
    # Until it is given, the session opens nothing but the login steps.
    assert person.get("/api/v1/transfers").status_code == 401
    assert person.get("/api/v1/auth/session").json()["second_factor_pending"] is True
    r = person.post("/api/v1/auth/totp/enrol")
    assert r.status_code == 200
    enrolment = r.json()
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/")
    assert enrolment["qr_svg"].lstrip().startswith(("<svg", "<?xml"))
    person.secret = enrolment["secret"]
    assert person.post("/api/v1/auth/totp/confirm", json={"code": "000000"}).status_code in (
        401,
        422,
    )
    before = person.cookie
    r = person.take(person.post("/api/v1/auth/totp/confirm", json={"code": net.code(person)}))
    assert r.status_code == 200 and len(r.json()["recovery_codes"]) == 10
    # Privilege changed: the session token changed with it, and the old one is dead.
    assert person.cookie != before
    assert person.get("/api/v1/transfers").status_code == 200
    stale = Person("clerk", person.client, before, person.csrf)
    assert stale.get("/api/v1/transfers").status_code == 401


def test_administrators_and_external_users_always_give_a_second_factor(
    net: InProcessHub,
) -> None:
    for username in ("manager", "solicitor"):
        _, r = _password(net, username, INSIDE)
        assert r.json()["second_factor"] == "enrol", username


def test_a_code_works_once_and_a_replay_is_refused_and_audited(net: InProcessHub) -> None:
    person = net.log_in("clerk", OUTSIDE)  # enrols
    net.clock.advance(minutes=5)
    _, r = _password(net, "clerk", OUTSIDE)
    second = Person("clerk", net.client(OUTSIDE))
    second.take(r)
    second.secret = person.secret
    code = net.code(second)
    assert second.take(second.post("/api/v1/auth/totp", json={"code": code})).status_code == 200
    # The same code again, within its window, for a new login: a replay.
    _, r = _password(net, "clerk", OUTSIDE)
    third = Person("clerk", net.client(OUTSIDE), secret=person.secret)
    third.take(r)
    r = third.post("/api/v1/auth/totp", json={"code": code})
    assert r.status_code == 401 and r.json()["detail"] == "that code was already used"
    replays = _events(net, "user:totp:replayed")
    assert replays and replays[-1]["actor"] == "clerk" and replays[-1]["outcome"] == "refused"
    # The next time step's code is good.
    net.clock.advance(seconds=30)
    assert (
        third.take(third.post("/api/v1/auth/totp", json={"code": net.code(third)})).status_code
        == 200
    )


def test_a_recovery_code_works_once(net: InProcessHub) -> None:
    person = net.log_in("clerk", OUTSIDE)
    spare = person.recovery_codes[0]
    for expected in (200, 401):
        _, r = _password(net, "clerk", OUTSIDE)
        again = Person("clerk", net.client(OUTSIDE))
        again.take(r)
        r = again.post("/api/v1/auth/totp", json={"code": spare.upper()})
        assert r.status_code == expected, r.text


def test_repeated_failures_lock_the_account_until_unlocked_or_later(net: InProcessHub) -> None:
    for _ in range(5):
        _, r = _password(net, "clerk", INSIDE, "wrong password, clearly")
        assert r.status_code == 401
    _, r = _password(net, "clerk", INSIDE)
    assert r.status_code == 403 and "locked" in r.json()["detail"]
    assert _events(net, "user:login:locked")
    # Lifted by time...
    net.clock.advance(minutes=16)
    _, r = _password(net, "clerk", INSIDE)
    assert r.status_code == 200
    # ...or by an administrator.
    for _ in range(5):
        _password(net, "clerk", INSIDE, "wrong password, clearly")
    assert _password(net, "clerk", INSIDE)[1].status_code == 403
    users = {u["username"]: u for u in net.admin("GET", "/api/v1/users").json()}
    net.admin("POST", f"/api/v1/users/{users['clerk']['id']}/unlock")
    assert _password(net, "clerk", INSIDE)[1].status_code == 200


def test_wrong_second_factors_count_towards_the_lock(net: InProcessHub) -> None:
    person = net.log_in("clerk", OUTSIDE)
    _, r = _password(net, "clerk", OUTSIDE)
    guesser = Person("clerk", net.client(OUTSIDE))
    guesser.take(r)
    right = totp.code_at(person.secret, net.clock().timestamp())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(5):
        assert guesser.post("/api/v1/auth/totp", json={"code": wrong}).status_code == 401
    r = guesser.post("/api/v1/auth/totp", json={"code": right})
    assert r.status_code == 403 and "locked" in r.json()["detail"]


def test_failures_from_one_address_are_throttled(net: InProcessHub) -> None:
    for i in range(30):
        _password(net, f"nobody{i}", OUTSIDE, "not the password at all")
    _, r = _password(net, "clerk", OUTSIDE)
    assert r.status_code == 429
    # Another address is not affected.
    assert _password(net, "clerk", INSIDE)[1].status_code == 200


def test_sessions_end_when_idle_at_their_absolute_limit_and_on_logout(
    net: InProcessHub,
) -> None:
    person = net.log_in("clerk", INSIDE)
    net.clock.advance(minutes=29)
    assert person.get("/api/v1/transfers").status_code == 200
    net.clock.advance(minutes=31)
    assert person.get("/api/v1/transfers").status_code == 401
    # Active all the time, still not past 12 hours.
    person = net.log_in("clerk", INSIDE)
    for _ in range(12 * 3):
        net.clock.advance(minutes=20)
        status = person.get("/api/v1/transfers").status_code
    assert status == 401
    person = net.log_in("clerk", INSIDE)
    assert person.post("/api/v1/auth/logout").status_code == 200
    assert person.get("/api/v1/transfers").status_code == 401


def test_an_administrator_ends_a_users_sessions(net: InProcessHub) -> None:
    person = net.log_in("clerk", INSIDE)
    users = {u["username"]: u for u in net.admin("GET", "/api/v1/users").json()}
    r = net.admin("POST", f"/api/v1/users/{users['clerk']['id']}/sessions/end")
    assert r.json()["sessions_ended"] >= 1
    assert person.get("/api/v1/transfers").status_code == 401


def test_forms_need_the_csrf_token_and_cookies_cannot_be_forged(net: InProcessHub) -> None:
    person = net.log_in("clerk", INSIDE)
    no_csrf = {"Cookie": f"{SESSION_COOKIE}={person.cookie}"}
    r = person.client.post("/api/v1/transfers/x/retry", headers=no_csrf)
    assert r.status_code == 403 and CSRF_HEADER in r.json()["detail"]
    forged = Person("clerk", person.client, person.cookie[:-2] + "xx", person.csrf)
    assert forged.get("/api/v1/transfers").status_code == 401


def test_api_tokens_are_scoped_expire_and_can_be_revoked(net: InProcessHub) -> None:
    person = net.log_in("clerk", INSIDE)
    r = person.post("/api/v1/tokens", json={"name": "x", "scopes": ["download"], "days": 5})
    assert r.status_code == 403  # a clerk cannot download, so neither can its token
    r = person.post(
        "/api/v1/tokens", json={"name": "tracker", "scopes": ["track_transfers"], "days": 5}
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    client = net.client(OUTSIDE)
    assert client.get("/api/v1/transfers", headers=bearer).status_code == 200
    # Within its scope only: the clerk may send, the token may not.
    assert client.post("/api/v1/transfers", headers=bearer, json={}).status_code == 403
    net.clock.advance(days=6)
    assert client.get("/api/v1/transfers", headers=bearer).status_code == 401
    person = net.log_in("clerk", INSIDE)  # the session ended meanwhile
    r = person.post("/api/v1/tokens", json={"name": "t2", "scopes": ["track_transfers"]})
    second = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.get("/api/v1/transfers", headers=second).status_code == 200
    person.post(f"/api/v1/tokens/{r.json()['id']}/revoke")
    assert client.get("/api/v1/transfers", headers=second).status_code == 401


def test_weak_passwords_are_refused_with_the_reason(net: InProcessHub) -> None:
    for password, reason in (("short", "12"), ("password1234", "common")):
        r = net.client().post(
            "/api/v1/users",
            headers=net.admin_headers,
            json={"username": "newbie", "password": password, "institution": "SEG"},
        )
        assert r.status_code == 422 and reason in r.json()["detail"], r.text


def test_changing_the_password_ends_the_other_sessions(net: InProcessHub) -> None:
    here = net.log_in("clerk", INSIDE)
    elsewhere = net.log_in("clerk", INSIDE, Person("clerk", net.client(INSIDE)))
    r = here.post(
        "/api/v1/auth/password", json={"current": "wrong guess at it", "new": PASSWORD + "!"}
    )
    assert r.status_code == 403
    r = here.post("/api/v1/auth/password", json={"current": PASSWORD, "new": "short"})
    assert r.status_code == 422
    new = "a brand new passphrase 77"
    r = here.post("/api/v1/auth/password", json={"current": PASSWORD, "new": new})
    assert r.status_code == 200 and r.json()["other_sessions_ended"] == 1
    assert here.get("/api/v1/transfers").status_code == 200
    assert elsewhere.get("/api/v1/transfers").status_code == 401


def test_a_user_sees_and_ends_their_own_sessions(net: InProcessHub) -> None:
    here = net.log_in("clerk", INSIDE)
    other = net.log_in("clerk", OUTSIDE, Person("clerk", net.client(OUTSIDE)))
    sessions = here.get("/api/v1/auth/sessions").json()
    assert len(sessions) == 2 and sum(s["current"] for s in sessions) == 1
    (theirs,) = [s for s in sessions if not s["current"]]
    assert theirs["source_address"] == OUTSIDE
    assert here.post(f"/api/v1/auth/sessions/{theirs['id']}/end").status_code == 200
    assert other.get("/api/v1/transfers").status_code == 401
    assert (
        net.log_in("manager", INSIDE)
        .post(f"/api/v1/auth/sessions/{sessions[0]['id']}/end")
        .status_code
        == 404
    )
