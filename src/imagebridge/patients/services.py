"""The patient index: linking what the hub indexes and what institutions register to one
person per NHS number, raising identity flags where they disagree, and the lookups of
PIXm, PDQm and the receiving gateways.

Disagreements are flagged for a human, never resolved here: two records of one NHS number
with different birth dates stay two records, and a local ID linked to two NHS numbers
gives neither to a delivery.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Select, false, func, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from imagebridge.actors import Actor, manages
from imagebridge.audit.services import record
from imagebridge.db import one_of, utcnow
from imagebridge.index.models import Patient, Study
from imagebridge.index.visibility import Scope
from imagebridge.institutions.models import Institution
from imagebridge.patients.fhir import (
    NHS_SYSTEM,
    DateRange,
    Demographics,
    Identifier,
    from_person_name,
    local_system,
)
from imagebridge.patients.models import (
    INDEXED,
    REGISTERED,
    IdentityFlag,
    PatientIdentifier,
    Person,
)

PI = PatientIdentifier
_COMPARED = (("birth_date", "birth date"), ("sex", "sex"))
# Values per IN list: within SQLite's oldest limit of bound parameters (999) as well.
IN_CHUNK = 500


# -- maintaining the index ------------------------------------------------------------------


def person_for(session: Session, nhs_number: str) -> Person:
    """The person of an NHS number, created if new (safely beside other hub processes)."""
    found = session.scalar(select(Person).where(Person.nhs_number == nhs_number))
    if found is not None:
        return found
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(Person)
        .values(nhs_number=nhs_number, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["nhs_number"])
    )
    return session.scalars(select(Person).where(Person.nhs_number == nhs_number)).one()


def demographics_of(row: PatientIdentifier) -> Demographics:
    return Demographics(row.family, row.given, row.birth_date, row.sex)


def _set_demographics(row: PatientIdentifier, d: Demographics) -> None:
    row.family, row.given, row.birth_date, row.sex = d.family, d.given, d.birth_date, d.sex
    row.updated_at = utcnow()


def link_indexed(session: Session, patients: Iterable[Patient]) -> list[IdentityFlag]:
    """Link index Patient rows that carry an NHS number to their person; the flags raised.

    A row whose NHS number changed keeps its old link as a detached identifier beside the
    new one: the local ID is then linked to two NHS numbers, which is flagged.
    """
    flags: list[IdentityFlag] = []
    codes: dict[int, str] = {}
    for patient in patients:
        nhs_number = patient.nhs_number
        # A PatientID that is the NHS number itself is nobody's local identifier.
        if nhs_number is None or not patient.patient_id or patient.patient_id == nhs_number:
            continue
        wanted = Demographics(
            *from_person_name(patient.patient_name), patient.birth_date[:8], patient.sex[:16]
        )
        linked = session.execute(
            select(PI, Person.nhs_number)
            .join(Person, Person.id == PI.person_id)
            .where(PI.patient_ref == patient.id)
        ).first()
        row = linked[0] if linked else None
        if linked and linked[1] == nhs_number and demographics_of(linked[0]) == wanted:
            continue  # the usual case: one more batch of a patient already linked
        if linked and linked[1] != nhs_number:
            linked[0].patient_ref = None  # kept, detached: the old link stays on record
            session.flush()
            row = None
        person = person_for(session, nhs_number)
        if row is None:
            if patient.institution_id not in codes:
                codes[patient.institution_id] = session.scalars(
                    select(Institution.code).where(Institution.id == patient.institution_id)
                ).one()
            row = PI(
                person=person,
                institution_id=patient.institution_id,
                issuer=(patient.issuer_of_patient_id or codes[patient.institution_id])[:64],
                value=patient.patient_id[:64],
                source=INDEXED,
                patient_ref=patient.id,
            )
            session.add(row)
        _set_demographics(row, wanted)
        session.flush()
        flags += check(session, row)
    return flags


def register(
    session: Session,
    institution_id: int,
    issuer: str,
    value: str,
    nhs_number: str,
    demographics: Demographics,
    actor: dict[str, Any],
) -> tuple[PatientIdentifier, bool]:
    """Record an institution's statement "NHS number X is our (issuer, value)": the row and
    whether it is new. A later statement about the same local ID replaces the earlier."""
    person = person_for(session, nhs_number)
    row = session.scalar(
        select(PI).where(
            PI.institution_id == institution_id,
            PI.issuer == issuer,
            PI.value == value,
            PI.source == REGISTERED,
        )
    )
    created = row is None
    if row is None:
        row = PI(institution_id=institution_id, issuer=issuer, value=value, source=REGISTERED)
        session.add(row)
    row.person = person
    _set_demographics(row, demographics)
    session.flush()
    record(
        session,
        "patient:identity:registered",
        institution_id=institution_id,
        patient_ref=nhs_number,
        detail={"system": local_system(issuer), "created": created},
        **actor,
    )
    check(session, row, actor)
    return row, created


def check(
    session: Session, row: PatientIdentifier, actor: dict[str, Any] | None = None
) -> list[IdentityFlag]:
    """Compare a new or changed identifier with the person's others and with the same local
    ID elsewhere; a flag for each disagreement not raised before."""
    flags: list[IdentityFlag] = []
    others = session.scalars(select(PI).where(PI.person_id == row.person_id, PI.id != row.id))
    for other in others:
        for field, label in _COMPARED:
            mine, theirs = getattr(row, field), getattr(other, field)
            if mine and theirs and mine != theirs:
                flags += _flag(
                    session, field, f"{label} differs", row, other, (mine, theirs), actor
                )
    same_local_id = session.scalars(
        select(PI).where(
            PI.institution_id == row.institution_id,
            PI.issuer == row.issuer,
            PI.value == row.value,
            PI.person_id != row.person_id,
        )
    )
    for other in same_local_id:
        numbers = (row.person.nhs_number, other.person.nhs_number)
        flags += _flag(
            session, "nhs_number", "one local ID, two NHS numbers", row, other, numbers, actor
        )
    return flags


def _flag(
    session: Session,
    kind: str,
    reason: str,
    row: PatientIdentifier,
    other: PatientIdentifier,
    values: tuple[str, str],
    actor: dict[str, Any] | None,
) -> list[IdentityFlag]:
    first, second = sorted([(row.id, values[0]), (other.id, values[1])])
    signature = f"{kind}:{first[0]}:{second[0]}:{first[1]}:{second[1]}"
    if session.scalar(select(IdentityFlag.id).where(IdentityFlag.signature == signature)):
        return []
    flag = IdentityFlag(
        kind=kind,
        signature=signature[:300],
        identifier_id=row.id,
        other_identifier_id=other.id,
        reason=f"{reason}: {values[0]} and {values[1]}"[:300],
    )
    session.add(flag)
    session.flush()
    record(
        session,
        "patient:identity-flag:raised",
        institution_id=row.institution_id,
        patient_ref=row.person.nhs_number,
        detail={"flag": flag.id, "kind": kind},
        **(actor or {}),
    )
    return [flag]


# -- flags ----------------------------------------------------------------------------------


def flags_query(institution_id: int | None, status: str | None) -> Select[IdentityFlag]:
    """Flags touching an identifier of the institution (all of them for None)."""
    query = select(IdentityFlag).order_by(IdentityFlag.id)
    if institution_id is not None:
        mine = select(PI.id).where(PI.institution_id == institution_id)
        query = query.where(
            or_(IdentityFlag.identifier_id.in_(mine), IdentityFlag.other_identifier_id.in_(mine))
        )
    if status == "open":
        query = query.where(IdentityFlag.resolved_at.is_(None))
    elif status == "resolved":
        query = query.where(IdentityFlag.resolved_at.is_not(None))
    return query


def resolve(flag: IdentityFlag, by: str, resolution: str, now: datetime) -> None:
    flag.resolved_at = now
    flag.resolved_by = by
    flag.resolution = resolution


# -- lookups --------------------------------------------------------------------------------


def visible(scope: Scope) -> ColumnElement[bool]:
    """Identifiers a caller may see: those of the institutions whose studies it sees, and
    those of patients whose studies were sent to its institution."""
    clauses: list[ColumnElement[bool]] = []
    if scope.institutions:
        clauses.append(PI.institution_id.in_(scope.institutions))
    if scope.receiver is not None:
        received = Scope(frozenset(), scope.receiver).where()
        clauses.append(PI.patient_ref.in_(select(Study.patient_ref).where(received)))
    return or_(*clauses) if clauses else false()


def known_issuer(session: Session, scope: Scope, issuer: str) -> bool:
    """An issuer is known if it is an institution's code or names an identifier the caller
    sees: others' issuers stay as unknown as their patients."""
    if session.scalar(select(Institution.id).where(Institution.code == issuer)):
        return True
    return (
        session.scalar(select(PI.id).where(visible(scope), PI.issuer == issuer).limit(1))
        is not None
    )


def _persons_with(identifier: Identifier, scope: Scope) -> Select[int]:
    if identifier.is_nhs_number:
        return select(Person.id).where(Person.nhs_number == identifier.value)
    return select(PI.person_id).where(
        visible(scope), PI.issuer == identifier.issuer, PI.value == identifier.value
    )


def _visible_rows(session: Session, scope: Scope, person_ids: Any) -> Sequence[PatientIdentifier]:
    # The institution's own statement first, then the most recently seen.
    return session.scalars(
        select(PI)
        .where(visible(scope), PI.person_id.in_(person_ids))
        .order_by(PI.source.desc(), PI.updated_at.desc(), PI.id)
    ).all()


@dataclass(frozen=True)
class CrossReference:
    nhs_numbers: list[str]
    targets: list[tuple[str, str]]  # (system, value)


def cross_reference(
    session: Session, scope: Scope, source: Identifier, systems: set[str] | None
) -> CrossReference | None:
    """ITI-83: the other identifiers of the person ``source`` names, within the scope and
    the target systems (all for None). None if the caller sees no such person."""
    rows = _visible_rows(session, scope, _persons_with(source, scope))
    if not rows:
        return None
    persons = {row.person_id: row.person.nhs_number for row in rows}
    found: list[tuple[str, str]] = [(NHS_SYSTEM, n) for n in sorted(set(persons.values()))]
    found += sorted({(local_system(r.issuer), r.value) for r in rows})
    targets = [
        t
        for t in found
        if t != (source.system, source.value) and (systems is None or t[0] in systems)
    ]
    return CrossReference(sorted(set(persons.values())), targets)


@dataclass(frozen=True)
class Criteria:
    """A PDQm search: each given criterion must hold for one identifier the caller sees."""

    family: str | None = None
    given: str | None = None
    birthdate: DateRange | None = None
    sex: str | None = None
    identifier: Identifier | None = None


def _matching_persons(scope: Scope, c: Criteria) -> Select[int]:
    query = select(PI.person_id).where(visible(scope)).distinct()
    if c.family is not None:
        query = query.where(PI.family.istartswith(c.family, autoescape=True))
    if c.given is not None:
        # FHIR string search: any given name starting with the text.
        query = query.where(
            or_(
                PI.given.istartswith(c.given, autoescape=True),
                PI.given.icontains(" " + c.given, autoescape=True),
            )
        )
    if c.birthdate is not None:
        if c.birthdate.low is not None:
            query = query.where(PI.birth_date >= c.birthdate.low)
        if c.birthdate.high is not None:
            query = query.where(PI.birth_date <= c.birthdate.high, PI.birth_date != "")
    if c.sex is not None:
        query = query.where(PI.sex == c.sex)
    if c.identifier is not None:
        query = query.where(PI.person_id.in_(_persons_with(c.identifier, scope)))
    return query


def search(
    session: Session, scope: Scope, criteria: Criteria, count: int, offset: int = 0
) -> tuple[int, list[tuple[Person, list[PatientIdentifier]]]]:
    """ITI-78: how many persons match, and a page of them with the identifiers the caller
    sees."""
    matching = _matching_persons(scope, criteria).subquery()
    total = session.scalar(select(func.count()).select_from(matching)) or 0
    ids = list(
        session.scalars(
            select(matching.c.person_id).order_by(matching.c.person_id).offset(offset).limit(count)
        )
    )
    return total, _with_rows(session, scope, ids)


def read(
    session: Session, scope: Scope, person_id: int
) -> tuple[Person, list[PatientIdentifier]] | None:
    found = _with_rows(session, scope, [person_id])
    return found[0] if found else None


def _with_rows(
    session: Session, scope: Scope, person_ids: list[int]
) -> list[tuple[Person, list[PatientIdentifier]]]:
    by_person: dict[int, list[PatientIdentifier]] = {}
    for row in _visible_rows(session, scope, person_ids):
        by_person.setdefault(row.person_id, []).append(row)
    return [(rows[0].person, rows) for pid in person_ids if (rows := by_person.get(pid))]


def resource_parts(
    rows: list[PatientIdentifier],
) -> tuple[list[tuple[str, str]], list[Demographics]]:
    """The distinct (issuer, value) identifiers and the demographics of visible rows."""
    identifiers = list(dict.fromkeys((r.issuer, r.value) for r in rows))
    return identifiers, [demographics_of(r) for r in rows]


@dataclass(frozen=True)
class LocalId:
    """The answer to a receiving gateway: its institution's identifier for an NHS number.

    ``conflict`` says why the institution's records allow no answer; then the study must go
    under a foreign ID. Without either, the hub knows no local ID.
    """

    patient_id: str | None = None
    issuer: str = ""
    birth_date: str = ""
    sex: str = ""
    conflict: str = ""

    def as_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copies cost more than the lookups of a batch.
        return dict(vars(self))


def local_id(session: Session, institution_id: int, nhs_number: str) -> LocalId:
    """The institution's local ID for an NHS number, or why it has none to file under."""
    return local_ids(session, institution_id, [nhs_number])[nhs_number]


def local_ids(
    session: Session, institution_id: int, nhs_numbers: Collection[str]
) -> dict[str, LocalId]:
    """``local_id`` for each of many NHS numbers in two queries (per IN_CHUNK numbers),
    not two each: the matches of one C-FIND name hundreds of patients."""
    held = _held_rows(session, institution_id, nhs_numbers)
    local = {(r.issuer, r.value) for rows in held.values() for r in rows}
    named = _persons_named(session, institution_id, local)
    return {n: _decide(held.get(n, []), named) for n in nhs_numbers}


class _Held(NamedTuple):
    """What the decision needs of one identifier row."""

    person_id: int
    issuer: str
    value: str
    source: str
    birth_date: str
    sex: str


def _held_rows(
    session: Session, institution_id: int, nhs_numbers: Collection[str]
) -> dict[str, list[_Held]]:
    """The institution's identifier rows of each NHS number, most recently updated first."""
    held: dict[str, list[_Held]] = {}
    for chunk in _chunks(set(nhs_numbers)):
        rows = session.execute(
            select(
                Person.nhs_number,
                PI.person_id,
                PI.issuer,
                PI.value,
                PI.source,
                PI.birth_date,
                PI.sex,
            )
            .join(Person, Person.id == PI.person_id)
            .where(PI.institution_id == institution_id, one_of(session, Person.nhs_number, chunk))
            .order_by(PI.updated_at.desc(), PI.id)
        )
        for row in rows:
            held.setdefault(row[0], []).append(_Held._make(row[1:]))
    return held


# By (issuer, value): for each source, the lowest and highest person id it names.
_Named = dict[tuple[str, str], list[tuple[str, int, int]]]


def _persons_named(session: Session, institution_id: int, local: set[tuple[str, str]]) -> _Named:
    """The persons that the institution's local IDs (issuer, value) name, by source, as the
    lowest and highest person id: enough to tell whether an ID names anyone besides one
    person, in one row however many a placeholder ID such as "UNKNOWN" names."""
    issuers = {issuer for issuer, _ in local}
    named: _Named = {}
    for chunk in _chunks({value for _, value in local}):
        # Issuer and value both, so that the (issuer, value) index serves.
        rows = session.execute(
            select(PI.issuer, PI.value, PI.source, func.min(PI.person_id), func.max(PI.person_id))
            .where(
                PI.institution_id == institution_id,
                PI.issuer.in_(issuers),
                one_of(session, PI.value, chunk),
            )
            .group_by(PI.issuer, PI.value, PI.source)
        )
        for issuer, value, source, lowest, highest in rows:
            if (issuer, value) in local:
                named.setdefault((issuer, value), []).append((source, lowest, highest))
    return named


def _chunks(values: set[str]) -> Iterator[list[str]]:
    ordered = sorted(values)
    for start in range(0, len(ordered), IN_CHUNK):
        yield ordered[start : start + IN_CHUNK]


def _decide(rows: list[_Held], named: _Named) -> LocalId:
    """The answer for one NHS number from its rows (newest first) and the persons that the
    institution's local IDs name."""
    if not rows:
        return LocalId()
    # What the institution registered settles which ID it files under; else what it sent.
    pool = [r for r in rows if r.source == REGISTERED] or rows
    ids = {(r.issuer, r.value) for r in pool}
    if len(ids) > 1:
        return LocalId(conflict=f"{len(ids)} local identifiers for one NHS number")
    ((issuer, value),) = ids
    # As above, a registration outranks what studies said: only another one contradicts it.
    registered = pool[0].source == REGISTERED
    person = pool[0].person_id
    if any(
        (lowest, highest) != (person, person)
        for source, lowest, highest in named.get((issuer, value), [])
        if source == REGISTERED or not registered
    ):
        return LocalId(conflict="the local identifier is linked to another NHS number too")
    for field, label in _COMPARED:
        if len({getattr(r, field) for r in pool} - {""}) > 1:
            return LocalId(conflict=f"the institution's records disagree on {label}")
    return LocalId(
        patient_id=value,
        issuer=issuer,
        birth_date=next((r.birth_date for r in pool if r.birth_date), ""),
        sex=next((r.sex for r in pool if r.sex), ""),
    )


def _flag_side(session: Session, actor: Actor, row: PatientIdentifier) -> dict[str, Any]:
    code = session.scalars(
        select(Institution.code).where(Institution.id == row.institution_id)
    ).one()
    side: dict[str, Any] = {
        "institution": code,
        "source": row.source,
        "nhs_number": row.person.nhs_number,
        "birth_date": row.birth_date,
        "sex": row.sex,
    }
    # Another institution's local ID is its own business: the disagreement is enough.
    if manages(actor, row.institution_id):
        side |= {"system": local_system(row.issuer), "value": row.value}
    return side


def described_flag(session: Session, actor: Actor, flag: IdentityFlag) -> dict[str, Any]:
    """A flag as the API and the portal show it: what disagrees, between which identifiers."""
    return {
        "id": flag.id,
        "kind": flag.kind,
        "reason": flag.reason,
        "status": "resolved" if flag.resolved_at else "open",
        "created_at": flag.created_at,
        "identifiers": [
            _flag_side(session, actor, flag.identifier),
            _flag_side(session, actor, flag.other_identifier),
        ],
        "resolved_at": flag.resolved_at,
        "resolved_by": flag.resolved_by,
        "resolution": flag.resolution,
    }


def listed_flags(session: Session, actor: Actor, status: str) -> list[dict[str, Any]]:
    """The flags touching the caller's institution (every flag, for the network's
    administrators), in this status (open, resolved, all); the listing audited."""
    institution = None if actor.network_wide else actor.institution_id
    flags = session.scalars(flags_query(institution, status)).all()
    out = [described_flag(session, actor, f) for f in flags]
    record(
        session,
        "patient:identity-flag:listed",
        institution_id=actor.institution_id,
        detail={"status": status, "returned": len(out)},
        **actor.audit(),
    )
    return out
