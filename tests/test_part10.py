"""The header reader the gateways and the hub index by: the same values as pydicom reads,
found without parsing the whole header, and every damaged dataset refused."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import (
    INDEXED,
    REQUIRED_UIDS,
    BadDataset,
    file_meta,
    read_header,
    read_meta,
)

# What the header reader reads (what the hub checks and indexes, and two more), each compared
# with pydicom's reading of the same file.
KEYWORDS = (*REQUIRED_UIDS, *INDEXED, "SpecificCharacterSet", "ImageType")


def _readable(paths: list[str]) -> list[tuple[Path, Dataset]]:
    out: list[tuple[Path, Dataset]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in paths:
            try:
                ds = dcmread(name)
                ds.file_meta.TransferSyntaxUID  # noqa: B018 - only Part 10 files
            except Exception:
                continue
            if all(ds.get(k) for k in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")):
                out.append((Path(name), ds))
    return out


# pydicom's own test files: many transfer syntaxes, character sets, sequences, private tags.
SAMPLES = _readable(get_testdata_files() + get_charset_files())


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def test_the_samples_cover_what_they_should() -> None:
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for _, ds in SAMPLES}
    assert len(SAMPLES) > 100
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"} <= syntaxes
    assert any("1.2.840.10008.1.2.4" in s for s in syntaxes)  # JPEG family
    assert any(ds.get("SpecificCharacterSet") not in (None, "ISO_IR 100") for _, ds in SAMPLES)


@pytest.mark.parametrize(("path", "ds"), SAMPLES, ids=[p.name for p, _ in SAMPLES])
def test_values_are_those_pydicom_reads(path: Path, ds: Dataset) -> None:
    try:
        header = read_header(path)
    except BadDataset as exc:
        # Refused only for a reason that pydicom's reading shows too.
        if "truncated" in str(exc):
            last = ds._dict[max(ds._dict)]  # still raw: its declared length and its bytes
            assert isinstance(last, RawDataElement) and last.value is not None
            assert len(last.value) < last.length
        else:
            assert "missing SOP" in str(exc)
            assert not (ds.get("SOPClassUID") and ds.get("SOPInstanceUID"))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword in KEYWORDS:
            assert header.text(keyword) == _text(ds, keyword), keyword
        items = ds.get("OtherPatientIDsSequence") or []
        got = header.items("OtherPatientIDsSequence")
        assert len(got) == len(items)
        for want, item in zip(items, got, strict=True):
            assert item.text("PatientID") == _text(want, "PatientID")
            assert item.text("IssuerOfPatientID") == _text(want, "IssuerOfPatientID")


def test_a_bare_dataset_reads_as_its_file(tmp_path: Path) -> None:
    """As a C-STORE delivers it: the dataset alone, its syntax from the presentation context."""
    study = generate_ct_study(tmp_path, slices=1)
    path = study.paths[0]
    with open(path, "rb") as fh:
        meta = read_meta(fh)
        bare = fh.read()
    from_file = read_header(path)
    for source in (io.BytesIO(bare), bare):
        header = read_header(source, meta.transfer_syntax_uid)
        for keyword in KEYWORDS:
            assert header.text(keyword) == from_file.text(keyword)
    assert [i.text("PatientID") for i in from_file.items("OtherPatientIDsSequence")] == [
        "9434765919"
    ]
    assert from_file.dataset.PatientID == "A123456"  # the header as a pydicom Dataset


@pytest.fixture
def ct(tmp_path: Path) -> bytes:
    return generate_ct_study(tmp_path / "ct", slices=1).paths[0].read_bytes()


def test_a_dataset_cut_short_is_refused(ct: bytes, tmp_path: Path) -> None:
    for cut in (len(ct) - 1, len(ct) - 1000, len(ct) // 2):
        path = tmp_path / f"cut-{cut}.dcm"
        path.write_bytes(ct[:cut])
        with pytest.raises(BadDataset, match="truncated"):
            read_header(path)


def test_garbage_and_missing_uids_are_refused(ct: bytes, tmp_path: Path) -> None:
    meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    with pytest.raises(BadDataset, match=r"unreadable|missing SOPClassUID"):
        read_header(meta + b"\xde\xad\xbe\xef\x00\xff\x13\x37" * 512)
    with pytest.raises(BadDataset, match="unreadable"):
        read_header(ct[:400] + b"\xff" * 64)  # the header itself damaged
    with pytest.raises(BadDataset, match="not a DICOM Part 10 file"):
        read_header(b"\x00" * 64)
    with pytest.raises(BadDataset, match="empty file"):
        empty = tmp_path / "empty.dcm"
        empty.write_bytes(b"")
        read_header(empty)
    with pytest.raises(BadDataset, match="missing SOPInstanceUID"):
        ds = dcmread(io.BytesIO(ct))
        del ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        read_header(out.getvalue())


def test_elements_out_of_order_are_refused(ct: bytes) -> None:
    """A second PatientID after the pixel data must not slip past reconciliation."""
    extra = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 8) + b"OTHER-ID"
    with pytest.raises(BadDataset, match="out of order"):
        read_header(ct + extra)


EDGE_VALUES: dict[str, list[str | bytes]] = {
    # What a sender may put in a value: padding on either side, several values, empty
    # values, characters outside ASCII, and an integer string written in several ways.
    "PatientID": [" A1 ", "A1\\B2", "", "ÄÖ-1", b"ID\x00"],
    "PatientName": ["Doe^John", "Doe^John=Yamada^Taro", "Müller^Jürgen ", ""],
    "InstanceNumber": [" 12", "0012", "+3", "-4 ", "", "1\\2"],
    "RetrieveAETitle": [" PACS_A ", "A\\B"],
    "StudyTime": ["101010.123 ", "1010"],
    "StudyDate": ["20260101"],
    "AccessionNumber": ["ACC\x00", "ESC\x1b(B1"],
    "StudyDescription": ["CT  HEAD  ", "two\\values"],
}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_edge_values_read_as_pydicom_reads_them(
    tmp_path: Path, implicit: bool, charset: str
) -> None:
    base = dcmread(generate_ct_study(tmp_path / "ct", slices=1).paths[0])
    syntax = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    for round_ in range(max(len(v) for v in EDGE_VALUES.values())):
        ds = base.copy()
        ds.SpecificCharacterSet = charset
        for keyword, values in EDGE_VALUES.items():
            value = values[round_ % len(values)]
            if isinstance(value, bytes):
                ds[keyword].value = value.decode("latin-1")
            else:
                setattr(ds, keyword, value)
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        out = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(out, implicit_vr=implicit, little_endian=True)
            written = dcmread(io.BytesIO(out.getvalue()))
            header = read_header(out.getvalue())
            for keyword in EDGE_VALUES:
                assert header.text(keyword) == _text(written, keyword), (keyword, round_)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"SQ", b"OB"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def test_a_damaged_sequence_in_the_header_is_refused_when_read() -> None:
    """Found when the header is read, not later while the hub indexes it."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 8) + b"\xff" * 8
    dataset = b"".join(
        (
            _element(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00"),
            _element(0x00080018, b"UI", b"1.2.3.4"),
            _element(0x00100020, b"LO", b"ID-1  "),
            _element(0x00101002, b"SQ", item),
            _element(0x0020000D, b"UI", b"1.2.3.5\x00"),
            _element(0x0020000E, b"UI", b"1.2.3.6\x00"),
        )
    )
    meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    with pytest.raises(BadDataset):
        read_header(meta + dataset)
    whole = _element(0x00101002, b"SQ", b"")  # an empty sequence reads as no items
    header = read_header(meta + dataset.replace(_element(0x00101002, b"SQ", item), whole))
    assert header.items("OtherPatientIDsSequence") == []
    assert header.text("PatientID") == "ID-1"
