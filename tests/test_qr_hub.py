"""The hub's side of query/retrieve, on its real application and database: which
institutions a query reaches, and the tasks' rules (answered only by their gateway, only while
wanted; a fetch answered only with its closed transfer; users see their own PACS's tasks only).

The gateways' side, with real DICOM peers, is in test_qr_dicom.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from hubapp import InProcessHub, Person
from imagebridge.db import utcnow
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.institutions.models import Gateway
from imagebridge.institutions.services import get_institution
from imagebridge.queries import services
from imagebridge.queries.models import GatewayTask, TaskKind, TaskStatus

NHS = "9434765919"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    t = InProcessHub(tmp_path_factory.mktemp("qr-hub"))
    for code in ("SEG", "RVH", "NTH", "LOK", "NOA", "OFF"):
        t.add_institution(code)
        if code != "OFF":  # OFF has no gateway to ask
            t.gateway_token(code)
    for code, viewers in {"SEG": ["*"], "LOK": ["SEG"], "NOA": ["*"], "OFF": ["*"]}.items():
        t.admin("PUT", f"/api/v1/institutions/{code}/discovery", json={"to": viewers})
    t.admin("POST", "/api/v1/institutions/NOA/agreements/withdraw", json={"reason": "review"})
    t.add_user("SEG", "seg.pacs", ["pacs_manager"])
    t.add_user("RVH", "rvh.pacs", ["pacs_manager"])
    yield t
    t.close()


def _id(net: InProcessHub, code: str) -> int:
    with net.hub.sessions() as session:
        institution = get_institution(session, code)
        assert institution is not None
        return institution.id


def _gateway(net: InProcessHub, code: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {net.gateway_token(code)}"}


def _sources(net: InProcessHub, code: str, keys: dict[str, str]) -> tuple[set[int], list[str]]:
    with net.hub.sessions() as session:
        scope, sources = services.network_scope(session, _id(net, code), keys)
        return set(scope.institutions), [s.code for s in sources]


def test_a_query_reaches_discoverable_institutions_in_force_with_a_gateway(
    net: InProcessHub,
) -> None:
    for code in ("SEG", "LOK"):  # live gateways call the hub all the time
        r = net.client().get("/api/v1/gateway/config", headers=_gateway(net, code))
        assert r.status_code == 200
    seen, asked = _sources(net, "RVH", {"PatientID": NHS, "IssuerOfPatientID": "NHS"})
    # LOK lets only SEG discover it; NOA's agreement is withdrawn; OFF has no gateway, so
    # only its studies in the hub are seen.
    assert seen == {_id(net, c) for c in ("RVH", "SEG", "OFF")}
    assert asked == ["SEG"]
    assert _sources(net, "SEG", {})[1] == ["LOK"]
    # A gateway silent for minutes is off: asking it would make every query wait.
    with net.hub.sessions() as session, session.begin():
        session.execute(
            update(Gateway)
            .where(Gateway.institution_id == _id(net, "SEG"))
            .values(last_seen_at=utcnow() - timedelta(minutes=10))
        )
    assert _sources(net, "RVH", {"PatientID": NHS, "IssuerOfPatientID": "NHS"})[1] == []


def test_a_local_patient_id_stays_at_home(net: InProcessHub) -> None:
    for keys in ({"PatientID": "RVH0042"}, {"PatientID": "RVH*", "IssuerOfPatientID": "RVH"}):
        assert _sources(net, "RVH", keys) == ({_id(net, "RVH")}, [])


def test_without_an_agreement_an_institution_sees_only_its_own(net: InProcessHub) -> None:
    assert _sources(net, "NOA", {"PatientID": NHS, "IssuerOfPatientID": "NHS"}) == (
        {_id(net, "NOA")},
        [],
    )


def test_merge_keeps_the_hubs_answer_once() -> None:
    hub = [{"StudyInstanceUID": "1.1", "_source": "hub"}]
    pacs = [{"StudyInstanceUID": "1.1", "_source": "pacs"}, {"StudyInstanceUID": "1.2"}]
    merged = services.merge("STUDY", hub, pacs, limit=10)
    assert merged == [hub[0], pacs[1]]
    patients = [
        {"PatientID": "7", "_institution": "SEG"},
        {"PatientID": "7", "_institution": "NTH"},
    ]
    assert len(services.merge("PATIENT", patients, patients, limit=10)) == 2
    assert len(services.merge("STUDY", hub, pacs, limit=1)) == 1


def test_a_pacs_answer_keeps_text_keywords_and_those_asked_for() -> None:
    answer = [
        {
            "StudyInstanceUID": "1.1",
            "PatientID": 7,
            "ModalitiesInStudy": ["CT", "MR"],
            "StudyDescription": "x" * 2000,
            "_nhs_number": "9434765919",
            "_institution": "forged",
            "lowercase": "dropped",
            "PatientName": {"not": "text"},
        },
        {"StudyInstanceUID": "1.2", "_nhs_number": "not digits"},
    ]
    cleaned = services.pacs_matches(answer, "SEG")
    assert cleaned[0] == {
        "StudyInstanceUID": "1.1",
        "PatientID": "7",
        "ModalitiesInStudy": ["CT", "MR"],
        "StudyDescription": "x" * 1024,
        "_institution": "SEG",
        "_nhs_number": "9434765919",
        "_source": "pacs",
    }
    assert cleaned[1]["_nhs_number"] == ""
    narrowed = services.pacs_matches(answer, "SEG", {"StudyInstanceUID", "PatientName"})
    assert narrowed == [
        {"StudyInstanceUID": s, "_institution": "SEG", "_nhs_number": n, "_source": "pacs"}
        for s, n in (("1.1", "9434765919"), ("1.2", ""))
    ]


def _task(net: InProcessHub, code: str, kind: TaskKind, **request: Any) -> str:
    with net.hub.sessions() as session, session.begin():
        task = services.create_task(
            session,
            institution_id=_id(net, code),
            kind=kind,
            request=request,
            requester_institution_id=_id(net, "RVH"),
            requested_by="test",
            expires_at=net.clock() + timedelta(minutes=1),
        )
        return task.id


def test_a_task_is_answered_by_its_gateway_only_and_only_while_wanted(net: InProcessHub) -> None:
    client = net.client()
    task_id = _task(net, "SEG", TaskKind.FIND, level="STUDY", keys={}, limit=10)
    # A fetch is not handed to a gateway asking for queries, and the other way round.
    r = client.get("/api/v1/gateway/tasks", params={"kind": "fetch"}, headers=_gateway(net, "SEG"))
    assert r.json() == {"task": None}
    r = client.get("/api/v1/gateway/tasks", params={"kind": "find"}, headers=_gateway(net, "SEG"))
    task = r.json()["task"]
    assert (task["id"], task["institution"], task["requester"]) == (task_id, "SEG", "RVH")
    answer = {"status": "done", "matches": [{"StudyInstanceUID": "1.2.3"}]}
    url = f"/api/v1/gateway/tasks/{task_id}/result"
    assert client.post(url, json=answer, headers=_gateway(net, "NTH")).status_code == 404

    late = _task(net, "SEG", TaskKind.FIND, level="STUDY", keys={}, limit=10)
    net.clock.advance(minutes=2)
    r = client.get("/api/v1/gateway/tasks", params={"kind": "find"}, headers=_gateway(net, "SEG"))
    assert r.json() == {"task": None}  # expired, never handed out
    r = client.post(
        f"/api/v1/gateway/tasks/{late}/result", json=answer, headers=_gateway(net, "SEG")
    )
    assert r.status_code == 409 and "expired" in r.json()["detail"]
    # Past its expiry the first is not wanted either, though its gateway had taken it.
    assert client.post(url, json=answer, headers=_gateway(net, "SEG")).status_code == 409


def test_a_fetch_is_done_only_with_its_closed_transfer(net: InProcessHub, tmp_path: Any) -> None:
    seg = net.log_in("seg.pacs")
    r = seg.post(
        "/api/v1/pacs/fetch",
        json={"study_instance_uids": ["1.2.3.4"], "receiver": "NTH", "reason": "clinic"},
    )
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    client = net.client()
    gw = _gateway(net, "SEG")
    r = client.get("/api/v1/gateway/tasks", params={"kind": "fetch"}, headers=gw)
    task = r.json()["task"]
    assert task["id"] == task_id and task["request"]["receiver"] == "NTH"
    assert task["request"]["keys"] == {"StudyInstanceUID": "1.2.3.4"}
    url = f"/api/v1/gateway/tasks/{task_id}/result"

    study = generate_ct_study(tmp_path / "s", slices=1, rows=16, columns=16, nhs_number=NHS)
    to_rvh = net.upload("SEG", "RVH", study.paths)  # to another receiver than the fetch's
    to_nth = net.upload("SEG", "NTH", study.paths)  # still receiving
    for transfer in ("nope", to_rvh, to_nth):
        r = client.post(url, json={"status": "done", "transfer_id": transfer}, headers=gw)
        assert r.status_code == 409, (transfer, r.text)
    assert client.post(f"/api/v1/transfers/{to_nth}/close", headers=gw).status_code == 200
    r = client.post(url, json={"status": "done", "transfer_id": to_nth, "instances": 1}, headers=gw)
    assert r.status_code == 200, r.text

    state = seg.get(f"/api/v1/pacs/tasks/{task_id}").json()
    assert (state["status"], state["transfer_id"], state["instances"]) == ("done", to_nth, 1)
    # Another institution's users cannot see it; nor anyone the tasks of network queries.
    rvh: Person = net.log_in("rvh.pacs")
    assert rvh.get(f"/api/v1/pacs/tasks/{task_id}").status_code == 404
    query = _task(net, "SEG", TaskKind.FIND, level="STUDY", keys={}, limit=10)
    assert seg.get(f"/api/v1/pacs/tasks/{query}").status_code == 404
    with net.hub.sessions() as session:
        row = session.get(GatewayTask, task_id)
        assert row is not None and row.status == TaskStatus.done


def test_a_gateways_find_returns_the_fields_it_asks_for(net: InProcessHub, tmp_path: Any) -> None:
    study = generate_ct_study(tmp_path / "s", slices=1, rows=16, columns=16, nhs_number=NHS)
    net.upload("NTH", "RVH", study.paths)  # NTH: not discoverable, so no PACS is asked
    client, gw = net.client(), _gateway(net, "NTH")
    query = {"level": "STUDY", "keys": {"StudyInstanceUID": study.study_instance_uid}}
    whole = client.post("/api/v1/gateway/find", json=query, headers=gw).json()["matches"]
    assert len(whole) == 1 and whole[0]["NumberOfStudyRelatedInstances"] == 1
    assert whole[0]["ModalitiesInStudy"] == ["CT"] and whole[0]["PatientID"] == "A123456"
    fields = ["StudyInstanceUID", "PatientID", "NotAKeyword"]
    r = client.post("/api/v1/gateway/find", json={**query, "fields": fields}, headers=gw)
    assert r.status_code == 200, r.text
    (match,) = r.json()["matches"]
    assert match == {
        "PatientID": "A123456",
        "StudyInstanceUID": study.study_instance_uid,
        "_institution": "NTH",
        "_nhs_number": NHS,
        "_source": "hub",
    }
