"""A real Orthanc PACS for the tests: its own config, storage, index and ports under a folder.

Orthanc 1.10 listens on all interfaces (it has no bind option), so it gets unusual free
ports; its REST API refuses other hosts (``RemoteAccessAllowed`` false) and is only used on
loopback here. Each instance is a subprocess stopped by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from imagebridge.demo.network import free_port

ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Modality:
    """A remote DICOM node as Orthanc's ``DicomModalities`` names it."""

    ae_title: str
    port: int
    host: str = "127.0.0.1"
    local_ae_title: str | None = None  # Orthanc's calling AE towards it; default its DicomAet

    def config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"AET": self.ae_title, "Host": self.host, "Port": self.port}
        if self.local_ae_title:
            entry["LocalAet"] = self.local_ae_title
        return entry


@dataclass
class Orthanc:
    ae_title: str
    folder: Path
    modalities: Mapping[str, Modality] = field(default_factory=dict)
    http_port: int = 0
    dicom_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def start(self, executable: str = ORTHANC, timeout: float = 30) -> None:
        if self.process is not None:
            raise RuntimeError("Orthanc already started")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [executable, str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=self.folder
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"Orthanc's REST API did not answer on port {self.http_port}")

    def _config(self) -> dict[str, Any]:
        return {
            "Name": f"test {self.ae_title}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: m.config() for name, m in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "DeflatedTransferSyntaxAccepted": True,
            "JpegTransferSyntaxAccepted": True,
            "Jpeg2000TransferSyntaxAccepted": True,
            "JpegLosslessTransferSyntaxAccepted": True,
            "JpipTransferSyntaxAccepted": True,
            "RleTransferSyntaxAccepted": True,
            "UnknownSopClassAccepted": False,
            # Close an SCU association as soon as its job is done, not 5 s later.
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "Plugins": [],
            "OverwriteInstances": False,
        }

    def terminate(self) -> None:
        """Ask Orthanc to stop (SIGTERM) without waiting; :meth:`stop` then waits."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if Orthanc has not stopped within 10 s; safe to call twice."""
        process = self.process
        if process is None:
            return
        self.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def upload(self, paths: list[Path]) -> set[str]:
        """POST each file to /instances; the Orthanc IDs of the studies they belong to."""
        studies: set[str] = set()
        with self.client() as c:
            for path in paths:
                r = c.post("/instances", content=path.read_bytes())
                r.raise_for_status()
                studies.add(str(r.json()["ParentStudy"]))
        return studies

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc ID of the study with this StudyInstanceUID, if it holds it."""
        with self.client() as c:
            r = c.post(
                "/tools/lookup",
                content=study_instance_uid,
                headers={"Content-Type": "text/plain"},
            )
            r.raise_for_status()
            for found in r.json():
                if found["Type"] == "Study":
                    return str(found["ID"])
        return None

    def study_files(self, study_id: str) -> list[bytes]:
        """Each instance of the study as Orthanc stored it (Part 10)."""
        with self.client() as c:
            instances = c.get(f"/studies/{study_id}/instances")
            instances.raise_for_status()
            files: list[bytes] = []
            for instance in instances.json():
                r = c.get(f"/instances/{instance['ID']}/file")
                r.raise_for_status()
                files.append(r.content)
            return files


@contextmanager
def running_orthanc(
    ae_title: str, folder: Path, modalities: Mapping[str, Modality] | None = None
) -> Iterator[Orthanc]:
    orthanc = Orthanc(ae_title, folder, dict(modalities or {}))
    try:
        orthanc.start()
        yield orthanc
    finally:
        orthanc.stop()
