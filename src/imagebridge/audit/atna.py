"""Audit events as DICOM PS3.15 A.5 audit messages (IHE ATNA, RFC 3881 lineage).

Each `area:subject:action` tag maps to a standard EventID, EventActionCode and event types;
the tag itself travels too, as an EventTypeCode of our private scheme "99IMAGEBRIDGE", so
nothing is lost when the standard vocabulary is coarser than ours. A tag nobody has mapped
yet still yields a valid message (see `spec_for`).
"""

from __future__ import annotations

import base64
import fnmatch
import ipaddress
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PRIVATE_SCHEME = "99IMAGEBRIDGE"


@dataclass(frozen=True)
class Code:
    """A coded value: csd-code, codeSystemName, originalText (the code meaning)."""

    value: str
    scheme: str
    meaning: str


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


# EventID (CID 400)
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
PATIENT_RECORD = _dcm("110110", "Patient Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
# EventTypeCode (CID 401, 403)
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
OBJECT_SECURITY_CHANGED = _dcm("110135", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_SECURITY_CHANGED = _dcm("110137", "User security Attributes Changed")
# RoleIDCode (CID 402)
APPLICATION = _dcm("110150", "Application")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
# ParticipantObjectIDTypeCode
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
SEARCH_CRITERIA = Code("10", "RFC-3881", "Search Criteria")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
TRANSFER = Code("transfer", PRIVATE_SCHEME, "Transfer")
ROLE = Code("role", PRIVATE_SCHEME, "Role")
INSTITUTION = Code("institution", PRIVATE_SCHEME, "Institution Code")
# AuditSourceTypeCode 4: application server process
APPLICATION_SERVER = Code("4", "DCM", "Application Server Process Tier in a Multi-tier System")


@dataclass(frozen=True)
class EventSpec:
    event_id: Code
    types: tuple[Code, ...] = ()
    action: str | None = None  # C R U D E; None: from the tag's verb
    # Which way data moved between the actor and the hub: "in" (to the hub), "out", or none.
    direction: str | None = None
    serious: bool = False  # a failure is a serious one (8), not a minor one (4)


def _alert(*types: Code) -> EventSpec:
    return EventSpec(SECURITY_ALERT, types, "E")


_RECEIVED = EventSpec(INSTANCES_TRANSFERRED, action="C", direction="in")
_DELIVERED = EventSpec(INSTANCES_TRANSFERRED, action="R", direction="out")
_LOGIN = EventSpec(USER_AUTHENTICATION, (LOGIN,), "E")
_QUERY = EventSpec(QUERY, action="E")
_EXPORT = EventSpec(EXPORT, action="R", direction="out")

# First match wins: specific tags before the patterns that would also catch them.
RULES: tuple[tuple[str, EventSpec], ...] = (
    ("user:login:*", _LOGIN),
    ("user:totp:replayed", _alert(RESTRICTED_FUNCTION)),
    ("user:totp:success", _LOGIN),
    ("user:totp:failure", _LOGIN),
    ("user:recovery_code:*", _LOGIN),
    ("user:logout:*", EventSpec(USER_AUTHENTICATION, (LOGOUT,), "E")),
    ("user:session:*", EventSpec(USER_AUTHENTICATION, (LOGOUT,), "E")),
    ("*:role:*", _alert(SECURITY_ROLES_CHANGED)),
    ("*:roles:*", _alert(USER_SECURITY_CHANGED)),
    ("*:permission*:*", _alert(USER_SECURITY_CHANGED)),
    ("user:*:*", _alert(USER_SECURITY_CHANGED)),
    ("*:user:*", _alert(USER_SECURITY_CHANGED)),
    ("*:token:*", _alert(USER_SECURITY_CHANGED)),
    ("*:certificate:refused", _alert(NODE_AUTHENTICATION)),
    ("*:certificate:*", _alert(SECURITY_CONFIGURATION)),
    ("*:agreement:*", _alert(SECURITY_CONFIGURATION)),
    ("directory:gateway:*", _alert(SECURITY_CONFIGURATION)),
    ("*:trusted_network:*", _alert(NETWORK_CONFIGURATION)),
    ("directory:*:*", _alert(NETWORK_CONFIGURATION)),
    ("dicom:association:*", _alert(NODE_AUTHENTICATION)),
    ("http:request:refused", _alert(RESTRICTED_FUNCTION)),
    ("audit:*:*", EventSpec(AUDIT_LOG_USED, action="R")),
    ("*:query:*", _QUERY),
    ("query:*:*", _QUERY),
    ("*:*:queried", _QUERY),
    ("*:*:listed", _QUERY),
    ("*:export:*", _EXPORT),
    ("*:*:exported", _EXPORT),
    ("*:*:downloaded", _EXPORT),
    ("*:*:viewed", EventSpec(INSTANCES_ACCESSED, action="R", direction="out")),
    ("share:*:*", _alert(OBJECT_SECURITY_CHANGED)),
    ("dicom:instances:*", _RECEIVED),
    ("dicom:instance:*", _RECEIVED),
    ("transfer:transfer:created", EventSpec(BEGIN_TRANSFERRING, action="E", direction="in")),
    ("transfer:transfer:retried", EventSpec(BEGIN_TRANSFERRING, action="E", direction="out")),
    ("transfer:transfer:failed", EventSpec(INSTANCES_TRANSFERRED, (), "R", "out", True)),
    ("transfer:transfer:delivered", _DELIVERED),
    ("transfer:instances:delivered", _DELIVERED),
    ("transfer:instances:failed", _DELIVERED),
    ("transfer:report:delivered", _DELIVERED),
    ("transfer:report:failed", _DELIVERED),
    ("transfer:delivery:*", _DELIVERED),
    ("transfer:*:*", _RECEIVED),
    ("*:patient:*", EventSpec(PATIENT_RECORD)),
    ("patient:*:*", EventSpec(PATIENT_RECORD)),
    ("*:application:started", EventSpec(APPLICATION_ACTIVITY, (APPLICATION_START,), "E")),
    ("*:application:stopped", EventSpec(APPLICATION_ACTIVITY, (APPLICATION_STOP,), "E")),
)

_VERB_ACTIONS = {
    "C": {"created", "added", "issued", "attached", "enrolled", "granted", "signed", "recorded"},
    "U": {"updated", "changed", "modified", "renamed", "locked", "unlocked", "reset", "retried"},
    "D": {"deleted", "removed", "revoked", "withdrawn", "purged", "expired"},
    "R": {"viewed", "read", "downloaded", "exported", "retrieved", "searched", "verified"},
}


def spec_for(action: str, outcome: str) -> EventSpec:
    """The standard event for a tag; an unknown tag is a security alert if it was refused,
    application activity otherwise."""
    for pattern, spec in RULES:
        if fnmatch.fnmatchcase(action, pattern):
            return spec
    if outcome == "refused":
        return _alert(RESTRICTED_FUNCTION)
    return EventSpec(APPLICATION_ACTIVITY)


def action_code(spec: EventSpec, action: str) -> str:
    if spec.action:
        return spec.action
    verb = action.rsplit(":", 1)[-1]
    return next((code for code, verbs in _VERB_ACTIONS.items() if verb in verbs), "E")


def outcome_indicator(spec: EventSpec, outcome: str) -> str:
    if outcome == "success":
        return "0"
    return "8" if spec.serious else "4"


@dataclass(frozen=True)
class AuditSource:
    """Who reports: AuditSourceID and the site used when an event has no institution."""

    source_id: str = "imagebridge-hub"
    site_id: str = "ImageBridge"
    process_id: str = field(default_factory=lambda: str(os.getpid()))


# Participant objects named in an event's detail: key -> (type, role, id type code).
# Types: 1 person, 2 system object, 3 organization. Roles: 2 location, 6 user, 11 security
# user entity, 13 security resource.
_DETAIL_OBJECTS: tuple[tuple[str, str, str, Code], ...] = (
    ("user", "1", "11", USER_IDENTIFIER),
    ("username", "1", "11", USER_IDENTIFIER),
    ("target_user", "1", "11", USER_IDENTIFIER),
    ("role", "2", "13", ROLE),
    ("institution", "3", "2", INSTITUTION),
    ("path", "2", "13", URI),
)

# Characters XML 1.0 cannot carry (C0 controls but tab, newline, carriage return; surrogates).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return _NOT_XML.sub("\ufffd", text)


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _text(code.value),
            "codeSystemName": code.scheme,
            "originalText": code.meaning,
        },
    )


def _access_point(address: str) -> dict[str, str]:
    if not address:
        return {}
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return {"NetworkAccessPointID": _text(address), "NetworkAccessPointTypeCode": "1"}
    return {"NetworkAccessPointID": address, "NetworkAccessPointTypeCode": "2"}


def _participant(
    root: ET.Element,
    user_id: str,
    requestor: bool,
    role: Code | None,
    address: str = "",
    alternative: str = "",
) -> None:
    attributes = {"UserID": _text(user_id or "unknown")}
    if alternative:
        attributes["AlternativeUserID"] = alternative
    attributes["UserIsRequestor"] = "true" if requestor else "false"
    attributes.update(_access_point(address))
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    if role is not None:
        _coded(element, "RoleIDCode", role)


def _object(
    root: ET.Element,
    object_id: str,
    type_code: str,
    role: str,
    id_type: Code,
    details: Mapping[str, str] | None = None,
    query: bytes | None = None,
) -> None:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": _text(object_id),
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _coded(element, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    for key, value in (details or {}).items():
        encoded = base64.b64encode(value.encode()).decode()
        ET.SubElement(element, "ParticipantObjectDetail", {"type": key, "value": encoded})


def _roles(direction: str | None) -> tuple[Code | None, Code]:
    """Roles of (the acting peer, the hub) for data moving `direction` relative to the hub."""
    if direction == "in":
        return SOURCE, DESTINATION
    if direction == "out":
        return DESTINATION, SOURCE
    return None, APPLICATION


def audit_message(
    event: Mapping[str, Any], source: AuditSource, institution_code: str = ""
) -> bytes:
    """One stored event as the XML of a DICOM audit message (UTF-8, with declaration)."""
    action = str(event.get("action") or "unknown:unknown:unknown")
    outcome = str(event.get("outcome") or "")
    detail = event.get("detail")
    detail = detail if isinstance(detail, dict) else {}
    spec = spec_for(action, outcome)

    root = ET.Element("AuditMessage")
    at = event.get("at")
    at = at if isinstance(at, datetime) and at.tzinfo else datetime.now(UTC)
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action_code(spec, action),
            "EventDateTime": at.astimezone(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome_indicator(spec, outcome),
        },
    )
    _coded(identification, "EventID", spec.event_id)
    for code in (*spec.types, Code(action, PRIVATE_SCHEME, action)):
        _coded(identification, "EventTypeCode", code)
    reason = detail.get("reason") or detail.get("detail")
    if outcome != "success" and reason:
        ET.SubElement(identification, "EventOutcomeDescription").text = _text(reason)[:1000]

    peer_role, hub_role = _roles(spec.direction)
    actor = str(event.get("actor") or "")
    address = str(event.get("source_address") or "")
    calling = detail.get("calling_ae_title")
    if calling:
        # A DICOM node called one of our gateways: the node asked, the gateway answered.
        _participant(root, str(calling), True, SOURCE if spec.direction else None, address)
        _participant(root, actor, False, DESTINATION if spec.direction else APPLICATION)
        hub_role = APPLICATION  # the hub only reports what its gateway saw
    elif event.get("actor_type") not in ("system", None) or actor:
        _participant(root, actor or address, True, peer_role, address)
    hub_requests = event.get("actor_type") == "system" and not actor
    _participant(root, source.source_id, hub_requests, hub_role, alternative=source.process_id)

    ET.SubElement(
        root,
        "AuditSourceIdentification",
        {
            "AuditEnterpriseSiteID": _text(institution_code or source.site_id),
            "AuditSourceID": _text(source.source_id),
        },
    )
    _coded(root[-1], "AuditSourceTypeCode", APPLICATION_SERVER)

    _participant_objects(root, event, spec, detail)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


def _participant_objects(
    root: ET.Element, event: Mapping[str, Any], spec: EventSpec, detail: Mapping[str, Any]
) -> None:
    transfer = str(event.get("transfer_ref") or "")
    patient = str(event.get("patient_ref") or "")
    study = str(event.get("study_ref") or "")
    if patient:
        _object(root, patient, "1", "1", PATIENT_NUMBER)
    if study:
        _object(
            root,
            study,
            "2",
            "3",
            STUDY_INSTANCE_UID,
            {"TransferID": transfer} if transfer else None,
        )
    elif transfer:
        _object(root, transfer, "2", "20", TRANSFER)
    if spec.event_id == QUERY:
        query = detail.get("query", "")
        sop_class = str(detail.get("sop_class_uid") or "")
        id_type = Code(sop_class, "DCM", "SOP Class UID") if sop_class else SEARCH_CRITERIA
        encoded = (query if isinstance(query, str) else json.dumps(query, default=str)).encode()
        _object(root, sop_class or "query", "2", "24", id_type, query=encoded)
    for key, type_code, role, id_type in _DETAIL_OBJECTS:
        value = detail.get(key)
        if value and isinstance(value, str | int):
            _object(root, str(value), type_code, role, id_type)
