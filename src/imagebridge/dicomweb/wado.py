"""WADO-RS (PS3.18 10.4): retrieving studies, series and instances the caller may see.

What is sent is settled before the first byte goes out (which instances, in which syntax,
or 406), so a refusal is always a clean HTTP answer; then the stored files are streamed
from the blob store a chunk at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.audit.services import record
from imagebridge.counts import whole_number
from imagebridge.dicomweb import dicomjson, pixels
from imagebridge.dicomweb.media import (
    DICOM,
    OCTET_STREAM,
    Choice,
    MediaRange,
    choose_frames,
    choose_instance,
    part_ranges,
)
from imagebridge.dicomweb.rendering import Rendering, render
from imagebridge.index.query import Located, locate
from imagebridge.index.visibility import scope_of
from imagebridge.storage.blobs import BlobStore

CHUNK = 1024 * 1024
PREAMBLE_BYTES = 128
NOT_FOUND = "no such {}, or not one you may see"
AVAILABLE_TRANSFER_SYNTAX = "00083002"


class NotFound(LookupError):
    """Absent, or outside what the caller may see: the two answer alike."""


class NotAcceptable(ValueError):
    """Nothing the client accepts can be produced, with the reason."""


@dataclass(frozen=True)
class Target:
    """What a retrieve names: a study, or a series or instance of it."""

    study: str
    series: str | None = None
    instance: str | None = None

    @property
    def level(self) -> str:
        return "instance" if self.instance else "series" if self.series else "study"

    def url(self, base_url: str) -> str:
        url = f"{base_url}/studies/{self.study}"
        if self.series:
            url += f"/series/{self.series}"
        if self.instance:
            url += f"/instances/{self.instance}"
        return url


def resolve(session: Session, actor: Actor, target: Target, resource: str) -> list[Located]:
    """The instances the target names that the caller may see, audited as retrieved."""
    found = locate(session, scope_of(session, actor), target.study, target.series, target.instance)
    if not found:
        raise NotFound(NOT_FOUND.format(target.level))
    record(
        session,
        f"dicomweb:{target.level}:retrieved",
        institution_id=actor.institution_id,
        patient_ref=found[0].patient_id,
        study_ref=target.study,
        detail={
            "resource": resource,
            "instances": len(found),
            "bytes": sum(i.size for i in found),
            "series": sorted({i.series_instance_uid for i in found})[:100],
            "source_institutions": sorted({i.institution_id for i in found}),
        },
        **actor.audit(),
    )
    return found


def plan_instances(found: list[Located], ranges: list[MediaRange]) -> list[tuple[Located, Choice]]:
    """Each instance with the syntax it goes in; NotAcceptable if one cannot go in any the
    client accepts."""
    planned = []
    for item in found:
        syntax = item.transfer_syntax_uid
        choice = choose_instance(ranges, syntax, pixels.can_convert(syntax))
        if choice is None:
            raise NotAcceptable(
                f"an instance is stored in {syntax}, which the Accept header does not allow "
                "and which cannot be converted to one it does"
            )
        planned.append((item, choice))
    return planned


def instance_parts(
    blobs: BlobStore, planned: list[tuple[Located, Choice]]
) -> Iterator[tuple[str, Iterable[bytes]]]:
    for item, choice in planned:
        media = f"{DICOM}; transfer-syntax={choice.transfer_syntax_uid}"
        if choice.as_stored:
            yield media, _chunks(blobs, item.blob_sha256)
        else:
            with blobs.open(item.blob_sha256) as fp:
                yield media, [pixels.to_explicit_little_endian(fp)]


def _chunks(blobs: BlobStore, sha256: str) -> Iterator[bytes]:
    with blobs.open(sha256) as fp:
        # The preamble goes out as zeros whatever is stored: the hub refuses any other,
        # but a blob stored before it did must not pass on what a sender hid there.
        chunk = fp.read(CHUNK)
        chunk = bytes(min(len(chunk), PREAMBLE_BYTES)) + chunk[PREAMBLE_BYTES:]
        while chunk:
            yield chunk
            chunk = fp.read(CHUNK)


def metadata(blobs: BlobStore, found: list[Located], base_url: str) -> Iterator[bytes]:
    """A JSON array of each instance's metadata, written one instance at a time."""
    yield b"["
    for n, item in enumerate(found):
        instance_url = Target(
            item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid
        ).url(base_url)
        with blobs.open(item.blob_sha256) as fp:
            ds = pixels.read_dataset(fp, item.transfer_syntax_uid)
            attributes = dicomjson.dataset_json(ds, _bulk_uri(instance_url))
        attributes[AVAILABLE_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [item.transfer_syntax_uid]}
        yield (b"," if n else b"") + json.dumps(dict(sorted(attributes.items()))).encode()
    yield b"]"


def _bulk_uri(instance_url: str) -> dicomjson.BulkDataURI:
    def uri(path: str) -> str:
        return f"{instance_url}/bulkdata/{path}"

    return uri


def parse_frame_list(value: str) -> list[int]:
    numbers = [whole_number(p.strip(), 1) for p in value.split(",")]
    if not all(numbers):
        raise ValueError("frames are a comma-separated list of numbers from 1")
    if len(numbers) > 10000:
        raise ValueError("at most 10000 frames at once")
    return [n for n in numbers if n]


def frame_parts(
    blobs: BlobStore, item: Located, numbers: list[int] | None, ranges: list[MediaRange]
) -> tuple[str, list[bytes]]:
    """The frames (all of them if ``numbers`` is None) and their media type."""
    syntax = item.transfer_syntax_uid
    choice = choose_frames(ranges, syntax, pixels.can_decode(syntax))
    if choice is None:
        raise NotAcceptable(
            f"the frames are stored in {syntax}, which the Accept header does not allow "
            "and which cannot be decoded to one it does"
        )
    with blobs.open(item.blob_sha256) as fp:
        if numbers is None:
            numbers = list(range(1, _frame_count(fp, syntax) + 1))
        data = pixels.frames(fp, syntax, numbers, decode=not choice.as_stored)
    return f"{choice.media_type}; transfer-syntax={choice.transfer_syntax_uid}", data


def _frame_count(fp: BinaryIO, syntax: str) -> int:
    ds = pixels.read_dataset(fp, syntax)
    if pixels.PIXEL_DATA not in ds:
        raise pixels.FrameNotFound("the instance has no pixel data")
    return pixels.number_of_frames(ds)


def bulkdata(
    blobs: BlobStore, item: Located, path: str, ranges: list[MediaRange]
) -> tuple[str, list[bytes]]:
    """The value a BulkDataURI of the metadata names. Pixel data goes as its frames."""
    if path.strip("/").upper() == f"{pixels.PIXEL_DATA:08X}":
        return frame_parts(blobs, item, None, ranges)
    if not any(r.matches(OCTET_STREAM) for r in part_ranges(ranges, OCTET_STREAM)):
        raise NotAcceptable(f"bulk data is sent as {OCTET_STREAM}")
    with blobs.open(item.blob_sha256) as fp:
        ds = pixels.read_dataset(fp, item.transfer_syntax_uid)
        try:
            element = dicomjson.element_at(ds, path)
        except (KeyError, IndexError, ValueError) as exc:
            raise NotFound("no such bulk data in this instance") from exc
        value: Any = element.value
    if not isinstance(value, bytes):
        raise NotFound("no such bulk data in this instance")
    return OCTET_STREAM, [value]


def rendered(blobs: BlobStore, item: Located, frame: int, how: Rendering) -> bytes:
    with blobs.open(item.blob_sha256) as fp:
        header = pixels.read_dataset(fp, item.transfer_syntax_uid)
        return render(fp, header, frame, how)
