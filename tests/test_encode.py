"""Elements we encode ourselves (the file meta, C-FIND answers) read back by pydicom as the
values they were given, in both little endian syntaxes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode

from imagebridge.dicom.encode import flat_dataset, keyword_entry, value_bytes

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
    elements = [(0x00080005, "CS", b"ISO_IR 192")]
    for keyword, text in VALUES.items():
        entry = keyword_entry(keyword)
        assert entry is not None
        tag, vr = entry
        elements.append((tag, vr, value_bytes(vr, text, "utf-8")))
    ds = decode(BytesIO(flat_dataset(reversed(elements), implicit=implicit)), implicit, True)
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
