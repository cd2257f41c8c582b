"""The patient index on the hub's real application: FHIR cross-reference (PIXm ITI-83) and
patient search (PDQm ITI-78) by NHS number and by local ID, registration of local IDs,
identity flags, bad input and authorization.

Studies reach the index through the real upload route, as gateways send them; people log in
through the real login steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from hubapp import InProcessHub, Person
from imagebridge.db import make_engine
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.migrate import upgrade
from imagebridge.nhs import is_valid_nhs_number

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ALICE = "9434765919"  # at SEG, NTH and (registered) RVH, all agreeing
BOB = "9434765005"  # SEG and RVH disagree on his birth date
CAROL, DAVE = "9434765013", "9434765021"  # RVH sent one local ID under both
NOBODY = "9434765048"  # valid, never seen
PIX = "/fhir/Patient/$ihe-pix"


def local(issuer: str) -> str:
    return f"urn:imagebridge:issuer:{issuer}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    folder = tmp_path_factory.mktemp("patients")
    t = InProcessHub(folder / "hub")
    for code in ("SEG", "RVH", "NTH"):
        t.add_institution(code)
    # SEG and RVH let everyone with an agreement find their studies; NTH lets nobody.
    for code in ("SEG", "RVH"):
        t.admin("PUT", f"/api/v1/institutions/{code}/discovery", json={"to": ["*"]})
    sent = [
        ("SEG", "RVH", "SEG778899", "DOE^ALICE^MAY", "19700101", "F", ALICE),
        ("NTH", "SEG", "NTH-55", "DOE^ALICE", "19700101", "F", ALICE),
        ("SEG", "RVH", "SEG1234", "ROE^BOB", "19800101", "M", BOB),
        ("RVH", "SEG", "RVH0500", "POE^CAROL", "19900101", "F", CAROL),
        ("RVH", "SEG", "RVH0500", "POE^CAROL", "19900101", "F", DAVE),
    ]
    for n, (code, receiver, pid, name, birth, sex, nhs) in enumerate(sent):
        study = generate_ct_study(
            folder / f"study{n}",
            slices=1,
            rows=16,
            columns=16,
            patient_id=pid,
            patient_name=name,
            birth_date=birth,
            sex=sex,
            nhs_number=nhs,
        )
        t.upload(code, receiver, study.paths)
    t.add_user("RVH", "radiologist", ["radiologist"])
    t.add_user("RVH", "clerk", ["clerk"])
    t.add_user("RVH", "manager", ["pacs_manager"])
    t.add_user("SEG", "manager-seg", ["pacs_manager"])
    t.add_user("NTH", "manager-nth", ["pacs_manager"])
    yield t
    t.close()


@pytest.fixture(scope="module")
def people(net: InProcessHub) -> dict[str, Person]:
    return {
        name: net.log_in(name)
        for name in ("radiologist", "clerk", "manager", "manager-seg", "manager-nth")
    }


@pytest.fixture(scope="module")
def registered(net: InProcessHub, people: dict[str, Person]) -> None:
    """RVH's PAS says: Alice is our RVH0042, Bob is our RVH0099 (born a month later)."""
    for value, nhs, birth, gender in (
        ("RVH0042", ALICE, "1970-01-01", "female"),
        ("RVH0099", BOB, "1980-02-01", "male"),
    ):
        name = ("DOE", ["ALICE"]) if nhs == ALICE else ("ROE", ["BOB"])
        r = register(people["manager"], local("RVH"), value, nhs, birth, gender, name)
        assert r.status_code == 201, r.text


def register(
    person: Person,
    system: str,
    value: str,
    nhs: str,
    birth: str = "",
    gender: str = "",
    name: tuple[str, list[str]] = ("DOE", ["ALICE"]),
) -> httpx.Response:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": NHS_SYSTEM, "value": nhs}],
        "name": [{"family": name[0], "given": name[1]}],
    }
    if birth:
        body["birthDate"] = birth
    if gender:
        body["gender"] = gender
    return person.request(
        "PUT",
        "/fhir/Patient",
        params={"identifier": f"{system}|{value}"},
        json=body,
        headers={"Content-Type": "application/fhir+json"},
    )


def targets(r: httpx.Response) -> set[tuple[str, str]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "Parameters"
    assert all(p["name"] == "targetIdentifier" for p in body["parameter"])
    return {
        (p["valueIdentifier"]["system"], p["valueIdentifier"]["value"]) for p in body["parameter"]
    }


def patients(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == len(bundle["entry"])
    return [e["resource"] for e in bundle["entry"]]


def identifiers(patient: dict[str, Any]) -> set[tuple[str, str]]:
    return {(i["system"], i["value"]) for i in patient["identifier"]}


def audit(net: InProcessHub, action: str) -> list[dict[str, Any]]:
    r = net.admin("GET", "/api/v1/audit", params={"action": action, "limit": 1000})
    events: list[dict[str, Any]] = r.json()
    return events


def test_pix_by_nhs_number_names_the_visible_local_ids(
    net: InProcessHub, people: dict[str, Person], registered: None
) -> None:
    doctor = people["radiologist"]
    r = doctor.get(PIX, params={"sourceIdentifier": f"{NHS_SYSTEM}|{ALICE}"})
    # NTH's NTH-55 is not revealed: NTH lets nobody discover its studies.
    assert targets(r) == {(local("SEG"), "SEG778899"), (local("RVH"), "RVH0042")}
    r = doctor.get(
        PIX,
        params={"sourceIdentifier": f"{NHS_SYSTEM}|943 476 5919", "targetSystem": local("RVH")},
    )
    assert targets(r) == {(local("RVH"), "RVH0042")}
    # The network's operator sees every institution.
    r = net.client().get(
        PIX, params={"sourceIdentifier": f"{NHS_SYSTEM}|{ALICE}"}, headers=net.admin_headers
    )
    assert (local("NTH"), "NTH-55") in targets(r)
    events = [e for e in audit(net, "patient:identity:lookup") if e["actor"] == "radiologist"]
    assert events and events[0]["patient_ref"] == ALICE
    assert events[0]["detail"]["operation"] == "pix"


def test_pix_by_local_id_gives_the_nhs_number_and_the_other_ids(
    people: dict[str, Person], registered: None
) -> None:
    doctor = people["radiologist"]
    r = doctor.get(PIX, params={"sourceIdentifier": f"{local('SEG')}|SEG778899"})
    assert targets(r) == {(NHS_SYSTEM, ALICE), (local("RVH"), "RVH0042")}
    r = doctor.get(
        PIX,
        params=[
            ("sourceIdentifier", f"{local('RVH')}|RVH0042"),
            ("targetSystem", NHS_SYSTEM),
        ],
    )
    assert targets(r) == {(NHS_SYSTEM, ALICE)}
    # A known patient with nothing in the wanted system: an empty answer.
    r = doctor.get(
        PIX,
        params={"sourceIdentifier": f"{local('SEG')}|SEG1234", "targetSystem": local("SEG")},
    )
    assert targets(r) == set()


def test_an_invisible_institutions_patient_is_not_found(people: dict[str, Person]) -> None:
    doctor = people["radiologist"]
    for source in (f"{local('NTH')}|NTH-55", f"{NHS_SYSTEM}|{NOBODY}"):
        r = doctor.get(PIX, params={"sourceIdentifier": source})
        assert r.status_code == 404, r.text
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "not-found"
        assert outcome["issue"][0]["diagnostics"] == "sourceIdentifier Patient Identifier not found"


def test_pdq_search_by_demographics_and_identifiers(
    net: InProcessHub, people: dict[str, Person], registered: None
) -> None:
    doctor = people["radiologist"]
    found = patients(doctor.get("/fhir/Patient", params={"family": "doe", "birthdate": "1970"}))
    assert len(found) == 1
    alice = found[0]
    assert identifiers(alice) == {
        (NHS_SYSTEM, ALICE),
        (local("SEG"), "SEG778899"),
        (local("RVH"), "RVH0042"),
    }
    assert alice["birthDate"] == "1970-01-01" and alice["gender"] == "female"
    assert {"family": "DOE", "given": ["ALICE", "MAY"]} in alice["name"]
    for params in (
        {"identifier": f"{NHS_SYSTEM}|{ALICE}"},
        {"identifier": f"{local('SEG')}|SEG778899"},
        {"given": "may", "gender": "female"},
        {"family": "D", "birthdate": ["ge1969-12-31", "lt1970-01-02"]},
    ):
        assert [p["id"] for p in patients(doctor.get("/fhir/Patient", params=params))] == [
            alice["id"]
        ], params
    for params in (
        {"family": "OE"},  # a family name is matched from its start
        {"identifier": f"{local('NTH')}|NTH-55"},  # not visible to RVH
        {"family": "doe", "birthdate": "gt1970-01-01"},
        {"identifier": f"{NHS_SYSTEM}|{NOBODY}"},
    ):
        assert patients(doctor.get("/fhir/Patient", params=params)) == [], params
    bob = patients(doctor.get("/fhir/Patient", params={"gender": "male", "birthdate": "ge1980"}))
    assert [identifiers(p) for p in bob] == [
        {(NHS_SYSTEM, BOB), (local("SEG"), "SEG1234"), (local("RVH"), "RVH0099")}
    ]
    # The Patient a search found reads back the same.
    r = doctor.get(f"/fhir/Patient/{alice['id']}")
    assert r.status_code == 200 and r.json() == alice
    events = audit(net, "patient:identity:lookup")
    assert any(e["detail"]["operation"] == "pdq" and e["patient_ref"] == ALICE for e in events)


BAD_INPUT = [
    (PIX, {}, 400, "sourceIdentifier is required"),
    (PIX, {"sourceIdentifier": "9434765919"}, 400, "must be system|value"),
    (PIX, {"sourceIdentifier": f"{NHS_SYSTEM}|"}, 400, "must be system|value"),
    (PIX, {"sourceIdentifier": "http://example.org/mrn|42"}, 400, "unknown identifier system"),
    (PIX, {"sourceIdentifier": f"{NHS_SYSTEM}|9434765918"}, 400, "mod-11 check digit"),
    (PIX, {"sourceIdentifier": f"{local('XYZ')}|1"}, 400, "Assigning Authority not found"),
    (
        PIX,
        {"sourceIdentifier": f"{NHS_SYSTEM}|{ALICE}", "targetSystem": "urn:oid:1.2.3"},
        403,
        "targetSystem not found",
    ),
    (PIX, {"sourceIdentifier": f"{NHS_SYSTEM}|{ALICE}", "foo": "1"}, 400, "unsupported"),
    ("/fhir/Patient", {}, 400, "give at least one of"),
    ("/fhir/Patient", {"birthdate": "1970-13"}, 400, "is not a date"),
    ("/fhir/Patient", {"birthdate": "1970-02-30"}, 400, "is not a date"),
    ("/fhir/Patient", {"birthdate": "yesterday"}, 400, "birthdate must be"),
    ("/fhir/Patient", {"gender": "f"}, 400, "gender must be"),
    ("/fhir/Patient", {"family": "doe", "_count": "500"}, 400, "_count"),
    ("/fhir/Patient", {"family": "doe", "_format": "xml"}, 400, "only JSON"),
    ("/fhir/Patient", {"identifier": "urn:oid:1.2|7"}, 400, "unknown identifier system"),
    ("/fhir/Patient", {"identifier": f"{NHS_SYSTEM}|123"}, 400, "not a valid NHS number"),
    ("/fhir/Patient", {"family": ""}, 400, "family is empty"),
    ("/fhir/Patient/not-a-number", {}, 404, "no such Patient"),
]


@pytest.mark.parametrize(("path", "params", "status", "reason"), BAD_INPUT)
def test_bad_input_gets_an_operation_outcome_with_the_reason(
    net: InProcessHub,
    people: dict[str, Person],
    path: str,
    params: dict[str, str],
    status: int,
    reason: str,
) -> None:
    r = people["radiologist"].get(path, params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    assert reason in outcome["issue"][0]["diagnostics"]
    failures = [e for e in audit(net, "patient:identity:lookup") if e["outcome"] == "failure"]
    assert any(reason in e["detail"].get("reason", "") for e in failures)


def test_lookups_need_the_query_network_permission(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    query = {"sourceIdentifier": f"{NHS_SYSTEM}|{ALICE}"}
    for path, params in (
        (PIX, query),
        ("/fhir/Patient", {"family": "doe"}),
        ("/fhir/Patient/1", {}),
    ):
        r = people["clerk"].get(path, params=params)
        assert r.status_code == 403 and "query_network" in r.json()["detail"], path
        gateway = {"Authorization": f"Bearer {net.gateway_token('RVH')}"}
        assert net.client().get(path, params=params, headers=gateway).status_code == 403
        assert net.client().get(path, params=params).status_code == 401


def test_registration_is_an_institution_administrators_and_checked(
    net: InProcessHub, people: dict[str, Person], registered: None
) -> None:
    manager = people["manager"]
    # The same statement again updates it.
    r = register(manager, local("RVH"), "RVH0042", ALICE, "1970-01-01", "female")
    assert r.status_code == 200, r.text
    assert r.headers["location"].endswith(f"/fhir/Patient/{r.json()['id']}")
    assert identifiers(r.json()) == {(NHS_SYSTEM, ALICE), (local("RVH"), "RVH0042")}
    refused = [
        (register(manager, local("SEG"), "X1", ALICE), 403, "another institution's"),
        (register(manager, NHS_SYSTEM, ALICE, ALICE), 400, "must be a local one"),
        (register(manager, local("RVH"), "X2", "9434765918"), 400, "not a valid NHS number"),
        (register(manager, local("RVH"), "X3", ALICE, "1970-02-30"), 400, "is not a date"),
        (register(manager, local("RVH"), "X4", ALICE, "", "woman"), 400, "gender must be"),
        (
            manager.request("PUT", "/fhir/Patient", params={"identifier": f"{local('RVH')}|X5"}),
            400,
            "FHIR Patient resource",
        ),
    ]
    for r, status, reason in refused:
        assert r.status_code == status, r.text
        assert reason in r.json()["issue"][0]["diagnostics"]
    r = register(people["radiologist"], local("RVH"), "X6", ALICE)
    assert r.status_code == 403 and "admin_institution" in r.json()["detail"]
    failures = [e for e in audit(net, "patient:identity:registered") if e["outcome"] == "failure"]
    assert len(failures) >= len(refused)
    # The network's operator registers under an institution's code.
    r = net.client().put(
        "/fhir/Patient",
        params={"identifier": f"{local('NTH')}|NTH-77"},
        json={"resourceType": "Patient", "identifier": [{"system": NHS_SYSTEM, "value": NOBODY}]},
        headers=net.admin_headers,
    )
    assert r.status_code == 201, r.text
    r = net.client().put(
        "/fhir/Patient",
        params={"identifier": f"{local('NOWHERE')}|1"},
        json={"resourceType": "Patient", "identifier": [{"system": NHS_SYSTEM, "value": NOBODY}]},
        headers=net.admin_headers,
    )
    assert r.status_code == 400 and "no institution is known" in r.text


def flags(person: Person, status: str = "open") -> list[dict[str, Any]]:
    r = person.get("/api/v1/patients/flags", params={"status": status})
    assert r.status_code == 200, r.text
    result: list[dict[str, Any]] = r.json()
    return result


def test_a_birth_date_mismatch_is_flagged_for_a_human(
    net: InProcessHub, people: dict[str, Person], registered: None
) -> None:
    [flag] = [f for f in flags(people["manager"]) if f["kind"] == "birth_date"]
    assert "19800201" in flag["reason"] and "19800101" in flag["reason"]
    sides = {s["institution"]: s for s in flag["identifiers"]}
    assert sides["RVH"]["value"] == "RVH0099" and sides["RVH"]["source"] == "registered"
    # Another institution's local ID is not shown to RVH; SEG's manager sees its own.
    assert "value" not in sides["SEG"] and sides["SEG"]["birth_date"] == "19800101"
    [seen_by_seg] = [f for f in flags(people["manager-seg"]) if f["id"] == flag["id"]]
    assert {s.get("value") for s in seen_by_seg["identifiers"]} == {"SEG1234", None}
    assert all(f["id"] != flag["id"] for f in flags(people["manager-nth"]))
    assert any(
        e["detail"].get("flag") == flag["id"] for e in audit(net, "patient:identity-flag:raised")
    )
    # Nothing was merged: each record keeps its own birth date.
    r = net.client().get(
        PIX, params={"sourceIdentifier": f"{NHS_SYSTEM}|{BOB}"}, headers=net.admin_headers
    )
    assert targets(r) == {(local("SEG"), "SEG1234"), (local("RVH"), "RVH0099")}

    path = f"/api/v1/patients/flags/{flag['id']}/resolve"
    # The administrators' page shows it, with the form that resolves it; not to others.
    page = people["manager"].get("/portal/admin/flags")
    assert page.status_code == 200 and "19800201" in page.text and path in page.text
    assert path not in people["manager-nth"].get("/portal/admin/flags").text
    assert people["manager-nth"].post(path, json={"resolution": "x"}).status_code == 404
    assert people["manager"].post(path, json={"resolution": ""}).status_code == 422
    r = people["manager"].post(path, json={"resolution": "PAS had a typo; corrected"})
    assert r.status_code == 200 and r.json()["status"] == "resolved", r.text
    assert r.json()["resolved_by"] == "manager"
    assert people["manager"].post(path, json={"resolution": "again"}).status_code == 409
    assert all(f["id"] != flag["id"] for f in flags(people["manager"]))
    assert any(f["id"] == flag["id"] for f in flags(people["manager"], "resolved"))
    page = people["manager"].get("/portal/admin/flags", params={"status": "resolved"})
    assert "PAS had a typo; corrected" in page.text and path not in page.text
    # The same disagreement is not raised again when it is stated again.
    register(
        people["manager"], local("RVH"), "RVH0099", BOB, "1980-02-01", "male", ("ROE", ["BOB"])
    )
    assert all(f["kind"] != "birth_date" for f in flags(people["manager"]))
    assert audit(net, "patient:identity-flag:resolved")
    assert audit(net, "patient:identity-flag:listed")


def ask_local_id(net: InProcessHub, code: str, nhs: str) -> httpx.Response:
    """As the institution's gateway asks on delivery."""
    return net.client().post(
        "/api/v1/gateway/patients/local-id",
        json={"nhs_number": nhs},
        headers={"Authorization": f"Bearer {net.gateway_token(code)}"},
    )


def test_one_local_id_under_two_nhs_numbers_is_flagged_and_given_to_neither(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    [flag] = [f for f in flags(people["manager"]) if f["kind"] == "nhs_number"]
    assert {s["nhs_number"] for s in flag["identifiers"]} == {CAROL, DAVE}
    assert {s["value"] for s in flag["identifiers"]} == {"RVH0500"}
    for nhs in (CAROL, DAVE):
        r = ask_local_id(net, "RVH", nhs)
        assert r.status_code == 200, r.text
        assert r.json()["patient_id"] is None
        assert "another NHS number" in r.json()["conflict"]


def test_the_receiving_gateway_asks_for_its_own_local_id(
    net: InProcessHub, registered: None
) -> None:
    def ask(code: str, nhs: str) -> Any:
        r = ask_local_id(net, code, nhs)
        assert r.status_code == 200, r.text
        return r.json()

    assert ask("RVH", ALICE) == {
        "patient_id": "RVH0042",
        "issuer": "RVH",
        "birth_date": "19700101",
        "sex": "F",
        "conflict": "",
    }
    # From what the hub indexed: SEG's own ID for Alice.
    assert ask("SEG", ALICE)["patient_id"] == "SEG778899"
    assert ask("RVH", NOBODY) == {
        "patient_id": None,
        "issuer": "",
        "birth_date": "",
        "sex": "",
        "conflict": "",
    }
    r = ask_local_id(net, "RVH", "9434765918")
    assert r.status_code == 422 and "check digit" in r.text
    events = audit(net, "patient:identity:lookup")
    assert any(e["detail"]["operation"] == "local-id" and e["patient_ref"] == ALICE for e in events)


def test_many_local_ids_in_one_request_answer_as_one_each(
    net: InProcessHub, registered: None
) -> None:
    """The matches of one C-FIND name many patients: the gateway asks for all at once, and
    gets what it would have got asking one by one; the batch is audited as one lookup that
    names every number, as ATNA audits a query."""
    everyone = [ALICE, BOB, CAROL, DAVE, NOBODY]
    for code in ("RVH", "SEG"):
        answers = ask_local_ids(net, code, [*everyone, ALICE])
        assert answers == {nhs: ask_local_id(net, code, nhs).json() for nhs in everyone}
    assert answers[ALICE]["patient_id"] == "SEG778899"  # SEG's, from what it sent
    before = len(audit(net, "patient:identity:lookup"))
    answers = ask_local_ids(net, "RVH", [NOBODY, ALICE, CAROL, BOB, DAVE, ALICE])
    assert answers[ALICE]["patient_id"] == "RVH0042"  # registered
    assert answers[BOB]["patient_id"] == "RVH0099"
    assert answers[NOBODY]["patient_id"] is None and not answers[NOBODY]["conflict"]
    for nhs in (CAROL, DAVE):  # one local ID under both
        assert "another NHS number" in answers[nhs]["conflict"]
    [event] = audit(net, "patient:identity:lookup")[before:]
    assert event["patient_ref"] == ""  # many patients: named in the detail
    assert event["detail"] == {
        "operation": "local-ids",
        "nhs_numbers": sorted(everyone),
        "found": 2,
        "conflicts": {nhs: answers[nhs]["conflict"] for nhs in (CAROL, DAVE)},
    }
    ask_local_ids(net, "RVH", [ALICE])
    [event] = audit(net, "patient:identity:lookup")[before + 1 :]
    assert event["patient_ref"] == ALICE and event["detail"]["found"] == 1

    # As many as the request allows: more than one IN list's worth.
    many = [*everyone, *valid_nhs_numbers(1000 - len(everyone))]
    got = ask_local_ids(net, "RVH", many)
    [event] = audit(net, "patient:identity:lookup")[before + 2 :]
    assert len(event["detail"]["nhs_numbers"]) == 1000 and event["detail"]["found"] == 2
    assert got == {nhs: answers.get(nhs, answers[NOBODY]) for nhs in many}

    r = post_local_ids(net, "RVH", [ALICE, "9434765918"])
    assert r.status_code == 422 and "1 not valid NHS numbers" in r.text
    assert post_local_ids(net, "RVH", [ALICE] * 1001).status_code == 422


def test_a_search_by_patient_finds_the_lookups_naming_them_among_others(
    net: InProcessHub, registered: None
) -> None:
    """Who looked a patient up: the batches that named the patient among others as well as
    the lookups of the patient alone (an information-governance question)."""
    ask_local_ids(net, "RVH", [BOB, CAROL])
    ask_local_ids(net, "SEG", [CAROL, DAVE, NOBODY])
    ask_local_id(net, "RVH", CAROL)
    ask_local_ids(net, "RVH", [BOB, DAVE])  # not her
    ask_local_id(net, "SEG", BOB)

    def lookups_of(patient: str) -> list[dict[str, Any]]:
        r = net.admin(
            "GET",
            "/api/v1/audit",
            params={"patient": patient, "action": "patient:identity:lookup", "limit": 1000},
        )
        events: list[dict[str, Any]] = r.json()
        return events

    found = lookups_of(CAROL)
    named = [e for e in found if e["patient_ref"] == ""]
    assert len(named) >= 2 and all(CAROL in e["detail"]["nhs_numbers"] for e in named)
    assert any(e["patient_ref"] == CAROL for e in found)
    everyone = {e["id"] for e in audit(net, "patient:identity:lookup")}
    naming = {
        e["id"]
        for e in audit(net, "patient:identity:lookup")
        if CAROL in e["detail"].get("nhs_numbers", []) or e["patient_ref"] == CAROL
    }
    assert {e["id"] for e in found} == naming < everyone  # all of them, and no other


def post_local_ids(net: InProcessHub, code: str, numbers: list[str]) -> httpx.Response:
    """As the institution's gateway asks before answering a C-FIND."""
    return net.client().post(
        "/api/v1/gateway/patients/local-ids",
        json={"nhs_numbers": numbers},
        headers={"Authorization": f"Bearer {net.gateway_token(code)}"},
    )


def ask_local_ids(net: InProcessHub, code: str, numbers: list[str]) -> dict[str, Any]:
    r = post_local_ids(net, code, numbers)
    assert r.status_code == 200, r.text
    answers: dict[str, Any] = r.json()["answers"]
    return answers


def valid_nhs_numbers(count: int) -> list[str]:
    """Valid NHS numbers nobody in these tests has."""
    stems = (f"{stem}" for stem in range(100_000_000, 999_999_999))
    candidates = (stem + digit for stem in stems for digit in "0123456789")
    return list(islice((n for n in candidates if is_valid_nhs_number(n)), count))


def test_the_migration_links_patients_indexed_before_it(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine, "0004")
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO institutions (id, code, name, routing_ae_title, created_at)"
                " VALUES (1, 'SEG', 'SEG', 'IB_SEG', '2026-01-01 00:00:00')"
            )
        )
        for pid, issuer, nhs in (("S1", "", ALICE), ("S2", "SEG-PAS", ALICE), ("S3", "", None)):
            c.execute(
                text(
                    "INSERT INTO patients (institution_id, patient_id, issuer_of_patient_id,"
                    " patient_name, birth_date, sex, nhs_number, created_at) VALUES"
                    " (1, :pid, :issuer, 'DOE^ALICE^MAY', '19700101', 'F', :nhs,"
                    " '2026-01-01 00:00:00')"
                ),
                {"pid": pid, "issuer": issuer, "nhs": nhs},
            )
    upgrade(engine)
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT p.nhs_number, i.issuer, i.value, i.family, i.given, i.source"
                " FROM patient_identifiers i JOIN persons p ON p.id = i.person_id ORDER BY i.value"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        (ALICE, "SEG", "S1", "DOE", "ALICE MAY", "indexed"),
        (ALICE, "SEG-PAS", "S2", "DOE", "ALICE MAY", "indexed"),
    ]
