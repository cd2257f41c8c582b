from __future__ import annotations

import io
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from imagebridge.dicom.part10 import BadDataset, file_meta, read_header
from imagebridge.gateway.reconcile import (
    RECONCILED_TAGS,
    Reconciled,
    apply,
    find_nhs_number,
    plan,
    reconcile_file,
)
from imagebridge.settings import Reconciliation

NHS = "9434765919"
MRN = "RGT0001234"
# Settings refuse an invalid NHS number as a key (see the test below); built unvalidated here
# to prove that reconciliation itself never looks an invalid number up.
POLICY = Reconciliation.model_construct(mrn_map={NHS: MRN, "9434765918": "MUST-NOT-MATCH"})
SENDER, RECEIVER = "RXH", "RGT"
GROUP_LENGTHS = {0x00080000, 0x00100000}


def lookup(policy: Reconciliation = POLICY) -> Callable[[str], str | None]:
    return policy.mrn_map.get


def nhs_item(number: str = NHS, issuer: str = "NHS") -> Dataset:
    item = Dataset()
    item.PatientID = number
    item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


def ct_slice(index: int = 0, *, nhs_number: str | None = NHS) -> Dataset:
    """A CT slice as a scanner would send it: 512x512 int16, private tags, sequences of
    defined and undefined length, some in the groups that are rewritten."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = "101112.123"
    ds.AccessionNumber = "A20240001"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "Royal Example Hospital"
    ds.ReferringPhysicianName = "Who^Doctor"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTHEAD", "L", "CT head"
    ds.ProcedureCodeSequence = Sequence([code])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    code.is_undefined_length_sequence_item = True
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = "Axial 1mm"
    reference = Dataset()
    reference.ReferencedSOPClassUID = CTImageStorage
    reference.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([reference])
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "private in group 9")
    ds.add_new(0x00091002, "OB", b"\x01\x02\x03\x04")
    ds.PatientName = "Smith^Jane"
    ds.PatientID = "RXH123456"
    ds.IssuerOfPatientID = "RXH"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    if nhs_number is not None:
        ds.OtherPatientIDsSequence = Sequence([nhs_item(nhs_number)])
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1428.99.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1428.99.1.1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-125.0, -125.0, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.add_new(0x00290010, "LO", "ACME 1.0")
    ds.add_new(0x00291010, "UN", b"\x00" * 64)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.PixelSpacing = [0.488, 0.488]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    pixels = np.random.default_rng(index).integers(-1024, 3071, (512, 512), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def split_meta(raw: bytes) -> tuple[bytes, bytes]:
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    end = 144 + struct.unpack_from("<I", raw, 140)[0]
    return raw[:end], raw[end:]


def hub_store(path: Path, raw: bytes) -> Path:
    """The file as the hub stores it: ImageBridge's file meta, then the dataset as sent."""
    _, body = split_meta(raw)
    meta = dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta
    path.write_bytes(
        file_meta(
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID
        )
        + body
    )
    return path


def bundled(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path)).read_bytes()


# An independent reading of the data element framing (PS3.5 7.1, 7.5), for the comparisons.


def elements(body: bytes, implicit: bool, order: str = "<") -> dict[int, bytes]:
    """Each top-level element's complete encoding (tag to end of value), by tag."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(body):
        tag, end = skip(body, pos, implicit, order)
        assert tag not in out
        out[tag] = body[pos:end]
        pos = end
    return out


def skip(body: bytes, pos: int, implicit: bool, order: str) -> tuple[int, int]:
    group, elem = struct.unpack_from(order + "HH", body, pos)
    vr = body[pos + 4 : pos + 6]
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from(order + "I", body, pos + 4)
        pos += 8
    elif vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        (length,) = struct.unpack_from(order + "I", body, pos + 8)
        pos += 12
    else:
        (length,) = struct.unpack_from(order + "H", body, pos + 6)
        pos += 8
    tag = group << 16 | elem
    if length != 0xFFFFFFFF:
        return tag, pos + length
    nested_implicit = implicit or vr == b"UN"
    while True:  # items (or fragments), then the sequence delimiter
        group, elem, length = struct.unpack_from(order + "HHI", body, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return tag, pos
        assert (group, elem) == (0xFFFE, 0xE000)
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while struct.unpack_from(order + "HH", body, pos) != (0xFFFE, 0xE00D):
            pos = skip(body, pos, nested_implicit, order)[1]
        pos += 8


def read_body(path: Path) -> tuple[bytes, bytes, bool, str]:
    """(file meta, dataset bytes, implicit VR, byte order) of a Part 10 file."""
    meta, body = split_meta(path.read_bytes())
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax.is_deflated:
        body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    return meta, body, syntax.is_implicit_VR, "<" if syntax.is_little_endian else ">"


def assert_only_identity_changed(src: Path, dst: Path) -> None:
    """Every element but the reconciled ones has the same bytes and the same value."""
    _, src_body, implicit, order = read_body(src)
    dst_meta, dst_body, _, _ = read_body(dst)
    header = dcmread(src, stop_before_pixels=True)
    assert dst_meta == file_meta(
        header.file_meta.MediaStorageSOPClassUID,
        header.file_meta.MediaStorageSOPInstanceUID,
        header.file_meta.TransferSyntaxUID,
    )
    before = elements(src_body, implicit, order)
    after = elements(dst_body, implicit, order)
    changed = RECONCILED_TAGS | GROUP_LENGTHS
    assert set(after) - set(before) <= changed
    for tag, encoded in before.items():
        if tag not in changed:
            assert after[tag] == encoded, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) changed"

    full_src, full_dst = dcmread(src), dcmread(dst)
    for elem in full_src:
        if elem.tag not in changed:
            assert full_dst[elem.tag] == elem, elem
    if "PixelData" in full_src:
        assert full_dst.PixelData == full_src.PixelData
    read_header(dst)  # what the hub and gateways accept


def reconcile(src: Path, dst: Path, policy: Reconciliation = POLICY) -> Reconciled:
    return reconcile_file(
        src,
        dst,
        sender_code=SENDER,
        receiver_code=RECEIVER,
        policy=policy,
        mrn_lookup=lookup(policy),
    )


def other_ids(ds: Dataset) -> list[tuple[str, str, str]]:
    return [
        (i.get("PatientID"), i.get("IssuerOfPatientID"), i.get("TypeOfPatientID"))
        for i in ds.get("OtherPatientIDsSequence", [])
    ]


def plan_for(ds: Dataset, policy: Reconciliation = POLICY) -> Reconciled:
    return plan(
        ds, sender_code=SENDER, receiver_code=RECEIVER, policy=policy, mrn_lookup=lookup(policy)
    )


# The decisions, on a Dataset.


def test_matched_nhs_number_gives_the_local_mrn() -> None:
    r = plan_for(ct_slice())
    assert r == Reconciled(
        patient_id=MRN,
        issuer_of_patient_id=RECEIVER,
        accession_number="RXH-A20240001",
        matched=True,
        nhs_number=NHS,
        original_patient_id="RXH123456",
        original_issuer="RXH",
    )


def test_unmatched_gets_a_recognisably_foreign_id() -> None:
    ds = ct_slice(nhs_number="4010232137")  # valid, but no local MRN
    r = plan_for(ds)
    assert (r.patient_id, r.matched, r.nhs_number) == ("EXT-RXH-RXH123456", False, "4010232137")

    ds.PatientID = "P" * 64
    assert plan_for(ds).patient_id == ("EXT-RXH-" + "P" * 64)[:64]

    custom = Reconciliation(unmatched_format="{patient_id}@{sender}")
    assert plan_for(ct_slice(), custom).patient_id == "RXH123456@RXH"


def test_issuer_is_the_policy_issuer_or_the_receiver_code() -> None:
    assert plan_for(ct_slice()).issuer_of_patient_id == RECEIVER
    policy = Reconciliation(issuer_of_patient_id="RGT-PAS", mrn_map={NHS: MRN})
    assert plan_for(ct_slice(), policy).issuer_of_patient_id == "RGT-PAS"


def test_accession_number_prefix_within_sixteen_characters() -> None:
    ds = ct_slice()
    assert plan_for(ds).accession_number == "RXH-A20240001"
    ds.AccessionNumber = "SITE202400012345"  # too long with the prefix: keep its end
    assert plan_for(ds).accession_number == "RXH-202400012345"
    ds.AccessionNumber = ""
    assert plan_for(ds).accession_number == ""
    long_prefix = Reconciliation(accession_prefix="{sender}-IMPORTED-FROM-")
    assert plan_for(ct_slice(), long_prefix).accession_number == "RXH-IMPORTED-FRO"


def test_apply_keeps_the_original_id_and_the_nhs_item() -> None:
    ds = ct_slice()
    untouched = {e.tag: e.value for e in ds if e.tag not in RECONCILED_TAGS}
    r = plan_for(ds)
    apply(ds, r)
    assert (ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber) == (
        MRN,
        RECEIVER,
        "RXH-A20240001",
    )
    assert other_ids(ds) == [(NHS, "NHS", "TEXT"), ("RXH123456", "RXH", "TEXT")]
    assert {e.tag: e.value for e in ds if e.tag not in RECONCILED_TAGS} == untouched

    apply(ds, r)  # the original is there already: no second copy
    assert len(ds.OtherPatientIDsSequence) == 2


def test_apply_without_issuer_or_accession() -> None:
    ds = ct_slice(nhs_number=None)
    del ds.IssuerOfPatientID, ds.AccessionNumber
    r = plan_for(ds)
    assert r.original_issuer == SENDER
    apply(ds, r)
    assert "AccessionNumber" not in ds
    assert ds.PatientID == "EXT-RXH-RXH123456"
    assert [(i.PatientID, i.IssuerOfPatientID) for i in ds.OtherPatientIDsSequence] == [
        ("RXH123456", SENDER)
    ]


@pytest.mark.parametrize("tag", ["0010,1000", "(0010,1000)", "00101000", "OtherPatientIDs"])
def test_nhs_number_from_a_configured_tag(tag: str) -> None:
    ds = ct_slice(nhs_number=None)
    ds.OtherPatientIDs = ["X-1", "943 476 5919"]
    policy = Reconciliation(nhs_number_tag=tag, mrn_map={NHS: MRN})
    assert find_nhs_number(ds, policy) == NHS
    assert plan_for(ds, policy).patient_id == MRN
    assert find_nhs_number(ds, POLICY) is None  # not looked at unless configured


def test_nhs_number_in_patient_id_issued_by_the_nhs() -> None:
    ds = ct_slice(nhs_number=None)
    ds.PatientID, ds.IssuerOfPatientID = NHS, "NHS"
    r = plan_for(ds)
    assert (r.patient_id, r.nhs_number) == (MRN, NHS)
    apply(ds, r)
    assert [(i.PatientID, i.IssuerOfPatientID) for i in ds.OtherPatientIDsSequence] == [
        (NHS, "NHS")
    ]


def test_invalid_nhs_number_is_ignored() -> None:
    ds = ct_slice(nhs_number="9434765918")  # wrong check digit; in mrn_map all the same
    r = plan_for(ds)
    assert (r.nhs_number, r.matched, r.patient_id) == (None, False, "EXT-RXH-RXH123456")


def test_only_the_nhs_issuer_counts() -> None:
    ds = ct_slice(nhs_number=None)
    ds.OtherPatientIDsSequence = [nhs_item(issuer="RXH")]
    assert find_nhs_number(ds, POLICY) is None
    ds.OtherPatientIDsSequence.append(nhs_item(issuer="NHS"))
    assert find_nhs_number(ds, POLICY) == NHS


# The file rewrite.


def implicit_ct_small() -> bytes:
    ds = dcmread(io.BytesIO(bundled("CT_small.dcm")))
    return encode(ds, ImplicitVRLittleEndian)


def jpegls_with_study() -> bytes:
    ds = dcmread(io.BytesIO(bundled("JPEGLSNearLossless_16.dcm")))
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1428.99.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1428.99.2.1"  # lacks this too
    return encode(ds, ds.file_meta.TransferSyntaxUID)


SOURCES: dict[str, Callable[[], bytes]] = {
    "synthetic CT": lambda: encode(ct_slice()),
    "JPEG2000.dcm": lambda: bundled("JPEG2000.dcm"),
    "SC_rgb_rle.dcm": lambda: bundled("SC_rgb_rle.dcm"),
    "JPEGLSNearLossless_16.dcm": jpegls_with_study,
    "SC_rgb_jpeg_gdcm.dcm": lambda: bundled("SC_rgb_jpeg_gdcm.dcm"),
    "CT_small.dcm implicit": implicit_ct_small,
    "image_dfl.dcm deflated": lambda: bundled("image_dfl.dcm"),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_reconcile_file_changes_only_the_identity(tmp_path: Path, name: str) -> None:
    src = hub_store(tmp_path / "src.dcm", SOURCES[name]())
    dst = tmp_path / "dst.dcm"
    r = reconcile(src, dst)
    assert_only_identity_changed(src, dst)

    # The bytes say what the Dataset functions would have made of the same instance.
    expected = dcmread(src)
    assert plan_for(expected) == r
    apply(expected, r)
    got = dcmread(dst)
    for keyword in ("PatientID", "IssuerOfPatientID", "AccessionNumber", "SpecificCharacterSet"):
        assert got.get(keyword) == expected.get(keyword), keyword
    assert other_ids(got) == other_ids(expected)
    assert got.PatientID == r.patient_id and got.IssuerOfPatientID == RECEIVER
    assert not list(tmp_path.glob(".*.tmp"))


def test_synthetic_ct_reconciled_values(tmp_path: Path) -> None:
    src = hub_store(tmp_path / "src.dcm", encode(ct_slice()))
    r = reconcile(src, tmp_path / "dst.dcm")
    assert r.matched
    ds = dcmread(tmp_path / "dst.dcm")
    assert (ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber) == (
        MRN,
        RECEIVER,
        "RXH-A20240001",
    )
    assert [(i.PatientID, i.IssuerOfPatientID) for i in ds.OtherPatientIDsSequence] == [
        (NHS, "NHS"),
        ("RXH123456", "RXH"),
    ]
    assert ds.SpecificCharacterSet == "ISO_IR 100"


def test_undefined_length_other_patient_ids_keeps_its_items(tmp_path: Path) -> None:
    ds = ct_slice()
    ds["OtherPatientIDsSequence"].is_undefined_length = True
    ds.OtherPatientIDsSequence[0].is_undefined_length_sequence_item = True
    src = hub_store(tmp_path / "src.dcm", encode(ds))
    reconcile(src, tmp_path / "dst.dcm")
    assert_only_identity_changed(src, tmp_path / "dst.dcm")
    before = elements(read_body(src)[1], False)[0x00101002]
    after = elements(read_body(tmp_path / "dst.dcm")[1], False)[0x00101002]
    assert after.startswith(before[:-8])  # the NHS item byte for byte, then the new one
    got = dcmread(tmp_path / "dst.dcm").OtherPatientIDsSequence
    assert [i.PatientID for i in got] == [NHS, "RXH123456"]


def test_nhs_number_in_a_private_tag_of_an_implicit_file(tmp_path: Path) -> None:
    ds = ct_slice(nhs_number=None)
    ds.add_new(0x00291011, "LO", "943-476-5919")
    src = hub_store(tmp_path / "src.dcm", encode(ds, ImplicitVRLittleEndian))
    policy = Reconciliation(nhs_number_tag="0029,1011", mrn_map={NHS: MRN})
    assert reconcile(src, tmp_path / "dst.dcm", policy).patient_id == MRN
    assert find_nhs_number(dcmread(src), policy) == NHS
    assert_only_identity_changed(src, tmp_path / "dst.dcm")


def test_group_lengths_are_kept_and_recounted(tmp_path: Path) -> None:
    _, body = split_meta(encode(ct_slice()))
    grouped = b""
    by_group: dict[int, list[bytes]] = {}
    for tag, encoded in elements(body, False).items():
        by_group.setdefault(tag >> 16, []).append(encoded)
    for group, group_elements in sorted(by_group.items()):
        length = sum(map(len, group_elements))
        grouped += struct.pack("<HH2sHI", group, 0, b"UL", 4, length) + b"".join(group_elements)
    src = tmp_path / "src.dcm"
    src.write_bytes(file_meta(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian) + grouped)
    dst = tmp_path / "dst.dcm"
    reconcile(src, dst)
    assert_only_identity_changed(src, dst)
    after = elements(read_body(dst)[1], False)
    for group in (0x0008, 0x0010, 0x0018, 0x7FE0):
        counted = sum(len(v) for t, v in after.items() if t >> 16 == group and t & 0xFFFF)
        assert struct.unpack_from("<I", after[group << 16], 8)[0] == counted


def test_character_sets(tmp_path: Path) -> None:
    # Latin-1 in an ISO_IR 100 dataset: the same bytes come back inside the foreign ID.
    ds = ct_slice(nhs_number=None)
    ds.PatientID = "MÜLLER1"
    src = hub_store(tmp_path / "latin.dcm", encode(ds))
    reconcile(src, tmp_path / "latin-out.dcm")
    got = dcmread(tmp_path / "latin-out.dcm")
    assert (got.PatientID, got.SpecificCharacterSet) == ("EXT-RXH-MÜLLER1", "ISO_IR 100")
    assert b"EXT-RXH-M\xdcLLER1" in (tmp_path / "latin-out.dcm").read_bytes()

    # A non-ASCII issuer for an ASCII dataset: declared UTF-8, which ASCII already is.
    ds = ct_slice()
    del ds.SpecificCharacterSet
    src = hub_store(tmp_path / "ascii.dcm", encode(ds))
    policy = Reconciliation(issuer_of_patient_id="Hôpital", mrn_map={NHS: MRN})
    reconcile(src, tmp_path / "ascii-out.dcm", policy)
    got = dcmread(tmp_path / "ascii-out.dcm")
    assert (got.IssuerOfPatientID, got.SpecificCharacterSet) == ("Hôpital", "ISO_IR 192")
    expected = dcmread(src)
    apply(expected, plan_for(expected, policy))
    assert expected.SpecificCharacterSet == "ISO_IR 192"

    # Not representable in the dataset's own character set: refused, not garbled.
    ds = ct_slice()
    ds.SpecificCharacterSet = "ISO_IR 144"  # Cyrillic
    src = hub_store(tmp_path / "cyrillic.dcm", encode(ds))
    with pytest.raises(ValueError, match="character set"):
        reconcile(src, tmp_path / "cyrillic-out.dcm", policy)
    assert not (tmp_path / "cyrillic-out.dcm").exists()


def test_big_endian(tmp_path: Path) -> None:
    ds = ct_slice()
    del ds.PixelData
    src = hub_store(tmp_path / "src.dcm", encode(ds, ExplicitVRBigEndian))
    reconcile(src, tmp_path / "dst.dcm")
    assert_only_identity_changed(src, tmp_path / "dst.dcm")
    assert dcmread(tmp_path / "dst.dcm").PatientID == MRN


def test_deflated_output_is_deflated(tmp_path: Path) -> None:
    src = hub_store(tmp_path / "src.dcm", encode(ct_slice(), DeflatedExplicitVRLittleEndian))
    reconcile(src, tmp_path / "dst.dcm")
    assert (tmp_path / "dst.dcm").stat().st_size < 600_000
    assert_only_identity_changed(src, tmp_path / "dst.dcm")


def test_refuses_what_is_not_a_clean_part10_file(tmp_path: Path) -> None:
    dst = tmp_path / "dst.dcm"
    for name, raw in {
        "empty": b"",
        "not DICOM": b"hello" * 100,
        "truncated": encode(ct_slice())[:100_000],
    }.items():
        src = tmp_path / name
        src.write_bytes(raw)
        with pytest.raises(BadDataset):
            reconcile(src, dst)
    # A second, out-of-order PatientID would reach the PACS unreconciled.
    _, body = split_meta(encode(ct_slice()))
    patient_id = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 10) + b"RXH999999 "
    src = tmp_path / "twice.dcm"
    src.write_bytes(
        file_meta(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian) + body[:-8] + patient_id
    )
    with pytest.raises(BadDataset, match="out of order"):
        reconcile(src, dst)
    assert not dst.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_fast_path_timing(tmp_path: Path) -> None:
    """300 slices of 512x512: print the time per file for the record, next to a plain copy
    of the same files, so that the difference is the rewrite's own work."""
    sources, copies, out = tmp_path / "hub", tmp_path / "copies", tmp_path / "out"
    for folder in (sources, copies, out):
        folder.mkdir()
    files = [hub_store(sources / f"{i:03d}.dcm", encode(ct_slice(i))) for i in range(300)]
    reconcile(files[0], out / "warm.dcm")

    def per_file(action: Callable[[Path], object]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for src in files:
            action(src)
        return (
            (time.perf_counter() - wall) / len(files) * 1e3,
            (time.process_time() - cpu) / len(files) * 1e3,
        )

    copy_wall, copy_cpu = per_file(lambda src: shutil.copyfile(src, copies / src.name))
    wall, cpu = per_file(lambda src: reconcile(src, out / src.name))
    print(
        f"\nreconcile_file, 300 x {files[0].stat().st_size // 1024} KiB: "
        f"{wall:.3f} ms wall, {cpu:.3f} ms CPU per file; "
        f"plain copy: {copy_wall:.3f} ms wall, {copy_cpu:.3f} ms CPU per file"
    )
    assert_only_identity_changed(files[-1], out / files[-1].name)


def test_an_original_id_already_listed_is_not_repeated(tmp_path: Path) -> None:
    ds = ct_slice()
    ds.OtherPatientIDsSequence.append(nhs_item("RXH123456", "RXH"))
    src = hub_store(tmp_path / "src.dcm", encode(ds))
    reconcile(src, tmp_path / "dst.dcm")
    before = elements(read_body(src)[1], False)
    after = elements(read_body(tmp_path / "dst.dcm")[1], False)
    assert after[0x00101002] == before[0x00101002]


def test_an_instance_without_patient_id(tmp_path: Path) -> None:
    ds = ct_slice(nhs_number=None)
    del ds.PatientID, ds.IssuerOfPatientID
    src = hub_store(tmp_path / "src.dcm", encode(ds))
    r = reconcile(src, tmp_path / "dst.dcm")
    assert (r.patient_id, r.original_patient_id) == ("EXT-RXH-", "")
    got = dcmread(tmp_path / "dst.dcm")
    assert (got.PatientID, got.IssuerOfPatientID) == ("EXT-RXH-", RECEIVER)
    assert "OtherPatientIDsSequence" not in got  # nothing worth keeping
    assert_only_identity_changed(src, tmp_path / "dst.dcm")


def test_settings_refuse_an_invalid_nhs_number_in_the_map() -> None:
    with pytest.raises(ValueError, match="not a valid NHS number"):
        Reconciliation(mrn_map={"9434765918": "X"})
    assert Reconciliation(mrn_map={"943 476 5919": "X"}).mrn_map == {"9434765919": "X"}
