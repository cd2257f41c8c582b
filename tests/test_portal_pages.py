"""The portal's pages and the parts their scripts fetch, through the real application
in-process: who sees what, CSRF on every POST, nothing about a patient in addresses or
titles, the outbox's filters and progress, reports only for those who may read them, and the
audit trail's CSV export."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from hubapp import OUTSIDE, InProcessHub, Person
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.transfers.models import TransferInstance

NHS_NUMBER = "9434765919"
PATIENT = {"patient_id": "SEG778899", "patient_name": "PAGES^PATIENT", "nhs_number": NHS_NUMBER}
REPORT = b'=HYPERLINK("x") typed report, not a formula'


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    folder = tmp_path_factory.mktemp("pages")
    hub = InProcessHub(folder / "hub")
    for code in ("SEG", "RVH", "NTH"):
        hub.add_institution(code)
    hub.add_institution("OFF", agreement=False)
    hub.add_user("SEG", "sender", ["radiographer"])
    hub.add_user("RVH", "reader", ["radiologist"])
    hub.add_user("NTH", "stranger", ["radiologist"])
    hub.add_user("SEG", "auditor", ["auditor"])
    # SEG sends a study to RVH; RVH's gateway delivers it; SEG attaches a report.
    study = generate_ct_study(folder / "study", slices=2, rows=16, columns=16, **PATIENT)
    tid = hub.upload("SEG", "RVH", study.paths)
    client = hub.client()
    seg = {"Authorization": f"Bearer {hub.gateway_token('SEG')}"}
    assert client.post(f"/api/v1/transfers/{tid}/close", headers=seg).status_code == 200
    r = client.post(
        f"/api/v1/transfers/{tid}/reports",
        headers={**seg, "Content-Type": "text/plain"},
        content=REPORT,
    )
    assert r.status_code == 201, r.text
    report_id = r.json()["id"]
    with hub.hub.sessions() as session:
        ids = session.scalars(
            select(TransferInstance.id).where(TransferInstance.transfer_id == tid)
        ).all()
    r = client.post(
        f"/api/v1/transfers/{tid}/deliveries",
        headers={"Authorization": f"Bearer {hub.gateway_token('RVH')}"},
        json={
            "instances": [{"id": i, "outcome": "delivered"} for i in ids],
            "reports": [{"id": report_id, "outcome": "delivered", "sop_instance_uid": "1.2.3"}],
        },
    )
    assert r.status_code == 200, r.text
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def people(net: InProcessHub) -> dict[str, Person]:
    return {name: net.log_in(name, OUTSIDE) for name in ("sender", "reader", "stranger", "auditor")}


def _title(html: str) -> str:
    found = re.search(r"<title>(.*?)</title>", html)
    assert found is not None
    return found.group(1)


def test_every_post_needs_the_sessions_csrf_token(people: dict[str, Person]) -> None:
    reader = people["reader"]
    for path, body in (
        ("/portal/patient", {"term": NHS_NUMBER}),
        ("/portal/transfers/rows", {"box": "inbox"}),
    ):
        r = reader.post(path, json=body, headers={"X-CSRF-Token": "forged"})
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["detail"], path
        assert PATIENT["patient_id"] not in r.text
        assert reader.post(path, json=body).status_code == 200, path


def test_the_patient_is_found_by_nhs_number_within_sight_and_audited(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    r = people["reader"].post("/portal/patient", json={"term": "943 476 5919"})
    assert r.status_code == 200
    assert "SEG778899" in r.text and "PAGES, PATIENT" in r.text and "/portal/studies/" in r.text
    report_links = re.findall(r'href="/portal/reports/(\d+)"', r.text)
    assert len(report_links) == 1
    # NTH has an agreement but SEG does not let it discover: as if there were no patient.
    r = people["stranger"].post("/portal/patient", json={"term": NHS_NUMBER})
    assert "Nothing you may see" in r.text and "SEG778899" not in r.text
    # A local ID is one's own institution's: SEG's ID means nothing at RVH.
    r = people["reader"].post("/portal/patient", json={"term": "SEG778899"})
    assert "Nothing you may see" in r.text
    r = people["sender"].post("/portal/patient", json={"term": "SEG778899"})
    assert "PAGES, PATIENT" in r.text
    events = (
        net.client()
        .get(
            "/api/v1/audit", params={"action": "portal:patient:searched"}, headers=net.admin_headers
        )
        .json()
    )
    assert [(e["actor"], e["patient_ref"], e["outcome"]) for e in events][-4:] == [
        ("reader", NHS_NUMBER, "success"),
        ("stranger", NHS_NUMBER, "failure"),
        ("reader", "SEG778899", "failure"),
        ("sender", NHS_NUMBER, "success"),
    ]


def test_pages_name_no_patient_in_their_address_or_title(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    reader = people["reader"]
    rows = reader.post("/portal/transfers/rows", json={"box": "inbox"}).text
    links = re.findall(r'href="(/portal/[^"]+)"', rows)
    assert links and all(re.fullmatch(r"/portal/studies/\d+", link) for link in links)
    for path in ["/portal/", "/portal/inbox", "/portal/patient", *links]:
        r = reader.get(path)
        assert r.status_code == 200, path
        assert r.headers["cache-control"] == "no-store"
        for value in (*PATIENT.values(), "PAGES", "PATIENT"):
            assert value not in path and value not in _title(r.text), (path, value)
    # The viewer shows the patient in the page itself, for the person looking.
    assert "PAGES, PATIENT" in reader.get(links[0]).text


def test_the_outbox_and_inbox_filter_and_show_progress(people: dict[str, Person]) -> None:
    sender, reader = people["sender"], people["reader"]

    def rows(person: Person, **filters: str) -> str:
        r = person.post("/portal/transfers/rows", json=filters)
        assert r.status_code == 200, r.text
        # What a person reads, and the row's status class.
        return " ".join(re.sub(r"<[^>]+>", " ", r.text).split()) + r.text

    outbox = rows(sender, box="outbox")
    assert "status-delivered" in outbox and "2 of 2 images" in outbox and "RVH" in outbox
    assert "No transfers match" in rows(sender, box="inbox")
    assert "2 of 2 images" in rows(reader, box="inbox", patient="pages")  # family name start
    assert "2 of 2 images" in rows(reader, box="inbox", patient=NHS_NUMBER)
    assert "No transfers match" in rows(reader, box="inbox", patient="SOMEONE")
    assert "No transfers match" in rows(reader, box="inbox", status="failed")
    assert "No transfers match" in rows(reader, box="inbox", institution="NTH")
    assert "2 of 2 images" in rows(reader, box="inbox", institution="seg", since="2000-01-01")
    assert "No transfers match" in rows(reader, box="inbox", until="2000-01-01")
    r = reader.post("/portal/transfers/rows", json={"box": "inbox", "since": "yesterday"})
    assert r.status_code == 422


def test_reports_only_for_those_who_may_read_them(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    page = people["reader"].post("/portal/patient", json={"term": NHS_NUMBER}).text
    [report_id] = re.findall(r'href="/portal/reports/(\d+)"', page)
    r = people["reader"].get(f"/portal/reports/{report_id}")
    assert r.status_code == 200 and r.content == REPORT
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("stranger", "sender"):
        r = people[name].get(f"/portal/reports/{report_id}")
        expected = 200 if name == "sender" else 404
        assert r.status_code == expected, name
    assert people["reader"].get("/portal/reports/999999").status_code == 404
    viewed = (
        net.client()
        .get("/api/v1/audit", params={"action": "portal:report:viewed"}, headers=net.admin_headers)
        .json()
    )
    assert {e["actor"] for e in viewed} == {"reader", "sender"}


def test_the_send_page_offers_only_institutions_with_an_agreement(
    people: dict[str, Person],
) -> None:
    sender = people["sender"]
    page = sender.get("/portal/send").text
    offered = re.findall(r'<option value="([A-Z]+)">', page)
    assert offered == ["NTH", "RVH"]  # by name; never OFF (no agreement) nor SEG itself
    r = sender.post("/portal/send/studies", json={"keys": {"PatientName": "pages*"}})
    [match] = r.json()["matches"]
    assert match["PatientID"] == "SEG778899" and match["_source"] == "hub"
    assert match["_nhs_number"] == NHS_NUMBER
    by_nhs = {"PatientID": NHS_NUMBER, "IssuerOfPatientID": "NHS"}
    r = sender.post("/portal/send/studies", json={"keys": by_nhs})
    assert [m["PatientID"] for m in r.json()["matches"]] == ["SEG778899"]
    r = sender.post("/portal/send/studies", json={"keys": {"StudyDate": "yesterday"}})
    assert r.status_code == 400
    # RVH received the study: it is not RVH's to send on from the hub.
    reader = people["reader"]
    assert reader.get("/portal/send").status_code == 403


def test_the_audit_export_is_csv_that_a_spreadsheet_cannot_run(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    r = people["auditor"].post("/portal/audit/export", json={"action": "transfer:report:attached"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["action"] for row in table] == ["transfer:report:attached"]
    assert table[0]["institution"] == "SEG"
    # A value beginning like a formula is written as text.
    net.hub.settings.accounts.lockout_threshold = 1000
    bad = net.client(OUTSIDE).post(
        "/api/v1/auth/login", json={"username": "=cmd|'/c calc'!A1", "password": "x" * 12}
    )
    assert bad.status_code == 401
    r = people["auditor"].post("/portal/audit/export", json={"action": "user:login:failure"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows and all(not row["actor"].startswith("=") for row in rows), rows
    r = people["auditor"].post("/portal/audit/events", json={"since": "2000-01-01", "limit": 5})
    assert r.status_code == 200 and r.text.count("<tr") == 5


def test_static_files_are_only_the_portals_own(net: InProcessHub) -> None:
    client = net.client()
    assert client.get("/portal/static/portal.css").headers["content-type"].startswith("text/css")
    for name in ("nothing.js", "..%2Froutes.py", "%2E%2E%2Fpages.py"):
        assert client.get(f"/portal/static/{name}").status_code == 404, name
    r = client.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/portal/"


def test_the_viewer_of_a_study_out_of_sight_is_not_found(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    rows = people["reader"].post("/portal/transfers/rows", json={"box": "inbox"}).text
    [link] = set(re.findall(r'href="(/portal/studies/\d+)"', rows))
    assert people["stranger"].get(link).status_code == 404
    assert people["reader"].get(link).status_code == 200
    assert people["reader"].get("/portal/studies/999999").status_code == 404


def test_my_account_is_for_people_only(net: InProcessHub, people: dict[str, Person]) -> None:
    """Every person has the page, linked from their name; the bootstrap credential and
    gateways have no account to show."""
    reader = people["reader"]
    page = reader.get("/portal/account")
    assert page.status_code == 200 and _title(page.text) == "My account · ImageBridge"
    assert 'href="/portal/account"' in reader.get("/portal/").text
    assert "this session" in page.text and 'data-api="/api/v1/auth/password"' in page.text
    for bearer in (net.hub.admin_token, net.gateway_token("RVH")):
        r = net.client().get("/portal/account", headers={"Authorization": f"Bearer {bearer}"})
        assert r.status_code == 403, r.text


def test_the_viewer_offers_sharing_to_those_who_may_share(
    net: InProcessHub, people: dict[str, Person]
) -> None:
    """A radiologist of an institution holding the study may share it from the viewer, the
    study filled in; a radiographer (no share_external) is not offered it."""
    reader, sender = people["reader"], people["sender"]
    rows = reader.post("/portal/transfers/rows", json={"box": "inbox"}).text
    study = re.findall(r'href="/portal/studies/(\d+)"', rows)[0]
    assert f'href="/portal/shares?study={study}"' in reader.get(f"/portal/studies/{study}").text
    shares = reader.get("/portal/shares", params={"study": study}).text
    uid = re.search(r"<textarea[^>]*>([\d.]+)</textarea>", shares)
    assert uid is not None and uid.group(1).startswith("1.")
    outbox = sender.post("/portal/transfers/rows", json={"box": "outbox"}).text
    mine = re.findall(r'href="/portal/studies/(\d+)"', outbox)
    assert mine and all(
        "/portal/shares" not in sender.get(f"/portal/studies/{s}").text for s in mine
    )
    assert sender.get("/portal/shares").status_code == 403
    # The same from the patient's record, for the studies the institution holds.
    record = reader.post("/portal/patient", json={"term": NHS_NUMBER}).text
    assert f'href="/portal/shares?study={study}"' in record
    assert "/portal/shares" not in sender.post("/portal/patient", json={"term": NHS_NUMBER}).text
