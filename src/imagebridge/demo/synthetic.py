"""Synthetic CT studies for the demo, the tests and the benchmark.

The pixels look like a chest CT (body, fat rim, lungs, heart, spine, table, noise) so that
viewers show something plausible and compressors see realistic data, but no real patient
is involved. The phantom is computed once; each slice only thresholds precomputed distance
fields and takes a shifted window of one noise field, so 300 slices of 512x512 take seconds.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from imagebridge.dicom.reports import to_part10

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FIELD_OF_VIEW_MM = 400.0
SLICE_SPACING_MM = 1.0
INTERCEPT = -1024  # stored value = HU + 1024

# Hounsfield units of the phantom's tissues.
AIR, LUNG, FAT, SOFT, BLOOD, VERTEBRA, DISC, CORTEX, TABLE = (
    -1000,
    -850,
    -100,
    40,
    60,
    350,
    80,
    900,
    200,
)

Float = npt.NDArray[np.float32]
Int16 = npt.NDArray[np.int16]


@dataclass(frozen=True)
class StudyFiles:
    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]
    total_bytes: int


def generate_ct_study(
    out_dir: Path,
    *,
    slices: int = 300,
    rows: int = 512,
    columns: int = 512,
    patient_id: str = "A123456",
    patient_name: str = "DEMO^ALICE",
    birth_date: str = "19700101",
    sex: str = "F",
    nhs_number: str | None = "9434765919",
    nhs_issuer: str = "NHS",
    issuer_of_patient_id: str = "",
    accession_number: str = "ACC0001",
    study_description: str = "CT CHEST",
    study_date: str | None = None,
    seed: int = 0,
) -> StudyFiles:
    """Write one axial CT series of ``slices`` files named ``CT0001.dcm``... to ``out_dir``.

    UIDs are new on every call (a new scan); ``seed`` fixes only the pixels.
    """
    if slices < 1:
        raise ValueError("a study needs at least one slice")
    if rows < 16 or columns < 16:
        raise ValueError("rows and columns must be at least 16")
    out_dir.mkdir(parents=True, exist_ok=True)
    phantom = _Phantom(rows, columns, seed)
    header = _series_header(
        rows=rows,
        columns=columns,
        patient_id=patient_id,
        patient_name=patient_name,
        birth_date=birth_date,
        sex=sex,
        nhs_number=nhs_number,
        nhs_issuer=nhs_issuer,
        issuer_of_patient_id=issuer_of_patient_id,
        accession_number=accession_number,
        study_description=study_description,
        study_date=study_date,
    )
    spacing = FIELD_OF_VIEW_MM / columns
    x0 = -FIELD_OF_VIEW_MM / 2 + spacing / 2
    y0 = -(rows * spacing) / 2 + spacing / 2
    paths: list[Path] = []
    total = 0
    for index in range(slices):
        z = -index * SLICE_SPACING_MM  # head first: each slice further towards the feet
        # The same header object is reused: only these attributes change per slice.
        header.SOPInstanceUID = generate_uid()
        header.InstanceNumber = index + 1
        header.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        header.SliceLocation = _ds(z)
        header.PixelData = phantom.slice(index / max(slices - 1, 1), index).tobytes()
        data = to_part10(header)
        path = out_dir / f"CT{index + 1:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
        total += len(data)
    return StudyFiles(
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        paths=paths,
        total_bytes=total,
    )


def _series_header(
    *,
    rows: int,
    columns: int,
    patient_id: str,
    patient_name: str,
    birth_date: str,
    sex: str,
    nhs_number: str | None,
    nhs_issuer: str,
    issuer_of_patient_id: str,
    accession_number: str,
    study_description: str,
    study_date: str | None = None,
) -> Dataset:
    now = dt.datetime.now()
    date, time = study_date or now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    spacing = _ds(FIELD_OF_VIEW_MM / columns)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # demo names may be non-ASCII
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "ImageBridge synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = "Synthetic chest phantom"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer_of_patient_id:
        ds.IssuerOfPatientID = issuer_of_patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    if nhs_number is not None:
        # How the NHS number travels beside a hospital's local ID (DESIGN.md, Standards).
        other = Dataset()
        other.PatientID = nhs_number
        other.IssuerOfPatientID = nhs_issuer
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([other])
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(SLICE_SPACING_MM)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"  # soft-tissue window
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = b""
    # Explicit VR needs the VR; an empty PixelData would otherwise be guessed as OB.
    ds["PixelData"].VR = "OW"
    return ds


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) without float noise like 0.30000000000000004."""
    return f"{value:.6g}"


class _Phantom:
    """Precomputed distance fields of a chest, thresholded cheaply per slice."""

    def __init__(self, rows: int, columns: int, seed: int) -> None:
        # Coordinates in [-1, 1] across the square field of view, y down (anterior at top).
        y = np.linspace(-rows / columns, rows / columns, rows, dtype=np.float32)[:, None]
        x = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
        self.body = _ellipse(x, y, 0.0, 0.0, 0.85, 0.62)
        self.lungs = np.minimum(
            _ellipse(x, y, -0.36, -0.04, 0.26, 0.40), _ellipse(x, y, 0.36, -0.04, 0.26, 0.40)
        )
        self.heart = _ellipse(x, y, 0.08, 0.02, 0.22, 0.20)
        self.spine = _ellipse(x, y, 0.0, 0.42, 0.10, 0.09)
        # The scanner table under the patient.
        self.table = (y > 0.68) & (y < 0.73) & (np.abs(x) < 0.9)
        self.rows, self.columns = rows, columns
        rng = np.random.default_rng(seed)
        # Pulmonary vessels: small blobs, each labelled, each visible over its own z range.
        self.vessels = np.full((rows, columns), -1, dtype=np.int16)
        count = 60
        for label in range(count):
            cx = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.55)
            r = rng.uniform(0.012, 0.03)
            blob = _ellipse(x, y, cx, rng.uniform(-0.4, 0.3), r, r) <= 1.0
            self.vessels[blob] = label
        self.vessel_phase = rng.uniform(0.0, 1.0, count)
        # One noise field larger than a slice; each slice reads a different window of it.
        self.pad = 32
        self.noise = rng.normal(0.0, 12.0, (rows + self.pad, columns + self.pad)).astype(np.int16)

    def slice(self, t: float, index: int) -> Int16:
        """Stored values (HU - intercept) at fraction ``t`` from the top of the chest."""
        hu = np.full((self.rows, self.columns), AIR, dtype=np.int16)
        hu[self.table] = TABLE
        hu[self.body <= 1.0] = FAT
        hu[self.body <= 0.86] = SOFT  # inner body: leaves a fat rim under the skin
        # Lungs grow from the apex, are widest mid-chest, shrink towards the diaphragm.
        lung_scale = 0.35 + 0.65 * math.sin(math.pi * min(max(t, 0.0), 1.0)) ** 0.5
        lungs = self.lungs <= lung_scale**2
        hu[lungs] = LUNG
        # A vessel shows where it crosses this slice: a lookup per label, not per pixel.
        visible = np.append(np.abs(self.vessel_phase - t) < 0.15, False)
        hu[lungs & visible[self.vessels]] = BLOOD
        if 0.35 < t < 0.8:
            hu[self.heart <= 1.0] = BLOOD
        # Vertebrae alternate with discs every 25 mm or so.
        spine = self.spine <= 1.0
        hu[spine] = DISC if (index * SLICE_SPACING_MM) % 25 > 21 else VERTEBRA
        hu[spine & (self.spine > 0.7)] = CORTEX
        dy, dx = (index * 7) % self.pad, (index * 13) % self.pad
        hu += self.noise[dy : dy + self.rows, dx : dx + self.columns]
        stored: Int16 = (hu - INTERCEPT).astype("<i2")
        return stored


def _ellipse(x: Float, y: Float, cx: float, cy: float, rx: float, ry: float) -> Float:
    """Squared normalised distance from an ellipse's centre: <= 1 inside."""
    result: Float = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return result
