"""Indexing received instances: patients -> studies -> series -> instances."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from imagebridge.db import one_of, take_turns, utcnow
from imagebridge.dicom.part10 import INDEXED, Header
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.nhs import normalise_nhs_number
from imagebridge.patients.services import link_indexed


class NotIndexed(ValueError):
    """An instance the index refuses, with the reason; nothing of it is filed."""


class IdentityConflict(NotIndexed):
    """An instance whose study is already filed under another patient: never merged silently."""


@dataclass
class _Cache:
    """Rows already looked up in this batch: a batch usually holds one study."""

    patients: dict[tuple[str, str], Patient] = field(default_factory=dict)
    studies: dict[str, Study] = field(default_factory=dict)
    series: dict[tuple[int, str], Series] = field(default_factory=dict)


def nhs_number_of(header: Header, nhs_issuer: str) -> str | None:
    if header.text("IssuerOfPatientID") == nhs_issuer:
        return normalise_nhs_number(header.text("PatientID"))
    for item in header.items("OtherPatientIDsSequence"):
        if item.text("IssuerOfPatientID") == nhs_issuer:
            return normalise_nhs_number(item.text("PatientID"))
    return None


def _patient_key(header: Header) -> tuple[str, str]:
    return header.text("IssuerOfPatientID")[:64], header.text("PatientID")[:64]


@dataclass(frozen=True)
class Indexed:
    """Where an instance was filed: its row and its study's."""

    id: int
    study_id: int


_INSTANCES = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)
_STUDIES = cast(Table, Study.__table__)
_MODALITIES_ROOM = cast(String, _STUDIES.c.modalities_in_study.type).length or 255
# Executed with one parameter set per row: SET takes the columns each set names.
_UPDATE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.id == bindparam("row_id"))
_KEY = ("series_id", "sop_instance_uid")
# take_turns area for filing an institution's instances ("IBIX").
INDEX_TURN = 0x49424958


def index_instances(
    session: Session,
    institution_id: int,
    items: list[tuple[Header, str, int]],
    nhs_issuer: str = "NHS",
) -> list[Indexed | NotIndexed]:
    """Index a batch of (header, blob digest, size); one result per item, in order.

    An item whose study is filed under another patient is refused before anything of it
    is written, so a refusal leaves no partial record. Instances are written with one
    statement per batch, not one ORM object each: this runs for every instance received.
    """
    # One batch at a time per institution: each looks for its patient, study and series rows
    # before inserting them, and two at once would insert the same rows twice.
    take_turns(session, INDEX_TURN, institution_id)
    cache = _Cache()
    placed: list[tuple[Series, Header, str, int] | NotIndexed] = []
    for header, sha, size in items:
        # DICOM allows NUL in text only as a UID's padding, and PostgreSQL stores none; dropping
        # it could make two patient IDs one, so the instance is refused instead.
        if any("\x00" in header.text(keyword) for keyword in INDEXED):
            placed.append(NotIndexed("a text value of the instance holds a NUL character"))
            continue
        study = _study(session, institution_id, header, cache, nhs_issuer)
        if isinstance(study, IdentityConflict):
            placed.append(study)
            continue
        placed.append((_series(session, study, header, cache), header, sha, size))
    session.flush()
    # The patient index follows the patients indexed here (and flags disagreements).
    link_indexed(session, cache.patients.values())
    # The newest bytes received become the stored copy; an instance sent twice in one
    # batch is one row, with the later bytes.
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for p in placed:
        if not isinstance(p, NotIndexed):
            series, header, sha, size = p
            rows[(series.id, header.sop_instance_uid)] = {
                "series_id": series.id,
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "instance_number": header.text("InstanceNumber")[:12],
                "blob_sha256": sha,
                "size": size,
            }
    ids: dict[tuple[int, str], int] = {}
    if rows:
        found = session.execute(
            select(_INSTANCES.c.series_id, _INSTANCES.c.sop_instance_uid, _INSTANCES.c.id).where(
                tuple_(_INSTANCES.c.series_id, _INSTANCES.c.sop_instance_uid).in_(list(rows))
            )
        )
        ids = {(series_id, uid): row_id for series_id, uid, row_id in found}
    changed = [
        {k: v for k, v in rows[key].items() if k not in _KEY} | {"row_id": row_id}
        for key, row_id in ids.items()
    ]
    if changed:
        session.execute(_UPDATE_INSTANCE, changed)
    if new := [row for key, row in rows.items() if key not in ids]:
        now = utcnow()
        inserted = session.execute(
            insert(_INSTANCES).returning(
                _INSTANCES.c.id, _INSTANCES.c.series_id, _INSTANCES.c.sop_instance_uid
            ),
            [{**row, "created_at": now} for row in new],
        )
        ids.update({(series_id, uid): row_id for row_id, series_id, uid in inserted})
        count_again(session, {row["series_id"] for row in new})
    return [
        p
        if isinstance(p, NotIndexed)
        else Indexed(ids[(p[0].id, p[1].sop_instance_uid)], p[0].study_id)
        for p in placed
    ]


def count_again(session: Session, series_ids: set[int]) -> None:
    """Count again the instances of these series, and the series, instances and modalities
    of their studies, into the rows that queries return them from.

    Counted from the rows, not incremented, so a count cannot drift; the institution's turn
    (held by whoever indexes) keeps other batches from adding rows meanwhile.
    """
    if not series_ids:
        return
    instances = select(func.count()).where(_INSTANCES.c.series_id == _SERIES.c.id).scalar_subquery()
    session.execute(
        update(_SERIES)
        .where(one_of(session, _SERIES.c.id, series_ids))
        .values(number_of_instances=instances)
    )
    studies = select(_SERIES.c.study_id).where(one_of(session, _SERIES.c.id, series_ids))
    per_study: dict[int, list[tuple[str, int]]] = {}
    for study_id, modality, count in session.execute(
        select(_SERIES.c.study_id, _SERIES.c.modality, _SERIES.c.number_of_instances).where(
            _SERIES.c.study_id.in_(studies)
        )
    ):
        per_study.setdefault(study_id, []).append((modality, count))
    session.execute(
        update(_STUDIES).where(_STUDIES.c.id == bindparam("study_id")),
        [
            {
                "study_id": study_id,
                "number_of_series": len(series),
                "number_of_instances": sum(count for _, count in series),
                "modalities_in_study": _joined_modalities(m for m, _ in series),
            }
            for study_id, series in per_study.items()
        ],
    )


def _joined_modalities(modalities: Iterable[str]) -> str:
    """Distinct modalities, sorted, joined by "\\" as a multi-valued CS; whole values only,
    as many as fit in the column."""
    out = ""
    for modality in sorted({m for m in modalities if m}):
        joined = f"{out}\\{modality}" if out else modality
        if len(joined) > _MODALITIES_ROOM:
            break
        out = joined
    return out


def _study(
    session: Session, institution_id: int, header: Header, cache: _Cache, nhs_issuer: str
) -> Study | IdentityConflict:
    uid = header.study_instance_uid
    key = _patient_key(header)
    study = cache.studies.get(uid)
    if study is None:
        study = session.scalar(
            select(Study).where(
                Study.institution_id == institution_id, Study.study_instance_uid == uid
            )
        )
        if study is None:
            patient = _patient(session, institution_id, header, cache, nhs_issuer)
            study = Study(institution_id=institution_id, patient=patient, study_instance_uid=uid)
            session.add(study)
        study.study_date = header.text("StudyDate")[:8]
        study.study_time = header.text("StudyTime")[:16]
        study.accession_number = header.text("AccessionNumber")[:16]
        study.study_description = header.text("StudyDescription")[:64]
        cache.studies[uid] = study
    if (study.patient.issuer_of_patient_id, study.patient.patient_id) != key:
        return IdentityConflict("study already filed under another patient at this institution")
    return study


def _patient(
    session: Session, institution_id: int, header: Header, cache: _Cache, nhs_issuer: str
) -> Patient:
    key = _patient_key(header)
    patient = cache.patients.get(key)
    if patient is not None:
        return patient
    patient = session.scalar(
        select(Patient).where(
            Patient.institution_id == institution_id,
            Patient.issuer_of_patient_id == key[0],
            Patient.patient_id == key[1],
        )
    )
    if patient is None:
        patient = Patient(
            institution_id=institution_id, issuer_of_patient_id=key[0], patient_id=key[1]
        )
        session.add(patient)
    patient.patient_name = header.text("PatientName")[:324]
    patient.birth_date = header.text("PatientBirthDate")[:8]
    patient.sex = header.text("PatientSex")[:16]
    patient.nhs_number = nhs_number_of(header, nhs_issuer) or patient.nhs_number
    cache.patients[key] = patient
    return patient


def _series(session: Session, study: Study, header: Header, cache: _Cache) -> Series:
    uid = header.series_instance_uid
    key = (id(study), uid)
    series = cache.series.get(key)
    if series is not None:
        return series
    if study.id is not None:
        series = session.scalar(
            select(Series).where(Series.study_id == study.id, Series.series_instance_uid == uid)
        )
    if series is None:
        series = Series(study=study, series_instance_uid=uid)
        series.modality = header.text("Modality")[:16]
        series.series_number = header.text("SeriesNumber")[:12]
        series.series_description = header.text("SeriesDescription")[:64]
        session.add(series)
    cache.series[key] = series
    return series
