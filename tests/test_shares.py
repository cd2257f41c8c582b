"""Legal access: a user with the share permission grants an external user time-limited access
to named studies; the solicitor (always with a second factor) views and downloads them as a zip
with a DICOMDIR, sees nothing else, and loses access when the grant expires or is revoked.

The hub's real application in-process, the study uploaded by SEG's gateway through the real
upload route, and DCMTK's dcmdump reading the downloaded DICOMDIR.
"""

from __future__ import annotations

import io
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from hubapp import INSIDE, OUTSIDE, InProcessHub, Person
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.dicom.reports import minimal_pdf

NOT_SHARED = "nothing is shared with you under this reference"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[InProcessHub]:
    t = InProcessHub(tmp_path / "hub")
    t.add_institution("SEG")
    t.add_institution("RVH")
    t.add_user("SEG", "doctor", ["radiologist"])
    t.add_user("SEG", "clerk", ["clerk"])
    t.add_user("SEG", "solicitor", [], external=True)
    t.add_user("RVH", "other", ["radiologist"])
    yield t
    t.close()


def _upload(net: InProcessHub, study: StudyFiles) -> str:
    """SEG's gateway sends the study (with a PDF report) towards RVH."""
    tid = net.upload("SEG", "RVH", study.paths)
    r = net.client().post(
        f"/api/v1/transfers/{tid}/reports",
        headers={
            "Authorization": f"Bearer {net.gateway_token('SEG')}",
            "Content-Type": "application/pdf",
        },
        content=minimal_pdf(["CT head: no acute abnormality."]),
    )
    assert r.status_code == 201, r.text
    return tid


def _share(doctor: Person, uid: str, days: int = 7) -> Any:
    return doctor.post(
        "/api/v1/shares",
        json={
            "grantee": "solicitor",
            "study_instance_uids": [uid],
            "purpose": "Personal injury claim 2026/113",
            "days": days,
        },
    )


def test_a_solicitor_sees_and_downloads_only_what_was_shared_until_it_ends(
    net: InProcessHub, tmp_path: Path
) -> None:
    dcmdump = require_tool("/usr/bin/dcmdump")
    study = generate_ct_study(tmp_path / "study", slices=3, rows=64, columns=64)
    _upload(net, study)
    doctor = net.log_in("doctor", INSIDE)

    # Only what the institution holds can be shared, and only by those permitted.
    assert _share(net.log_in("clerk", INSIDE), study.study_instance_uid).status_code == 403
    other = net.log_in("other", OUTSIDE)
    r = _share(other, "1.2.3.999")
    assert r.status_code == 404
    r = _share(doctor, study.study_instance_uid)
    assert r.status_code == 201, r.text
    share_id = r.json()["id"]

    solicitor = net.log_in("solicitor", INSIDE)  # external: always a second factor
    assert solicitor.secret, "the solicitor had to enrol a second factor"
    listed = solicitor.get("/api/v1/shared").json()
    assert [s["id"] for s in listed] == [share_id]
    assert listed[0]["studies"][0]["instances"] == 3
    r = solicitor.get(f"/api/v1/shared/{share_id}/package")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        archive.extractall(folder)
    dump = subprocess.run(
        [dcmdump, str(folder / "DICOMDIR")], capture_output=True, text=True, check=True
    )
    assert dump.stdout.count("(0004,1430) CS [IMAGE") == 3
    assert "ENCAP DOC" in dump.stdout  # the report, as an Encapsulated PDF in the study
    assert study.study_instance_uid in dump.stdout
    assert "E:" not in dump.stderr and "W:" not in dump.stderr

    # The solicitor sees nothing else, and the answer for another reference reveals nothing.
    assert solicitor.get("/api/v1/transfers").status_code == 403
    assert solicitor.get("/api/v1/audit").status_code == 403
    for tampered in (share_id + 1, 999999):
        r = solicitor.get(f"/api/v1/shared/{tampered}/package")
        assert r.status_code == 403 and r.json()["detail"] == NOT_SHARED

    exported = net.admin("GET", "/api/v1/audit", params={"action": "share:package:exported"})
    (event,) = exported.json()
    assert event["actor"] == "solicitor" and event["study_ref"] == study.study_instance_uid

    # Expiry ends it everywhere.
    net.clock.advance(days=8)
    solicitor = net.log_in("solicitor", INSIDE, solicitor)
    assert solicitor.get("/api/v1/shared").json() == []
    for path in (f"/api/v1/shared/{share_id}", f"/api/v1/shared/{share_id}/package"):
        r = solicitor.get(path)
        assert r.status_code == 403 and r.json()["detail"] == NOT_SHARED

    # So does revocation.
    doctor = net.log_in("doctor", INSIDE)
    again = _share(doctor, study.study_instance_uid).json()["id"]
    assert solicitor.get(f"/api/v1/shared/{again}").status_code == 200
    assert doctor.post(f"/api/v1/shares/{again}/revoke").status_code == 200
    assert solicitor.get(f"/api/v1/shared/{again}/package").status_code == 403
    assert net.admin("GET", "/api/v1/audit", params={"action": "share:access:revoked"}).json()
