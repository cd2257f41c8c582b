"""The portal end to end, in a real headless browser (Debian's chromium, driven by
Playwright), against a real network on loopback: the hub and two gateways as processes, a
real Orthanc as St Elsewhere's PACS (queried and fetched from through its gateway) and a
small archive as Riverside's PACS.

People log in as they would: password, then the TOTP step, because 127.0.0.1 is outside
both institutions' trusted networks (and administrators always give a second factor). The
clerk at SEG sends from the PACS; the radiologist at RVH watches it arrive in the inbox
without reloading, opens it in the viewer and windows the image. Every page visited is
photographed into the test's screenshot folder ($IMAGEBRIDGE_SCREENSHOTS, else under the
test's tmp dir); none names the patient in its address or title.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import zxingcpp
from PIL import Image
from playwright.sync_api import BrowserContext, Page, expect

from browser import TABLET, Shots, browsers, screenshot_folder
from conftest import audit_events, require_tool
from imagebridge.accounts.totp import code_at
from imagebridge.demo.network import Network, free_port
from imagebridge.demo.pacs import MiniPacs
from imagebridge.demo.synthetic import StudyFiles, generate_ct_study
from imagebridge.gateway.hubclient import HubClient
from imagebridge.hub.auth import SESSION_COOKIE
from orthanc import ORTHANC, Modality, Orthanc

pytestmark = pytest.mark.peers

PASSWORD = "correct horse battery staple 42"
NEW_PASSWORD = "a longer passphrase of her own 7"
NHS_NUMBER = "9434765919"
PATIENT_ID = "SEG778899"
PATIENT_NAME = "DEMO^ALICE"
REPORT = "CT chest: no acute abnormality. Typed at St Elsewhere for Riverside."
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
FAST = {"study_stable_seconds": 0.5, "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5}
# Who uses the portal here: (institution, role).
PEOPLE = {
    "sam": ("SEG", "pacs_manager"),  # sends from SEG's PACS; an administrator: always TOTP
    "rita": ("RVH", "radiologist"),  # receives and views at RVH
    "carl": ("RVH", "clerk"),  # may track, may not view studies
    "nora": ("SEG", "network_admin"),
    "audrey": ("SEG", "auditor"),
    "mona": ("SEG", "clerk"),  # looks after her own account
    "sara": ("SEG", "radiologist"),  # shares a study with a solicitor
    "lena": ("SEG", ""),  # the solicitor: an external user, who has no role
}


@dataclass
class World:
    net: Network
    study: StudyFiles
    rvh_pacs: MiniPacs
    shots: Shots
    root: Path
    secrets: dict[str, str] = field(default_factory=dict)
    recovery_codes: dict[str, list[str]] = field(default_factory=dict)


def _enrol(net: Network, username: str) -> tuple[str, list[str]]:
    """Set up a person's authenticator through the API (as on an earlier day); the secret
    and the recovery codes."""
    with httpx.Client(base_url=net.hub_url, timeout=30) as client:
        r = client.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
        assert r.status_code == 200 and r.json()["second_factor"] == "enrol", r.text
        # The session cookie is Secure: httpx keeps it for https only, so it goes by hand.
        headers = {
            "Cookie": f"{SESSION_COOKIE}={r.cookies[SESSION_COOKIE]}",
            "X-CSRF-Token": r.json()["csrf_token"],
        }
        secret: str = client.post("/api/v1/auth/totp/enrol", headers=headers).json()["secret"]
        r = client.post(
            "/api/v1/auth/totp/confirm",
            headers=headers,
            json={"code": code_at(secret, time.time())},
        )
        assert r.status_code == 200, r.text
    return secret, r.json()["recovery_codes"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    orthanc_exe = require_tool(ORTHANC)
    require_tool("/usr/bin/chromium")
    root = tmp_path_factory.mktemp("portal")
    net = Network(root / "net")
    seg_port = free_port()
    seg_pacs = Orthanc(
        "ORTHANC_SEG", root / "orthanc", {"gateway": Modality("IB_GW_SEG", seg_port)}
    )
    rvh_pacs = MiniPacs("PACS_RVH", free_port(), root / "pacs-rvh")
    try:
        net.start_hub(inbox_wait_seconds=1.0)
        net.add_institution("SEG", "St Elsewhere General Hospital")
        net.add_institution("RVH", "Riverside Hospital")
        with net.admin() as admin:
            for code in ("SEG", "RVH"):
                # The hospitals' own networks: the tests' 127.0.0.1 is outside both.
                r = admin.put(
                    f"/api/v1/institutions/{code}/trusted-networks", json={"cidrs": ["10.0.0.0/8"]}
                )
                r.raise_for_status()
            for username, (code, role) in PEOPLE.items():
                r = admin.post(
                    "/api/v1/users",
                    json={
                        "username": username,
                        "password": PASSWORD,
                        "institution": code,
                        "roles": [role] if role else [],
                        "display_name": username.title(),
                        "kind": "staff" if role else "external",
                    },
                )
                r.raise_for_status()
        study = generate_ct_study(
            root / "study",
            slices=30,
            rows=256,
            columns=256,
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            nhs_number=NHS_NUMBER,
        )
        seg_pacs.start(orthanc_exe)
        seg_pacs.upload(study.paths)
        rvh_pacs.start()
        net.start_gateway(
            "SEG",
            port=seg_port,
            calling_aes=[{"ae_title": seg_pacs.ae_title, "permissions": ["echo"]}],
            pacs_qr={
                "ae_title": seg_pacs.ae_title,
                "host": "127.0.0.1",
                "port": seg_pacs.dicom_port,
            },
            **FAST,
        )
        net.start_gateway(
            "RVH",
            calling_aes=[],
            pacs=[
                {"name": "pacs", "ae_title": "PACS_RVH", "host": "127.0.0.1", "port": rvh_pacs.port}
            ],
            reconciliation={"mrn_map": {NHS_NUMBER: "RVH0042"}},
            **FAST,
        )
        world = World(net, study, rvh_pacs, Shots(screenshot_folder(root)), root)
        for username in ("rita", "carl", "nora", "audrey", "mona", "sara", "lena"):
            world.secrets[username], world.recovery_codes[username] = _enrol(net, username)
        print(f"screenshots in {world.shots.folder}")
        yield world
    finally:
        seg_pacs.terminate()
        net.stop()
        rvh_pacs.stop()
        seg_pacs.stop()


# -- what a person does -----------------------------------------------------------------------


def _password(page: Page, world: World, username: str, path: str = "/portal/") -> None:
    page.goto(world.net.hub_url + path)
    # No session: the page sends the browser to log in, and back afterwards.
    expect(page).to_have_url(
        f"{world.net.hub_url}/portal/login?next={urllib.parse.quote(path, safe='/')}"
    )
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def log_in(page: Page, world: World, username: str, path: str = "/portal/") -> None:
    """Password, then the code of the next time step from the person's authenticator."""
    _password(page, world, username, path)
    expect(page.locator("#code-step")).to_be_visible()
    page.get_by_label("Code", exact=True).fill(code_at(world.secrets[username], time.time() + 30))
    page.get_by_role("button", name="Continue").click()
    expect(page).to_have_url(world.net.hub_url + path)


def _decode_qr(page: Page) -> str:
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(page.locator("#qr").screenshot())))
    assert len(found) == 1, "the enrolment QR code cannot be read"
    return str(found[0].text)


def _renders(page: Page) -> int:
    """How many rendered frames the page has asked the hub for."""
    return int(
        page.evaluate(
            "performance.getEntriesByType('resource')"
            ".filter((e) => e.name.includes('/rendered')).length"
        )
    )


def _pixels(page: Page) -> dict[str, Any]:
    """Statistics of the middle of the viewer's canvas, where the image is."""
    stats: dict[str, Any] = page.evaluate(
        """() => {
            const c = document.getElementById("image");
            const w = Math.floor(c.width / 3), h = Math.floor(c.height / 3);
            const d = c.getContext("2d").getImageData(w, h, w, h).data;
            let n = 0, sum = 0, squares = 0;
            const values = new Set();
            for (let i = 0; i < d.length; i += 4) {
                n += 1; sum += d[i]; squares += d[i] * d[i]; values.add(d[i]);
            }
            const mean = sum / n;
            return {mean, sd: Math.sqrt(squares / n - mean * mean), distinct: values.size,
                    sample: Array.from(d.filter((_, i) => i % 4 === 0))};
        }"""
    )
    return stats


def _drawn(page: Page) -> int:
    return int(page.locator("#image").get_attribute("data-drawn") or 0)


# -- the tests --------------------------------------------------------------------------------


def test_send_from_the_pacs_watch_it_arrive_and_view_it(world: World) -> None:
    shots = world.shots
    with browsers(world.root) as people:
        # Riverside's radiologist, on a tablet, logs in with her code and opens the inbox.
        rita = people.open("rita", TABLET)
        _password(rita, world, "rita", "/portal/inbox")
        expect(rita.locator("#code-step")).to_be_visible()
        shots.take(rita, "login-code")
        rita.get_by_label("Code", exact=True).fill(code_at(world.secrets["rita"], time.time() + 30))
        rita.get_by_role("button", name="Continue").click()
        expect(rita).to_have_url(world.net.hub_url + "/portal/inbox")
        _check_secure_cookie(rita.context)
        rita.evaluate("window.__sameDocument = true")

        # St Elsewhere's PACS manager logs in for the first time: enrolment by QR code.
        sam = people.open("sam")
        _password(sam, world, "sam", "/portal/send")
        expect(sam.locator("#enrol-step")).to_be_visible()
        uri = _decode_qr(sam)
        secret = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)["secret"][0]
        assert uri.startswith("otpauth://totp/") and secret == sam.locator("#secret").inner_text()
        shots.take(sam, "login-enrol")
        sam.get_by_label("Code from the app").fill(code_at(secret, time.time()))
        sam.get_by_role("button", name="Turn on two-factor login").click()
        expect(sam.locator("#recovery-codes li")).to_have_count(10)
        sam.get_by_role("button", name="I have kept them: continue").click()
        expect(sam).to_have_url(world.net.hub_url + "/portal/send")

        # Send: find the study in SEG's PACS, to Riverside, urgent, with a typed report.
        sam.get_by_label("Patient ID").fill(PATIENT_ID)
        sam.get_by_role("button", name="Search").click()
        expect(sam.locator("#search-message")).to_have_text("1 found.", timeout=30_000)
        expect(sam.locator("#receiver option")).to_have_count(2)  # "Choose…" and RVH only
        sam.locator("#study-results input[name=study]").check()
        sam.get_by_label("Send to").select_option("RVH")
        sam.get_by_label("Urgent").check()
        sam.get_by_label("Reason").fill("Transfer of care: admitted to Riverside ICU")
        sam.get_by_label("Typed text").check()
        sam.get_by_label("Report text").fill(REPORT)
        shots.take(sam, "send", full_page=True)
        sam.get_by_role("button", name="Send", exact=True).click()
        expect(sam.locator("#send-message")).to_contain_text("Sent with the report", timeout=90_000)

        # Riverside's inbox follows it to "delivered" without being reloaded.
        delivered = rita.locator("#transfer-rows tr.status-delivered.urgent")
        expect(delivered).to_contain_text("30 of 30 images", timeout=120_000)
        expect(delivered).to_contain_text("URGENT")
        expect(delivered).to_contain_text("SEG")
        assert rita.evaluate("window.__sameDocument") is True
        shots.take(rita, "inbox")
        assert world.rvh_pacs.count() >= 30

        # St Elsewhere's outbox says the same.
        sam.get_by_role("link", name="Follow it in the outbox").click()
        expect(sam.locator("#transfer-rows tr.status-delivered")).to_contain_text(
            "30 of 30 images", timeout=60_000
        )
        shots.take(sam, "outbox")

        # Sent again, from what the hub now holds for SEG, routine, with a PDF report.
        sam.get_by_role("link", name="Send", exact=True).click()
        sam.get_by_label("Studies the hub holds for us").check()
        sam.get_by_label("NHS number").fill(NHS_NUMBER)
        sam.get_by_role("button", name="Search").click()
        expect(sam.locator("#search-message")).to_have_text("1 found.")
        sam.locator("#study-results input[name=study]").check()
        sam.get_by_label("Send to").select_option("RVH")
        sam.get_by_label("PDF file").check()
        sam.get_by_label("PDF report").set_input_files(
            files=[{"name": "letter.pdf", "mimeType": "application/pdf", "buffer": PDF}]
        )
        sam.get_by_label("Report title").fill("Discharge letter")
        sam.get_by_role("button", name="Send", exact=True).click()
        expect(sam.locator("#send-message")).to_contain_text("Sent with the report")
        sam.get_by_role("link", name="Follow it in the outbox").click()
        expect(sam.locator("#transfer-rows tr.status-delivered")).to_have_count(2, timeout=60_000)

        # The radiologist opens the study in the viewer.
        with rita.expect_navigation():
            delivered.get_by_role("link", name="View").click()
        assert rita.title() == "Viewer · ImageBridge"
        rita.wait_for_function("Number(document.getElementById('image').dataset.drawn) >= 1")
        expect(rita.locator("#series-list img")).to_have_count(1)
        before = _pixels(rita)
        # A chest, not a blank: many grey levels, widely spread.
        assert before["distinct"] > 40 and before["sd"] > 20, before
        assert rita.locator("#image").get_attribute("data-window") == "40,400"

        drawn = _drawn(rita)
        rita.get_by_role("button", name="Lung").click()
        rita.wait_for_function(
            f"Number(document.getElementById('image').dataset.drawn) > {drawn}"
            " && document.getElementById('image').dataset.window === '-600,1500'"
        )
        lung = _pixels(rita)
        changed = sum(a != b for a, b in zip(before["sample"], lung["sample"], strict=True))
        assert changed > len(lung["sample"]) // 4, "the lung window did not change the image"
        assert lung["distinct"] > 20

        # Dragging changes the window too; keys and the wheel move through the slices.
        box = rita.locator("#image").bounding_box()
        assert box is not None
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        rita.mouse.move(cx, cy)
        rita.mouse.down()
        # As over a slow link (or from a busy hub): frames take longer than the moves.
        cdp = rita.context.new_cdp_session(rita)
        cdp.send("Network.enable")
        slow = {"offline": False, "downloadThroughput": -1, "uploadThroughput": -1}
        cdp.send("Network.emulateNetworkConditions", {**slow, "latency": 300})
        rita.evaluate(
            "window.moves = 0;"
            " document.getElementById('image').addEventListener('pointermove',"
            " () => { window.moves += 1; })"
        )
        renders = _renders(rita)
        rita.mouse.move(cx + 80, cy + 40, steps=24)
        rita.mouse.up()
        expect(rita.locator("#image")).not_to_have_attribute("data-window", "-600,1500")
        # The window the drag ended at (right widens, down raises the level, by width/256):
        # the last frame drawn is the one at the end, not one passed on the way.
        scale = max(1, 1500 / 256)
        ended = f"{math.floor(-600 + 40 * scale + 0.5)},{math.floor(1500 + 160 * scale + 0.5)}"
        expect(rita.locator("#image")).to_have_attribute("data-window", ended)
        # One frame at a time while the window moves (each then asks for the window reached
        # meanwhile), and four neighbours once it stops: a frame asked for at every move
        # would queue behind the others, and the image lag behind the hand.
        moves = int(rita.evaluate("window.moves"))
        asked = _renders(rita) - renders
        assert moves >= 8 and asked - 4 <= moves // 2, (moves, asked)
        cdp.send("Network.emulateNetworkConditions", {**slow, "latency": 0})
        slice_before = int(rita.locator("#image").get_attribute("data-slice") or 0)
        rita.locator("#image").focus()
        rita.keyboard.press("ArrowDown")
        expect(rita.locator("#image")).to_have_attribute("data-slice", str(slice_before + 1))
        rita.mouse.move(cx, cy)
        rita.mouse.wheel(0, 120)
        expect(rita.locator("#image")).to_have_attribute("data-slice", str(slice_before + 2))
        rita.keyboard.press("2")  # soft tissue
        expect(rita.locator("#image")).to_have_attribute("data-window", "40,400")
        # The report beside the images.
        expect(rita.frame_locator("iframe.report-text").locator("body")).to_contain_text(REPORT)
        shots.take(rita, "viewer")

        # Everything about the patient across the network, found by NHS number.
        rita.get_by_role("link", name="Patient").click()
        rita.get_by_label("NHS number, or your institution's patient ID").fill(NHS_NUMBER)
        rita.get_by_role("button", name="Find").click()
        record = rita.locator("#patient-record")
        expect(record).to_contain_text("St Elsewhere General Hospital")
        expect(record).to_contain_text("CT CHEST")
        expect(record.get_by_role("link", name="Report")).to_have_count(1)
        shots.take(rita, "patient", full_page=True)

        # The portal on a laptop, the same viewer.
        rita.set_viewport_size({"width": 1366, "height": 900})
        rita.go_back()
        rita.wait_for_function("Number(document.getElementById('image').dataset.drawn) >= 1")
        shots.take(rita, "viewer-laptop")
        shots.note(sam)

    shots.assert_nothing_names(PATIENT_ID, NHS_NUMBER, "DEMO", "ALICE", "RVH0042")
    [viewed] = [e for e in audit_events(world.net, "portal:study:viewed") if e["actor"] == "rita"][
        :1
    ]
    assert viewed["study_ref"] == world.study.study_instance_uid
    searched = audit_events(world.net, "portal:patient:searched")
    assert [e["patient_ref"] for e in searched if e["actor"] == "rita"] == [NHS_NUMBER]


def _check_secure_cookie(context: BrowserContext) -> None:
    """The session cookie is Secure, HttpOnly and SameSite=Strict, and chromium keeps it
    over http://127.0.0.1 (a secure context): the login above worked with it."""
    [cookie] = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["domain"] == "127.0.0.1"


def test_people_without_the_permission_get_no_page(world: World) -> None:
    with browsers(world.root) as people:
        page = people.open("carl")
        # Nobody logged in: every page sends the browser to log in.
        for path in ("/portal/inbox", "/portal/audit", "/portal/studies/1"):
            page.goto(world.net.hub_url + path)
            expect(page).to_have_url(f"{world.net.hub_url}/portal/login?next={path}")
        # A clerk may track transfers, not view studies nor read the trail.
        log_in(page, world, "carl", "/portal/inbox")
        nav = page.get_by_role("navigation", name="Main")
        expect(nav.get_by_role("link")).to_have_text(["Send", "Outbox", "Inbox"])
        for path in (
            "/portal/studies/1",
            "/portal/patient",
            "/portal/audit",
            "/portal/admin/users",
        ):
            response = page.goto(world.net.hub_url + path)
            assert response is not None and response.status == 403, path
            expect(page.get_by_role("heading", level=1)).to_have_text("Not permitted")
            expect(page.locator("main")).not_to_contain_text(PATIENT_ID)
        world.shots.take(page, "refused")
        # Nor through what the pages' scripts fetch.
        answer = page.evaluate(
            """async () => {
                const csrf = document.querySelector("meta[name=csrf-token]").content;
                const r = await fetch("/portal/patient", {method: "POST",
                    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                    body: JSON.stringify({term: "9434765919"})});
                return [r.status, await r.text()];
            }"""
        )
        assert answer[0] == 403 and PATIENT_ID not in answer[1]
        # Logging out ends the session: the pages send the browser to log in again.
        page.goto(world.net.hub_url + "/portal/inbox")
        page.get_by_role("button", name="Log out").click()
        expect(page).to_have_url(world.net.hub_url + "/portal/login")
        page.goto(world.net.hub_url + "/portal/inbox")
        expect(page).to_have_url(f"{world.net.hub_url}/portal/login?next=/portal/inbox")


def test_administration_and_audit_pages(world: World) -> None:
    shots = world.shots
    with browsers(world.root) as people:
        page = people.open("nora")
        log_in(page, world, "nora", "/portal/admin/institutions")
        rows = page.locator("main table").first.locator("tbody tr")
        expect(rows).to_have_count(2)
        expect(rows.filter(has_text="RVH")).to_contain_text("in force")
        shots.take(page, "admin-institutions", full_page=True)
        page.get_by_role("link", name="Users").click()
        expect(page.locator("main")).to_contain_text("rita")
        shots.take(page, "admin-users", full_page=True)
        page.get_by_role("link", name="Gateways").click()
        expect(page.locator("main")).to_contain_text("IB_RVH")
        # Register a gateway: its token is shown once, in the page.
        form = page.locator("form", has_text="Register a gateway").first
        form.get_by_label("Register a gateway: name").fill("spare")
        form.get_by_role("button", name="Issue its token").click()
        expect(form.locator("output")).to_contain_text("token: ibg_")
        shots.take(page, "admin-gateways", full_page=True)
    issued = audit_events(world.net, "directory:gateway:issued")
    assert any(e["actor"] == "nora" and e["detail"]["name"] == "spare" for e in issued)

    with browsers(world.root) as people:
        page = people.open("audrey")
        log_in(page, world, "audrey", "/portal/audit")
        page.get_by_label("Action (tag, or prefix ending in :)").fill("user:login:")
        page.get_by_role("button", name="Search").click()
        expect(page.locator("#audit-rows tr").first).to_contain_text("user:login:")
        expect(page.locator("#audit-rows")).to_contain_text("audrey")
        shots.take(page, "audit", full_page=True)
        with page.expect_download() as download:
            page.get_by_role("button", name="Export CSV").click()
        content = Path(download.value.path()).read_text()
        assert content.startswith("id,at,actor_type,actor,institution,action")
        assert "user:login:success" in content and "audrey" in content
        page.get_by_role("button", name="Verify the chain").click()
        expect(page.locator("#audit-search output")).to_contain_text("intact: true")
    assert any(e["actor"] == "audrey" for e in audit_events(world.net, "audit:trail:exported"))


def test_my_account_sessions_tokens_and_password(world: World) -> None:
    """A person's own account, from her name at the top of each page: where she is logged
    in, an API token made (shown once), used and revoked, and a new password, which ends her
    other sessions."""
    with browsers(world.root) as people:
        elsewhere = people.open("mona-elsewhere")  # a second session, in another browser
        # A recovery code here, the authenticator's code below: each works once.
        _password(elsewhere, world, "mona")
        elsewhere.get_by_label("Code", exact=True).fill(world.recovery_codes["mona"][0])
        elsewhere.get_by_role("button", name="Continue").click()
        expect(elsewhere).to_have_url(world.net.hub_url + "/portal/")
        page = people.open("mona")
        log_in(page, world, "mona")
        page.get_by_role("link", name="mona").click()
        expect(page).to_have_title("My account · ImageBridge")
        # This one, the other browser's, and the enrolment's of an earlier day if still live.
        expect(page.locator("#sessions tbody tr", has_text="this session")).to_have_count(1)
        live = page.locator("#sessions tbody tr").count()
        assert live >= 2

        form = page.locator("form", has_text="Make a token")
        form.get_by_label("Name").fill("nightly export")
        form.get_by_label("track_transfers").check()
        form.get_by_role("button", name="Make a token").click()
        expect(form.locator("output")).to_contain_text("token: ibu_")
        token = re.search(r"ibu_\S+", form.locator("output").inner_text())
        assert token is not None
        bearer = {"Authorization": f"Bearer {token.group(0)}"}
        with httpx.Client(base_url=world.net.hub_url, headers=bearer, timeout=30) as script:
            assert script.get("/api/v1/transfers").status_code == 200  # what it may
            assert script.post("/api/v1/transfers", json={"receiver": "RVH"}).status_code == 403
            page.reload()
            row = page.locator("#tokens tbody tr", has_text="nightly export")
            expect(row).to_contain_text("active")
            page.once("dialog", lambda dialog: dialog.accept())
            row.get_by_role("button", name="Revoke").click()
            expect(page.locator("#tokens tbody tr", has_text="nightly export")).to_contain_text(
                "revoked"
            )
            assert script.get("/api/v1/transfers").status_code == 401

        change = page.locator("form", has_text="Change password")
        change.get_by_label("Current password").fill("not my password at all")
        change.get_by_label("New password").fill(NEW_PASSWORD)
        change.get_by_role("button", name="Change password").click()
        expect(change.locator("output")).to_have_class(re.compile("error"))
        change.get_by_label("Current password").fill(PASSWORD)
        change.get_by_role("button", name="Change password").click()
        expect(change.locator("output")).to_contain_text(f"other_sessions_ended: {live - 1}")
        elsewhere.reload()
        expect(elsewhere).to_have_url(re.compile(r"/portal/login"))
        page.reload()
        expect(page.locator("#sessions tbody tr")).to_have_count(1)
        world.shots.take(page, "my-account", full_page=True)
    actions = {e["action"] for e in audit_events(world.net, "user:") if e["actor"] == "mona"}
    assert {"user:token:created", "user:token:revoked", "user:password:changed"} <= actions


def test_a_study_shared_with_a_solicitor_who_downloads_it_until_revoked(world: World) -> None:
    """A radiologist shares a study her institution sent with a solicitor, for a stated
    purpose; the solicitor sees it (and nothing else) on her own page and downloads it as a
    zip with a DICOMDIR; revoked, it is gone. Every step is audited."""
    study = generate_ct_study(
        world.root / "shared-study",
        slices=2,
        rows=32,
        columns=32,
        patient_id="SEG5150",
        patient_name="CLAIM^CAROL",
        nhs_number=None,  # not the patient of the other tests, whose studies would show too
    )
    token = world.net.issue_token("SEG", "records")
    with closing(HubClient(world.net.hub_url, token)) as sender:
        items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in study.paths]
        made = sender.create_transfer(
            receiver="RVH", origin="dicom", idempotency_key=uuid.uuid4().hex, reason="records"
        )
        sender.upload(made["id"], list(items))  # held at the hub as SEG's, never delivered
    uid = str(pydicom.dcmread(study.paths[0], stop_before_pixels=True).StudyInstanceUID)

    with browsers(world.root) as people:
        sara = people.open("sara")
        log_in(sara, world, "sara", "/portal/patient")
        # From the study itself: found by the patient's ID, opened, shared from the viewer.
        sara.get_by_label("NHS number, or your institution's patient ID").fill("SEG5150")
        sara.get_by_role("button", name="Find").click()
        with sara.expect_navigation():
            sara.locator("#patient-record").get_by_role("link", name="View").click()
        sara.get_by_role("link", name="Share with an external user…").click()
        form = sara.locator("section", has_text="Share studies").locator("form")
        studies = form.get_by_label("Studies (Study Instance UIDs, separated by spaces or commas)")
        expect(studies).to_have_value(uid)
        form.get_by_label("External user's name").fill("lena")
        form.get_by_label("Purpose").fill("Claim 2026/118: personal injury")
        form.get_by_role("button", name="Share").click()
        row = sara.locator("#shares tbody tr", has_text="lena")
        expect(row).to_contain_text("granted")
        world.shots.take(sara, "shares", full_page=True)

        lena = people.open("lena")
        log_in(lena, world, "lena", "/portal/shared")
        expect(lena.locator("main")).to_contain_text("Claim 2026/118")
        expect(lena.locator("main")).to_contain_text("CLAIM, CAROL")
        expect(lena.get_by_role("link", name="Send")).to_have_count(0)  # hers only
        with lena.expect_download() as download:
            lena.get_by_role("link", name=re.compile("Download the images")).click()
        with zipfile.ZipFile(download.value.path()) as package:
            names = package.namelist()
        assert "DICOMDIR" in names and sum(n.startswith("DICOM/") for n in names) >= 2, names
        world.shots.take(lena, "shared-with-me", full_page=True)

        sara.once("dialog", lambda dialog: dialog.accept())
        row.get_by_role("button", name="Revoke").click()
        expect(sara.locator("#shares tbody tr", has_text="lena")).to_contain_text("revoked")
        lena.reload()
        expect(lena.locator("main")).to_contain_text("Nothing is shared with you")
    done = {e["action"] for e in audit_events(world.net, "share:")}
    assert {"share:access:granted", "share:study:listed", "share:package:exported"} <= done
    assert "share:access:revoked" in done
