"""Hostile bodies and parameters for the hub's HTTP edges: STOW-RS multipart bodies, QIDO-RS
searches, the gateways' framed blob stream and uploaded reports."""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import quote

from hypothesis import strategies as st

from imagebridge.dicom.part10 import read_meta, walk
from imagebridge.dicom.reports import minimal_pdf
from imagebridge.transfers.framing import frame_header

# -- DICOM Part 10 files ---------------------------------------------------------------------

EXECUTABLE = b"MZ\x90\x00\x03\x00\x00\x00This program cannot be run in DOS mode.\r\n$"


def with_preamble(data: bytes, preamble: bytes = EXECUTABLE) -> bytes:
    """A Part 10 file carrying ``preamble`` (an executable's header) in its 128 bytes."""
    return preamble.ljust(128, b"\x00")[:128] + data[128:]


@dataclass(frozen=True)
class Part10:
    data: bytes
    sop_instance_uid: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def boundaries(self) -> frozenset[int]:
        """Where its top-level elements end: a cut there leaves a shorter, whole dataset."""
        start = read_meta(io.BytesIO(self.data)).dataset_offset
        return frozenset(end for _, _, _, end in walk(self.data, start, "<", implicit=False))


@dataclass(frozen=True)
class Part:
    """One part of a STOW-RS body and whether the hub should store it."""

    headers: bytes
    body: bytes
    stored: bool
    kind: str


def _damaged_parts(good: Part10) -> dict[str, tuple[bytes, bool]]:
    data = good.data
    meta_length = bytearray(data)
    struct.pack_into("<I", meta_length, 140, 0xFFFFFFF0)
    return {
        "valid": (data, True),
        "executable-preamble": (with_preamble(data), True),  # stored, its preamble zeroed
        "truncated": (data[: len(data) - 100], False),
        "header-only": (data[:200], False),
        "not-part10": (b"\x00" * 128 + b"NOPE" + data[132:], False),
        "huge-meta-length": (bytes(meta_length), False),
        "empty": (b"", False),
    }


@st.composite
def stow_parts(draw: st.DrawFn, files: list[Part10]) -> list[Part]:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        good = draw(st.sampled_from(files))
        kind, (body, stored) = draw(st.sampled_from(sorted(_damaged_parts(good).items())))
        content_type = b"Content-Type: application/dicom\r\n"
        if draw(st.integers(0, 9)) == 0:
            content_type = draw(
                st.sampled_from([b"", b"Content-Type: application/pdf\r\n", b"X-Other: 1\r\n"])
            )
            # Without a Content-Type a part is of the body's `type`; a PDF is not stored.
            stored = stored and b"pdf" not in content_type
            kind += "+wrong-type"
        if draw(st.integers(0, 9)) == 0:
            body = body + draw(st.binary(min_size=1, max_size=32))
            stored = False  # bytes past the dataset's end are no dataset
            kind += "+trailing-noise"
        parts.append(Part(content_type, body, stored, kind))
    return parts


# Boundary characters that need no quoting in a Content-Type parameter.
BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-."


def multipart_body(parts: list[Part], boundary: str) -> bytes:
    b = boundary.encode("latin-1")
    out = b"".join(b"--" + b + b"\r\n" + p.headers + b"\r\n" + p.body + b"\r\n" for p in parts)
    return out + b"--" + b + b"--\r\n"


@dataclass(frozen=True)
class StowRequest:
    content_type: str
    body: bytes
    parts: list[Part]
    # False when the body or its Content-Type was damaged: then only "no 5xx, nothing
    # partial" can be said of the answer, not which parts are stored.
    well_formed: bool
    chunk: int = 65536
    damage: list[str] = field(default_factory=list)


@st.composite
def stow_requests(draw: st.DrawFn, files: list[Part10]) -> StowRequest:
    parts = draw(stow_parts(files))
    boundary = draw(st.text(BCHARS, min_size=20, max_size=40))
    body = multipart_body(parts, boundary)
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    damage: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(
            st.sampled_from(
                [
                    "no-closing",
                    "cut",
                    "noise-after-boundary",
                    "header-without-colon",
                    "long-headers",
                    "content-type",
                    "boundary-param",
                    "flip",
                ]
            )
        )
        damage.append(kind)
        if kind == "no-closing":
            body = body[: body.rfind(b"\r\n--")]
        elif kind == "cut":
            body = body[: draw(st.integers(0, len(body)))]
        elif kind == "noise-after-boundary":
            at = body.find(b"\r\n", 2)
            body = body[:at] + b" junk" + body[at:]
        elif kind == "header-without-colon":
            body = body.replace(b"Content-Type:", b"Content-Type", 1)
        elif kind == "long-headers":
            at = body.find(b"\r\n") + 2
            body = body[:at] + b"X-Long: " + b"a" * 20000 + b"\r\n" + body[at:]
        elif kind == "content-type":
            content_type = draw(
                st.sampled_from(
                    [
                        "multipart/related",
                        "application/dicom",
                        'multipart/related; type="application/pdf"; boundary=' + boundary,
                        "multipart/related; boundary=" + "x" * 80,
                        "multipart/related; boundary=",
                        'multipart/related; boundary="' + boundary,
                        "text/plain; charset=utf-8",
                        "",
                    ]
                )
            )
        elif kind == "boundary-param":
            content_type = f"multipart/related; boundary={boundary}x"
        elif body:
            at = draw(st.integers(0, len(body) - 1))
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
    chunk = draw(st.sampled_from([1, 7, 100, 4096, 65536]))
    if len(body) > 200_000 and chunk < 100:
        chunk = 4096  # a byte at a time through the whole app would take minutes
    return StowRequest(content_type, body, parts, not damage, chunk, damage)


# -- QIDO-RS ----------------------------------------------------------------------------------

QIDO_NAMES = [
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyDate",
    "StudyTime",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "ModalitiesInStudy",
    "Modality",
    "IssuerOfPatientID",
    "00100020",
    "0020000D",
    "00080020",
    "limit",
    "offset",
    "includefield",
    "fuzzymatching",
    "OtherPatientIDsSequence.PatientID",
    "NoSuchKeyword",
    "7FE00010",
    "ZZZZZZZZ",
    "",
]
QIDO_VALUES = st.one_of(
    st.sampled_from(
        [
            "*",
            "?",
            "**",
            "A*B?C",
            "20200101-20201231",
            "-20201231",
            "20200101-",
            "2020-13-45",
            "20201301",
            "1.2.3",
            "1.2.*",
            "1.2.3\\4.5.6",
            "0",
            "-1",
            "99999999999999999999999999",
            "1e9",
            "all",
            "true",
            "maybe",
            "00100010,StudyDate,NoSuch",
            "DOE^JOHN",
            "=?utf-8?",
            "%00",
            "\x00",
            "A" * 70,
            "A" * 5000,
        ]
    ),
    st.text(max_size=80),
)
# Numbers as text: the odd ones ("²" is a digit to str.isdigit, not to int).
NUMBERS = st.sampled_from(
    [
        "0",
        "1",
        "-1",
        "+1",
        " 5",
        "²",
        "٣",
        "1e3",
        "0x10",
        "2147483648",
        "99999999999999999999999",
        "9" * 5000,
        "",
    ]
)
COUNT_NAMES = {"limit", "offset", "quality", "_count"}
QIDO_PATHS = ["/studies", "/series", "/instances", "/studies/{study}/series"]
QIDO_PATHS += ["/studies/{study}/instances", "/studies/{study}/series/{series}/instances"]
QIDO_ACCEPTS = [
    None,
    "application/dicom+json",
    "application/json",
    "*/*",
    "application/dicom+xml",
    "image/png",
    "multipart/related; type=application/dicom",
    "application/dicom+json; q=0",
    ";;;,,,",
    "text/html, */*; q=0.1",
]


@st.composite
def qido_searches(
    draw: st.DrawFn, study: str, series: str
) -> tuple[str, list[tuple[str, str]], str | None]:
    path = draw(st.sampled_from(QIDO_PATHS))
    path = path.format(
        study=draw(st.sampled_from([study, "1.2.3", "*", "not-a-uid", "9" * 70])),
        series=draw(st.sampled_from([series, "1.2.3", "x"])),
    )
    return path, draw(parameters(QIDO_NAMES)), draw(st.sampled_from(QIDO_ACCEPTS))


@st.composite
def parameters(draw: st.DrawFn, names: list[str]) -> list[tuple[str, str]]:
    """Up to five query parameters: known names or noise, each with a value to match."""
    out = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(names) | st.text(max_size=20))
        out.append((name, draw(NUMBERS | QIDO_VALUES if name in COUNT_NAMES else QIDO_VALUES)))
    return out


RETRIEVE_SUFFIXES = [
    "",
    "/metadata",
    "/rendered",
    "/frames/1",
    "/frames/{frames}",
    "/frames/{frames}/rendered",
    "/bulkdata/{bulk}",
    "/thumbnail",
]
RETRIEVE_NAMES = ["window", "quality", "viewport", "annotation", "iccprofile", "charset"]
WINDOWS = st.sampled_from(
    ["40,400,linear", "0,0,sigmoid", "1,1", "a,b,c", "1,1,LINEAR-EXACT", "1e308,1e308,linear"]
)
RETRIEVE_ACCEPTS = [
    *QIDO_ACCEPTS,
    'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/octet-stream"',
    "image/jpeg",
    "image/png; q=0.5, image/gif",
    "image/jp2",
    'multipart/related; type="image/jpeg"',
]


@st.composite
def retrieve_requests(
    draw: st.DrawFn, study: str, series: str, instance: str
) -> tuple[str, list[tuple[str, str]], str | None]:
    """WADO-RS: instance, frames, rendered, metadata and bulk data, with odd parameters."""
    level = draw(st.sampled_from(["study", "series", "instance"]))
    path = {
        "study": f"/studies/{study}",
        "series": f"/studies/{study}/series/{series}",
        "instance": f"/studies/{study}/series/{series}/instances/{instance}",
    }[level]
    if draw(st.integers(0, 4)) == 0:
        path = path.replace(study, draw(st.sampled_from(["1.2.3", "*", "x" * 80, "%00"])))
    suffix = draw(st.sampled_from(RETRIEVE_SUFFIXES)).format(
        frames=draw(st.sampled_from(["1,1", "0", "²", "1,2,3", "", "99999999999999999999", "-1"])),
        bulk=draw(st.sampled_from(["7FE00010", "00100010", "x", "7FE00010/1", "../../etc"])),
    )
    params = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(RETRIEVE_NAMES) | st.text(max_size=12))
        value = draw(
            WINDOWS
            if name == "window"
            else NUMBERS | st.sampled_from(["1,1", "²,²", "4097,1", "0,0", "100,x"])
        )
        params.append((name, value))
    return path + suffix, params, draw(st.sampled_from(RETRIEVE_ACCEPTS))


# -- FHIR (PIXm, PDQm) -------------------------------------------------------------------------

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
FHIR_IDENTIFIERS = st.sampled_from(
    [
        f"{NHS_SYSTEM}|9434765919",
        f"{NHS_SYSTEM}|9434765918",
        f"{NHS_SYSTEM}|",
        "urn:imagebridge:issuer:SEG|A123456",
        "urn:imagebridge:issuer:|x",
        "|",
        "no-bar",
        "http://unknown|1",
        "a|b|c",
    ]
)
FHIR_NAMES = [
    "family",
    "given",
    "birthdate",
    "gender",
    "identifier",
    "_count",
    "_format",
    "sourceIdentifier",
    "targetSystem",
    "name",
]


@st.composite
def fhir_requests(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    path = draw(
        st.sampled_from(["/fhir/Patient", "/fhir/Patient/$ihe-pix", "/fhir/Patient/{id}"])
    ).format(id=quote(draw(NUMBERS | st.text(max_size=10)), safe=""))
    params = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(FHIR_NAMES) | st.text(max_size=10))
        if name in ("identifier", "sourceIdentifier", "targetSystem"):
            value = draw(FHIR_IDENTIFIERS | st.text(max_size=40))
        elif name == "birthdate":
            value = draw(
                st.sampled_from(["1970", "ge1970-01", "lt1970-01-01", "eq1970-13-40", "xx1970"])
                | st.text(max_size=12)
            )
        elif name == "_count":
            value = draw(NUMBERS)
        else:
            value = draw(QIDO_VALUES)
        params.append((name, value))
    return path, params


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def fhir_patients(draw: st.DrawFn) -> object:
    """Bodies for a PIXm feed: a Patient resource with parts wrong, or any JSON at all."""
    patient: dict[str, object] = {
        "resourceType": "Patient",
        "identifier": [{"system": NHS_SYSTEM, "value": "9434765919"}],
        "name": [{"family": "DOE", "given": ["ALICE"]}],
        "birthDate": "1970-01-01",
        "gender": "female",
    }
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*patient, "extra"]))
        patient[key] = draw(JSON)
    return draw(st.just(patient) | JSON)


# -- the gateways' framed blob stream ---------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    raw: bytes
    sha256: str
    accepted: bool  # the hub accepts it (None of the kinds below is refused by chance)
    kind: str


@st.composite
def frame_streams(draw: st.DrawFn, files: list[Part10], held: Part10) -> tuple[bytes, list[Frame]]:
    """A batch of frames, each sound or damaged; the stream as sent, and what each was."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 5))):
        good = draw(st.sampled_from(files))
        kind = draw(
            st.sampled_from(
                [
                    "valid",
                    "held-reference",
                    "unknown-reference",
                    "wrong-digest",
                    "truncated",
                    "noise",
                    "executable-preamble",
                ]
            )
        )
        if kind == "valid":
            frame = Frame(
                frame_header(good.sha256, len(good.data)) + good.data, good.sha256, True, kind
            )
        elif kind == "held-reference":
            frame = Frame(frame_header(held.sha256, 0), held.sha256, True, kind)
        elif kind == "unknown-reference":
            sha = hashlib.sha256(draw(st.binary(min_size=8, max_size=8))).hexdigest()
            frame = Frame(frame_header(sha, 0), sha, False, kind)
        elif kind == "wrong-digest":
            sha = hashlib.sha256(b"other" + good.data).hexdigest()
            frame = Frame(frame_header(sha, len(good.data)) + good.data, sha, False, kind)
        elif kind == "truncated":
            # Cut inside an element: cut between two, a dataset is only shorter, and nothing
            # in it can tell (a PACS that sends an image without its pixel data is not hostile
            # input but a broken PACS).
            inside = sorted(set(range(len(good.data))) - good.boundaries)
            at = draw(st.sampled_from(inside))
            cut = good.data[:at]
            sha = hashlib.sha256(cut).hexdigest()
            frame = Frame(frame_header(sha, len(cut)) + cut, sha, False, kind)
        elif kind == "noise":
            noise = draw(st.binary(min_size=1, max_size=300))
            sha = hashlib.sha256(noise).hexdigest()
            frame = Frame(frame_header(sha, len(noise)) + noise, sha, False, kind)
        else:
            data = with_preamble(good.data)
            sha = hashlib.sha256(data).hexdigest()
            frame = Frame(frame_header(sha, len(data)) + data, sha, False, kind)
        frames.append(frame)
    return b"".join(f.raw for f in frames), frames


@st.composite
def broken_frame_streams(draw: st.DrawFn, files: list[Part10]) -> bytes:
    """Streams that are not well-formed framing at all: refused whole."""
    good = draw(st.sampled_from(files))
    sound = frame_header(good.sha256, len(good.data)) + good.data
    kind = draw(st.sampled_from(["short-header", "cut-blob", "trailing", "huge-length", "noise"]))
    if kind == "short-header":
        return sound[: draw(st.integers(1, 39))]
    if kind == "cut-blob":
        return sound[: draw(st.integers(41, len(sound) - 1))]
    if kind == "trailing":
        return sound + draw(st.binary(min_size=1, max_size=39))
    if kind == "huge-length":
        length = draw(st.integers(5 * 1024**3, 2**64 - 1))
        return frame_header(good.sha256, length) + good.data[:1000]
    return draw(st.binary(min_size=1, max_size=2000))


# -- reports ----------------------------------------------------------------------------------

REPORT_TYPES = [
    "application/pdf",
    "text/plain",
    "text/plain; charset=utf-8",
    "APPLICATION/PDF",
    "application/octet-stream",
    "image/png",
    "",
    "multipart/related",
]


@st.composite
def reports(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    kind = draw(
        st.sampled_from(
            ["pdf", "pdf-head", "text", "noise", "utf8-bad", "nul", "empty", "huge-title"]
        )
    )
    params: dict[str, str] = {}
    if kind == "pdf":
        body = minimal_pdf([draw(st.text(max_size=40))])
    elif kind == "pdf-head":
        body = b"%PDF-" + draw(st.binary(max_size=200))
    elif kind == "text":
        body = draw(st.text(min_size=1, max_size=200)).encode("utf-8")
    elif kind == "noise":
        body = draw(st.binary(min_size=1, max_size=300))
    elif kind == "utf8-bad":
        body = b"report \xff\xfe\xc3\x28"
    elif kind == "nul":
        body = b"a report\x00with a NUL"
    elif kind == "empty":
        body = b""
    else:
        body = b"a report"
        params["title"] = "T" * draw(st.integers(60, 300))
    if draw(st.booleans()):
        params["study_instance_uid"] = draw(st.sampled_from(["1.2.3", "x" * 70, "", "*"]))
    if draw(st.booleans()):
        params.setdefault("title", draw(st.text(max_size=70)))
    return draw(st.sampled_from(REPORT_TYPES)), body, params
