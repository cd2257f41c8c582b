"""Reports as DICOM instances of the study they describe.

A report that travels with a transfer is delivered to the receiving PACS as one more
instance of the same study (same patient, same StudyInstanceUID, a series of its own), so
the radiologist sees it beside the images without a separate document system. A PDF becomes
an Encapsulated PDF; plain text becomes a Basic Text SR.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imagebridge.dicom.part10 import file_meta

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

MAX_PDF_BYTES = 64 * 1024 * 1024
MANUFACTURER = "ImageBridge"
# High series numbers keep the report after the image series in a PACS's series list.
PDF_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
# UTF-8: patient names and report text arrive from any hospital in any script.
UTF8 = "ISO_IR 192"

# Patient module (PS3.3 C.7.1.1): type 2 attributes are always present, possibly empty;
# type 3 ones only if the study has them.
_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_TYPE3 = ("IssuerOfPatientID", "OtherPatientIDsSequence")
# General Study module (PS3.3 C.7.2.1).
_STUDY_TYPE1 = ("StudyInstanceUID",)
_STUDY_TYPE2 = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")
_STUDY_TYPE3 = ("StudyDescription",)

RADIOLOGY_REPORT = ("11528-7", "LN", "Radiology Report")
FINDINGS = ("121070", "DCM", "Findings")


def encapsulated_pdf(
    pdf: bytes,
    study: Dataset,
    *,
    title: str = "Report",
    institution_name: str = "",
    max_bytes: int = MAX_PDF_BYTES,
) -> Dataset:
    """An Encapsulated PDF Storage instance holding ``pdf``, in a new series of ``study``.

    ``study`` is the header of one of the study's images, already carrying the receiving
    hospital's patient ID; its Patient and General Study attributes are copied.
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("not a PDF: the document does not start with '%PDF-'")
    if len(pdf) > max_bytes:
        raise ValueError(f"PDF too large: {len(pdf)} bytes, the limit is {max_bytes}")
    ds = _new_instance(ENCAPSULATED_PDF_STORAGE, study, title, institution_name)
    ds.Modality = "DOC"
    ds.SeriesNumber = PDF_SERIES_NUMBER
    # SC Equipment module: "workstation", i.e. not digitised from film.
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"  # a report names the patient in its content
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = _codes([RADIOLOGY_REPORT])
    ds.AcquisitionDateTime = ""
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # The length attribute keeps the true size, so a reader can drop the pad byte.
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + b"\x00" if len(pdf) % 2 else pdf
    return ds


def basic_text_sr(
    text: str, study: Dataset, *, title: str = "Report", institution_name: str = ""
) -> Dataset:
    """A Basic Text SR instance holding ``text`` as findings, in a new series of ``study``."""
    if not text.strip():
        raise ValueError("empty report text")
    if "\x00" in text:
        raise ValueError("report text contains a NUL character")
    ds = _new_instance(BASIC_TEXT_SR_STORAGE, study, title, institution_name)
    ds.Modality = "SR"
    ds.SeriesNumber = SR_SERIES_NUMBER
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    # Received, not signed off here: the sending hospital's sign-off does not travel.
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    # SR Document Content module: the document root is a container.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _codes([RADIOLOGY_REPORT])
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = _codes([FINDINGS])
    item.TextValue = text
    ds.ContentSequence = Sequence([item])
    return ds


def to_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file in Explicit VR Little Endian, with ImageBridge's meta group.

    The meta group depends only on the UIDs, so the same dataset always gives the same bytes.
    """
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not str(ds.get(keyword, "") or ""):
            raise ValueError(f"cannot write a Part 10 file without {keyword}")
    if any(elem.tag.group == 0x0002 for elem in ds):
        raise ValueError(
            "group 0002 (file meta) elements belong in the meta group, not the dataset"
        )
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    meta = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
    return meta + fp.getvalue()


# Page geometry for minimal_pdf (points): A4, 11 pt Helvetica on 14 pt lines.
_PAGE_W, _PAGE_H = 595, 842
_TOP, _LEFT, _LEADING, _FONT_SIZE = 790, 56, 14, 11
MAX_PDF_LINES = (_TOP - 40) // _LEADING


def minimal_pdf(lines: list[str]) -> bytes:
    """A single-page PDF showing ``lines`` in Helvetica, with no dependencies.

    Deterministic (no dates, no IDs). Characters outside Windows-1252 become '?'.
    """
    if len(lines) > MAX_PDF_LINES:
        raise ValueError(f"too many lines for one page: {len(lines)} > {MAX_PDF_LINES}")
    text = [b"BT", f"/F1 {_FONT_SIZE} Tf {_LEADING} TL {_LEFT} {_TOP} Td".encode()]
    for line in lines:
        text.append(b"(" + _pdf_string(line) + b") Tj T*")
    text.append(b"ET")
    stream = b"\n".join(text) + b"\n"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {_PAGE_W} {_PAGE_H}] ".encode()
        + b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"endstream",
    ]
    # The binary comment tells transfer tools the file is binary, not text.
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    # Each xref entry is exactly 20 bytes, ending in space + LF.
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _pdf_string(line: str) -> bytes:
    raw = line.encode("cp1252", errors="replace")
    # Control characters (tab, newline) have no glyph in Helvetica: show them as spaces.
    raw = bytes(b if b >= 0x20 else 0x20 for b in raw)
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _codes(codes: Iterable[tuple[str, str, str]]) -> Sequence:
    items = []
    for value, scheme, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = meaning
        items.append(item)
    return Sequence(items)


def _new_instance(sop_class_uid: str, study: Dataset, title: str, institution_name: str) -> Dataset:
    if not str(study.get("StudyInstanceUID", "") or ""):
        raise ValueError("the study header has no StudyInstanceUID")
    if len(institution_name) > 64 or "\\" in institution_name:
        raise ValueError("institution name must be at most 64 characters and without '\\'")
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = UTF8
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    _copy(study, ds, _PATIENT_TYPE2 + _STUDY_TYPE1 + _STUDY_TYPE2, required=True)
    _copy(study, ds, _PATIENT_TYPE3 + _STUDY_TYPE3, required=False)
    ds.SeriesInstanceUID = generate_uid()
    # LO: one value (no backslash), at most 64 characters.
    ds.SeriesDescription = title.replace("\\", "/")[:64]
    ds.Manufacturer = MANUFACTURER
    if institution_name:
        ds.InstitutionName = institution_name
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    return ds


def _copy(src: Dataset, dst: Dataset, keywords: Iterable[str], *, required: bool) -> None:
    """Copy attributes by keyword; type 2 ones (``required``) are added empty if absent."""
    for keyword in keywords:
        if keyword in src and src[keyword].value not in (None, ""):
            dst.add(_detached(src[keyword]))
        elif required:
            setattr(dst, keyword, "")


def _detached(elem: DataElement) -> DataElement:
    """A decoded copy of ``elem``, free of the source's character set and raw bytes.

    The source may be in Latin-1 or any other repertoire; the copy is re-encoded as UTF-8.
    """
    if elem.VR == "SQ":
        items = []
        for src_item in elem.value:
            item = Dataset()
            for child in src_item:
                item.add(_detached(src_item[child.tag]))
            items.append(item)
        return DataElement(elem.tag, "SQ", Sequence(items))
    value = elem.value
    if elem.VR == "PN":
        value = [str(v) for v in value] if elem.VM > 1 else str(value)
    elif isinstance(value, bytes | str | int | float):
        pass
    elif hasattr(value, "__iter__"):
        value = list(value)
    return DataElement(elem.tag, elem.VR, value)
