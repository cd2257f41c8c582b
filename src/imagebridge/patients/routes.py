"""HTTP API of the patient index: FHIR (IHE PIXm ITI-83, PDQm ITI-78, and registration of
local identifiers as a conditional update of Patient) under /fhir, and identity flags.

Lookups see what the caller's scope lets it see (index/visibility.py): an identifier at an
institution the caller may not see is never named, nor is a patient known only there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from imagebridge.actors import Actor, manages
from imagebridge.audit.services import record
from imagebridge.counts import RowId, whole_number
from imagebridge.hub.auth import InstitutionAdmin, P, get_hub, require
from imagebridge.hub.state import Hub
from imagebridge.index.visibility import Scope, scope_of
from imagebridge.institutions.models import Institution
from imagebridge.patients import fhir, services
from imagebridge.patients.fhir import FhirError
from imagebridge.patients.models import IdentityFlag, PatientIdentifier

router = APIRouter(tags=["patient identity"])
HubDep = Annotated[Hub, Depends(get_hub)]
Querier = Annotated[Actor, Depends(require(P.QUERY_NETWORK))]
LOOKUP = "patient:identity:lookup"
MAX_COUNT = 100
_JSON_FORMATS = {"json", "application/json", "application/fhir+json"}


def _fhir(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(body, status, headers=headers, media_type=fhir.MEDIA_TYPE)


def _refuse(exc: FhirError) -> Response:
    return _fhir(fhir.operation_outcome(exc.diagnostics, exc.code), exc.status)


def _parameters(request: Request, allowed: set[str], repeatable: set[str]) -> dict[str, list[str]]:
    """The query's parameters by name; FhirError for unknown or wrongly repeated ones."""
    found: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        found.setdefault(name, []).append(value)
    unknown = sorted(set(found) - allowed - {"_format"})
    if unknown:
        raise FhirError(
            400, f"unsupported search parameter(s): {', '.join(unknown)}", "not-supported"
        )
    for name, values in found.items():
        if len(values) > 1 and name not in repeatable:
            raise FhirError(400, f"{name} given more than once")
    if found.get("_format", ["json"])[0] not in _JSON_FORMATS:
        raise FhirError(400, "only JSON is supported (_format=json)", "not-supported")
    return found


def _lookup(
    hub: Hub,
    request: Request,
    actor: Actor,
    operation: str,
    answer: Callable[[Session, Scope], tuple[Response, list[str]]],
) -> Response:
    """Run a lookup within the caller's scope, audited: one event per patient it named (so
    that an auditor searching by patient finds each), or one with why it named none."""
    with hub.sessions() as session, session.begin():
        try:
            response, nhs_numbers = answer(session, scope_of(session, actor))
        except FhirError as exc:
            response, nhs_numbers = _refuse(exc), []
            reason = exc.diagnostics
        else:
            reason = ""
        for nhs_number in nhs_numbers or [""]:
            record(
                session,
                LOOKUP,
                "success" if response.status_code < 400 else "failure",
                institution_id=actor.institution_id,
                patient_ref=nhs_number,
                detail={
                    "operation": operation,
                    "status": response.status_code,
                    "returned": len(nhs_numbers),
                    **({"reason": reason[:300]} if reason else {}),
                },
                **actor.audit(),
            )
    return response


def _source_issuer_known(session: Session, scope: Scope, identifier: fhir.Identifier) -> None:
    if identifier.issuer is not None and not services.known_issuer(
        session, scope, identifier.issuer
    ):
        raise FhirError(400, "sourceIdentifier Assigning Authority not found", "code-invalid")


def _known_system(session: Session, scope: Scope, system: str) -> bool:
    try:
        issuer = fhir.parse_system(system, "targetSystem")
    except FhirError:
        return False
    return issuer is None or services.known_issuer(session, scope, issuer)


@router.get("/fhir/Patient/$ihe-pix")
def pix_query(
    request: Request,
    actor: Querier,
    hub: HubDep,
    source_identifier: Annotated[
        str | None, Query(alias="sourceIdentifier", description="system|value")
    ] = None,
    target_system: Annotated[
        list[str] | None, Query(alias="targetSystem", description="Identifier systems wanted")
    ] = None,
) -> Response:
    """IHE PIXm (ITI-83): the identifiers of the patient a source identifier names."""

    def answer(session: Session, scope: Scope) -> tuple[Response, list[str]]:
        params = _parameters(request, {"sourceIdentifier", "targetSystem"}, {"targetSystem"})
        if "sourceIdentifier" not in params:
            raise FhirError(400, "sourceIdentifier is required", "required")
        source = fhir.parse_identifier(params["sourceIdentifier"][0], "sourceIdentifier")
        _source_issuer_known(session, scope, source)
        systems: set[str] | None = None
        if "targetSystem" in params:
            systems = {s.strip() for v in params["targetSystem"] for s in v.split(",")}
            if not all(_known_system(session, scope, system) for system in systems):
                # PIXm's answer for a target domain it does not know.
                raise FhirError(403, "targetSystem not found", "code-invalid")
        found = services.cross_reference(session, scope, source, systems)
        if found is None:
            raise FhirError(404, "sourceIdentifier Patient Identifier not found", "not-found")
        return _fhir(fhir.parameters(found.targets)), found.nhs_numbers

    return _lookup(hub, request, actor, "pix", answer)


def _criteria(params: dict[str, list[str]]) -> services.Criteria:
    def one(name: str) -> str | None:
        values = params.get(name)
        if values is None:
            return None
        if not values[0].strip():
            raise FhirError(400, f"{name} is empty")
        return values[0].strip()

    ranges = [fhir.parse_birthdate(v.strip()) for v in params.get("birthdate", [])]
    birthdate = None
    if ranges:
        lows = [r.low for r in ranges if r.low is not None]
        highs = [r.high for r in ranges if r.high is not None]
        birthdate = fhir.DateRange(max(lows, default=None), min(highs, default=None))
    gender = one("gender")
    identifier = one("identifier")
    return services.Criteria(
        family=one("family"),
        given=one("given"),
        birthdate=birthdate,
        sex=fhir.parse_gender(gender) if gender is not None else None,
        identifier=fhir.parse_identifier(identifier, "identifier") if identifier else None,
    )


def _patient(rows: list[PatientIdentifier]) -> dict[str, Any]:
    identifiers, demographics = services.resource_parts(rows)
    return fhir.patient_resource(
        rows[0].person_id, rows[0].person.nhs_number, identifiers, demographics
    )


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


@router.get("/fhir/Patient")
def pdq_search(
    request: Request,
    actor: Querier,
    hub: HubDep,
    family: str | None = None,
    given: str | None = None,
    birthdate: Annotated[
        list[str] | None, Query(description="[eq|ge|le|gt|lt]YYYY[-MM[-DD]]")
    ] = None,
    gender: Annotated[str | None, Query(description="male, female, other or unknown")] = None,
    identifier: Annotated[str | None, Query(description="system|value")] = None,
    _count: Annotated[str | None, Query(description=f"At most {MAX_COUNT}")] = None,
) -> Response:
    """IHE PDQm (ITI-78): patients matching demographics or an identifier, as a searchset."""

    def answer(session: Session, scope: Scope) -> tuple[Response, list[str]]:
        names = {"family", "given", "birthdate", "gender", "identifier", "_count"}
        params = _parameters(request, names, {"birthdate"})
        criteria = _criteria(params)
        if criteria == services.Criteria():
            raise FhirError(
                400, "give at least one of family, given, birthdate, gender, identifier"
            )
        count = whole_number(params.get("_count", ["20"])[0], 0, MAX_COUNT)
        if count is None:
            raise FhirError(400, f"_count must be a number from 0 to {MAX_COUNT}")
        if criteria.identifier is not None:
            _source_issuer_known(session, scope, criteria.identifier)
        total, found = services.search(session, scope, criteria, count)
        patients = [_patient(rows) for _, rows in found]
        bundle = fhir.searchset(_base(request), str(request.url), total, patients)
        return _fhir(bundle), [person.nhs_number for person, _ in found]

    return _lookup(hub, request, actor, "pdq", answer)


@router.get("/fhir/Patient/{patient_id}")
def read_patient(patient_id: str, request: Request, actor: Querier, hub: HubDep) -> Response:
    """PDQm's read of one Patient found by a search."""

    def answer(session: Session, scope: Scope) -> tuple[Response, list[str]]:
        _parameters(request, set(), set())
        number = whole_number(patient_id, 1)
        found = services.read(session, scope, number) if number is not None else None
        if found is None:
            raise FhirError(404, "no such Patient", "not-found")
        return _fhir(_patient(found[1])), [found[0].nhs_number]

    return _lookup(hub, request, actor, "read", answer)


def _registering_institution(session: Session, actor: Actor, issuer: str) -> int:
    """The institution whose identifier this is: the caller's own, or for the network's
    administrators the one whose code (or known issuer) it is."""
    owner = session.scalar(select(Institution.id).where(Institution.code == issuer))
    if actor.institution_id is not None and not actor.network_wide:
        if owner is not None and owner != actor.institution_id:
            raise FhirError(403, f"the issuer {issuer} is another institution's", "forbidden")
        return actor.institution_id
    if owner is None:
        users = set(
            session.scalars(
                select(PatientIdentifier.institution_id).where(PatientIdentifier.issuer == issuer)
            )
        )
        owner = users.pop() if len(users) == 1 else None
    if owner is None:
        raise FhirError(
            400,
            f"no institution is known to issue {issuer}: register under "
            f"{fhir.ISSUER_SYSTEM}<institution code>",
            "code-invalid",
        )
    return owner


@router.put("/fhir/Patient")
async def register_identifier(
    request: Request,
    actor: InstitutionAdmin,
    hub: HubDep,
    identifier: Annotated[
        str | None, Query(description=f"{fhir.ISSUER_SYSTEM}<issuer>|<local ID>")
    ] = None,
) -> Response:
    """Register "this NHS number is our local ID" (as IHE PIXm's feed, ITI-104, does): a
    conditional update of the Patient with that local identifier. The body is a Patient
    carrying the NHS number and the demographics the institution holds."""
    try:
        body = await request.json()
    except ValueError:
        body = None

    def register() -> Response:
        params = _parameters(request, {"identifier"}, set())
        if "identifier" not in params:
            raise FhirError(400, "identifier=system|value names the local identifier", "required")
        local = fhir.parse_identifier(params["identifier"][0], "identifier")
        if local.issuer is None:
            raise FhirError(400, "identifier must be a local one; the NHS number goes in the body")
        nhs_number, demographics = fhir.parse_patient(body)
        with hub.sessions() as session, session.begin():
            institution_id = _registering_institution(session, actor, local.issuer)
            row, created = services.register(
                session,
                institution_id,
                local.issuer,
                local.value,
                nhs_number,
                demographics,
                actor.audit(),
            )
            resource = fhir.patient_resource(
                row.person_id, nhs_number, [(row.issuer, row.value)], [demographics]
            )
        location = {"Location": f"{_base(request)}/Patient/{resource['id']}"}
        return _fhir(resource, 201 if created else 200, location)

    def refused(exc: FhirError) -> None:
        with hub.sessions() as session, session.begin():
            record(
                session,
                "patient:identity:registered",
                "failure",
                institution_id=actor.institution_id,
                detail={"status": exc.status, "reason": exc.diagnostics[:300]},
                **actor.audit(),
            )

    try:
        return await run_in_threadpool(register)
    except FhirError as exc:
        await run_in_threadpool(refused, exc)
        return _refuse(exc)


# -- identity flags -------------------------------------------------------------------------


class ResolveIn(BaseModel):
    resolution: str = Field(min_length=1, max_length=500, description="What was found and done")


@router.get("/api/v1/patients/flags")
def list_flags(
    actor: InstitutionAdmin,
    hub: HubDep,
    status: Annotated[str, Query(pattern="^(open|resolved|all)$")] = "open",
) -> list[dict[str, Any]]:
    """Identity flags touching the caller's institution (every flag, for the network's
    administrators)."""
    with hub.sessions() as session, session.begin():
        return services.listed_flags(session, actor, status)


@router.post("/api/v1/patients/flags/{flag_id}/resolve")
def resolve_flag(
    flag_id: RowId, body: ResolveIn, actor: InstitutionAdmin, hub: HubDep
) -> dict[str, Any]:
    """Record what a person found and did about a flag; the identifiers stay as they are."""
    with hub.sessions() as session, session.begin():
        flag = session.get(IdentityFlag, flag_id)
        if flag is None or not (
            manages(actor, flag.identifier.institution_id)
            or manages(actor, flag.other_identifier.institution_id)
        ):
            raise HTTPException(404, "no such identity flag")
        if flag.resolved_at is not None:
            raise HTTPException(409, "this identity flag is already resolved")
        services.resolve(flag, actor.name, body.resolution, hub.clock())
        record(
            session,
            "patient:identity-flag:resolved",
            institution_id=actor.institution_id,
            patient_ref=flag.identifier.person.nhs_number,
            detail={"flag": flag.id, "kind": flag.kind},
            **actor.audit(),
        )
        return services.described_flag(session, actor, flag)
