"""The parsers at the edges, on their own and with many more cases than the servers can take:
the gateways' blob framing, multipart bodies, and the settings files.

Each either gives back exactly what was sent or refuses with its own error type and a
reason; no other exception escapes.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.config_inputs import GATEWAY_KEYS, HUB_KEYS, settings_documents, toml_document
from fuzz.figures import budget, input_path
from imagebridge.dicomweb.multipart import (
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    write_parts,
)
from imagebridge.settings import GatewaySettings, HubSettings, SettingsError
from imagebridge.transfers.framing import (
    FrameData,
    FrameDecoder,
    FrameEnd,
    FrameStart,
    FramingError,
    frame_header,
)

LIMIT = 1 << 16


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def decode(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    """(digest, bytes) of each frame, or FramingError."""
    decoder = FrameDecoder(LIMIT)
    blobs: list[tuple[str, bytes]] = []
    current = b""
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if isinstance(event, FrameStart):
                assert event.length <= LIMIT
                current = b""
            elif isinstance(event, FrameData):
                current += bytes(event.data)
            elif isinstance(event, FrameEnd):
                blobs.append((event.sha256, current))
    decoder.close()
    return blobs


# -- framing -------------------------------------------------------------------------------------


@budget(500)
@given(
    blobs=st.lists(st.binary(max_size=300), max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
@input_path("framing: sound streams, any chunking")
def test_frames_come_back_whole_however_the_stream_is_cut(
    blobs: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame_header(hashlib.sha256(b).hexdigest(), len(b)) + b for b in blobs)
    decoded = decode(split(stream, cuts))
    # An empty blob is a reference frame: its digest, no bytes.
    assert decoded == [(hashlib.sha256(b).hexdigest(), b) for b in blobs]


@budget(500)
@given(
    stream=st.binary(max_size=400)
    | st.builds(
        lambda length, tail: frame_header("ab" * 32, length) + tail,
        st.integers(0, 2**64 - 1),
        st.binary(max_size=100),
    ),
    cuts=st.lists(st.integers(0, 1000), max_size=6),
)
@input_path("framing: hostile streams")
def test_hostile_streams_are_decoded_or_refused_as_malformed(
    stream: bytes, cuts: list[int]
) -> None:
    try:
        frames = decode(split(stream, cuts))
    except FramingError as exc:
        assert str(exc)
        return
    assert sum(40 + len(b) for _, b in frames) == len(stream)


# -- multipart -----------------------------------------------------------------------------------


def read_multipart(boundary: str, chunks: list[bytes]) -> list[tuple[dict[str, str], bytes]]:
    reader = MultipartReader(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks:
        for event in reader.feed(chunk):
            if isinstance(event, PartStart):
                parts.append((event.headers, b""))
            elif isinstance(event, PartData):
                parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
            else:
                assert isinstance(event, PartEnd)
    reader.close()
    return parts


@budget(400)
@given(
    bodies=st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
@input_path("multipart: sound bodies, any chunking")
def test_multipart_parts_come_back_whole(bodies: list[bytes], cuts: list[int]) -> None:
    boundary = "ib-" + hashlib.sha256(b"".join(bodies)).hexdigest()[:24]
    body = b"".join(write_parts([("application/dicom", [b]) for b in bodies], boundary))
    parts = read_multipart(boundary, split(body, cuts))
    assert [b for _, b in parts] == bodies
    assert all(h == {"content-type": "application/dicom"} for h, _ in parts)


@budget(400)
@given(
    boundary=st.text(max_size=80),
    body=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 1000), max_size=6),
)
@input_path("multipart: hostile bodies")
def test_hostile_multipart_bodies_are_read_or_refused(
    boundary: str, body: bytes, cuts: list[int]
) -> None:
    try:
        read_multipart(boundary, split(body, cuts))
    except MultipartError as exc:
        assert str(exc)
    except UnicodeEncodeError:
        # A boundary the HTTP header could never have carried (not Latin-1).
        assert any(ord(c) > 255 for c in boundary)


# -- settings files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "keys"),
    [(HubSettings, HUB_KEYS), (GatewaySettings, GATEWAY_KEYS)],
    ids=["hub", "gateway"],
)
@budget(300)
@given(data=st.data())
@input_path("TOML: settings files")
def test_settings_load_or_say_what_is_wrong(
    tmp_path: Path, kind: type[HubSettings | GatewaySettings], keys: list[str], data: st.DataObject
) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(data.draw(settings_documents(keys)))
    try:
        settings = kind.load(path)
    except SettingsError as exc:
        assert str(exc).startswith(str(path))
        return
    assert isinstance(settings, kind)


def test_a_refusal_names_the_setting_but_never_its_value(tmp_path: Path) -> None:
    """A value may be a secret: the reason names where it is wrong, not what it is."""
    secret = "s3cr3t-canary-0123456789"
    path = tmp_path / "hub.toml"
    path.write_text(
        toml_document({"admin_token": [secret], "blob_store": {"secret_access_key": 5}})
    )
    with pytest.raises(SettingsError) as caught:
        HubSettings.load(path)
    message = str(caught.value)
    assert "admin_token" in message and "blob_store.secret_access_key" in message
    assert secret not in message


def test_a_bad_environment_variable_is_refused_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEBRIDGE_GATEWAY_PORT", "eleven thousand")
    with pytest.raises(SettingsError, match="port"):
        GatewaySettings.load(None)
    monkeypatch.delenv("IMAGEBRIDGE_GATEWAY_PORT")
    monkeypatch.setenv("IMAGEBRIDGE_HUB_BLOB_STORE", "{not json")
    with pytest.raises(SettingsError):
        HubSettings.load(None)


@pytest.mark.parametrize("command", ["hub", "gateway"])
@pytest.mark.parametrize(
    "document",
    [b"port = \xff\n", b"port = 'eleven'\n", b"data_dir = 5\n", b"[[calling_aes]]\nx = 1\n"],
    ids=["not-utf8", "wrong-type", "path-not-string", "bad-table"],
)
@input_path("TOML: the command line")
def test_the_command_stops_with_the_reason_not_a_traceback(
    tmp_path: Path, command: str, document: bytes
) -> None:
    path = tmp_path / f"{command}.toml"
    path.write_bytes(document)
    result = subprocess.run(
        [sys.executable, "-m", "imagebridge", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"Error: {path}"), result.stderr
    assert "Traceback" not in result.stderr
