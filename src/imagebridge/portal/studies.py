"""Studies as the portal shows them: those an institution may send, one study for the
viewer, its reports, and everything about one patient across the network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.agreements.services import institutions_in_force
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.index.query import find
from imagebridge.index.visibility import Scope, scope_of
from imagebridge.institutions.models import Gateway, Institution
from imagebridge.nhs import normalise_nhs_number
from imagebridge.patients.models import PatientIdentifier, Person
from imagebridge.patients.services import visible as visible_identifiers
from imagebridge.transfers.models import Report, Transfer

# Search fields of the send page, as DICOM query keys (PS3.4 C.2.2.2 matching).
SEARCH_KEYS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "ModalitiesInStudy",
)


def held_studies(
    session: Session, actor: Actor, keys: dict[str, str], limit: int = 100
) -> list[dict[str, Any]]:
    """Studies the hub holds for the actor's own institution: what it may send on."""
    if actor.institution_id is None:
        return []
    own = Scope(frozenset({actor.institution_id}), None)
    return find(session, "STUDY", keys, own, limit=limit)


def destinations(session: Session, actor: Actor) -> list[Institution]:
    """Institutions one may send to: every other one with an agreement in force, and only
    while one's own is in force too."""
    in_force = institutions_in_force(session)
    if actor.institution_id not in in_force:
        return []
    return list(
        session.scalars(
            select(Institution)
            .where(Institution.id.in_(in_force), Institution.id != actor.institution_id)
            .order_by(Institution.name)
        )
    )


def visible_study(session: Session, actor: Actor, study_id: int) -> Study | None:
    """The study, if the actor may see it; otherwise as if it did not exist."""
    return session.scalar(
        select(Study).where(Study.id == study_id, scope_of(session, actor).where())
    )


def _reports_where(session: Session, actor: Actor) -> Any:
    """Reports travel with transfers: the sender's and the receiver's to read, and those
    of institutions whose studies the actor may see."""
    scope = scope_of(session, actor)
    clauses: list[ColumnElement[bool]] = [Transfer.sender_institution_id.in_(scope.institutions)]
    if scope.receiver is not None:
        clauses.append(Transfer.receiver_institution_id == scope.receiver)
    return or_(*clauses)


def reports_of(session: Session, actor: Actor, studies: list[Study]) -> dict[int, list[Report]]:
    """Each study's reports the actor may read, by study row id, newest first."""
    by_key = {(s.institution_id, s.study_instance_uid): s.id for s in studies}
    out: dict[int, list[Report]] = {s.id: [] for s in studies}
    if not studies:
        return out
    found = session.execute(
        select(Report, Transfer.sender_institution_id)
        .join(Transfer, Transfer.id == Report.transfer_id)
        .where(
            Report.study_instance_uid.in_({s.study_instance_uid for s in studies}),
            _reports_where(session, actor),
        )
        .order_by(Report.id.desc())
    ).all()
    seen: set[str] = set()
    for report, sender in found:
        study_id = by_key.get((sender, report.study_instance_uid))
        # The same report sent twice is the same document: show it once.
        if study_id is not None and report.blob_sha256 not in seen:
            seen.add(report.blob_sha256)
            out[study_id].append(report)
    return out


def readable_report(session: Session, actor: Actor, report_id: int) -> Report | None:
    return session.scalar(
        select(Report)
        .join(Transfer, Transfer.id == Report.transfer_id)
        .where(Report.id == report_id, _reports_where(session, actor))
    )


@dataclass
class PatientRecord:
    """What the actor may see about one patient: the identities and the studies."""

    nhs_numbers: list[str]
    identities: list[dict[str, str]]
    studies: list[dict[str, Any]] = field(default_factory=list)


def _nhs_numbers_of_local_id(session: Session, actor: Actor, scope: Scope, term: str) -> set[str]:
    registered = select(Person.nhs_number).join(
        PatientIdentifier, PatientIdentifier.person_id == Person.id
    )
    found = set(
        session.scalars(
            registered.where(
                PatientIdentifier.institution_id == actor.institution_id,
                PatientIdentifier.value == term,
                visible_identifiers(scope),
            )
        )
    )
    found |= {
        n
        for n in session.scalars(
            select(Patient.nhs_number).where(
                Patient.institution_id == actor.institution_id, Patient.patient_id == term
            )
        )
        if n
    }
    return found


def patient_record(session: Session, actor: Actor, term: str) -> PatientRecord | None:
    """Found by NHS number, or by a local ID of the actor's own institution; None when the
    actor may see nothing about such a patient."""
    term = term.strip()
    if not term:
        return None
    scope = scope_of(session, actor)
    nhs = normalise_nhs_number(term)
    nhs_numbers = {nhs} if nhs else _nhs_numbers_of_local_id(session, actor, scope, term)
    matching: list[ColumnElement[bool]] = [Patient.nhs_number.in_(nhs_numbers)]
    if not nhs:
        matching.append(
            (Patient.institution_id == actor.institution_id) & (Patient.patient_id == term)
        )
    found = session.execute(
        select(Study, Patient, Institution)
        .join(Patient, Patient.id == Study.patient_ref)
        .join(Institution, Institution.id == Study.institution_id)
        .where(scope.where(), or_(*matching))
        .order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
        .limit(500)
    ).all()
    if not found:
        return None
    studies = [s for s, _, _ in found]
    reports = reports_of(session, actor, studies)
    counts = _counts(session, [s.id for s in studies])
    record = PatientRecord(sorted({p.nhs_number for _, p, _ in found if p.nhs_number}), [])
    seen: set[tuple[str, str, str]] = set()
    for study, patient, institution in found:
        key = (institution.code, patient.issuer_of_patient_id, patient.patient_id)
        if key not in seen:
            seen.add(key)
            record.identities.append(
                {
                    "institution": institution.name,
                    "code": institution.code,
                    "patient_id": patient.patient_id,
                    "issuer": patient.issuer_of_patient_id,
                    "name": patient.patient_name,
                    "birth_date": patient.birth_date,
                    "sex": patient.sex,
                }
            )
        series, instances, modalities = counts.get(study.id, (0, 0, ""))
        record.studies.append(
            {
                "id": study.id,
                "uid": study.study_instance_uid,
                "date": study.study_date,
                "description": study.study_description,
                "accession": study.accession_number,
                "institution": institution.name,
                "code": institution.code,
                "patient_id": patient.patient_id,
                "series": series,
                "instances": instances,
                "modalities": modalities,
                "reports": reports.get(study.id, []),
            }
        )
    return record


def _counts(session: Session, study_ids: list[int]) -> dict[int, tuple[int, int, str]]:
    rows = session.execute(
        select(
            Series.study_id,
            func.count(func.distinct(Series.id)),
            func.count(Instance.id),
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(study_ids))
        .group_by(Series.study_id)
    ).all()
    modalities: dict[int, set[str]] = {}
    for study_id, modality in session.execute(
        select(Series.study_id, Series.modality).where(Series.study_id.in_(study_ids))
    ):
        modalities.setdefault(study_id, set()).add(modality)
    return {
        sid: (n_series, n_instances, "/".join(sorted(modalities.get(sid, set()) - {""})))
        for sid, n_series, n_instances in rows
    }


def study_summary(session: Session, study: Study) -> dict[str, Any]:
    patient = session.get(Patient, study.patient_ref)
    institution = session.get(Institution, study.institution_id)
    return {
        "id": study.id,
        "uid": study.study_instance_uid,
        "date": study.study_date,
        "description": study.study_description,
        "accession": study.accession_number,
        "institution": institution.name if institution else "",
        "patient_name": patient.patient_name if patient else "",
        "patient_id": patient.patient_id if patient else "",
        "birth_date": patient.birth_date if patient else "",
        "sex": patient.sex if patient else "",
        "nhs_number": (patient.nhs_number or "") if patient else "",
    }


SHOWN_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)


def public_match(match: dict[str, Any]) -> dict[str, Any]:
    """A held study as the send page lists it, in the same terms as a PACS's answer."""
    out = {k: match.get(k, "") for k in SHOWN_KEYS}
    out["_nhs_number"] = match.get("_nhs_number") or ""
    out["_source"] = "hub"
    return out


def institution_codes(session: Session) -> list[tuple[int, str]]:
    return [(i, c) for i, c in session.execute(select(Institution.id, Institution.code))]


def institution_name(session: Session, institution_id: int | None) -> str:
    institution = session.get(Institution, institution_id) if institution_id else None
    return institution.name if institution else "the network"


def has_gateway(session: Session, institution_id: int | None) -> bool:
    """Whether the institution's PACS can be asked: through a gateway not revoked."""
    return institution_id is not None and (
        session.scalar(
            select(Gateway.id)
            .where(Gateway.institution_id == institution_id, Gateway.revoked_at.is_(None))
            .limit(1)
        )
        is not None
    )
