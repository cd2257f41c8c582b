"""Matching DICOM query keys against the index, as C-FIND and QIDO-RS both need.

The matching rules are those of PS3.4 C.2.2.2: universal (empty), single value, wildcard
(`*` and `?`, not for UIDs), range (dates and times, `A-B`, `A-`, `-B`), and a list of
UIDs. Person names match case-insensitively. The caller passes the keys as DICOM keywords
with their string values, and a Scope saying which studies it may see.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.index.visibility import Scope
from imagebridge.institutions.models import Institution
from imagebridge.nhs import normalise_nhs_number

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MAX_LIMIT = 1000


class QueryError(ValueError):
    """A query the standard does not allow, with the reason."""


@dataclass(frozen=True)
class Key:
    level: str
    column: InstrumentedAttribute[str]
    vr: str


KEYS: dict[str, Key] = {
    "PatientID": Key("PATIENT", Patient.patient_id, "LO"),
    "IssuerOfPatientID": Key("PATIENT", Patient.issuer_of_patient_id, "LO"),
    "PatientName": Key("PATIENT", Patient.patient_name, "PN"),
    "PatientBirthDate": Key("PATIENT", Patient.birth_date, "DA"),
    "PatientSex": Key("PATIENT", Patient.sex, "CS"),
    "StudyInstanceUID": Key("STUDY", Study.study_instance_uid, "UI"),
    "StudyDate": Key("STUDY", Study.study_date, "DA"),
    "StudyTime": Key("STUDY", Study.study_time, "TM"),
    "AccessionNumber": Key("STUDY", Study.accession_number, "SH"),
    "StudyDescription": Key("STUDY", Study.study_description, "LO"),
    "SeriesInstanceUID": Key("SERIES", Series.series_instance_uid, "UI"),
    "Modality": Key("SERIES", Series.modality, "CS"),
    "SeriesNumber": Key("SERIES", Series.series_number, "IS"),
    "SeriesDescription": Key("SERIES", Series.series_description, "LO"),
    "SOPInstanceUID": Key("IMAGE", Instance.sop_instance_uid, "UI"),
    "SOPClassUID": Key("IMAGE", Instance.sop_class_uid, "UI"),
    "InstanceNumber": Key("IMAGE", Instance.instance_number, "IS"),
}
# Matchable at study level although held per series.
MODALITIES_IN_STUDY = "ModalitiesInStudy"
# Returned, never matched.
COUNTS = {
    "STUDY": ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", MODALITIES_IN_STUDY),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
}


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def match(key: Key, value: str) -> ColumnElement[bool] | None:
    """The condition for one key, or None for universal matching."""
    value = value.strip()
    if value in ("", "*"):
        return None
    column = key.column
    if key.vr == "UI":
        uids = [u.strip() for u in value.replace(",", "\\").split("\\") if u.strip()]
        if any(c in u for u in uids for c in "*?"):
            raise QueryError(f"UIDs match exactly or by list, not by wildcard: {value}")
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if key.vr in ("DA", "TM") and "-" in value:
        low, _, high = value.partition("-")
        low, high = low.strip(), high.strip()
        for part in (low, high):
            if part and not part.replace(".", "").isdigit():
                raise QueryError(f"not a {key.vr} range: {value}")
        # An upper time "1200" includes 12:00:30: compare against "1200" followed by the
        # highest character.
        top = high + ("\uffff" if key.vr == "TM" else "")
        if low and high:
            return and_(column >= low, column <= top)
        return column >= low if low else column <= top
    if key.vr == "DA" and not (value.isdigit() and len(value) == 8):
        raise QueryError(f"a date is YYYYMMDD: {value}")
    if key.vr == "PN":
        lowered = func.lower(column)
        if "*" in value or "?" in value:
            pattern = value.lower()
            condition: ColumnElement[bool] = lowered.like(_like(pattern), escape="\\")
            prefix = pattern[: min(i for i in (pattern.find("*"), pattern.find("?")) if i >= 0)]
            if prefix.isascii() and prefix.isalnum() and prefix[-1] not in "z9":
                # The same rows as a range too, which an index on lower(name) can serve
                # (LIKE alone cannot use it). Letters and digits only, whose order is the
                # same under any collation.
                upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
                condition = and_(lowered >= prefix, lowered < upper, condition)
            return condition
        return lowered == value.lower()
    if "*" in value or "?" in value:
        return column.like(_like(value), escape="\\")
    return column == value


def _patient_id_condition(keys: dict[str, str], nhs_issuer: str) -> ColumnElement[bool] | None:
    """PatientID with the NHS's issuer finds the patient by NHS number at any institution."""
    pid = keys.get("PatientID", "").strip()
    issuer = keys.get("IssuerOfPatientID", "").strip()
    if issuer != nhs_issuer or not pid:
        return None
    number = normalise_nhs_number(pid)
    if number is None:
        raise QueryError("not a valid NHS number (10 digits with its check digit)")
    return or_(
        Patient.nhs_number == number,
        and_(Patient.issuer_of_patient_id == nhs_issuer, Patient.patient_id == number),
    )


def _conditions(level: str, keys: dict[str, str], nhs_issuer: str) -> list[ColumnElement[bool]]:
    depth = LEVELS.index(level)
    out: list[ColumnElement[bool]] = []
    by_nhs = _patient_id_condition(keys, nhs_issuer)
    if by_nhs is not None:
        out.append(by_nhs)
    for keyword, value in keys.items():
        if by_nhs is not None and keyword in ("PatientID", "IssuerOfPatientID"):
            continue
        if keyword == MODALITIES_IN_STUDY:
            if level != "STUDY":
                raise QueryError("ModalitiesInStudy is a study-level key")
            modalities = [m for m in value.replace(",", "\\").split("\\") if m.strip()]
            if modalities:
                out.append(
                    exists().where(Series.study_id == Study.id, Series.modality.in_(modalities))
                )
            continue
        key = KEYS.get(keyword)
        if key is None:
            if any(keyword in names for names in COUNTS.values()):
                continue  # a return key only
            raise QueryError(f"unsupported matching key: {keyword}")
        if LEVELS.index(key.level) > depth:
            raise QueryError(f"{keyword} is a {key.level}-level key, below {level}")
        condition = match(key, value)
        if condition is not None:
            out.append(condition)
    return out


def check(level: str, keys: dict[str, str], nhs_issuer: str = "NHS") -> list[ColumnElement[bool]]:
    """The conditions of a query at ``level``, or QueryError with the reason the standard
    gives for refusing it; nothing is asked of the database."""
    if level not in LEVELS:
        raise QueryError(f"unsupported query level: {level}")
    return _conditions(level, keys, nhs_issuer)


# The hub's own references returned beside the keys of each level.
_REFERENCES: dict[str, tuple[tuple[str, InstrumentedAttribute[Any]], ...]] = {
    "PATIENT": (
        ("_nhs_number", Patient.nhs_number),
        ("_institution", Institution.code),
        ("_patient_id", Patient.id),
    ),
    "STUDY": (("_study_id", Study.id), ("_institution_id", Study.institution_id)),
    "SERIES": (("_series_id", Series.id),),
    "IMAGE": (
        ("_transfer_syntax_uid", Instance.transfer_syntax_uid),
        ("_blob_sha256", Instance.blob_sha256),
        ("_size", Instance.size),
    ),
}


# Returned at their own level only, from the counts kept as instances are indexed.
_COUNTED: dict[str, tuple[tuple[str, InstrumentedAttribute[Any]], ...]] = {
    "STUDY": (
        ("NumberOfStudyRelatedSeries", Study.number_of_series),
        ("NumberOfStudyRelatedInstances", Study.number_of_instances),
        (MODALITIES_IN_STUDY, Study.modalities_in_study),
    ),
    "SERIES": (("NumberOfSeriesRelatedInstances", Series.number_of_instances),),
}


def _returned(level: str) -> tuple[tuple[str, ...], tuple[InstrumentedAttribute[Any], ...]]:
    """The names and columns of a match at ``level``: from the patient down, each level's
    keys, then the hub's references; then the level's counts."""
    pairs: list[tuple[str, InstrumentedAttribute[Any]]] = []
    for each in LEVELS[: LEVELS.index(level) + 1]:
        pairs += [(name, key.column) for name, key in KEYS.items() if key.level == each]
        pairs += _REFERENCES[each]
    pairs += _COUNTED.get(level, ())
    names, columns = zip(*pairs, strict=True)
    return names, columns


_RETURNED = {level: _returned(level) for level in LEVELS}


@lru_cache(maxsize=256)
def _returned_of(
    level: str, fields: frozenset[str] | None
) -> tuple[tuple[str, ...], tuple[InstrumentedAttribute[Any], ...]]:
    """``_returned``, narrowed to ``fields`` when given: a column not asked for is neither
    read nor turned into a value, which for hundreds of matches is most of the work."""
    names, columns = _RETURNED[level]
    if fields is None:
        return names, columns
    kept = [(n, c) for n, c in zip(names, columns, strict=True) if n in fields]
    return tuple(n for n, _ in kept), tuple(c for _, c in kept)


def _base(level: str, columns: tuple[InstrumentedAttribute[Any], ...]) -> Select[Any]:
    # Columns, not ORM entities: building objects costs more than the query for many rows.
    if level == "PATIENT":
        return (
            select(*columns)
            .select_from(Patient)
            .join(Institution, Institution.id == Patient.institution_id)
        )
    query = (
        select(*columns)
        .select_from(Study)
        .join(Patient, Patient.id == Study.patient_ref)
        .join(Institution, Institution.id == Study.institution_id)
    )
    if level in ("SERIES", "IMAGE"):
        query = query.join(Series, Series.study_id == Study.id)
    if level == "IMAGE":
        query = query.join(Instance, Instance.series_id == Series.id)
    return query


def find(
    session: Session,
    level: str,
    keys: dict[str, str],
    scope: Scope,
    *,
    limit: int = 100,
    offset: int = 0,
    nhs_issuer: str = "NHS",
    fields: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Matches at ``level`` that ``scope`` may see, newest study first; each a dict of
    keyword -> value, with the hub's own references under keys starting with `_`; with
    ``fields``, only the keywords and references named there."""
    if not 0 < limit <= MAX_LIMIT or offset < 0:
        raise QueryError(f"limit is 1 to {MAX_LIMIT}, offset 0 or more")
    conditions = check(level, keys, nhs_issuer)
    names, columns = _returned_of(level, None if fields is None else frozenset(fields))
    if level == "PATIENT":
        visible = exists().where(Study.patient_ref == Patient.id, scope.where())
        query = _base(level, columns).where(visible, *conditions).order_by(Patient.id)
    else:
        query = _base(level, columns).where(scope.where(), *conditions)
        query = query.order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
    if level in ("SERIES", "IMAGE"):
        query = query.order_by(Series.id)
    if level == "IMAGE":
        query = query.order_by(Instance.id)
    # Core, not the ORM: the rows are plain values, and the ORM would handle each one again.
    rows = session.connection().execute(query.limit(limit).offset(offset)).all()
    out = [dict(zip(names, row, strict=True)) for row in rows]
    if level == "STUDY" and MODALITIES_IN_STUDY in names:
        for item in out:
            modalities = item[MODALITIES_IN_STUDY]
            item[MODALITIES_IN_STUDY] = modalities.split("\\") if modalities else []
    return out


@dataclass(frozen=True)
class Located:
    """One stored instance a retrieve may send, with what its answer and audit need."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_sha256: str
    size: int
    patient_id: str
    institution_id: int


def locate(
    session: Session,
    scope: Scope,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[Located]:
    """Every instance of a study (or of one series, or one instance) that ``scope`` may see,
    in series and instance order; without a limit, since a retrieve sends them all.

    A study held by two institutions is one study: each SOP instance comes once, from the
    copy indexed last.
    """
    query = (
        select(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.blob_sha256,
            Instance.size,
            Patient.patient_id,
            Study.institution_id,
            Series.series_number,
            Instance.instance_number,
        )
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .join(Patient, Patient.id == Study.patient_ref)
        .where(Study.study_instance_uid == study_instance_uid, scope.where())
        .order_by(Instance.id.desc())
    )
    if series_instance_uid is not None:
        query = query.where(Series.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    found: dict[str, tuple[tuple[int, str, int, str], Located]] = {}
    for row in session.execute(query):
        if row.sop_instance_uid in found:
            continue
        order = (
            _number(row.series_number),
            row.series_instance_uid,
            _number(row.instance_number),
            row.sop_instance_uid,
        )
        found[row.sop_instance_uid] = (order, Located(*row[:9]))
    return [located for _, located in sorted(found.values(), key=lambda item: item[0])]


def _number(value: str) -> int:
    """An IS value for ordering; one that is not a number goes last."""
    try:
        return int(value)
    except ValueError:
        return 2**31
