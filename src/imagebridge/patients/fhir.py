"""FHIR R4 for the patient index: identifier systems, search parameters, and the Patient,
Parameters, Bundle and OperationOutcome resources of IHE PIXm (ITI-83) and PDQm (ITI-78).

Identifier systems: the NHS number's official system, and one URN per local issuer
(``urn:imagebridge:issuer:<IssuerOfPatientID>``, the institution's code where its PACS
names no issuer).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from typing import Any

from imagebridge.nhs import normalise_nhs_number

MEDIA_TYPE = "application/fhir+json"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ISSUER_SYSTEM = "urn:imagebridge:issuer:"

_GENDERS = {"male": "M", "female": "F", "other": "O", "unknown": ""}
_SEXES = {v: k for k, v in _GENDERS.items() if v}
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_DATE_PREFIXES = ("eq", "ge", "le", "gt", "lt")


class FhirError(Exception):
    """A request the server cannot answer: the HTTP status and an OperationOutcome issue."""

    def __init__(self, status: int, diagnostics: str, code: str = "invalid") -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics


@dataclass(frozen=True)
class Identifier:
    """A parsed identifier: ``issuer`` is None for the NHS number."""

    system: str
    value: str
    issuer: str | None

    @property
    def is_nhs_number(self) -> bool:
        return self.issuer is None


def local_system(issuer: str) -> str:
    return ISSUER_SYSTEM + issuer


def parse_system(system: str, parameter: str) -> str | None:
    """The issuer a system names (None for the NHS number's); FhirError if unknown."""
    if system == NHS_SYSTEM:
        return None
    issuer = system.removeprefix(ISSUER_SYSTEM)
    if issuer == system or not issuer or len(issuer) > 64:
        raise FhirError(
            400,
            f"{parameter}: unknown identifier system {system[:100]!r}; use {NHS_SYSTEM} or "
            f"{ISSUER_SYSTEM}<issuer>",
            "code-invalid",
        )
    return issuer


def parse_identifier(token: str, parameter: str) -> Identifier:
    """``system|value`` as FHIR token search parameters write it; both parts required."""
    system, bar, value = token.partition("|")
    system, value = system.strip(), value.strip()
    if not bar or not system or not value:
        raise FhirError(400, f"{parameter} must be system|value, both given")
    issuer = parse_system(system, parameter)
    if issuer is None:
        nhs_number = normalise_nhs_number(value)
        if nhs_number is None:
            raise FhirError(
                400, f"{parameter}: not a valid NHS number (10 digits with a mod-11 check digit)"
            )
        return Identifier(system, nhs_number, None)
    if len(value) > 64:
        raise FhirError(400, f"{parameter}: a local identifier has at most 64 characters")
    return Identifier(system, value, issuer)


def parse_gender(value: str) -> str:
    """The DICOM PatientSex for a FHIR administrative gender."""
    try:
        return _GENDERS[value.strip()]
    except KeyError:
        raise FhirError(400, "gender must be male, female, other or unknown") from None


@dataclass(frozen=True)
class DateRange:
    """A FHIR date search as bounds on DICOM dates (YYYYMMDD, compared as text)."""

    low: str | None  # inclusive
    high: str | None  # inclusive


def parse_birthdate(value: str) -> DateRange:
    """``[eq|ge|le|gt|lt]YYYY[-MM[-DD]]``: a year or month stands for all its days."""
    prefix = value[:2] if value[:2] in _DATE_PREFIXES else "eq"
    text = value[2:] if value[:2] in _DATE_PREFIXES else value
    match = _DATE.match(text.strip())
    if not match:
        raise FhirError(400, "birthdate must be [eq|ge|le|gt|lt]YYYY[-MM[-DD]]")
    year, month, day = match.groups()
    y = int(year)
    first_month, last_month = (int(month), int(month)) if month else (1, 12)
    if not 1 <= first_month <= 12:
        raise FhirError(400, f"birthdate {text!r} is not a date")
    last_day = calendar.monthrange(y, last_month)[1]
    first_day, last_day = (int(day), int(day)) if day else (1, last_day)
    if not 1 <= first_day <= calendar.monthrange(y, last_month)[1]:
        raise FhirError(400, f"birthdate {text!r} is not a date")
    start = f"{year}{first_month:02d}{first_day:02d}"
    end = f"{year}{last_month:02d}{last_day:02d}"
    return {
        "eq": DateRange(start, end),
        "ge": DateRange(start, None),
        "gt": DateRange(_next_day(end), None),
        "le": DateRange(None, end),
        "lt": DateRange(None, _previous_day(start)),
    }[prefix]


def _next_day(date: str) -> str:
    year, month, day = int(date[:4]), int(date[4:6]), int(date[6:])
    if day < calendar.monthrange(year, month)[1]:
        return f"{year:04d}{month:02d}{day + 1:02d}"
    return f"{year + 1:04d}0101" if month == 12 else f"{year:04d}{month + 1:02d}01"


def _previous_day(date: str) -> str:
    year, month, day = int(date[:4]), int(date[4:6]), int(date[6:])
    if day > 1:
        return f"{year:04d}{month:02d}{day - 1:02d}"
    if month == 1:
        return f"{year - 1:04d}1231"
    return f"{year:04d}{month - 1:02d}{calendar.monthrange(year, month - 1)[1]:02d}"


@dataclass(frozen=True)
class Demographics:
    family: str = ""
    given: str = ""  # given names, space-separated
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F, O or empty


def from_person_name(name: str) -> tuple[str, str]:
    """(family, given names) of a DICOM PN: the alphabetic group's first two components,
    then the middle names, which FHIR counts as given names too."""
    alphabetic = name.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    family = parts[0] if parts else ""
    given = " ".join(p for p in parts[1:3] if p)
    return family[:200], given[:200]


def parse_patient(resource: Any) -> tuple[str, Demographics]:
    """The NHS number and demographics of a Patient resource that registers an identifier."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise FhirError(400, "the body must be a FHIR Patient resource")
    identifiers = resource.get("identifier") or []
    if not isinstance(identifiers, list):
        raise FhirError(400, "Patient.identifier must be a list")
    numbers = {
        i.get("value", "")
        for i in identifiers
        if isinstance(i, dict) and i.get("system") == NHS_SYSTEM
    }
    if len(numbers) != 1:
        raise FhirError(400, f"the Patient must carry exactly one identifier of {NHS_SYSTEM}")
    nhs_number = normalise_nhs_number(str(numbers.pop()))
    if nhs_number is None:
        raise FhirError(400, "not a valid NHS number (10 digits with a mod-11 check digit)")
    names = resource.get("name") or []
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], dict) else {}
    given = name.get("given") or []
    if not isinstance(given, list) or not all(isinstance(g, str) for g in given):
        raise FhirError(400, "Patient.name.given must be a list of strings")
    family = name.get("family") or ""
    if not isinstance(family, str):
        raise FhirError(400, "Patient.name.family must be a string")
    birth_date = resource.get("birthDate") or ""
    if birth_date:
        if not isinstance(birth_date, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", birth_date):
            raise FhirError(400, "Patient.birthDate must be YYYY-MM-DD")
        parse_birthdate(birth_date)  # a real date
    gender = resource.get("gender") or "unknown"
    return nhs_number, Demographics(
        family=family.strip()[:200],
        given=" ".join(g.strip() for g in given if g.strip())[:200],
        birth_date=birth_date.replace("-", ""),
        sex=parse_gender(gender if isinstance(gender, str) else "?"),
    )


def patient_resource(
    person_id: int,
    nhs_number: str | None,
    identifiers: list[tuple[str, str]],
    demographics: list[Demographics],
) -> dict[str, Any]:
    """A Patient: the NHS number, (issuer, value) local identifiers, and the names, sex and
    birth date the institutions hold (the first listed wins where one value is allowed)."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": str(person_id)}
    found = [{"system": NHS_SYSTEM, "value": nhs_number}] if nhs_number else []
    found += [{"system": local_system(i), "value": v} for i, v in identifiers]
    resource["identifier"] = found
    names = []
    for d in demographics:
        name: dict[str, Any] = {}
        if d.family:
            name["family"] = d.family
        if d.given:
            name["given"] = d.given.split(" ")
        if name and name not in names:
            names.append(name)
    if names:
        resource["name"] = names
    if sex := next((d.sex for d in demographics if d.sex in _SEXES), ""):
        resource["gender"] = _SEXES[sex]
    if birth := next((d.birth_date for d in demographics if len(d.birth_date) == 8), ""):
        resource["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    return resource


def parameters(targets: list[tuple[str, str]]) -> dict[str, Any]:
    """The ITI-83 answer: one targetIdentifier per (system, value)."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "targetIdentifier", "valueIdentifier": {"system": s, "value": v}}
            for s, v in targets
        ],
    }


def searchset(
    base: str, self_url: str, total: int, patients: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
        "entry": [
            {
                "fullUrl": f"{base}/Patient/{p['id']}",
                "resource": p,
                "search": {"mode": "match"},
            }
            for p in patients
        ],
    }


def operation_outcome(diagnostics: str, code: str = "invalid") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
