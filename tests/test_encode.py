"""Elements we encode ourselves (the file meta, C-FIND answers) read back by pydicom as the
values they were given, in both little endian syntaxes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode

from imagebridge.dicom.encode import keyword_entry, text_dataset, value_bytes

VALUES = {
    "PatientName": "Ó'Brien^Siobhán",
    "PatientID": "X1",  # even length: no padding
    "StudyInstanceUID": "1.2.3",  # odd: padded with NUL
    "StudyDate": "20260301",
    "ModalitiesInStudy": "CT\\SR",
    "NumberOfStudyRelatedInstances": "301",
    "Rows": "512",  # US
    "PixelSpacing": "0.5\\0.5",  # DS, multi-valued
    "RetrieveURL": "https://hub.example/dicomweb/studies/1.2.3",  # UR: a 4-byte length
    "StudyDescription": "",  # asked for, empty
    "ProcedureCodeSequence": "",  # SQ: an empty sequence
}


@pytest.mark.parametrize("implicit", [True, False])
def test_a_flat_dataset_reads_back_as_given(implicit: bool) -> None:
    # Given out of tag order, with a keyword that names no element.
    keywords = ("SpecificCharacterSet", "NoSuchKeyword", *reversed(VALUES))
    texts = ["ISO_IR 192", "x", *(VALUES[k] for k in reversed(VALUES))]
    encoded = text_dataset(keywords, texts, implicit=implicit, encoding="utf-8")
    ds = decode(BytesIO(encoded), implicit, True)
    assert "NoSuchKeyword" not in ds
    assert str(ds.PatientName) == VALUES["PatientName"]
    assert ds.PatientID == "X1"
    assert ds.StudyInstanceUID == "1.2.3"
    assert ds.StudyDate == "20260301"
    assert list(ds.ModalitiesInStudy) == ["CT", "SR"]
    assert ds.NumberOfStudyRelatedInstances == 301
    assert ds.Rows == 512
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5]
    assert ds.RetrieveURL == VALUES["RetrieveURL"]
    assert ds.StudyDescription == ""
    assert ds.ProcedureCodeSequence == Sequence()
    tags = [int(e.tag) for e in ds]
    assert tags == sorted(tags)


def test_values_that_cannot_be_stored_are_empty() -> None:
    assert value_bytes("US", "not a number", "ascii") == b""
    assert value_bytes("OB", "\x00\x01", "ascii") == b""
    assert value_bytes("UI", "1.2.3", "ascii") == b"1.2.3\x00"
    assert value_bytes("DA", "2026é", "utf-8") == b"2026? "  # DA is ASCII only
    assert keyword_entry("NoSuchKeyword") is None
