"""Users, roles, logins, second factors, sessions and API tokens.

Every function takes the time as an argument: the hub passes its clock, tests pass theirs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.accounts import passwords, totp
from imagebridge.accounts.models import ApiToken, LoginThrottle, Role, User, WebSession
from imagebridge.accounts.permissions import (
    ADMIN_PERMISSIONS,
    BUILTIN_ROLES,
    Permission,
    parse_permissions,
)
from imagebridge.institutions.models import Institution, TrustedNetwork
from imagebridge.sealing import PREFIX, Sealer, SealingError, is_sealed
from imagebridge.settings import AccountPolicy

SESSION_TOKEN_PREFIX = "ibs_"
API_TOKEN_PREFIX = "ibu_"
# Writing last_seen on every request would make each read a write; this is precise enough
# for a 30-minute idle timeout.
LAST_SEEN_RESOLUTION = timedelta(seconds=30)
# Verified when the user name is unknown, so both cases take the same time.
_DUMMY_HASH = passwords.hash_password(secrets.token_urlsafe(16))


class AccountError(Exception):
    """Refused, with a reason that can be shown to the person."""

    def __init__(self, reason: str, status: int = 400, audit_action: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.audit_action = audit_action


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_builtin_roles(session: Session) -> None:
    """Create or correct the built-in roles (their permissions are defined in code)."""
    existing = {r.name: r for r in session.scalars(select(Role).where(Role.builtin.is_(True)))}
    for name, perms in BUILTIN_ROLES.items():
        role = existing.get(name)
        wanted = sorted(p.value for p in perms)
        if role is None:
            session.add(Role(name=name, permissions=wanted, builtin=True))
        elif role.permissions != wanted:
            role.permissions = wanted


def permissions_of(user: User) -> frozenset[Permission]:
    if user.kind == "external":
        # An external user's rights come from their shares, never from roles.
        return frozenset({Permission.VIEW_SHARED})
    return frozenset(Permission(p) for role in user.roles for p in role.permissions)


def needs_second_factor(session: Session, user: User, address: str) -> bool:
    """Always for external users and administrators; otherwise when outside the
    institution's trusted networks."""
    if user.kind == "external" or permissions_of(user) & ADMIN_PERMISSIONS:
        return True
    return not address_is_trusted(session, user.institution_id, address)


def address_is_trusted(session: Session, institution_id: int, address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for cidr in session.scalars(
        select(TrustedNetwork.cidr).where(TrustedNetwork.institution_id == institution_id)
    ):
        network = ipaddress.ip_network(cidr, strict=False)
        if ip.version == network.version and ip in network:
            return True
    return False


def find_role(session: Session, name: str, institution_id: int | None) -> Role | None:
    """A built-in role, or a custom role of this institution."""
    return session.scalar(
        select(Role).where(
            Role.name == name,
            (Role.builtin.is_(True)) | (Role.institution_id == institution_id),
        )
    )


def create_user(
    session: Session,
    *,
    institution: Institution,
    username: str,
    password: str,
    role_names: list[str],
    kind: str = "staff",
    display_name: str = "",
    email: str = "",
) -> User:
    username = username.strip().lower()
    if not username or len(username) > 64 or not username.isprintable():
        raise AccountError("a user name is 1 to 64 printable characters", 422)
    if kind not in ("staff", "external"):
        raise AccountError("kind is staff or external", 422)
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise AccountError("that user name is taken", 409)
    try:
        passwords.check_policy(password, user_name=username, email=email)
    except passwords.WeakPassword as exc:
        raise AccountError(str(exc), 422) from exc
    roles = resolve_roles(session, role_names, institution.id)
    if kind == "external" and roles:
        raise AccountError("external users have no roles; share studies with them", 422)
    user = User(
        username=username,
        institution_id=institution.id,
        kind=kind,
        display_name=display_name,
        email=email,
        password_hash=passwords.hash_password(password),
        roles=roles,
    )
    session.add(user)
    session.flush()
    return user


def resolve_roles(session: Session, names: list[str], institution_id: int) -> list[Role]:
    roles = []
    for name in names:
        role = find_role(session, name, institution_id)
        if role is None:
            raise AccountError(f"no such role: {name}", 422)
        roles.append(role)
    return roles


def create_role(
    session: Session, *, institution_id: int, name: str, permissions: list[str]
) -> Role:
    try:
        perms = parse_permissions(permissions)
    except ValueError as exc:
        raise AccountError(str(exc), 422) from exc
    if Permission.ADMIN_NETWORK in perms:
        raise AccountError("network administration is not given by custom roles", 422)
    if find_role(session, name, institution_id) is not None:
        raise AccountError("a role of that name exists", 409)
    role = Role(
        name=name,
        institution_id=institution_id,
        permissions=sorted(p.value for p in perms),
    )
    session.add(role)
    session.flush()
    return role


def change_password(session: Session, user: User, current: str, new: str) -> None:
    if not passwords.verify_password(user.password_hash, current):
        raise AccountError("the current password is wrong", 403)
    try:
        passwords.check_policy(new, user_name=user.username, email=user.email)
    except passwords.WeakPassword as exc:
        raise AccountError(str(exc), 422) from exc
    user.password_hash = passwords.hash_password(new)


# --- logging in -------------------------------------------------------------------------


@dataclass
class Login:
    user: User
    token: str
    web_session: WebSession
    second_factor: str  # "" (none needed) | "code" | "enrol"


def _throttle(
    session: Session, address: str, now: datetime, policy: AccountPolicy
) -> LoginThrottle:
    row = session.get(LoginThrottle, address)
    window = timedelta(minutes=policy.address_window_minutes)
    if row is None:
        row = LoginThrottle(source_address=address, window_start=now, failures=0)
        session.add(row)
    elif row.window_start + window <= now:
        row.window_start, row.failures = now, 0
    return row


def log_in(
    session: Session,
    username: str,
    password: str,
    *,
    address: str,
    now: datetime,
    policy: AccountPolicy,
) -> Login:
    """Check the password and open a session, complete or waiting for a second factor.

    Raises AccountError with one reason for unknown users and wrong passwords alike."""
    throttle = _throttle(session, address, now, policy)
    if throttle.failures >= policy.address_failure_limit:
        raise AccountError(
            "too many failed logins from this address; try again later",
            429,
            "user:login:throttled",
        )
    user = session.scalar(select(User).where(User.username == username.strip().lower()))
    if user is None:
        passwords.verify_password(_DUMMY_HASH, password)
        throttle.failures += 1
        raise AccountError("wrong user name or password", 401, "user:login:failure")
    if user.disabled_at is not None:
        throttle.failures += 1
        raise AccountError("wrong user name or password", 401, "user:login:failure")
    if is_locked(user, now):
        raise AccountError(
            "this account is locked after repeated failed logins; an administrator can "
            "unlock it, or try again later",
            403,
            "user:login:locked",
        )
    if not passwords.verify_password(user.password_hash, password):
        throttle.failures += 1
        note_failure(user, now, policy)
        raise AccountError("wrong user name or password", 401, "user:login:failure")
    user.failed_logins = 0
    user.locked_until = None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    second = ""
    if needs_second_factor(session, user, address):
        second = "code" if user.totp_enabled else "enrol"
    token, web_session = _open_session(session, user, address, now, mfa_passed=not second)
    return Login(user, token, web_session, second)


def note_failure(user: User, now: datetime, policy: AccountPolicy) -> None:
    """A wrong password or second factor: enough in a row lock the account for a while."""
    user.failed_logins += 1
    if user.failed_logins >= policy.lockout_threshold:
        user.locked_until = now + timedelta(minutes=policy.lockout_minutes)
        user.failed_logins = 0


def is_locked(user: User, now: datetime) -> bool:
    return user.locked_until is not None and user.locked_until > now


def _open_session(
    session: Session, user: User, address: str, now: datetime, *, mfa_passed: bool
) -> tuple[str, WebSession]:
    token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)
    web_session = WebSession(
        token_sha256=digest(token),
        user=user,
        mfa_passed=mfa_passed,
        source_address=address[:64],
        created_at=now,
        last_seen_at=now,
    )
    session.add(web_session)
    session.flush()
    return token, web_session


def rotate(web_session: WebSession) -> str:
    """A new token for the same session, when its privileges change (no fixation)."""
    token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)
    web_session.token_sha256 = digest(token)
    return token


def find_session(
    session: Session, token: str, now: datetime, policy: AccountPolicy
) -> WebSession | None:
    """The live session for a cookie, or None when unknown, ended or timed out."""
    if not token.startswith(SESSION_TOKEN_PREFIX):
        return None
    web_session = session.scalar(select(WebSession).where(WebSession.token_sha256 == digest(token)))
    if web_session is None or web_session.ended_at is not None:
        return None
    idle = timedelta(minutes=policy.session_idle_minutes)
    absolute = timedelta(hours=policy.session_absolute_hours)
    if web_session.last_seen_at + idle <= now or web_session.created_at + absolute <= now:
        web_session.ended_at = now
        return None
    if web_session.user.disabled_at is not None:
        return None
    if now - web_session.last_seen_at >= LAST_SEEN_RESOLUTION:
        web_session.last_seen_at = now
    return web_session


def end_sessions(session: Session, user_id: int, now: datetime, *, keep: str | None = None) -> int:
    """End the user's live sessions, except the one whose cookie is ``keep``."""
    query = select(WebSession).where(WebSession.user_id == user_id, WebSession.ended_at.is_(None))
    if keep:
        query = query.where(WebSession.token_sha256 != digest(keep))
    live = session.scalars(query).all()
    for s in live:
        s.ended_at = now
    return len(live)


def live_sessions(session: Session, user_id: int, current_cookie: str) -> list[dict[str, Any]]:
    """A person's own live sessions: where and when each began, and which is this one."""
    current = digest(current_cookie)
    rows = session.scalars(
        select(WebSession)
        .where(WebSession.user_id == user_id, WebSession.ended_at.is_(None))
        .order_by(WebSession.id)
    )
    return [
        {
            "id": s.id,
            "source_address": s.source_address,
            "created_at": s.created_at,
            "last_seen_at": s.last_seen_at,
            "current": s.token_sha256 == current,
        }
        for s in rows
    ]


def csrf_token(session_token: str) -> str:
    """Bound to the session: a page reads it from /auth/session and echoes it in a header."""
    return hashlib.sha256(b"csrf:" + session_token.encode()).hexdigest()


# --- the second factor ------------------------------------------------------------------


def _totp_context(user: User) -> str:
    """What a user's sealed secret is bound to: it opens on that user's row only."""
    return f"user:{user.id}:totp"


def _totp_secret(user: User, sealer: Sealer) -> str:
    assert user.totp_secret is not None
    if not is_sealed(user.totp_secret):
        # Stored unsealed (by a process of an earlier version, during an upgrade): sealed now.
        secret = user.totp_secret
        user.totp_secret = sealer.seal(secret, _totp_context(user))
        return secret
    try:
        return sealer.open(user.totp_secret, _totp_context(user))
    except SealingError as exc:
        # Altered in the database, or copied from another row: no code can match it.
        raise AccountError(
            "the second factor cannot be checked; an administrator can reset it",
            403,
            "user:totp:failure",
        ) from exc


def seal_second_factors(session: Session, sealer: Sealer) -> int:
    """Seal the second-factor secrets stored before they were sealed; how many."""
    plain = session.scalars(
        select(User).where(User.totp_secret.is_not(None), ~User.totp_secret.startswith(PREFIX))
    ).all()
    for user in plain:
        assert user.totp_secret is not None
        user.totp_secret = sealer.seal(user.totp_secret, _totp_context(user))
    return len(plain)


def start_enrolment(user: User, sealer: Sealer) -> str:
    """A new secret, not yet active: the first correct code confirms it. The secret is
    returned to be shown once, and kept sealed."""
    if user.totp_enabled:
        raise AccountError("two-factor login is already set up; an administrator can reset it", 409)
    secret = totp.new_secret()
    user.totp_secret = sealer.seal(secret, _totp_context(user))
    return secret


def confirm_enrolment(user: User, code: str, now: datetime, sealer: Sealer) -> list[str]:
    if user.totp_secret is None or user.totp_enabled:
        raise AccountError("no enrolment in progress", 409)
    secret = _totp_secret(user, sealer)
    step = totp.verify_code(secret, code, at=now.timestamp(), last_step=None)
    if step is None:
        raise AccountError("that code is not right; check the device's clock", 401)
    codes = totp.new_recovery_codes()
    user.totp_enabled = True
    user.totp_last_step = step
    user.recovery_codes = [totp.hash_recovery_code(c) for c in codes]
    return codes


def check_second_factor(user: User, code: str, now: datetime, sealer: Sealer) -> str:
    """Accept a current TOTP code (once) or an unused recovery code; returns which was used."""
    if not user.totp_enabled or user.totp_secret is None:
        raise AccountError("two-factor login is not set up", 409)
    code = code.strip()
    if code.isdigit():
        at = now.timestamp()
        secret = _totp_secret(user, sealer)
        step = totp.verify_code(secret, code, at=at, last_step=user.totp_last_step)
        if step is not None:
            user.totp_last_step = step
            return "totp"
        if totp.verify_code(secret, code, at=at, last_step=None) is not None:
            raise AccountError("that code was already used", 401, "user:totp:replayed")
        raise AccountError("wrong code", 401, "user:totp:failure")
    matched = totp.match_recovery_code(code, list(user.recovery_codes))
    if matched is None:
        raise AccountError("wrong code", 401, "user:totp:failure")
    user.recovery_codes = [h for h in user.recovery_codes if h != matched]
    return "recovery_code"


def reset_second_factor(user: User) -> None:
    user.totp_secret = None
    user.totp_enabled = False
    user.totp_last_step = None
    user.recovery_codes = []


# --- API tokens -------------------------------------------------------------------------


def create_api_token(
    session: Session,
    user: User,
    *,
    name: str,
    scopes: list[str],
    days: int,
    now: datetime,
    policy: AccountPolicy,
) -> tuple[ApiToken, str]:
    try:
        wanted = parse_permissions(scopes)
    except ValueError as exc:
        raise AccountError(str(exc), 422) from exc
    if not wanted:
        raise AccountError("name at least one scope", 422)
    beyond = wanted - permissions_of(user)
    if beyond:
        raise AccountError(
            "a token cannot carry permissions its user lacks: "
            + ", ".join(sorted(p.value for p in beyond)),
            403,
        )
    if not 1 <= days <= policy.api_token_max_days:
        raise AccountError(f"a token lives 1 to {policy.api_token_max_days} days", 422)
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        token_sha256=digest(token),
        user=user,
        name=name,
        scopes=sorted(p.value for p in wanted),
        created_at=now,
        expires_at=now + timedelta(days=days),
    )
    session.add(row)
    session.flush()
    return row, token


def api_tokens_of(session: Session, user_id: int) -> list[dict[str, Any]]:
    """A person's API tokens, as they are shown (never the token itself)."""
    rows = session.scalars(
        select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)
    )
    return [described_token(t) for t in rows]


def described_token(t: ApiToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "scopes": t.scopes,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "revoked": t.revoked_at is not None,
    }


def find_api_token(session: Session, token: str, now: datetime) -> ApiToken | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest(token)))
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        return None
    if row.user.disabled_at is not None:
        return None
    return row
