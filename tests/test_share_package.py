"""The legal-access zip: opened with DCMTK's dcmdump and with pydicom's File-set reader."""

from __future__ import annotations

import io
import re
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from conftest import require_tool
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.reports import basic_text_sr, encapsulated_pdf, minimal_pdf, to_part10
from imagebridge.shares.package import PackageError, write_package

DCMDUMP = "/usr/bin/dcmdump"
SLICES = 4
FILE_ID_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")


@dataclass(frozen=True)
class Inputs:
    images: list[Path]
    pdf: Path
    sr: Path

    def labelled(self) -> list[tuple[str, Path]]:
        items = [(f"image {n}", p) for n, p in enumerate(self.images, start=1)]
        return [*items, ("report (PDF)", self.pdf), ("report (text)", self.sr)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("inputs")
    study = generate_ct_study(
        folder / "ct", slices=SLICES, rows=32, columns=32, patient_name="DEMO^ZOË"
    )
    header = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    # Over 64 KiB of document, so the header is listed without holding the document.
    pdf = minimal_pdf(["Report", "No fracture."]) + b"%" + b"x" * 200_000 + b"\n"
    pdf_path = folder / "report-pdf.dcm"
    pdf_path.write_bytes(to_part10(encapsulated_pdf(pdf, header, title="CT report")))
    sr_path = folder / "report-sr.dcm"
    sr_path.write_bytes(to_part10(basic_text_sr("No fracture.", header)))
    return Inputs(study.paths, pdf_path, sr_path)


def package(files: list[tuple[str, Path]], **kwargs: str) -> bytes:
    out = io.BytesIO()
    write_package(files, out, **kwargs)
    return out.getvalue()


def unzip(data: bytes, folder: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        archive.extractall(folder)
    return folder


def dcmdump(path: Path) -> str:
    result = subprocess.run(
        [require_tool(DCMDUMP), str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no warning about the encoding either
    return result.stdout


@dataclass
class Record:
    offset: int
    kind: str
    next: int = 0
    lower: int = 0
    file_id: str = ""


def directory_records(dump: str) -> tuple[int, dict[int, Record]]:
    """The first root record's offset and every record, as DCMTK's dcmdump reads them."""
    first = int(re.search(r"\(0004,1200\) up (\d+)", dump).group(1))  # type: ignore[union-attr]
    records: dict[int, Record] = {}
    current: Record | None = None
    for line in dump.splitlines():
        if m := re.search(r'"Directory Record" ([A-Z ]+?) #', line):
            current = Record(0, m.group(1))
        elif current and (m := re.search(r"#  offset=\$(\d+)", line)):
            current.offset = int(m.group(1))
            records[current.offset] = current
        elif current and (m := re.search(r"\(0004,1400\) up (\d+)", line)):
            current.next = int(m.group(1))
        elif current and (m := re.search(r"\(0004,1420\) up (\d+)", line)):
            current.lower = int(m.group(1))
        elif current and (m := re.search(r"\(0004,1500\) CS \[([^]]*)\]", line)):
            current.file_id = m.group(1)
    return first, records


def siblings(records: dict[int, Record], offset: int) -> list[Record]:
    found = []
    while offset:
        found.append(records[offset])
        offset = records[offset].next
    return found


def test_dcmtk_reads_the_dicomdir_and_the_files(inputs: Inputs, tmp_path: Path) -> None:
    root = unzip(package(inputs.labelled()), tmp_path / "package")
    dump = dcmdump(root / "DICOMDIR")
    first, records = directory_records(dump)
    # Records carry the instances' character set: a non-ASCII name reads back intact.
    assert "(0010,0010) PN [DEMO^ZOË]" in dump

    # Walk the hierarchy by DCMTK's offsets: patient -> study -> series -> instances.
    patients = siblings(records, first)
    assert [p.kind for p in patients] == ["PATIENT"]
    studies = siblings(records, patients[0].lower)
    assert [s.kind for s in studies] == ["STUDY"]
    series = siblings(records, studies[0].lower)
    leaves = [[r.kind for r in siblings(records, s.lower)] for s in series]
    assert sorted(leaves) == sorted([["IMAGE"] * SLICES, ["ENCAP DOC"], ["SR DOCUMENT"]])
    assert len(records) == 1 + 1 + len(series) + SLICES + 2  # nothing unreachable

    referenced = {r.file_id for r in records.values() if r.file_id}
    on_disk = {
        "\\".join(p.relative_to(root).parts) for p in (root / "DICOM").rglob("*") if p.is_file()
    }
    assert referenced == on_disk
    assert {p.name for p in root.iterdir()} == {"DICOMDIR", "DICOM"}
    for file_id in referenced:
        components = file_id.split("\\")
        assert components[0] == "DICOM" and len(components) <= 8
        assert all(FILE_ID_COMPONENT.fullmatch(c) for c in components), file_id

    # Each file is itself valid and is the instance its record names.
    pdf_record = next(r for r in records.values() if r.kind == "ENCAP DOC")
    pdf_dump = dcmdump(root.joinpath(*pdf_record.file_id.split("\\")))
    assert "=EncapsulatedPDFStorage" in pdf_dump
    image_record = next(r for r in records.values() if r.kind == "IMAGE")
    assert "(7fe0,0010) OW" in dcmdump(root.joinpath(*image_record.file_id.split("\\")))


def test_pydicom_opens_the_package_as_a_file_set(inputs: Inputs, tmp_path: Path) -> None:
    root = unzip(package(inputs.labelled()), tmp_path / "package")
    file_set = FileSet(root / "DICOMDIR")
    assert len(file_set) == SLICES + 2
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for _, p in inputs.labelled()
    }
    for instance in file_set:
        loaded = instance.load()
        assert loaded.SOPInstanceUID == instance.SOPInstanceUID
        source = expected.pop(str(instance.SOPInstanceUID))
        # The same bytes as the source, apart from the preamble.
        assert Path(instance.path).read_bytes()[128:] == source.read_bytes()[128:]
    assert expected == {}
    # The whole PDF travelled, though only its header was read to list it.
    (pdf,) = file_set.find(DirectoryRecordType="ENCAP DOC")
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert len(pdf.load().EncapsulatedDocument) > 200_000


def test_a_hidden_executable_in_the_preamble_is_zeroed(inputs: Inputs, tmp_path: Path) -> None:
    original = inputs.images[0].read_bytes()
    # A DOS/PE header in the preamble makes a file that Windows would run as a program.
    preamble = b"MZ\x90\x00" + b"This program cannot be run in DOS mode.".ljust(124, b"\x00")
    polyglot = tmp_path / "polyglot.dcm"
    polyglot.write_bytes(preamble + original[128:])

    with zipfile.ZipFile(io.BytesIO(package([("image", polyglot)]))) as archive:
        (name,) = [n for n in archive.namelist() if n.startswith("DICOM/")]
        packed = archive.read(name)
    assert packed[:128] == bytes(128)
    assert packed[128:] == original[128:]
    assert polyglot.read_bytes()[:2] == b"MZ"  # the source file is left as it was


def test_a_compressed_file_keeps_its_transfer_syntax(tmp_path: Path) -> None:
    jpeg = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm", download=False)
    assert jpeg is not None
    root = unzip(package([("photo", Path(jpeg))]), tmp_path / "package")
    dump = dcmdump(root / "DICOMDIR")
    assert "(0004,1512) UI =JPEGBaseline" in dump


def test_keys_a_record_needs_and_an_image_lacks_are_made_up(inputs: Inputs, tmp_path: Path) -> None:
    ds = pydicom.dcmread(inputs.images[0])
    del ds.file_meta
    # Type 2 in an image, type 1 in a directory record (PS3.3 F.5).
    ds.StudyID = ""
    ds.StudyDate = ""
    ds.SeriesNumber = None
    del ds.InstanceNumber
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(to_part10(ds))
    root = unzip(package([("bare", bare)]), tmp_path / "package")
    dump = dcmdump(root / "DICOMDIR")
    assert re.search(r"\(0020,0010\) SH \[IB\d{1,14}\]", dump)  # StudyID
    assert f"(0008,0020) DA [{ds.SeriesDate}]" in dump  # StudyDate from SeriesDate
    assert "(0020,0011) IS [1]" in dump  # SeriesNumber
    assert "(0020,0013) IS [1]" in dump  # InstanceNumber
    # The file itself is left as it came.
    (packed,) = (root / "DICOM").rglob("IM*")
    assert packed.read_bytes()[128:] == bare.read_bytes()[128:]


def test_readme_lists_every_file_with_its_label(inputs: Inputs) -> None:
    data = package(inputs.labelled(), readme="Shared for: claim 1234.")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        readme = archive.read("README.txt").decode()
        names = [n for n in archive.namelist() if n.startswith("DICOM/")]
    assert readme.startswith("Shared for: claim 1234.\n")
    for name in names:
        assert re.search(rf"^{re.escape(name)}  (image \d|report)", readme, re.M)


def test_streams_to_an_output_that_cannot_seek(inputs: Inputs) -> None:
    class Socketish(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.data += b
            return len(b)

    out = Socketish()
    write_package(inputs.labelled(), out)
    with zipfile.ZipFile(io.BytesIO(bytes(out.data))) as archive:
        assert archive.testzip() is None
        assert len(archive.namelist()) == 1 + SLICES + 2


def test_the_same_instance_twice_is_packed_once(inputs: Inputs) -> None:
    twice = [("first", inputs.images[0]), ("again", inputs.images[0])]
    with zipfile.ZipFile(io.BytesIO(package(twice))) as archive:
        assert len(archive.namelist()) == 2  # DICOMDIR and one file


def test_bad_inputs_are_refused_before_anything_is_written(inputs: Inputs, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image" * 20)
    headless = tmp_path / "headless.dcm"
    headless.write_bytes(inputs.images[0].read_bytes()[132:])  # no preamble, no meta
    cases = {
        "notes": (text, "notes: not a DICOM Part 10 file"),
        "headless": (headless, "headless: not a DICOM Part 10 file"),
        "gone": (tmp_path / "missing.dcm", "gone: not a readable DICOM file"),
    }
    for label, (path, message) in cases.items():
        out = io.BytesIO()
        with pytest.raises(PackageError, match=message):
            write_package([("image 1", inputs.images[0]), (label, path)], out)
        assert out.getvalue() == b""
    with pytest.raises(PackageError, match="nothing to package"):
        write_package([], io.BytesIO())


def test_an_instance_without_patient_id_is_refused_with_the_reason(tmp_path: Path) -> None:
    source = get_testdata_file("image_dfl.dcm", download=False)
    assert source is not None
    with pytest.raises(PackageError, match=r"^deflated: .*'Patient ID' element cannot be empty$"):
        write_package([("deflated", Path(source))], io.BytesIO())


def test_studies_of_two_patients_are_listed_apart(inputs: Inputs, tmp_path: Path) -> None:
    other = generate_ct_study(
        tmp_path / "other", slices=2, rows=16, columns=16, patient_id="B765432"
    )
    files = [*inputs.labelled(), *((f"other {p.name}", p) for p in other.paths)]
    root = unzip(package(files), tmp_path / "package")
    first, records = directory_records(dcmdump(root / "DICOMDIR"))
    patients = siblings(records, first)
    assert [p.kind for p in patients] == ["PATIENT", "PATIENT"]
    counts = []
    for patient in patients:
        (study,) = siblings(records, patient.lower)
        counts.append(sum(len(siblings(records, s.lower)) for s in siblings(records, study.lower)))
    assert counts == [SLICES + 2, 2]
    assert len(FileSet(root / "DICOMDIR")) == SLICES + 2 + 2
