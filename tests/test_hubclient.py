"""The gateway's hub client against a hub that stops mid-answer: a blob stream cut short
between two blobs (http.client ends such a body without an error) must fail as the hub
being unavailable, never pass for a complete download that leaves blobs out."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest

from imagebridge.gateway.hubclient import HubClient, HubUnavailable
from imagebridge.transfers.framing import FRAME_HEADER_SIZE, frame_header


def one_answer_then_close(answer: bytes) -> tuple[int, threading.Thread]:
    """A listener on loopback that reads one request, sends ``answer`` and closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize("cut", ["between blobs", "inside a blob"])
def test_a_blob_stream_cut_short_is_the_hub_unavailable(tmp_path: Path, cut: str) -> None:
    blobs = [bytes([n]) * 1000 for n in range(3)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    frames = [frame_header(d, len(b)) + b for d, b in zip(digests, blobs, strict=True)]
    sent = frames[0] + (frames[1] if cut == "between blobs" else frames[1][:500])
    length = sum(FRAME_HEADER_SIZE + len(b) for b in blobs)  # what the hub announced
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.imagebridge.frames\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    port, server = one_answer_then_close(head.encode() + sent)
    client = HubClient(f"http://127.0.0.1:{port}", "token", timeout=10)
    with pytest.raises(HubUnavailable, match="download interrupted"):
        client.download(digests, tmp_path)
    server.join(5)
    # What arrived whole is kept (checked against its digest); no partial file is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{d}.dcm" for d in digests[: 2 if cut == "between blobs" else 1]
    )
