"""Debian's chromium driven by Playwright for the portal's end-to-end tests.

`playwright install` cannot download browsers here, so Playwright drives /usr/bin/chromium,
headless, each person in a browser of their own with a new, empty profile folder. Under CI
a missing chromium fails the test (conftest.require_tool).

The session cookie is `Secure`. Chromium treats http://127.0.0.1 and http://localhost as
secure contexts and keeps Secure cookies set over them (checked in test_portal), so the
tests log in over plain HTTP on loopback exactly as a person would over HTTPS.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from conftest import require_tool

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP = {"width": 1366, "height": 900}
TABLET = {"width": 1024, "height": 768}
TIMEOUT_MS = 30_000


class Browsers:
    """Chromium browsers, one per person, each with a new empty profile folder."""

    def __init__(self, playwright: Playwright, executable: str, root: Path) -> None:
        self.playwright = playwright
        self.executable = executable
        self.root = root
        self.opened: list[BrowserContext] = []

    def open(self, person: str, viewport: dict[str, int] = LAPTOP) -> Page:
        profile = self.root / f"profile-{person}"
        profile.mkdir(parents=True)
        context = self.playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=self.executable,
            headless=True,
            args=ARGS,
            viewport=viewport,
            accept_downloads=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        self.opened.append(context)
        return context.pages[0] if context.pages else context.new_page()


@contextmanager
def browsers(root: Path) -> Iterator[Browsers]:
    """Playwright driving Debian's chromium; every browser opened is closed at the end,
    which stops its processes."""
    executable = require_tool(CHROMIUM)
    with sync_playwright() as playwright:
        opened = Browsers(playwright, executable, root)
        try:
            yield opened
        finally:
            for context in opened.opened:
                context.close()


def screenshot_folder(tmp_path: Path) -> Path:
    """Where a test keeps its screenshots: $IMAGEBRIDGE_SCREENSHOTS, else under its tmp dir."""
    folder = Path(os.environ.get("IMAGEBRIDGE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Shots:
    """Screenshots of the pages a test visits, and what every visited page showed in its
    address bar and title: neither may name a patient."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[tuple[str, str]] = []

    def take(self, page: Page, name: str, **options: Any) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), **options)
        self.note(page)
        return path

    def note(self, page: Page) -> None:
        self.seen.append((page.url, page.title()))

    def assert_nothing_names(self, *values: str) -> None:
        for url, title in self.seen:
            for value in values:
                pattern = re.compile(re.escape(value), re.IGNORECASE)
                assert not pattern.search(url) and not pattern.search(title), (url, title, value)
