"""Benchmark: the hub's DICOMweb, measured in one run on this machine.

(a) QIDO-RS over an index of 1,000,000 instances in 100,000 studies of 20,000 patients
    (rows generated and inserted with SQLAlchemy Core into the database the hub made with
    its migrations; no pixels): median and p95 latency of searches by patient ID, by NHS
    number, by name prefix and by date range, over HTTP to a real hub process, as a
    radiologist who may query the whole network.
    The same searches as C-FIND to a gateway, on one open association.
    Beside it, Orthanc's C-FIND to the same client, over a smaller index of the same shape
    whose searches of each kind return about as many studies as ours.
(b) WADO-RS retrieve of a 300-slice 512x512 CT, in MB/s, beside Orthanc's DICOMweb plugin
    holding the same study, both streamed in full by the same client.

The index part runs on SQLite and on PostgreSQL (a server of its own, durable defaults).

Usage: python bench/dicomweb.py [--patients 20000] [--queries 200] [--slices 300] [--runs 3]
       [--skip-index] [--skip-wado] [--skip-orthanc] [--databases sqlite,postgresql]
--skip-orthanc leaves out both Orthanc peers: C-FIND (once a run, after the databases, then
the ratio of medians to each database's) and WADO-RS. Orthanc gets free ports of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import Table, insert, select

from imagebridge.db import make_engine
from imagebridge.demo.network import Network, free_port, stop_process, wait_for_port
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.institutions.models import Institution
from imagebridge.storage.models import Blob

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import DEPLOYED_SERVER_OPTIONS, PostgresServer, postgres_binaries

ORTHANC = "/usr/sbin/Orthanc"
FINDSCU = "/usr/bin/findscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# findscu's log with a millisecond timestamp on each line (DCMTK's log4cplus configuration).
FINDSCU_LOG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%q} %m%n
"""
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PASSWORD = "correct horse battery staple 42"
INSTITUTIONS = ("BEN1", "BEN2", "BEN3", "BEN4")
STUDIES_PER_PATIENT = 5
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 5
SURNAMES = 2000
STUDY_YEARS = range(2010, 2026)  # our studies' dates: any month of these, day 1-28
DATE_SEARCHES = [f"{year}0301-{year}0331" for year in range(2012, 2026)]
# Orthanc's index for C-FIND holds only the months the date searches ask for (one instance a
# study), so a month still holds as many studies as ours; patients and surnames in proportion.
ORTHANC_SHARE = len(DATE_SEARCHES) / (len(STUDY_YEARS) * 12)
ORTHANC_AET = "ORTHANC_BENCH"
WADO_ACCEPT = 'multipart/related; type="application/dicom"'
_SYLLABLES = (
    "AB",
    "BER",
    "CAR",
    "DON",
    "EL",
    "FIN",
    "GAR",
    "HOL",
    "IN",
    "JON",
    "KEL",
    "LAN",
    "MOR",
    "NEL",
    "OR",
    "PAR",
    "QUIN",
    "ROB",
    "SON",
    "TAY",
    "UL",
    "VAN",
    "WIL",
    "YOR",
)
_GIVEN = ("ALICE", "BEN", "CARA", "DAVID", "EMMA", "FRED", "GRACE", "HARRY", "ISLA", "JACK")


def nhs_numbers(rng: random.Random) -> Iterator[str]:
    """Distinct valid NHS numbers (mod-11 check digit)."""
    seen: set[str] = set()
    while True:
        stem = f"{rng.randrange(100_000_000, 999_999_999)}"
        check = 11 - sum(int(d) * w for d, w in zip(stem, range(10, 1, -1), strict=True)) % 11
        check = 0 if check == 11 else check
        if check != 10 and stem not in seen:
            seen.add(stem)
            yield stem + str(check)


def surname(n: int) -> str:
    """About 2,000 distinct surnames, so a surname prefix finds a handful of patients."""
    k = len(_SYLLABLES)
    return _SYLLABLES[n % k] + _SYLLABLES[(n // k) % k] + _SYLLABLES[(n // k // k) % 4]


def token_for(net: Network, code: str, username: str, role: str, scopes: list[str]) -> str:
    """A user of ``role`` logs in from a trusted network and makes an API token."""
    with net.admin() as admin:
        admin.put(
            f"/api/v1/institutions/{code}/trusted-networks", json={"cidrs": ["127.0.0.0/8"]}
        ).raise_for_status()
        admin.post(
            "/api/v1/users",
            json={"username": username, "password": PASSWORD, "institution": code, "roles": [role]},
        ).raise_for_status()
    with httpx.Client(base_url=net.hub_url) as c:
        r = c.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
        r.raise_for_status()
        headers = {
            "Cookie": f"ib_session={r.cookies['ib_session']}",
            "X-CSRF-Token": r.json()["csrf_token"],
        }
        r = c.post(
            "/api/v1/tokens", headers=headers, json={"name": "bench", "scopes": scopes, "days": 1}
        )
        r.raise_for_status()
        token: str = r.json()["token"]
        return token


def fill_index(net: Network, patients: int, rng: random.Random) -> dict[str, list[str]]:
    """Insert the generated index; returns samples of what to search for."""
    engine = make_engine(net.hub_database_url)
    tables = {m: m.__table__ for m in (Patient, Study, Series, Instance, Blob)}
    t: dict[Any, Table] = {m: tab for m, tab in tables.items() if isinstance(tab, Table)}
    samples: dict[str, list[str]] = {"pid": [], "nhs": [], "name": [], "date": []}
    sha = hashlib.sha256(b"no pixels").hexdigest()
    with engine.begin() as c:
        ids = dict(c.execute(select(Institution.code, Institution.id)).all())
        c.execute(insert(t[Blob]), [{"sha256": sha, "size": 1}])
        numbers = nhs_numbers(rng)
        patient_rows, study_rows, series_rows, instance_rows = [], [], [], []
        pid0 = (c.execute(select(Patient.id).order_by(Patient.id.desc())).scalar() or 0) + 1
        sid0 = (c.execute(select(Study.id).order_by(Study.id.desc())).scalar() or 0) + 1
        rid0 = (c.execute(select(Series.id).order_by(Series.id.desc())).scalar() or 0) + 1
        now = datetime.now(UTC)
        for p in range(patients):
            code = INSTITUTIONS[p % len(INSTITUTIONS)]
            nhs = next(numbers)
            name = f"{surname(rng.randrange(SURNAMES))}^{rng.choice(_GIVEN)}"
            patient_rows.append(
                {
                    "id": pid0 + p,
                    "institution_id": ids[code],
                    "patient_id": f"{code}{p:07d}",
                    "issuer_of_patient_id": code,
                    "patient_name": name,
                    "birth_date": f"{rng.randrange(1930, 2020)}0101",
                    "sex": rng.choice("MF"),
                    "nhs_number": nhs,
                    "created_at": now,
                }
            )
            if p % 100 == 0:
                samples["pid"].append(f"{code}{p:07d}")
                samples["nhs"].append(nhs)
                samples["name"].append(name.split("^")[0][:6] + "*")
            for s in range(STUDIES_PER_PATIENT):
                sid = sid0 + p * STUDIES_PER_PATIENT + s
                year = rng.randrange(STUDY_YEARS.start, STUDY_YEARS.stop)
                month = rng.randrange(1, 13)
                study_rows.append(
                    {
                        "id": sid,
                        "institution_id": ids[code],
                        "patient_ref": pid0 + p,
                        "study_instance_uid": f"1.2.826.0.1.3680043.10.1428.77.{sid}",
                        "study_date": f"{year}{month:02d}{rng.randrange(1, 29):02d}",
                        "study_time": f"{rng.randrange(24):02d}{rng.randrange(60):02d}00",
                        "accession_number": f"A{sid}",
                        "study_description": "CT CHEST",
                        "created_at": now,
                        # The counts indexing keeps (index/services.count_again).
                        "number_of_series": SERIES_PER_STUDY,
                        "number_of_instances": SERIES_PER_STUDY * INSTANCES_PER_SERIES,
                        "modalities_in_study": "CT\\SR",
                    }
                )
                for r in range(SERIES_PER_STUDY):
                    rid = rid0 + sid * SERIES_PER_STUDY + r
                    series_rows.append(
                        {
                            "id": rid,
                            "study_id": sid,
                            "series_instance_uid": f"1.2.826.0.1.3680043.10.1428.77.{sid}.{r}",
                            "modality": "CT" if r == 0 else "SR",
                            "series_number": str(r + 1),
                            "series_description": "",
                            "number_of_instances": INSTANCES_PER_SERIES,
                        }
                    )
                    for i in range(INSTANCES_PER_SERIES):
                        instance_rows.append(
                            {
                                "series_id": rid,
                                "sop_instance_uid": f"1.2.826.0.1.3680043.10.1428.77.{sid}.{r}.{i}",
                                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                                "instance_number": str(i + 1),
                                "blob_sha256": sha,
                                "size": 1,
                                "created_at": now,
                            }
                        )
            if len(instance_rows) >= 200_000 or p == patients - 1:
                for model, rows in (
                    (Patient, patient_rows),
                    (Study, study_rows),
                    (Series, series_rows),
                    (Instance, instance_rows),
                ):
                    if rows:
                        c.execute(insert(t[model]), rows)
                    rows.clear()
        samples["date"] = list(DATE_SEARCHES)
    # Rows written behind the hub's back: refresh the planner's statistics, as the migration
    # that made the indexes does. PostgreSQL is also vacuumed, as after any bulk load:
    # otherwise autovacuum visits the million new rows while the searches are timed.
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.begin() as c:
            c.exec_driver_sql("ANALYZE")
    engine.dispose()
    return samples


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def searches_for(
    samples: dict[str, list[str]], rng: random.Random
) -> dict[str, Callable[[], dict[str, str]]]:
    """Each kind of search, as QIDO-RS parameters (C-FIND leaves out ``limit``)."""
    return {
        "patient ID": lambda: {"PatientID": rng.choice(samples["pid"])},
        "NHS number": lambda: {"PatientID": rng.choice(samples["nhs"]), "IssuerOfPatientID": "NHS"},
        "name prefix": lambda: {"PatientName": rng.choice(samples["name"]), "limit": "100"},
        "date range": lambda: {"StudyDate": rng.choice(samples["date"]), "limit": "100"},
    }


def bench_index(net: Network, args: argparse.Namespace) -> dict[str, float]:
    """QIDO-RS, then C-FIND; the C-FIND medians by kind of search."""
    rng = random.Random(1)
    for code in INSTITUTIONS:
        net.add_institution(code, f"Bench {code}")
        with net.admin() as admin:
            admin.put(f"/api/v1/institutions/{code}/discovery", json={"to": ["*"]})
    token = token_for(
        net, "BEN1", "bench.radiologist", "radiologist", ["view_studies", "query_network"]
    )
    t0 = time.perf_counter()
    samples = fill_index(net, args.patients, rng)
    # A hub reads the planner's statistics when it opens the database: start it again, as
    # after a bulk import.
    net.stop()
    net.start_hub()
    total = args.patients * STUDIES_PER_PATIENT * SERIES_PER_STUDY * INSTANCES_PER_SERIES
    print(
        f"index: {args.patients:,} patients, {args.patients * STUDIES_PER_PATIENT:,} studies,"
        f" {total:,} instances inserted in {time.perf_counter() - t0:.1f} s"
    )
    searches = searches_for(samples, rng)
    print(f"QIDO-RS /studies, {args.queries} searches each (median, p95, mean results):")
    with httpx.Client(
        base_url=f"{net.hub_url}/dicomweb", timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        for name, params in searches.items():
            for _ in range(10):
                client.get("/studies", params=params()).raise_for_status()
            times, counts = [], []
            for _ in range(args.queries):
                query = params()
                t = time.perf_counter()
                r = client.get("/studies", params=query)
                times.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                counts.append(len(r.json()))
            _report(name, times, counts)
    return bench_c_find(net, args, searches)


def _report(name: str, times: list[float], counts: list[int], *, target: bool = True) -> None:
    p95 = percentile(times, 0.95)
    verdict = f"   {'ok' if p95 < 50 else 'ABOVE TARGET'} (target p95 < 50 ms)" if target else ""
    print(
        f"  {name:12} median {statistics.median(times):6.1f} ms   p95 {p95:6.1f} ms"
        f"   {statistics.mean(counts):6.1f} studies{verdict}"
    )


def bench_c_find(
    net: Network, args: argparse.Namespace, searches: dict[str, Callable[[], dict[str, str]]]
) -> dict[str, float]:
    """The same searches as C-FIND (Study Root, STUDY level) to BEN1's gateway by DCMTK's
    findscu; the median milliseconds by kind of search."""
    gw = net.start_gateway(
        "BEN1",
        calling_aes=[{"ae_title": "BENCH_WS", "host": "127.0.0.1", "permissions": ["find"]}],
    )
    print(f"C-FIND (Study Root, STUDY) to a gateway, by findscu, {args.queries} searches each:")
    return c_find(gw.ae_title, gw.port, searches, args.queries)


def c_find(
    ae_title: str,
    port: int,
    searches: dict[str, Callable[[], dict[str, str]]],
    queries: int,
    *,
    target: bool = True,
) -> dict[str, float]:
    """Each kind of search as C-FIND by findscu, every search of a kind on one association as
    a workstation keeps it open: request to final response, from findscu's own log,
    timestamped to the millisecond. Prints each kind's figures; returns their medians."""
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ib-bench-cfind-") as tmp:
        folder = Path(tmp)
        log_config = folder / "log.cfg"
        log_config.write_text(FINDSCU_LOG)
        for name, params in searches.items():
            files = []
            for n in range(queries + 10):
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                for keyword in ("StudyInstanceUID", "StudyDate", "PatientName", "PatientID"):
                    setattr(query, keyword, "")
                for keyword, value in params().items():
                    if keyword != "limit":
                        setattr(query, keyword, value)
                files.append(folder / f"{name.replace(' ', '-')}-{n:04d}.dcm")
                query.save_as(files[-1], implicit_vr=True, little_endian=True)
            result = subprocess.run(
                [FINDSCU, "-S", "-lc", str(log_config), "-sr", "-aet", "BENCH_WS", "-aec"]
                + [ae_title, "127.0.0.1", str(port)]
                + [str(f) for f in files],
                env=DCMTK_ENV,
                capture_output=True,
                text=True,
            )
            times, counts = _find_timings(result.stdout + result.stderr)
            if result.returncode != 0 or len(times) != len(files):
                sys.exit(f"findscu failed: {(result.stdout + result.stderr)[-2000:]}")
            _report(name, times[10:], counts[10:], target=target)  # the first ten warm up
            medians[name] = statistics.median(times[10:])
    return medians


def _find_timings(log: str) -> tuple[list[float], list[int]]:
    """Each search's milliseconds from request to final response, and its matches."""
    times: list[float] = []
    counts: list[int] = []
    started = 0.0
    for line in log.splitlines():
        found = re.match(r"(\d\d):(\d\d):(\d\d\.\d{3}) (.*)", line)
        if found is None:
            continue
        hours, minutes, seconds, message = found.groups()
        at = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        if message.startswith("Sending Find Request"):
            started = at
            counts.append(0)
        elif message.startswith("Received Find Response") and "(Pending)" in message:
            counts[-1] += 1
        elif message.startswith("Received Final Find Response"):
            if "(Success)" not in message:
                sys.exit(f"C-FIND failed: {message}")
            times.append(((at - started) % 86400) * 1000)
    return times, counts


def fetch(url: str, headers: dict[str, str]) -> tuple[float, int]:
    """Seconds to receive the whole answer, and its size."""
    size = 0
    with httpx.Client(timeout=600) as c:
        t = time.perf_counter()
        with c.stream("GET", url, headers=headers) as r:
            r.raise_for_status()
            for chunk in r.iter_raw():
                size += len(chunk)
        return time.perf_counter() - t, size


def start_orthanc(
    folder: Path, extra: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """An Orthanc of its own under ``folder``, configured as below updated by ``extra``; its
    process and HTTP port. Orthanc 1.10 has no bind option: it listens on all interfaces, on
    free ports, and its REST API refuses other hosts."""
    folder.mkdir(parents=True)
    http_port = free_port()
    config: dict[str, Any] = {
        "Name": "bench",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "StorageCompression": False,
        "AuthenticationEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(extra or {}),
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen(
        [ORTHANC, str(folder / "orthanc.json")],
        # Its DICOM side is DCMTK's, which keeps Nagle's algorithm unless told: each C-FIND
        # would wait ~40 ms for a delayed ACK (the gateway sets TCP_NODELAY itself).
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(http_port, process)
        if config.get("DicomServerEnabled", True):
            wait_for_port(config["DicomPort"], process)
    except BaseException:
        stop_process(process)
        raise
    return process, http_port


def surname_share(share: float, rng: random.Random) -> list[str]:
    """A share of the surnames, in whole groups that share a 6-letter prefix and with as many
    groups of each size as among all, so a prefix matches as many surnames as in our index."""
    groups: dict[str, list[str]] = {}
    for n in range(SURNAMES):
        groups.setdefault(surname(n)[:6], []).append(surname(n))
    by_size: dict[int, list[list[str]]] = {}
    for group in groups.values():
        by_size.setdefault(len(group), []).append(group)
    return [
        name
        for size in sorted(by_size)
        for group in rng.sample(by_size[size], round(len(by_size[size]) * share))
        for name in group
    ]


def orthanc_index(
    our_patients: int, rng: random.Random
) -> tuple[list[bytes], dict[str, list[str]]]:
    """Part-10 files of one instance per study, without pixels: ``ORTHANC_SHARE`` of our
    patients, ``STUDIES_PER_PATIENT`` studies each dated in the months of the date searches;
    and samples of what to search for, as ``fill_index`` returns."""
    patients = round(our_patients * ORTHANC_SHARE)
    surnames = surname_share(ORTHANC_SHARE, rng)
    numbers = nhs_numbers(rng)
    samples: dict[str, list[str]] = {"pid": [], "nhs": [], "name": [], "date": list(DATE_SEARCHES)}
    files: list[bytes] = []
    for p in range(patients):
        code = INSTITUTIONS[p % len(INSTITUTIONS)]
        # Orthanc knows a patient by one PatientID: half by the hospital's, half by NHS number
        # (the search by NHS number then matches IssuerOfPatientID too, as the gateway's does).
        if p % 2:
            patient_id, issuer = next(numbers), "NHS"
            samples["nhs"].append(patient_id)
        else:
            patient_id, issuer = f"{code}{p:07d}", code
            samples["pid"].append(patient_id)
        name = f"{surnames[p % len(surnames)]}^{rng.choice(_GIVEN)}"  # as many each as ours
        samples["name"].append(name.split("^")[0][:6] + "*")
        birth_date, sex = f"{rng.randrange(1930, 2020)}0101", rng.choice("MF")
        for s in range(STUDIES_PER_PATIENT):
            uid = f"1.2.826.0.1.3680043.10.1428.78.{p * STUDIES_PER_PATIENT + s}"
            ds = Dataset()
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = f"{uid}.1.1"
            ds.StudyInstanceUID = uid
            ds.SeriesInstanceUID = f"{uid}.1"
            ds.PatientID = patient_id
            ds.IssuerOfPatientID = issuer
            ds.PatientName = name
            ds.PatientBirthDate = birth_date
            ds.PatientSex = sex
            year = DATE_SEARCHES[rng.randrange(len(DATE_SEARCHES))][:4]
            ds.StudyDate = f"{year}03{rng.randrange(1, 29):02d}"
            ds.StudyTime = f"{rng.randrange(24):02d}{rng.randrange(60):02d}00"
            ds.AccessionNumber = f"B{p * STUDIES_PER_PATIENT + s}"
            ds.StudyDescription = "CT CHEST"
            ds.Modality = "CT"
            ds.SeriesNumber = "1"
            ds.InstanceNumber = "1"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            files.append(buffer.getvalue())
    return files, samples


def bench_orthanc_c_find(work: Path, args: argparse.Namespace) -> dict[str, float]:
    """The peer of ``bench_c_find``: the same kinds of search by the same findscu to an Orthanc
    of its own, over a smaller index whose answers are about as large; its medians."""
    rng = random.Random(2)
    files, samples = orthanc_index(args.patients, rng)
    dicom_port = free_port()
    orthanc, http_port = start_orthanc(
        work,
        {
            "Name": "bench C-FIND",
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AET,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": True,
            # findscu's AE is known, from loopback, as the gateway knows it.
            "DicomModalities": {
                "bench": {
                    "AET": "BENCH_WS",
                    "Host": "127.0.0.1",
                    "Port": free_port(),
                    "AllowFind": True,
                }
            },
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowFind": False,
            "LimitFindResults": 0,  # all the matches, as the gateway answers
            "LimitFindInstances": 0,
            "Plugins": [],
        },
    )
    try:
        t0 = time.perf_counter()
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client,
            ThreadPoolExecutor(4) as pool,
        ):
            for r in pool.map(lambda body: client.post("/instances", content=body), files):
                r.raise_for_status()
            seconds = time.perf_counter() - t0
            held = client.get("/statistics").json()
        studies = int(held["CountStudies"])
        print(
            f"C-FIND to Orthanc (same client, {studies:,} studies, same-sized answers),"
            f" {args.queries} searches each:"
        )
        searches = searches_for(samples, rng)
        medians = c_find(ORTHANC_AET, dicom_port, searches, args.queries, target=False)
        print(
            f"  Orthanc holds {studies:,} studies of {int(held['CountPatients']):,} patients,"
            f" one instance each, uploaded in {seconds:.1f} s: a smaller index than our"
            f" {args.patients * STUDIES_PER_PATIENT:,} studies, which favours Orthanc"
        )
        return medians
    finally:
        stop_process(orthanc)


def bench_wado(net: Network, work: Path, args: argparse.Namespace) -> None:
    net.add_institution("WADO", "Bench retrieve")
    token = token_for(
        net, "WADO", "bench.radiographer", "radiographer", ["view_studies", "send_studies"]
    )
    study = generate_ct_study(work / "ct", slices=args.slices)
    mb = study.total_bytes / 1e6
    boundary = "bench-boundary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
            for p in study.paths
        )
        + f"--{boundary}--\r\n".encode()
    )
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=600) as c:
        r = c.post(
            f"{net.hub_url}/dicomweb/studies",
            content=body,
            headers={
                **auth,
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
        )
        r.raise_for_status()
    del body
    targets = {
        "ImageBridge": (
            f"{net.hub_url}/dicomweb/studies/{study.study_instance_uid}",
            {**auth, "Accept": WADO_ACCEPT},
        )
    }
    orthanc = None
    if not args.skip_orthanc:
        orthanc, port = start_orthanc(work / "orthanc")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            for p in study.paths:
                c.post("/instances", content=p.read_bytes()).raise_for_status()
        targets["Orthanc"] = (
            f"http://127.0.0.1:{port}/dicom-web/studies/{study.study_instance_uid}",
            {"Accept": WADO_ACCEPT},
        )
    try:
        results: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.runs):  # interleaved, so both see the same machine
            for name, (url, headers) in targets.items():
                seconds, size = fetch(url, headers)
                assert size > study.total_bytes, (name, size)
                results[name].append(seconds)
        print(f"WADO-RS retrieve of a {args.slices}-slice CT ({mb:.0f} MB), median of {args.runs}:")
        rates = {}
        for name, times in results.items():
            rates[name] = mb / statistics.median(times)
            print(f"  {name:12} {statistics.median(times):6.2f} s   {rates[name]:7.1f} MB/s")
        if "Orthanc" in rates:
            ratio = rates["ImageBridge"] / rates["Orthanc"]
            print(f"  ratio ImageBridge / Orthanc = {ratio:.2f} (target >= 1.0)")
    finally:
        if orthanc is not None:
            stop_process(orthanc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--skip-wado", action="store_true")
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="the index on each (comma-separated)"
    )
    args = parser.parse_args()
    if not args.skip_orthanc and not Path(ORTHANC).exists():
        sys.exit("missing Orthanc: apt-get install orthanc")
    if not args.skip_orthanc and not args.skip_wado and not Path(DICOMWEB_PLUGIN).exists():
        sys.exit("missing Orthanc's DICOMweb plugin: apt-get install orthanc orthanc-dicomweb")
    work = Path(tempfile.mkdtemp(prefix="ib-bench-dicomweb-"))
    try:
        if not args.skip_index:
            ours: dict[str, dict[str, float]] = {}
            for database in args.databases.split(","):
                with hub_on(database, work / f"index-{database}") as net:
                    print(f"-- the index on {database}")
                    ours[database] = bench_index(net, args)
            if not args.skip_orthanc:
                # Once a run, with no hub running, against each database's figures.
                print("-- the peer")
                peer = bench_orthanc_c_find(work / "orthanc-cfind", args)
                print("C-FIND medians, ratio ImageBridge / Orthanc (below 1.0: ours faster):")
                for database, medians in ours.items():
                    for name, median in medians.items():
                        print(f"  {database:10} {name:12} {median / peer[name]:5.2f}")
        if not args.skip_wado:
            with hub_on("sqlite", work / "wado") as net:
                bench_wado(net, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def hub_on(database: str, root: Path) -> Iterator[Network]:
    """A hub on SQLite, or on a PostgreSQL server of its own with the durable defaults."""
    net = Network(root)
    server: PostgresServer | None = None
    try:
        if database == "postgresql":
            server = PostgresServer(
                *postgres_binaries(), options={**DEPLOYED_SERVER_OPTIONS, "max_connections": "100"}
            )
            server.start()
            net.database_url = server.create()
        elif database != "sqlite":
            sys.exit(f"unknown database {database!r}: sqlite or postgresql")
        net.start_hub()
        yield net
    finally:
        net.database_url = ""  # dropped with its server
        net.stop()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
