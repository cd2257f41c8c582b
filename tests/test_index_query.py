"""Matching query keys against the index (PS3.4 C.2.2.2), within what a caller may see.

Studies reach the index through the real upload route; the matching runs on the hub's real
database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hubapp import InProcessHub
from imagebridge.actors import Actor
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.index.query import QueryError, find
from imagebridge.index.visibility import scope_of

NHS = "9434765919"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    folder = tmp_path_factory.mktemp("index")
    t = InProcessHub(folder / "hub")
    for code in ("SEG", "RVH", "NTH"):
        t.add_institution(code)
    studies = [
        ("SEG", "RVH", "SEG1", "SMITH^JOHN", "20240110", NHS),
        ("SEG", "RVH", "SEG2", "SMYTHE^JANE", "20250304", None),
        ("RVH", "NTH", "RVH9", "SMITH^JOHN", "20250601", NHS),
        ("NTH", "RVH", "NTH5", "SMITH^JOHN", "20250701", NHS),
    ]
    for code, receiver, pid, name, date, nhs in studies:
        study = generate_ct_study(
            folder / pid,
            slices=2,
            rows=32,
            columns=32,
            patient_id=pid,
            patient_name=name,
            nhs_number=nhs,
            study_date=date,
        )
        t.upload(code, receiver, study.paths)
    t.admin("POST", "/api/v1/institutions/NTH/agreements/withdraw", json={"reason": "review"})
    yield t
    t.close()


def _actor(net: InProcessHub, code: str, *permissions: str) -> Actor:
    with net.hub.sessions() as session:
        from imagebridge.institutions.services import get_institution

        institution = get_institution(session, code)
        assert institution is not None
        return Actor("user", f"user@{code}", institution.id, "", frozenset(permissions))


def _find(net: InProcessHub, actor: Actor, level: str, **keys: str) -> list[dict[str, Any]]:
    with net.hub.sessions() as session:
        return find(session, level, keys, scope_of(session, actor))


def _ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["PatientID"] for r in rows]


def test_matching_rules(net: InProcessHub) -> None:
    seg = _actor(net, "SEG", "view_studies")
    assert _ids(_find(net, seg, "STUDY")) == ["SEG2", "SEG1"]  # newest first
    assert _ids(_find(net, seg, "STUDY", PatientID="SEG1")) == ["SEG1"]
    assert _ids(_find(net, seg, "STUDY", PatientName="smith*")) == ["SEG1"]
    assert _ids(_find(net, seg, "STUDY", PatientName="SM?THE^JANE")) == ["SEG2"]
    assert _ids(_find(net, seg, "STUDY", StudyDate="20250101-")) == ["SEG2"]
    assert _ids(_find(net, seg, "STUDY", StudyDate="-20241231")) == ["SEG1"]
    assert _ids(_find(net, seg, "STUDY", StudyDate="20240101-20240131")) == ["SEG1"]
    assert _ids(_find(net, seg, "STUDY", ModalitiesInStudy="MR")) == []
    (study,) = _find(net, seg, "STUDY", PatientID="SEG1", ModalitiesInStudy="CT\\MR")
    assert study["NumberOfStudyRelatedSeries"] == 1
    assert study["NumberOfStudyRelatedInstances"] == 2
    assert study["ModalitiesInStudy"] == ["CT"]
    both = _find(net, seg, "STUDY")
    uids = "\\".join(s["StudyInstanceUID"] for s in both)
    assert len(_find(net, seg, "STUDY", StudyInstanceUID=uids)) == 2
    images = _find(net, seg, "IMAGE", StudyInstanceUID=study["StudyInstanceUID"])
    assert len(images) == 2 and all(i["_blob_sha256"] for i in images)
    (series,) = _find(net, seg, "SERIES", StudyInstanceUID=study["StudyInstanceUID"])
    assert series["NumberOfSeriesRelatedInstances"] == 2


def test_the_nhs_number_finds_the_patient_wherever_filed(net: InProcessHub) -> None:
    radiologist = _actor(net, "SEG", "view_studies", "query_network")
    net.admin("PUT", "/api/v1/institutions/RVH/discovery", json={"to": ["SEG"]})
    net.admin("PUT", "/api/v1/institutions/NTH/discovery", json={"to": ["*"]})
    found = _find(net, radiologist, "STUDY", PatientID=NHS, IssuerOfPatientID="NHS")
    # SEG's own, and RVH's that RVH lets SEG discover; never NTH's (no agreement in force).
    assert sorted(_ids(found)) == ["RVH9", "SEG1"]
    assert {r["_institution"] for r in found} == {"RVH", "SEG"}
    with pytest.raises(QueryError, match="NHS number"):
        _find(net, radiologist, "STUDY", PatientID="1234567890", IssuerOfPatientID="NHS")
    net.admin("PUT", "/api/v1/institutions/RVH/discovery", json={"to": []})


def test_visibility_follows_permissions_discovery_and_agreements(net: InProcessHub) -> None:
    net.admin("PUT", "/api/v1/institutions/SEG/discovery", json={"to": []})
    rvh_viewer = _actor(net, "RVH", "view_studies")
    rvh_querier = _actor(net, "RVH", "view_studies", "query_network")
    clerk = _actor(net, "RVH", "send_studies", "track_transfers")
    # RVH received SEG's studies: its viewers see them, and its own.
    assert sorted(_ids(_find(net, rvh_viewer, "STUDY"))) == ["NTH5", "RVH9", "SEG1", "SEG2"]
    assert _find(net, clerk, "STUDY") == []
    # Without SEG's leave to discover, a network query adds nothing beyond that.
    before = _ids(_find(net, rvh_querier, "STUDY"))
    net.admin("PUT", "/api/v1/institutions/SEG/discovery", json={"to": ["RVH"]})
    assert sorted(_ids(_find(net, rvh_querier, "STUDY"))) == sorted(before)
    # SEG sees RVH's only when RVH allows it.
    seg_querier = _actor(net, "SEG", "view_studies", "query_network")
    assert "RVH9" not in _ids(_find(net, seg_querier, "STUDY"))
    net.admin("PUT", "/api/v1/institutions/RVH/discovery", json={"to": ["*"]})
    assert "RVH9" in _ids(_find(net, seg_querier, "STUDY"))
    # Nor NTH's, which withdrew its agreement, whatever its discovery rule says.
    net.admin("PUT", "/api/v1/institutions/NTH/discovery", json={"to": ["*"]})
    assert "NTH5" not in _ids(_find(net, seg_querier, "STUDY"))


@pytest.mark.parametrize(
    ("level", "keys", "reason"),
    [
        ("WORKLIST", {}, "unsupported query level"),
        ("STUDY", {"SOPInstanceUID": "1.2"}, "below STUDY"),
        ("STUDY", {"StudyInstanceUID": "1.2.*"}, "not by wildcard"),
        ("STUDY", {"StudyDate": "2024-01-01"}, "range"),
        ("STUDY", {"StudyDate": "yesterday"}, "YYYYMMDD"),
        ("STUDY", {"ScheduledStationAETitle": "X"}, "unsupported matching key"),
        ("SERIES", {"ModalitiesInStudy": "CT"}, "study-level key"),
    ],
)
def test_bad_queries_are_refused_with_the_reason(
    net: InProcessHub, level: str, keys: dict[str, str], reason: str
) -> None:
    seg = _actor(net, "SEG", "view_studies")
    with pytest.raises(QueryError, match=reason):
        _find(net, seg, level, **keys)
