"""`imagebridge demo`: a CT and its report travel from one hospital's PACS to another's."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import click
from pydicom import dcmread

from imagebridge.demo.network import Network, free_port
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import generate_ct_study
from imagebridge.dicom.reports import minimal_pdf
from imagebridge.dicom.store_scu import FileToSend, Node, store_files

SENDER, RECEIVER = "SEG", "RVH"
NHS_NUMBER = "9434765919"
MRN_AT_RECEIVER = "RVH0042"


def run_demo(folder: Path | None, *, slices: int, keep_running: bool) -> int:
    folder = (folder or Path("demo-data") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    click.echo(f"ImageBridge demo; all its data goes under {folder}")
    net = Network(folder)
    pacs_a = MiniPacs("PACS_SEG", free_port(), folder / "pacs-SEG")
    pacs_b = MiniPacs("PACS_RVH", free_port(), folder / "pacs-RVH")
    try:
        net.start_hub()
        net.add_institution(SENDER, "St Elsewhere General Hospital")
        net.add_institution(RECEIVER, "Riverside Hospital")
        pacs_a.start()
        pacs_b.start()
        gw_a = net.start_gateway(
            SENDER, calling_aes=[{"ae_title": "PACS_SEG", "host": "127.0.0.1"}]
        )
        net.start_gateway(
            RECEIVER,
            calling_aes=[{"ae_title": "PACS_RVH", "host": "127.0.0.1"}],
            pacs=[
                {"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": pacs_b.port}
            ],
            reconciliation={"mrn_map": {NHS_NUMBER: MRN_AT_RECEIVER}},
        )
        click.echo(f"hub {net.hub_url} (API docs at /docs); admin token in hub/admin-token")

        click.echo(f"generating a synthetic CT of {slices} slices at {SENDER} ...")
        study = generate_ct_study(folder / "study-at-SEG", slices=slices, patient_id="SEG778899")
        files = [
            FileToSend(p, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1") for p in study.paths
        ]

        click.echo(
            f"PACS_SEG sends it to the routing AE IB_{RECEIVER} at gateway {gw_a.ae_title} ..."
        )
        started = time.monotonic()
        results = store_files(Node("IB_" + RECEIVER, "127.0.0.1", gw_a.port), "PACS_SEG", files)
        refused = [r for r in results if r.outcome != "delivered"]
        if refused:
            click.echo(
                f"the gateway refused {len(refused)} instance(s): {refused[0].detail}", err=True
            )
            return 1

        transfer = _find_transfer(net)
        with net.admin() as admin:
            pdf = minimal_pdf(
                ["CT chest report", "", "No acute abnormality.", "Reported by Dr Demo."]
            )
            admin.post(
                f"/api/v1/transfers/{transfer}/reports",
                content=pdf,
                headers={"Content-Type": "application/pdf"},
                params={"title": "CT chest report"},
            ).raise_for_status()
            final = _follow(admin, transfer, len(files))
        elapsed = time.monotonic() - started
        if final["status"] != "delivered":
            click.echo(f"transfer {final['status']}: {final['failure_reason']}", err=True)
            return 1
        _summary(final, elapsed, pacs_b)
        if keep_running:
            click.echo("the network keeps running; Ctrl-C stops it")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        net.stop()
        pacs_a.stop()
        pacs_b.stop()


def _find_transfer(net: Network) -> str:
    with net.admin() as admin:
        for _ in range(600):
            found = admin.get("/api/v1/transfers").json()
            if found:
                transfer_id: str = found[0]["id"]
                return transfer_id
            time.sleep(0.05)
    raise RuntimeError("the gateway did not open a transfer")


def _follow(admin: object, transfer: str, total: int) -> dict[str, object]:
    import httpx

    assert isinstance(admin, httpx.Client)
    with click.progressbar(length=total, label="delivered", show_pos=True) as bar:
        done = 0
        while True:
            t = admin.get(f"/api/v1/transfers/{transfer}").json()
            bar.update(t["instances_delivered"] - done)
            done = t["instances_delivered"]
            if t["status"] in ("delivered", "failed"):
                return dict(t)
            time.sleep(0.1)


def _summary(t: dict[str, object], elapsed: float, pacs: MiniPacs) -> None:
    received = pacs.received()
    patient_ids = set()
    report = False
    for path in received:
        ds = dcmread(path, stop_before_pixels=True)
        patient_ids.add(f"{ds.PatientID} (issuer {ds.get('IssuerOfPatientID', '')})")
        report |= ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    mb = int(str(t["bytes_delivered"])) / 1e6
    click.echo("")
    click.echo(
        f"delivered:   {t['instances_delivered']} instances, {mb:.1f} MB, in {elapsed:.1f} s"
    )
    click.echo(
        f"at {RECEIVER}:     {len(received)} files in its PACS, report as Encapsulated PDF: "
        f"{'yes' if report else 'no'}"
    )
    click.echo(f"patient ID:  {', '.join(sorted(patient_ids))} (was SEG778899 at {SENDER})")
