"""Indexing received instances: patients -> studies -> series -> instances."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from imagebridge.dicom.part10 import Header
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.nhs import normalise_nhs_number


class IdentityConflict(ValueError):
    """An instance whose study is already filed under another patient: never merged silently."""


@dataclass
class IndexCache:
    """Rows already looked up in this transaction: a batch usually holds one study."""

    patients: dict[tuple[str, str], Patient] = field(default_factory=dict)
    studies: dict[str, Study] = field(default_factory=dict)
    series: dict[tuple[int, str], Series] = field(default_factory=dict)


def _nhs_number(header: Header, nhs_issuer: str) -> str | None:
    ds = header.dataset
    if str(ds.get("IssuerOfPatientID", "")) == nhs_issuer:
        return normalise_nhs_number(str(ds.get("PatientID", "")))
    for item in ds.get("OtherPatientIDsSequence", []):
        if str(item.get("IssuerOfPatientID", "")) == nhs_issuer:
            return normalise_nhs_number(str(item.get("PatientID", "")))
    return None


def index_instance(
    session: Session,
    institution_id: int,
    header: Header,
    blob_sha256: str,
    size: int,
    cache: IndexCache,
    nhs_issuer: str = "NHS",
) -> Instance:
    patient = _patient(session, institution_id, header, cache, nhs_issuer)
    study = _study(session, institution_id, patient, header, cache)
    series = _series(session, study, header, cache)
    instance = session.scalar(
        select(Instance).where(
            Instance.series_id == series.id,
            Instance.sop_instance_uid == header.sop_instance_uid,
        )
    )
    if instance is None:
        instance = Instance(series_id=series.id, sop_instance_uid=header.sop_instance_uid)
        session.add(instance)
    instance.sop_class_uid = header.sop_class_uid
    instance.transfer_syntax_uid = header.transfer_syntax_uid
    instance.instance_number = header.text("InstanceNumber")[:12]
    instance.blob_sha256 = blob_sha256
    instance.size = size
    session.flush()
    return instance


def _patient(
    session: Session, institution_id: int, header: Header, cache: IndexCache, nhs_issuer: str
) -> Patient:
    key = (header.text("IssuerOfPatientID")[:64], header.text("PatientID")[:64])
    patient = cache.patients.get(key)
    if patient is None:
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
    patient.nhs_number = _nhs_number(header, nhs_issuer) or patient.nhs_number
    session.flush()
    cache.patients[key] = patient
    return patient


def _study(
    session: Session, institution_id: int, patient: Patient, header: Header, cache: IndexCache
) -> Study:
    uid = header.study_instance_uid
    study = cache.studies.get(uid) or session.scalar(
        select(Study).where(Study.institution_id == institution_id, Study.study_instance_uid == uid)
    )
    if study is None:
        study = Study(institution_id=institution_id, patient_ref=patient.id, study_instance_uid=uid)
        session.add(study)
    elif study.patient_ref != patient.id:
        raise IdentityConflict("study already filed under another patient at this institution")
    study.study_date = header.text("StudyDate")[:8]
    study.study_time = header.text("StudyTime")[:16]
    study.accession_number = header.text("AccessionNumber")[:16]
    study.study_description = header.text("StudyDescription")[:64]
    session.flush()
    cache.studies[uid] = study
    return study


def _series(session: Session, study: Study, header: Header, cache: IndexCache) -> Series:
    key = (study.id, header.series_instance_uid)
    series = cache.series.get(key) or session.scalar(
        select(Series).where(Series.study_id == study.id, Series.series_instance_uid == key[1])
    )
    if series is None:
        series = Series(study_id=study.id, series_instance_uid=key[1])
        session.add(series)
        series.modality = header.text("Modality")[:16]
        series.series_number = header.text("SeriesNumber")[:12]
        series.series_description = header.text("SeriesDescription")[:64]
        session.flush()
    cache.series[key] = series
    return series
