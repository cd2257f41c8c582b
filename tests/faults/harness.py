"""Fault injection: a study crosses a whole network on loopback while its processes are killed.

A trial sends one CT study from a sending PACS through gateway A, the hub and gateway B into a
receiving PACS, while a killer thread SIGKILLs the sending gateway, the hub, the receiving
gateway (and the worker, where the hub has one) at random moments and starts each again with
the same folder, port and token. The sending PACS keeps the contract of a real one: every
instance not answered with success is sent again, in a new association.

After every trial the suite checks what a PACS manager would: every transfer of the study is
delivered with as many instances confirmed as were declared; the receiving PACS holds each
expected instance, by SOP Instance UID, with the pixel data that was sent, filed under the
reconciled patient; the hub's blob store holds only whole blobs, each referenced; the sending
gateway's spool is empty; and the audit trail verifies.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from alembic import command
from pydicom import dcmread
from pynetdicom import evt
from sqlalchemy import text

from imagebridge.db import make_engine
from imagebridge.demo.network import Network, free_port, stop_process
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import CT_IMAGE_STORAGE, StudyFiles, generate_ct_study
from imagebridge.dicom.store_scu import (
    FileToSend,
    Node,
    NodeUnavailable,
    StoreResult,
    store_files,
)
from imagebridge.migrate import alembic_config
from imagebridge.storage.blobs import is_digest

EXPLICIT_LE = "1.2.840.10008.1.2.1"
SENDER_AE = "PACS_SEG"
RECEIVER_AE = "PACS_RVH"
NHS_NUMBER = "9434765919"
MRN_AT_RECEIVER = "RVH0042"  # what the receiving gateway files the patient under
# Short windows and retries, so that a trial takes seconds; the logic is the product's.
GATEWAY_SETTINGS: dict[str, Any] = {
    "study_stable_seconds": 0.5,
    "retry_initial_seconds": 0.2,
    "retry_max_seconds": 1.0,
}
HUB_SETTINGS: dict[str, Any] = {"inbox_wait_seconds": 1.0}
PROCESSES = ("gateway A", "hub", "gateway B", "worker")
# How a process is stopped: SIGKILL; SIGTERM; for the hub, SIGTERM and a schema upgrade.
Stop = Literal["kill", "term", "upgrade"]
# A process sent SIGTERM finishes or hands back its work within this (the tools' own wait).
STOP_SECONDS = 30.0


class CountingPacs(MiniPacs):
    """The receiving PACS: stores by SOP Instance UID, and counts every C-STORE it answers
    with success, so that an instance sent twice shows even though it is stored once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c_stores: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def _on_c_store(self, event: evt.Event) -> int:
        status = super()._on_c_store(event)
        if status == 0:
            with self._count_lock:
                self.c_stores[str(event.request.AffectedSOPInstanceUID)] += 1
        return status


@dataclass
class Figures:
    trials: int = 0
    instances: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    misfiled: int = 0
    corrupted: int = 0
    resent_c_stores: int = 0
    sender_resends: int = 0
    transfers: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stop_seconds: float = 0.0  # the longest a process took to end after SIGTERM

    def add(self, other: Figures) -> None:
        self.trials += other.trials
        self.instances += other.instances
        self.kills.update(other.kills)
        for name in (
            "lost",
            "duplicated",
            "misfiled",
            "corrupted",
            "resent_c_stores",
            "sender_resends",
            "transfers",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems += other.problems
        self.seconds += other.seconds
        self.stop_seconds = max(self.stop_seconds, other.stop_seconds)

    @property
    def ok(self) -> bool:
        return not self.problems and not (
            self.lost or self.duplicated or self.misfiled or self.corrupted
        )

    def summary(self) -> str:
        kills = ", ".join(f"{name} {self.kills[name]}" for name in PROCESSES if self.kills[name])
        lines = [
            f"trials             {self.trials} ({self.instances} instances, {self.seconds:.0f} s)",
            f"kills              {sum(self.kills.values())} ({kills or 'none'})",
            f"instances lost     {self.lost}",
            f"duplicated         {self.duplicated}",
            f"mis-filed          {self.misfiled}",
            f"corrupted          {self.corrupted}",
            f"transfers          {self.transfers}",
            f"re-sent C-STOREs   {self.resent_c_stores} (PACS already held the instance)",
            f"sender re-sends    {self.sender_resends} (no success answer from gateway A)",
        ]
        if self.stop_seconds:
            lines.append(f"slowest stop       {self.stop_seconds:.1f} s after SIGTERM")
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def worker_available() -> bool:
    """Whether this version has a separate worker process (`imagebridge worker`)."""
    done = subprocess.run(
        [sys.executable, "-m", "imagebridge", "worker", "--help"],
        capture_output=True,
        timeout=60,
    )
    return done.returncode == 0


class FaultNetwork:
    """The network under test: hub, SEG's gateway (A), RVH's gateway (B), RVH's PACS, and the
    worker when there is one. Every process can be killed and started again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.net = Network(root / "net")
        self.pacs = CountingPacs(RECEIVER_AE, free_port(), root / "pacs-RVH")
        self.worker: subprocess.Popen[bytes] | None = None
        self.has_worker = False
        self._lock = threading.Lock()  # one process changes state at a time

    def start(self) -> None:
        self.pacs.start()
        self.net.start_hub(**HUB_SETTINGS)
        self.net.add_institution("SEG", "St Elsewhere General Hospital")
        self.net.add_institution("RVH", "Riverside Hospital")
        self.start_sender_gateway()
        self.start_receiver_gateway()
        self.has_worker = worker_available()
        if self.has_worker:
            self.start_worker()

    def stop(self) -> None:
        if self.worker is not None:
            stop_process(self.worker)
        self.net.stop()
        self.pacs.stop()

    def start_sender_gateway(self) -> None:
        self.net.start_gateway(
            "SEG",
            calling_aes=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
            **GATEWAY_SETTINGS,
        )

    def start_receiver_gateway(self) -> None:
        self.net.start_gateway(
            "RVH",
            calling_aes=[{"ae_title": RECEIVER_AE, "host": "127.0.0.1"}],
            pacs=[{"ae_title": RECEIVER_AE, "host": "127.0.0.1", "port": self.pacs.port}],
            reconciliation={"mrn_map": {NHS_NUMBER: MRN_AT_RECEIVER}},
            **GATEWAY_SETTINGS,
        )

    def start_worker(self) -> None:
        config = self.net.root / "hub.toml"
        self.worker = self.net._spawn(
            ["worker", "--config", str(config)], self.net.root / "worker.log"
        )

    @property
    def sender_port(self) -> int:
        return self.net.gateways["SEG"].port

    def targets(self) -> list[str]:
        return list(PROCESSES if self.has_worker else PROCESSES[:3])

    def kill(
        self, name: str, down_seconds: float, how: Stop = "kill", figures: Figures | None = None
    ) -> None:
        """Stop one process (SIGKILL; or SIGTERM, which must end it within STOP_SECONDS;
        or, for the hub, SIGTERM and an upgrade of its database from the revision before),
        leave it down a while, start it again."""
        with self._lock:
            process = self._process(name)
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL if how == "kill" else signal.SIGTERM)
            started = time.monotonic()
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                if figures is not None:
                    figures.problems.append(f"{name} still running {STOP_SECONDS} s after SIGTERM")
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            if figures is not None and how != "kill":
                figures.stop_seconds = max(figures.stop_seconds, time.monotonic() - started)
            if how == "upgrade":
                assert name == "hub"
                self.downgrade_one()
            time.sleep(down_seconds)
            if name == "hub":
                self.net.start_hub(**HUB_SETTINGS)
            elif name == "gateway A":
                self.start_sender_gateway()
            elif name == "gateway B":
                self.start_receiver_gateway()
            else:
                self.start_worker()

    def _process(self, name: str) -> subprocess.Popen[bytes]:
        if name == "hub":
            assert self.net.hub_process is not None
            return self.net.hub_process
        if name == "worker":
            assert self.worker is not None
            return self.worker
        return self.net.gateways["SEG" if name == "gateway A" else "RVH"].process

    def downgrade_one(self) -> None:
        """The hub's database back to the revision before the newest, data and all: the
        hub started next upgrades it, as a new version does on a running network."""
        engine = make_engine(self.net.hub_database_url)
        config = alembic_config()
        try:
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                command.downgrade(config, "-1")
        finally:
            engine.dispose()

    # -- looking inside, as an operator would ------------------------------------------------

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        engine = make_engine(self.net.hub_database_url)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(statement))]
        finally:
            engine.dispose()

    def transfers_of(self, study_uid: str) -> list[dict[str, Any]]:
        try:
            with self.net.admin() as admin:
                found: list[dict[str, Any]] = admin.get("/api/v1/transfers").json()
        except httpx.HTTPError:
            return []  # the hub is being restarted
        return [t for t in found if any(s["study_instance_uid"] == study_uid for s in t["studies"])]

    def audit_verifies(self) -> tuple[bool, str]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "imagebridge",
                "audit",
                "verify",
                "--config",
                str(self.net.root / "hub.toml"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode == 0, (done.stdout + done.stderr).strip()

    def blob_problems(self) -> list[str]:
        """Blobs cut short, or held by nobody; blob rows without their file."""
        root = self.net.root / "hub" / "blobs"
        files = {p.name: p for p in root.glob("??/??/*") if p.is_file()}
        problems = [f"blob file {n} is not named by a digest" for n in files if not is_digest(n)]
        for name, path in files.items():
            if is_digest(name) and _sha256(path) != name:
                problems.append(f"blob {name[:12]} does not hash to its name (partial)")
        referenced = {
            row[0]
            for table in ("instances", "transfer_instances", "reports")
            for row in self.query(f"SELECT blob_sha256 FROM {table}")
        }
        problems += [f"blob {n[:12]} referenced by nothing" for n in set(files) - referenced]
        rows = {row[0] for row in self.query("SELECT sha256 FROM blobs")}
        problems += [f"blob row {n[:12]} has no file" for n in rows - set(files)]
        return problems

    def spool_left(self) -> list[Path]:
        spool = self.net.root / "gateway-SEG" / "data" / "spool"
        return [*spool.glob("out/*/*.dcm"), *spool.glob("refused/*")]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pixel_hash(path: Path) -> str:
    return hashlib.sha256(dcmread(path).PixelData).hexdigest()


class Sender:
    """The sending PACS: C-STOREs a study to gateway A, and sends again, in a new
    association, every instance that got no success answer."""

    def __init__(self, port: Callable[[], int], study: StudyFiles) -> None:
        self.port = port
        self.files = [FileToSend(p, CT_IMAGE_STORAGE, EXPLICIT_LE) for p in study.paths]
        self.resends = 0
        self.answered = 0  # C-STOREs answered with success so far
        self.finished = threading.Event()

    def run(self, deadline: float) -> None:
        remaining = self.files
        attempts = 0

        def attempted(index: int, result: StoreResult) -> None:
            nonlocal attempts
            attempts += 1
            self.answered += result.outcome == "delivered"

        while remaining:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(remaining)} instances never accepted by gateway A")
            try:
                results = store_files(
                    Node("IB_RVH", "127.0.0.1", self.port()),
                    SENDER_AE,
                    remaining,
                    timeout=10,
                    on_result=attempted,
                )
            except NodeUnavailable:
                time.sleep(0.2)
                continue
            remaining = [
                f for f, r in zip(remaining, results, strict=True) if r.outcome != "delivered"
            ]
            if remaining:
                time.sleep(0.2)
        # C-STOREs beyond one per instance: those sent again for want of a success answer.
        self.resends = attempts - len(self.files)
        self.finished.set()


@dataclass
class Trial:
    number: int
    rng: random.Random
    kills_per_trial: tuple[int, int]
    window_seconds: float
    how: Stop = "kill"


def run_trial(network: FaultNetwork, trial: Trial, slices: int, folder: Path) -> Figures:
    """One study through the network under fire; the figures of what arrived."""
    figures = Figures(trials=1, instances=slices)
    study = generate_ct_study(
        folder / f"study-{trial.number}",
        slices=slices,
        rows=64,
        columns=64,
        patient_id="SEG778899",
        nhs_number=NHS_NUMBER,
        accession_number=f"ACC{trial.number:05d}",
        seed=trial.number,
    )
    targets = network.targets()
    # The first kill goes round the processes in turn, so that a few trials hit each.
    names = [targets[(trial.number - 1) % len(targets)]] + [
        trial.rng.choice(targets) for _ in range(trial.rng.randint(*trial.kills_per_trial) - 1)
    ]
    plan: list[tuple[float, int, str]] = []
    for index, name in enumerate(names):
        # Gateway A dies while the PACS is sending (always its first kill, else one in two),
        # after a random number of answered C-STOREs; other kills at a random moment.
        while_sending = name == "gateway A" and (index == 0 or trial.rng.random() < 0.5)
        after = trial.rng.randint(1, slices - 1) if while_sending else 0
        at = 0.0 if while_sending else trial.rng.uniform(0, trial.window_seconds)
        plan.append((at, after, name))
    plan.sort()
    sender = Sender(lambda: network.sender_port, study)
    errors: list[BaseException] = []
    started = time.monotonic()

    def killer() -> None:
        try:
            for at, after, name in plan:
                time.sleep(max(0.0, started + at - time.monotonic()))
                while sender.answered < after and not sender.finished.wait(0.005):
                    pass
                how: Stop = trial.how if trial.how != "upgrade" or name == "hub" else "term"
                network.kill(name, trial.rng.uniform(0.0, 1.5), how, figures)
                figures.kills[name] += 1
        except BaseException as exc:  # reported by the trial, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=killer, name="killer", daemon=True)
    thread.start()
    sender.run(deadline=started + 180)
    thread.join()
    if errors:
        raise errors[0]
    figures.sender_resends = sender.resends
    _check_arrival(network, study, figures, deadline=time.monotonic() + 180)
    figures.seconds = time.monotonic() - started
    return figures


def _check_arrival(
    network: FaultNetwork, study: StudyFiles, figures: Figures, deadline: float
) -> None:
    uid = study.study_instance_uid
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in study.paths}

    def settled() -> list[dict[str, Any]]:
        transfers = network.transfers_of(uid)
        done = transfers and all(t["status"] in ("delivered", "failed") for t in transfers)
        return transfers if done and set(sent) <= set(network.pacs.c_stores) else []

    transfers: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not (transfers := settled()):
        time.sleep(0.2)
    if not transfers:
        transfers = network.transfers_of(uid)
        states = [(t["status"], t["instances_delivered"]) for t in transfers]
        figures.problems.append(f"study {uid} not settled in time: transfers {states}")
    figures.transfers += len(transfers)
    for t in transfers:
        if t["status"] != "delivered":
            figures.problems.append(f"transfer {t['id']} is {t['status']}: {t['failure_reason']}")
        declared = t.get("instances_declared")
        if declared is not None and t.get("instances_confirmed") != declared:
            figures.problems.append(
                f"transfer {t['id']}: {t.get('instances_confirmed')} of {declared} confirmed"
            )
    # Instances carried to the PACS by more than one transfer would be twice in a PACS that
    # does not key on the SOP Instance UID.
    carried = sum(t["instances_delivered"] for t in transfers)
    figures.duplicated += max(0, carried - len(sent))
    held = {p.stem: p for p in network.pacs.received()}
    for sop_uid, path in sent.items():
        got = held.get(sop_uid)
        if got is None:
            figures.lost += 1
            continue
        received = dcmread(got)
        if hashlib.sha256(received.PixelData).hexdigest() != pixel_hash(path):
            figures.corrupted += 1
        if (received.PatientID, received.IssuerOfPatientID) != (MRN_AT_RECEIVER, "RVH"):
            figures.misfiled += 1
        figures.resent_c_stores += max(0, network.pacs.c_stores[sop_uid] - 1)
    figures.problems += network.blob_problems()
    left = network.spool_left()
    if left:
        figures.problems.append(f"{len(left)} files left in gateway A's spool")
    ok, output = network.audit_verifies()
    if not ok:
        figures.problems.append(f"audit trail does not verify: {output}")


@contextmanager
def fault_network(root: Path | None = None) -> Iterator[FaultNetwork]:
    owned = root is None
    folder = Path(tempfile.mkdtemp(prefix="ib-faults-")) if root is None else root
    network = FaultNetwork(folder)
    try:
        network.start()
        yield network
    finally:
        network.stop()
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


def run_trials(
    network: FaultNetwork,
    *,
    trials: int,
    seed: int,
    slices: int = 300,
    kills_per_trial: tuple[int, int] = (1, 3),
    window_seconds: float = 8.0,
    report: Callable[[str], None] | None = None,
    how: Stop = "kill",
) -> Figures:
    """Run ``trials`` seeded trials on one network; the figures of them all. ``how``: each
    process stopped by SIGKILL, by SIGTERM, or (the hub) by SIGTERM and an upgrade."""
    rng = random.Random(seed)
    total = Figures()
    studies = network.root / "studies"
    for number in range(1, trials + 1):
        trial = Trial(number, rng, kills_per_trial, window_seconds, how)
        figures = run_trial(network, trial, slices, studies)
        shutil.rmtree(studies / f"study-{number}", ignore_errors=True)
        total.add(figures)
        if report is not None:
            kills = ", ".join(f"{k} x{v}" for k, v in sorted(figures.kills.items()))
            verdict = "ok" if figures.ok else "FAILED: " + "; ".join(figures.problems[:3])
            report(
                f"trial {number:3d}: {figures.seconds:5.1f} s, kills: {kills or 'none'}; "
                f"lost {figures.lost}, duplicated {figures.duplicated}, "
                f"mis-filed {figures.misfiled}, re-sent C-STOREs {figures.resent_c_stores}; "
                f"{verdict}"
            )
    return total
