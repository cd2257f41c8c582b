"""DICOMweb on a real hub process, through the real `dicomweb-client` and plain HTTP.

One hub serves the module: SEG stores a small CT and pydicom's compressed test files with
STOW-RS; RVH's radiologist may discover SEG's studies; NTH (agreement withdrawn) and OTH
(not discoverable) hold studies nobody else may ever see. Every person calls with an API
token made through the real login.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid
from requests import HTTPError

from conftest import audit_events
from imagebridge.demo.network import Network
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import file_meta, read_meta

PASSWORD = "correct horse battery staple 42"
NHS = "9434765919"
ANY = "*"
DICOM_ANY = f'multipart/related; type="application/dicom"; transfer-syntax={ANY}'
# pydicom's own test files in compressed syntaxes, and whether the syntax may be lossy.
COMPRESSED = {
    "MR_small_jp2klossless.dcm": False,  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm": False,  # JPEG-LS lossless
    "MR_small_RLE.dcm": False,  # RLE
    "SC_rgb_rle_2frame.dcm": False,  # RLE, two colour frames
    "image_dfl.dcm": False,  # deflated explicit VR little endian
    "JPEG2000.dcm": True,  # JPEG 2000 (lossy allowed)
    "JPGExtended.dcm": True,  # JPEG extended, 12 bit
    "SC_rgb_jpeg_dcmtk.dcm": True,  # JPEG baseline, YBR
}


@dataclass
class Stored:
    """A file as sent, with where the hub files it."""

    data: bytes
    study: str
    series: str
    instance: str
    syntax: str

    @property
    def as_hub_stores_it(self) -> bytes:
        """The hub keeps the dataset's bytes behind its own meta group."""
        meta = read_meta(io.BytesIO(self.data))
        ds = dcmread(io.BytesIO(self.data), stop_before_pixels=True)
        head = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), self.syntax)
        return head + self.data[meta.dataset_offset :]


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def restamp(name: str, study: str, patient_id: str) -> Stored:
    """A pydicom test file under new UIDs (they share UIDs among themselves), its pixel
    data untouched."""
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    ds = dcmread(path)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "COMPRESSED^TEST"
    syntax = str(ds.file_meta.TransferSyntaxUID)
    return Stored(part10(ds), study, ds.SeriesInstanceUID, ds.SOPInstanceUID, syntax)


def token_for(net: Network, code: str, username: str, role: str, scopes: list[str]) -> str:
    """A user of ``role`` at ``code`` logs in (from a trusted network: no second factor)
    and makes an API token with ``scopes``."""
    with net.admin() as admin:
        r = admin.post(
            "/api/v1/users",
            json={
                "username": username,
                "password": PASSWORD,
                "institution": code,
                "roles": [role],
                "kind": "staff",
            },
        )
        assert r.status_code == 201, r.text
    with httpx.Client(base_url=net.hub_url) as c:
        r = c.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
        assert r.status_code == 200 and r.json()["second_factor"] == "", r.text
        headers = {
            "Cookie": f"ib_session={r.cookies['ib_session']}",
            "X-CSRF-Token": r.json()["csrf_token"],
        }
        r = c.post(
            "/api/v1/tokens",
            json={"name": "dicomweb", "scopes": scopes, "days": 5},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


@dataclass
class Hub:
    net: Network
    tokens: dict[str, str]
    ct: list[Stored]
    compressed: dict[str, Stored]
    hidden: dict[str, str]  # institution -> a study nobody else may see

    def client(self, who: str) -> DICOMwebClient:
        return DICOMwebClient(
            url=f"{self.net.hub_url}/dicomweb",
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
        )

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.net.hub_url}/dicomweb",
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=60,
        )


def store(hub_client: DICOMwebClient, files: list[Stored]) -> Dataset:
    return hub_client.store_instances([dcmread(io.BytesIO(f.data)) for f in files])


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    folder = tmp_path_factory.mktemp("dicomweb")
    net = Network(folder / "net")
    try:
        net.start_hub()
        for code in ("SEG", "RVH", "NTH", "OTH"):
            net.add_institution(code, f"{code} Hospital")
        with net.admin() as admin:
            for code in ("SEG", "RVH", "NTH", "OTH"):
                admin.put(
                    f"/api/v1/institutions/{code}/trusted-networks",
                    json={"cidrs": ["127.0.0.0/8"]},
                ).raise_for_status()
        view = ["view_studies", "download", "query_network", "send_studies"]
        tokens = {
            "seg": token_for(net, "SEG", "seg.radiographer", "radiographer", view[:1] + view[3:]),
            "rvh": token_for(net, "RVH", "rvh.radiologist", "radiologist", view[:3]),
            "nth": token_for(net, "NTH", "nth.radiographer", "radiographer", view[:1] + view[3:]),
            "oth": token_for(net, "OTH", "oth.radiographer", "radiographer", view[:1] + view[3:]),
            "clerk": token_for(net, "SEG", "seg.clerk", "clerk", ["send_studies"]),
        }
        hub = Hub(net, tokens, [], {}, {})
        ct = generate_ct_study(
            folder / "ct", slices=3, rows=64, columns=64, patient_id="SEG1", nhs_number=NHS
        )
        for path in ct.paths:
            ds = dcmread(path)
            data = path.read_bytes()
            hub.ct.append(
                Stored(
                    data,
                    ct.study_instance_uid,
                    ct.series_instance_uid,
                    ds.SOPInstanceUID,
                    str(ds.file_meta.TransferSyntaxUID),
                )
            )
        store(hub.client("seg"), hub.ct)
        study = generate_uid()
        hub.compressed = {name: restamp(name, study, "SEGCMP") for name in COMPRESSED}
        store(hub.client("seg"), list(hub.compressed.values()))
        for code in ("nth", "oth"):
            other = generate_ct_study(
                folder / code,
                slices=1,
                rows=32,
                columns=32,
                patient_id=f"{code}1",
                nhs_number=NHS,
            )
            data = other.paths[0].read_bytes()
            store(hub.client(code), [Stored(data, other.study_instance_uid, "", "", "")])
            hub.hidden[code] = other.study_instance_uid
        with net.admin() as admin:
            admin.put("/api/v1/institutions/SEG/discovery", json={"to": ["RVH"]})
            admin.put("/api/v1/institutions/NTH/discovery", json={"to": ["*"]})
            admin.post(
                "/api/v1/institutions/NTH/agreements/withdraw", json={"reason": "review"}
            ).raise_for_status()
        yield hub
    finally:
        net.stop()
    log = (folder / "net" / "hub.log").read_text()
    assert "Traceback" not in log
    # The application log names events, never patients.
    for patient_data in ("SEG1", "DEMO^ALICE", NHS, "COMPRESSED^TEST"):
        assert patient_data not in log


def parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer, split by hand (not by the client)."""
    ctype = response.headers["content-type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n") if line)
        out.append(({k.lower(): v for k, v in headers.items()}, data.removesuffix(b"\r\n")))
    return out


def uids(found: list[dict[str, Any]], tag: str = "0020000D") -> set[str]:
    return {item[tag]["Value"][0] for item in found}


# -- QIDO-RS -------------------------------------------------------------------------------


def test_search_for_studies_series_and_instances(hub: Hub) -> None:
    client = hub.client("seg")
    ct = hub.ct[0]
    (study,) = client.search_for_studies(search_filters={"PatientID": "SEG1"})
    assert study["0020000D"] == {"vr": "UI", "Value": [ct.study]}
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DEMO^ALICE"}]}
    assert study["00201206"] == {"vr": "IS", "Value": [1]}  # series in study
    assert study["00201208"] == {"vr": "IS", "Value": [3]}  # instances in study
    assert study["00080061"] == {"vr": "CS", "Value": ["CT"]}
    assert study["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{ct.study}")
    assert "00081030" not in study  # StudyDescription: only when asked for
    (study,) = client.search_for_studies(
        search_filters={"PatientID": "SEG1"}, fields=["StudyDescription"]
    )
    assert study["00081030"]["Value"] == ["CT CHEST"]
    (everything,) = client.search_for_studies(search_filters={"PatientID": "SEG1"}, fields=["all"])
    assert "00100021" in everything  # IssuerOfPatientID
    assert client.search_for_studies(search_filters={"PatientName": "demo*"}, fuzzymatching=True)
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []

    (series,) = client.search_for_series(ct.study)
    assert series["0020000E"]["Value"] == [ct.series]
    assert series["00201209"] == {"vr": "IS", "Value": [3]}
    assert "00100010" not in series  # the study is in the path: its attributes are not repeated
    across = client.search_for_series(search_filters={"Modality": "CT", "PatientID": "SEG1"})
    assert uids(across, "0020000E") == {ct.series} and "00100020" in across[0]

    found = client.search_for_instances(ct.study, ct.series)
    assert [i["00200013"]["Value"][0] for i in found] == [1, 2, 3]
    assert uids(found, "00080018") == {s.instance for s in hub.ct}
    assert len(client.search_for_instances(ct.study)) == 3
    everywhere = client.search_for_instances(search_filters={"SOPInstanceUID": ct.instance})
    assert len(everywhere) == 1 and everywhere[0]["0020000D"]["Value"] == [ct.study]


def test_search_pages_with_limit_and_offset(hub: Hub) -> None:
    client = hub.client("seg")
    ct = hub.ct[0]
    first = client.search_for_instances(ct.study, ct.series, limit=2)
    rest = client.search_for_instances(ct.study, ct.series, limit=2, offset=2)
    assert len(first) == 2 and len(rest) == 1
    assert uids(first + rest, "00080018") == {s.instance for s in hub.ct}
    with hub.http("seg") as c:
        r = c.get("/studies", params={"limit": "5000"})
        assert r.status_code == 200 and "maximum" in r.headers["warning"]


def test_the_nhs_number_finds_what_each_caller_may_see(hub: Hub) -> None:
    nhs = {"PatientID": NHS, "IssuerOfPatientID": "NHS"}
    # SEG sees its own study; RVH sees SEG's (discoverable to RVH), never NTH's (agreement
    # withdrawn) nor OTH's (not discoverable).
    assert uids(hub.client("seg").search_for_studies(search_filters=nhs)) == {hub.ct[0].study}
    assert uids(hub.client("rvh").search_for_studies(search_filters=nhs)) == {hub.ct[0].study}
    everything = uids(hub.client("rvh").search_for_studies())
    assert hub.ct[0].study in everything
    assert not set(hub.hidden.values()) & everything
    assert uids(hub.client("oth").search_for_studies(search_filters=nhs)) == {hub.hidden["oth"]}


def test_queries_are_audited_with_what_they_returned(hub: Hub) -> None:
    hub.client("rvh").search_for_studies(search_filters={"PatientID": "SEG1"})
    event = audit_events(hub.net, "dicomweb:query:studies")[-1]
    assert event["actor"] == "rvh.radiologist"
    assert event["detail"]["level"] == "STUDY" and event["detail"]["results"] == 1
    assert event["detail"]["studies"] == [hub.ct[0].study]
    assert event["patient_ref"] == "SEG1"


@pytest.mark.parametrize(
    ("path", "params", "reason"),
    [
        ("/studies", {"limit": "ten"}, "limit is a whole number"),
        ("/studies", {"offset": "-1"}, "offset is a whole number"),
        ("/studies", {"StudyDate": "yesterday"}, "YYYYMMDD"),
        ("/studies", {"StudyDate": "2024-01-01"}, "range"),
        ("/studies", {"Modality": "CT"}, "below STUDY"),
        ("/studies", {"NoSuchKeyword": "x"}, "not a DICOM attribute"),
        ("/studies", {"includefield": "Bogus"}, "not a DICOM attribute"),
        ("/studies", {"fuzzymatching": "maybe"}, "true or false"),
        ("/studies", {"StudyInstanceUID": "1.2.*"}, "not by wildcard"),
        ("/studies", {"ScheduledStationAETitle": "X"}, "unsupported matching key"),
        ("/series", {"PatientID": ["A", "B"]}, "more than once"),
        ("/studies", {"PatientID": "1234567890", "IssuerOfPatientID": "NHS"}, "NHS number"),
        ("/studies", {"OtherPatientIDsSequence.PatientID": "1"}, "sequence matching"),
    ],
)
def test_bad_search_parameters_get_400_with_the_reason(
    hub: Hub, path: str, params: dict[str, Any], reason: str
) -> None:
    with hub.http("seg") as c:
        r = c.get(path, params=params)
    assert r.status_code == 400 and reason in r.json()["detail"], r.text


def test_unknown_levels_and_unacceptable_media_are_refused(hub: Hub) -> None:
    with hub.http("seg") as c:
        assert c.get("/patients").status_code == 404
        r = c.get("/studies", headers={"Accept": "application/dicom+xml"})
        assert r.status_code == 406 and "application/dicom+json" in r.json()["detail"]
        r = c.get("/studies", headers={"Accept": "text/html;q=1, nonsense"})
        assert r.status_code == 400


def test_permissions_are_checked(hub: Hub) -> None:
    clerk = hub.client("clerk")
    with pytest.raises(HTTPError) as refused:
        clerk.search_for_studies()
    assert refused.value.response.status_code == 403
    with pytest.raises(HTTPError) as refused:
        clerk.retrieve_study(hub.ct[0].study)
    assert refused.value.response.status_code == 403
    with httpx.Client(base_url=f"{hub.net.hub_url}/dicomweb") as anonymous:
        assert anonymous.get("/studies").status_code == 401


# -- WADO-RS -------------------------------------------------------------------------------


def test_retrieve_study_series_and_instance(hub: Hub) -> None:
    client = hub.client("rvh")
    ct = hub.ct[0]
    by_uid = {s.instance: s for s in hub.ct}
    for found in (client.retrieve_study(ct.study), client.retrieve_series(ct.study, ct.series)):
        assert {str(ds.SOPInstanceUID) for ds in found} == set(by_uid)
        for ds in found:
            original = dcmread(io.BytesIO(by_uid[ds.SOPInstanceUID].data))
            assert ds.PixelData == original.PixelData and ds.PatientName == original.PatientName
    ds = client.retrieve_instance(ct.study, ct.series, ct.instance)
    assert ds.SOPInstanceUID == ct.instance
    with hub.http("rvh") as c:
        r = c.get(f"/studies/{ct.study}", headers={"Accept": DICOM_ANY})
    assert r.status_code == 200
    got = {read_meta(io.BytesIO(data)).sop_instance_uid: data for _, data in parts(r)}
    assert got == {s.instance: s.as_hub_stores_it for s in hub.ct}
    event = audit_events(hub.net, "dicomweb:study:retrieved")[-1]
    assert event["actor"] == "rvh.radiologist" and event["study_ref"] == ct.study
    assert event["patient_ref"] == "SEG1" and event["detail"]["instances"] == 3


@pytest.mark.parametrize("name", list(COMPRESSED))
def test_compressed_instances_come_back_byte_identical(hub: Hub, name: str) -> None:
    stored = hub.compressed[name]
    with hub.http("seg") as c:
        url = f"/studies/{stored.study}/series/{stored.series}/instances/{stored.instance}"
        r = c.get(url, headers={"Accept": DICOM_ANY})
        assert r.status_code == 200, r.text
        ((headers, data),) = parts(r)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={stored.syntax}"
    assert data == stored.as_hub_stores_it
    # Without a syntax the default applies: lossless data is decompressed into Explicit VR
    # Little Endian, lossy data comes as stored (PS3.18 8.7.3.5.2).
    with hub.http("seg") as c:
        r = c.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        ((_, data),) = parts(r)
    ds = dcmread(io.BytesIO(data))
    original = dcmread(io.BytesIO(stored.data))
    explicit = hub.client("seg").retrieve_instance(
        stored.study,
        stored.series,
        stored.instance,
        media_types=(("application/dicom", "1.2.840.10008.1.2.1"),),
    )
    if COMPRESSED[name]:
        assert ds.file_meta.TransferSyntaxUID == stored.syntax
        assert ds.PixelData == original.PixelData
    else:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert explicit.PixelData == ds.PixelData


def test_frames_as_stored_and_decoded(hub: Hub) -> None:
    client = hub.client("seg")
    stored = hub.compressed["SC_rgb_rle_2frame.dcm"]
    original = dcmread(io.BytesIO(stored.data))
    encoded = list(generate_frames(original.PixelData, number_of_frames=2))
    ids = (stored.study, stored.series, stored.instance)
    assert list(client.retrieve_instance_frames(*ids, frame_numbers=[2])) == [encoded[1]]
    rle = (("image/dicom-rle", "1.2.840.10008.1.2.5"),)
    assert list(client.retrieve_instance_frames(*ids, [1, 2], media_types=rle)) == encoded
    decoded = list(
        client.retrieve_instance_frames(*ids, [2], media_types=("application/octet-stream",))
    )
    raw = original.pixel_array[1]  # RLE RGB decodes as RGB already
    assert decoded == [raw.astype(raw.dtype.newbyteorder("<")).tobytes()]
    ct = hub.ct[1]
    (frame,) = client.retrieve_instance_frames(ct.study, ct.series, ct.instance, [1])
    assert frame == dcmread(io.BytesIO(ct.data)).PixelData
    with hub.http("seg") as c:
        base = f"/studies/{ct.study}/series/{ct.series}/instances/{ct.instance}/frames"
        r = c.get(f"{base}/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
        assert r.status_code == 406
        assert c.get(f"{base}/2").status_code == 404
        assert c.get(f"{base}/0").status_code == 400
        assert c.get(f"{base}/1,x").status_code == 400


def test_metadata_has_bulk_data_by_reference(hub: Hub) -> None:
    client = hub.client("rvh")
    ct = hub.ct[0]
    found = client.retrieve_study_metadata(ct.study)
    assert len(found) == 3
    item = next(i for i in found if i["00080018"]["Value"] == [ct.instance])
    assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DEMO^ALICE"}]}
    assert item["00083002"]["Value"] == [ct.syntax]
    assert set(item["7FE00010"]) == {"vr", "BulkDataURI"}
    (pixels,) = client.retrieve_bulkdata(item["7FE00010"]["BulkDataURI"])
    assert pixels == dcmread(io.BytesIO(ct.data)).PixelData
    assert client.retrieve_series_metadata(ct.study, ct.series)
    one = client.retrieve_instance_metadata(ct.study, ct.series, ct.instance)
    assert one["0020000D"]["Value"] == [ct.study]
    # Compressed pixel data by reference comes as its frames.
    stored = hub.compressed["MR_small_jp2klossless.dcm"]
    meta = hub.client("seg").retrieve_instance_metadata(
        stored.study, stored.series, stored.instance
    )
    (frame,) = hub.client("seg").retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert frame == next(generate_frames(dcmread(io.BytesIO(stored.data)).PixelData))


def hounsfield(stored: Stored) -> np.ndarray[Any, Any]:
    ds = dcmread(io.BytesIO(stored.data))
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_rendered_images_are_windowed(hub: Hub) -> None:
    client = hub.client("rvh")
    ct = hub.ct[1]
    ids = (ct.study, ct.series, ct.instance)
    jpeg = client.retrieve_instance_rendered(*ids)
    assert jpeg[:2] == b"\xff\xd8" and Image.open(io.BytesIO(jpeg)).size == (64, 64)
    png = client.retrieve_instance_rendered(
        *ids, media_types=("image/png",), params={"window": "40,400,linear"}
    )
    grey = np.asarray(Image.open(io.BytesIO(png)))
    hu = hounsfield(ct)
    assert grey.shape == hu.shape
    assert (grey[hu <= 40 - 200] == 0).all() and (grey[hu >= 40 + 200] == 255).all()
    inside = (hu > -150) & (hu < 230)
    order = np.argsort(hu[inside])
    assert (np.diff(grey[inside][order].astype(int)) >= 0).all()  # monotonic in between
    narrow = client.retrieve_instance_rendered(
        *ids, media_types=("image/png",), params={"window": "40,80,sigmoid"}
    )
    assert narrow != png
    frame = client.retrieve_instance_frames_rendered(*ids, [1], media_types=("image/png",))
    assert Image.open(io.BytesIO(frame)).size == (64, 64)
    small = client.retrieve_instance_rendered(*ids, params={"viewport": "32,32"})
    assert Image.open(io.BytesIO(small)).size == (32, 32)
    with hub.http("rvh") as c:
        url = f"/studies/{ct.study}/series/{ct.series}/instances/{ct.instance}/rendered"
        assert c.get(url, headers={"Accept": "image/gif"}).status_code == 406
        for bad in (
            {"window": "40,400"},
            {"window": "40,0,linear"},
            {"quality": "0"},
            {"window": "a,b,linear"},
            {"window": "40,400,cubic"},
            {"bogus": "1"},
        ):
            r = c.get(url, params=bad)
            assert r.status_code == 400, (bad, r.text)


@pytest.mark.parametrize("name", list(COMPRESSED))
def test_compressed_instances_render(hub: Hub, name: str) -> None:
    stored = hub.compressed[name]
    png = hub.client("seg").retrieve_instance_rendered(
        stored.study, stored.series, stored.instance, media_types=("image/png",)
    )
    image = Image.open(io.BytesIO(png))
    original = dcmread(io.BytesIO(stored.data))
    assert image.size == (original.Columns, original.Rows)
    assert len(set(np.asarray(image).ravel().tolist())) > 2  # a picture, not a blank


def test_unseen_studies_answer_as_if_they_did_not_exist(hub: Hub) -> None:
    missing = generate_uid()
    with hub.http("rvh") as c:
        for study in (hub.hidden["oth"], hub.hidden["nth"], missing):
            for path in (f"/studies/{study}", f"/studies/{study}/metadata"):
                r = c.get(path, headers={"Accept": DICOM_ANY if "metadata" not in path else "*/*"})
                assert r.status_code == 404, path
                assert r.json() == {"detail": "no such study, or not one you may see"}
            assert c.get(f"/studies/{study}/series").json() == []
    # The owners do see their own.
    assert hub.client("oth").retrieve_study(hub.hidden["oth"])


def test_retrieve_refuses_unacceptable_media(hub: Hub) -> None:
    ct = hub.ct[0]
    with hub.http("seg") as c:
        for accept in (
            "image/png",
            'multipart/related; type="application/dicom+xml"',
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
        ):
            r = c.get(f"/studies/{ct.study}", headers={"Accept": accept})
            assert r.status_code == 406, accept
        r = c.get(f"/studies/{ct.study}/metadata", headers={"Accept": "application/dicom+xml"})
        assert r.status_code == 406


# -- STOW-RS -------------------------------------------------------------------------------


def multipart_body(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body + b"--" + boundary.encode() + b"--\r\n", ctype


def sequence(response: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(response.get(tag, {}).get("Value", []))


def new_ct(tmp_path: Path, slices: int = 2, **kwargs: Any) -> list[bytes]:
    study = generate_ct_study(tmp_path, slices=slices, rows=32, columns=32, **kwargs)
    return [p.read_bytes() for p in study.paths]


def count_instances(hub: Hub, patient_id: str) -> int:
    return len(hub.client("seg").search_for_instances(search_filters={"PatientID": patient_id}))


def test_store_answers_with_the_standard_response(hub: Hub, tmp_path: Path) -> None:
    files = new_ct(tmp_path, patient_id="STOW1")
    result = hub.client("seg").store_instances([dcmread(io.BytesIO(f)) for f in files])
    referenced = result.ReferencedSOPSequence
    assert len(referenced) == 2 and "FailedSOPSequence" not in result
    assert str(result.RetrieveURL).endswith(
        f"/dicomweb/studies/{dcmread(io.BytesIO(files[0])).StudyInstanceUID}"
    )
    assert referenced[0].RetrieveURL.startswith(hub.net.hub_url)
    assert count_instances(hub, "STOW1") == 2
    event = audit_events(hub.net, "dicomweb:instances:stored")[-1]
    assert event["patient_ref"] == "STOW1" and event["detail"] == {"instances": 2}


def test_broken_parts_are_refused_one_by_one(hub: Hub, tmp_path: Path) -> None:
    good, truncated = new_ct(tmp_path / "a", patient_id="STOW2")
    (other_study,) = new_ct(tmp_path / "b", slices=1, patient_id="STOW2")
    study = dcmread(io.BytesIO(good)).StudyInstanceUID
    body, ctype = multipart_body([good, truncated[:-100], b"not dicom at all" * 20, other_study])
    with hub.http("seg") as c:
        r = c.post(f"/studies/{study}", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 202, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    answer = r.json()
    (stored,) = sequence(answer, "00081199")
    assert stored["00081155"]["Value"] == [str(dcmread(io.BytesIO(good)).SOPInstanceUID)]
    reasons = sorted(f["00081197"]["Value"][0] for f in sequence(answer, "00081198"))
    assert reasons == [0xA900, 0xC000, 0xC000]
    assert "truncated" in r.headers["warning"]
    assert count_instances(hub, "STOW2") == 1  # nothing of the broken ones
    refused = audit_events(hub.net, "dicomweb:instances:refused")[-1]
    assert {i["failure_reason"] for i in refused["detail"]["refused"]} == {"0xA900", "0xC000"}


def test_a_study_under_another_patient_is_refused(hub: Hub, tmp_path: Path) -> None:
    (first,) = new_ct(tmp_path, slices=1, patient_id="STOW3")
    hub.client("seg").store_instances([dcmread(io.BytesIO(first))])
    ds = dcmread(io.BytesIO(first))
    ds.PatientID = "SOMEONE-ELSE"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    body, ctype = multipart_body([part10(ds)])
    with hub.http("seg") as c:
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 409
    (failed,) = sequence(r.json(), "00081198")
    assert failed["00081197"]["Value"] == [0x0110]
    assert "another patient" in r.headers["warning"]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("application/dicom", b"x", 415, "multipart/related"),
        ('multipart/related; type="application/dicom+json"; boundary=b', b"x", 415, "only"),
        ('multipart/related; type="application/dicom"', b"x", 400, "boundary"),
        (
            'multipart/related; type="application/dicom"; boundary=b',
            b"--b\r\n\r\nabc",
            400,
            "closing boundary",
        ),
        (
            'multipart/related; type="application/dicom"; boundary=b',
            b"--b--\r\n",
            400,
            "no instances",
        ),
    ],
)
def test_malformed_store_requests_store_nothing(
    hub: Hub, content_type: str, body: bytes, status: int, reason: str
) -> None:
    before = len(hub.client("seg").search_for_instances())
    with hub.http("seg") as c:
        r = c.post("/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status and reason in r.json()["detail"], r.text
    assert len(hub.client("seg").search_for_instances()) == before


def test_a_cut_off_body_stores_nothing(hub: Hub, tmp_path: Path) -> None:
    files = new_ct(tmp_path, patient_id="STOW4")
    body, ctype = multipart_body(files)
    with hub.http("seg") as c:
        # The closing boundary never comes: no part of the request is kept.
        r = c.post(
            "/studies",
            content=body[: -len("--b0undary--\r\n") - 50],
            headers={"Content-Type": ctype},
        )
    assert r.status_code == 400
    assert count_instances(hub, "STOW4") == 0


def test_all_parts_unreadable_is_400_and_a_store_needs_an_agreement(hub: Hub) -> None:
    body, ctype = multipart_body([b"garbage" * 30])
    with hub.http("seg") as c:
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 400
        assert sequence(r.json(), "00081198")[0]["00081197"]["Value"] == [0xC000]
        r = c.post(
            "/studies",
            content=body,
            headers={"Content-Type": ctype, "Accept": "application/dicom+xml"},
        )
        assert r.status_code == 406
    with hub.http("nth") as c:
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 403 and "agreement" in r.json()["detail"]
