"""Media types and the Accept header: what a DICOMweb client may be answered with (PS3.18 8.7).

An Accept header lists media ranges; a multipart range names the type of its parts and may
name a transfer syntax (`multipart/related; type="application/dicom"; transfer-syntax=*`).
Each resource picks from them what it can produce, or answers 406.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
JPEG = "image/jpeg"
PNG = "image/png"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
ANY_SYNTAX = "*"
# Syntaxes whose uncompressed frames are already in the bytes: served as octet-stream.
NATIVE_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
)
# PS3.18 Table 8.7.3-5: the media type of a frame in each compressed syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": JPEG,
    "1.2.840.10008.1.2.4.51": JPEG,
    "1.2.840.10008.1.2.4.57": JPEG,
    "1.2.840.10008.1.2.4.70": JPEG,
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
}
# Other names clients use for the same types.
ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
# Syntaxes that may hold lossy data: PS3.18 lets the server send these as stored even when
# the default (uncompressed) syntax was asked for, since decompressing restores nothing.
LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.203",
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 107)),
    }
)


class BadAccept(ValueError):
    """An Accept header that cannot be parsed."""


@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, media_type: str) -> bool:
        """Whether this range (e.g. `image/*`) covers a concrete media type."""
        wanted = ALIASES.get(self.type, self.type)
        if wanted == "*/*":
            return True
        if wanted.endswith("/*"):
            return media_type.startswith(wanted[:-1])
        return wanted == media_type

    @property
    def is_multipart(self) -> bool:
        return self.type in (MULTIPART, "multipart/*")


def _split(text: str, separator: str) -> list[str]:
    """Split on a separator outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise BadAccept("unbalanced quotes in the Accept header")
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first; none given means `*/*`."""
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[tuple[float, int, MediaRange]] = []
    for position, item in enumerate(_split(header, ",")):
        if not item.strip():
            continue
        media_type, *raw_params = (p.strip() for p in _split(item, ";"))
        if media_type.count("/") != 1:
            raise BadAccept(f"not a media range: {media_type[:60]}")
        params: dict[str, str] = {}
        for raw in raw_params:
            name, sep, value = raw.partition("=")
            if not sep:
                continue
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError as exc:
            raise BadAccept("a q value is a number from 0 to 1") from exc
        if q > 0:
            ranges.append((q, position, MediaRange(media_type.lower(), params)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (-t[0], t[1]))]


def accepts(ranges: list[MediaRange], *media_types: str) -> bool:
    return any(r.matches(m) for r in ranges for m in media_types)


def part_ranges(ranges: list[MediaRange], default_type: str) -> list[MediaRange]:
    """The acceptable types of the parts of a multipart answer, as media ranges that keep
    their transfer-syntax; `*/*` alone accepts a part of any type, in any syntax."""
    out = []
    for r in ranges:
        if r.is_multipart:
            out.append(MediaRange(r.params.get("type", default_type).lower(), r.params))
        elif r.type == "*/*":
            out.append(MediaRange("*/*", {"transfer-syntax": ANY_SYNTAX}))
    return out


def frame_media_type(transfer_syntax_uid: str) -> str:
    if transfer_syntax_uid in NATIVE_SYNTAXES:
        return OCTET_STREAM
    return FRAME_MEDIA_TYPES.get(transfer_syntax_uid, OCTET_STREAM)


@dataclass(frozen=True)
class Choice:
    """What to send for one stored object: its media type and syntax, and whether it is
    sent as stored or converted first."""

    media_type: str
    transfer_syntax_uid: str
    as_stored: bool


def choose_instance(ranges: list[MediaRange], stored: str, convertible: bool) -> Choice | None:
    """For `application/dicom` parts: the stored bytes when their syntax is acceptable;
    otherwise Explicit VR Little Endian, the default, by conversion."""
    wanted = [r for r in part_ranges(ranges, DICOM) if r.matches(DICOM)]
    syntaxes = [r.params.get("transfer-syntax") for r in wanted]
    if any(s in (ANY_SYNTAX, stored) for s in syntaxes):
        return Choice(DICOM, stored, True)
    if None in syntaxes and (stored in LOSSY_SYNTAXES or stored == EXPLICIT_VR_LITTLE_ENDIAN):
        return Choice(DICOM, stored, True)
    if (None in syntaxes or EXPLICIT_VR_LITTLE_ENDIAN in syntaxes) and convertible:
        return Choice(DICOM, EXPLICIT_VR_LITTLE_ENDIAN, False)
    return None


def choose_frames(ranges: list[MediaRange], stored: str, decodable: bool) -> Choice | None:
    """For frames and bulk data: the stored encoding when acceptable, else the frames
    decoded into `application/octet-stream`."""
    # Big-endian frames are not what octet-stream means: they go decoded (byte-swapped).
    stored_type = "" if stored == BIG_ENDIAN else frame_media_type(stored)
    for r in part_ranges(ranges, OCTET_STREAM):
        syntax = r.params.get("transfer-syntax")
        if stored_type and r.matches(stored_type) and syntax in (None, ANY_SYNTAX, stored):
            return Choice(stored_type, stored, True)
        native_ok = syntax in (None, ANY_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN)
        if r.matches(OCTET_STREAM) and native_ok and decodable:
            return Choice(OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, False)
    return None


def choose_rendered(ranges: list[MediaRange]) -> str | None:
    """JPEG unless the client prefers PNG."""
    for r in ranges:
        for media_type in (JPEG, PNG):
            if r.matches(media_type):
                return media_type
    return None
