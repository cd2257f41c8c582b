"""Reports become DICOM instances of the study they describe, readable by any DICOM reader."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.part10 import file_meta, read_header
from imagebridge.dicom.reports import (
    BASIC_TEXT_SR_STORAGE,
    ENCAPSULATED_PDF_STORAGE,
    MAX_PDF_LINES,
    basic_text_sr,
    encapsulated_pdf,
    minimal_pdf,
    to_part10,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The header of one slice of a synthetic study, as a gateway would read it."""
    files = generate_ct_study(
        tmp_path_factory.mktemp("ct"),
        slices=1,
        rows=32,
        columns=32,
        patient_name="MÜLLER^ZOË",
        issuer_of_patient_id="RGT",
    )
    return read_header(files.paths[0]).dataset


def _read(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def _assert_same_patient_and_study(ds: Dataset, study: Dataset) -> None:
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
    ):
        assert ds[keyword].value == study[keyword].value, keyword
    [other] = ds.OtherPatientIDsSequence
    assert other.PatientID == "9434765919"
    assert other.IssuerOfPatientID == "NHS"
    assert other.TypeOfPatientID == "TEXT"
    assert ds.SeriesInstanceUID != study.SeriesInstanceUID
    assert ds.SOPInstanceUID != study.SOPInstanceUID


def test_encapsulated_pdf_round_trips_in_the_same_study(study: Dataset) -> None:
    pdf = minimal_pdf(["Chest CT", "No acute findings."])
    data = to_part10(
        encapsulated_pdf(pdf, study, title="CT report", institution_name="St Elsewhere")
    )

    assert data.startswith(
        file_meta(ENCAPSULATED_PDF_STORAGE, _read(data).SOPInstanceUID, ExplicitVRLittleEndian)
    )
    ds = _read(data)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    _assert_same_patient_and_study(ds, study)
    assert str(ds.PatientName) == "MÜLLER^ZOË"
    assert ds.Modality == "DOC"
    assert ds.InstanceNumber == 1
    assert ds.ConversionType == "WSD"
    assert ds.BurnedInAnnotation == "YES"
    assert ds.DocumentTitle == "CT report"
    assert ds.InstitutionName == "St Elsewhere"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.EncapsulatedDocumentLength == len(pdf)
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.ContentDate and ds.InstanceCreationDate
    # ImageBridge's own strict reader accepts what it writes.
    assert read_header(data).sop_class_uid == ENCAPSULATED_PDF_STORAGE


def test_odd_length_pdf_is_padded_with_one_nul(study: Dataset) -> None:
    pdf = b"%PDF-1.4\n%%EOF\n"
    assert len(pdf) % 2 == 1
    ds = _read(to_part10(encapsulated_pdf(pdf, study)))
    assert ds.EncapsulatedDocument == pdf + b"\x00"
    assert ds.EncapsulatedDocumentLength == len(pdf)


def test_encapsulated_pdf_refuses_what_is_not_a_pdf_or_too_large(study: Dataset) -> None:
    with pytest.raises(ValueError, match="not a PDF"):
        encapsulated_pdf(b"<html>report</html>", study)
    with pytest.raises(ValueError, match="not a PDF"):
        encapsulated_pdf(b"", study)
    pdf = minimal_pdf(["x"])
    with pytest.raises(ValueError, match="too large"):
        encapsulated_pdf(pdf, study, max_bytes=len(pdf) - 1)
    assert encapsulated_pdf(pdf, study, max_bytes=len(pdf)).EncapsulatedDocumentLength == len(pdf)


def test_basic_text_sr_round_trips_in_the_same_study(study: Dataset) -> None:
    text = "Findings: no pneumothorax.\nÉpanchement pleural absent — 胸水なし.\\ok"
    data = to_part10(basic_text_sr(text, study, title="CT report"))

    ds = _read(data)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == BASIC_TEXT_SR_STORAGE
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    _assert_same_patient_and_study(ds, study)
    assert ds.Modality == "SR"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.ValueType == "CONTAINER"
    assert ds.ContinuityOfContent == "SEPARATE"
    [root_code] = ds.ConceptNameCodeSequence
    assert (root_code.CodeValue, root_code.CodingSchemeDesignator) == ("11528-7", "LN")
    [item] = ds.ContentSequence
    assert item.RelationshipType == "CONTAINS"
    assert item.ValueType == "TEXT"
    assert item.ConceptNameCodeSequence[0].CodeValue == "121070"
    assert item.TextValue == text
    assert read_header(data).sop_class_uid == BASIC_TEXT_SR_STORAGE


@pytest.mark.parametrize("text", ["", "   \n", "before\x00after"])
def test_basic_text_sr_refuses_empty_text_or_nul(study: Dataset, text: str) -> None:
    with pytest.raises(ValueError, match=r"empty|NUL"):
        basic_text_sr(text, study)


def test_latin1_study_header_is_re_encoded_as_utf8() -> None:
    """A header from a Latin-1 PACS: its names must survive the move to UTF-8."""
    src = Dataset()
    src.SpecificCharacterSet = "ISO_IR 100"
    src.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    src.SOPInstanceUID = "1.2.3.4"
    src.StudyInstanceUID = "1.2.3"
    src.SeriesInstanceUID = "1.2.3.5"
    src.PatientName = "GÓMEZ^JOSÉ"
    src.PatientID = "Ñ42"
    other = Dataset()
    other.PatientID = "9434765919"
    other.IssuerOfPatientID = "NHS Ñ"
    src.OtherPatientIDsSequence = [other]
    header = _read(to_part10(src))
    assert header.PatientName.original_string == "GÓMEZ^JOSÉ".encode("latin-1")

    ds = _read(to_part10(basic_text_sr("ok", header)))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "GÓMEZ^JOSÉ"
    assert ds.PatientName.original_string == "GÓMEZ^JOSÉ".encode()
    assert ds.PatientID == "Ñ42"
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "NHS Ñ"
    # Type 2 attributes the source lacked are present, empty.
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert "StudyDescription" not in ds and "IssuerOfPatientID" not in ds


def test_reports_from_a_real_vendor_header() -> None:
    """pydicom's CT_small.dcm (implicit-era header) as the study."""
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    study = pydicom.dcmread(path, stop_before_pixels=True)
    for ds in (encapsulated_pdf(minimal_pdf(["x"]), study), basic_text_sr("y", study)):
        back = _read(to_part10(ds))
        assert back.StudyInstanceUID == study.StudyInstanceUID
        assert back.PatientID == study.PatientID
        assert str(back.PatientName) == str(study.PatientName)


def test_to_part10_is_deterministic_and_refuses_meta_in_the_dataset(study: Dataset) -> None:
    ds = basic_text_sr("same", study)
    assert to_part10(ds) == to_part10(ds)
    no_uid = Dataset()
    no_uid.SOPClassUID = BASIC_TEXT_SR_STORAGE
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        to_part10(no_uid)
    ds.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(ValueError, match="group 0002"):
        to_part10(ds)
    # A file_meta attribute (pydicom's) is ignored: ImageBridge writes its own meta group.
    ds = basic_text_sr("same", study)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.ImplementationVersionName = "OTHER"
    assert b"OTHER" not in to_part10(ds)


def _check_pdf_structure(pdf: bytes) -> None:
    """Every xref entry points at its 'N 0 obj', and startxref at the xref table."""
    assert pdf.startswith(b"%PDF-1.4\n")
    assert pdf.endswith(b"%%EOF\n")
    startxref = int(re.search(rb"startxref\n(\d+)\n%%EOF\n$", pdf).group(1))  # type: ignore[union-attr]
    assert pdf[startxref:].startswith(b"xref\n0 ")
    header = re.match(rb"xref\n0 (\d+)\n", pdf[startxref:])
    assert header is not None
    count = int(header.group(1))
    table = pdf[startxref + header.end() :]
    entries = [table[i * 20 : (i + 1) * 20] for i in range(count)]
    assert entries[0] == b"0000000000 65535 f \n"
    for number, entry in enumerate(entries[1:], start=1):
        assert re.fullmatch(rb"\d{10} 00000 n \n", entry)
        assert pdf[int(entry[:10]) :].startswith(f"{number} 0 obj\n".encode())
    stream_length = int(re.search(rb"/Length (\d+) >>\nstream\n", pdf).group(1))  # type: ignore[union-attr]
    start = pdf.index(b"stream\n") + len(b"stream\n")
    assert pdf[start + stream_length :].startswith(b"endstream")
    assert f"/Size {count} ".encode() in pdf


def test_minimal_pdf_is_structurally_valid() -> None:
    lines = ["Report (draft) \\ final", "Ünïcödé → ok?", "tab\there", *["line"] * 10]
    pdf = minimal_pdf(lines)
    _check_pdf_structure(pdf)
    assert b"(Report \\(draft\\) \\\\ final) Tj" in pdf
    assert minimal_pdf(lines) == pdf  # no dates or IDs inside
    _check_pdf_structure(minimal_pdf([]))
    with pytest.raises(ValueError, match="too many lines"):
        minimal_pdf(["x"] * (MAX_PDF_LINES + 1))


def test_minimal_pdf_text_is_extractable(tmp_path: Path) -> None:
    """poppler's pdftotext reads it back: a real PDF reader accepts the file."""
    pdftotext = shutil.which("pdftotext")
    if pdftotext is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("pdftotext (poppler-utils) is required under CI")
        pytest.skip("pdftotext (poppler-utils) not installed")
    path = tmp_path / "r.pdf"
    path.write_bytes(minimal_pdf(["IMAGEBRIDGE REPORT", "Patient: Müller (draft)"]))
    result = subprocess.run(
        [pdftotext, "-layout", str(path), "-"], capture_output=True, check=True, timeout=30
    )
    assert b"Syntax Error" not in result.stderr, result.stderr
    text = result.stdout.decode()
    assert "IMAGEBRIDGE REPORT" in text
    assert "Patient: Müller (draft)" in text
