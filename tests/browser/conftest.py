"""Browser fixtures: Debian's chromium driven by Playwright for Python, against a real uvicorn on the tiny GPT-2.

Each test module gets one server (``launch_server`` from the end-to-end fixtures, here on the tiny
model, so start-up takes seconds) and the whole session one browser. Every page blocks requests that
leave the server's origin and records them, and records console errors and uncaught exceptions; a
test fails if any appear that it did not expect. Screenshots go to ``build/screenshots/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Route, sync_playwright

from tests.e2e.conftest import REPO_ROOT, Server, launch_server

SCREENSHOT_DIR = REPO_ROOT / "build" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
# The playground's tiny-model server: fast job polling, one background job at a time (so a second job
# is observably queued behind a first one).
TINY_SERVER_ENV = {
    "TEXTGEN_DTYPE": "float32",
    "TEXTGEN_JOB_POLL_INTERVAL_S": "0.05",
    "TEXTGEN_JOB_CONCURRENCY": "1",
    "TEXTGEN_SHUTDOWN_GRACE_S": "1",
}


def chromium_executable() -> str:
    path = os.environ.get("TEXTGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run `make setup` as root (scripts/install-chromium.sh) or apt-get it")
    return path


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
    try:
        yield browser
    finally:
        browser.close()


def tiny_server(tiny_model_dir: Path, workdir: Path, **env: str) -> Iterator[Server]:
    settings = {**TINY_SERVER_ENV, "TEXTGEN_MODEL": str(tiny_model_dir), **env}
    with launch_server(settings, workdir=workdir, name="browser-server", ready_timeout_s=120) as server:
        yield server


@dataclass
class PageWatch:
    """What a page did that a test did not ask for."""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    allowed_console: tuple[str, ...] = ()

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def on_route(self, route: Route) -> None:
        url = route.request.url
        if url.startswith(self.origin) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.external_requests.append(url)
            route.abort()

    def allow_console(self, *fragments: str) -> None:
        """Console errors containing one of these are expected (e.g. Chromium's line for a 400 response)."""
        self.allowed_console += fragments

    def unexpected(self) -> list[str]:
        console = [m for m in self.console_errors if not any(f in m for f in self.allowed_console)]
        return (
            console + [f"uncaught: {e}" for e in self.page_errors] + [f"external: {u}" for u in self.external_requests]
        )


def open_page(browser: Browser, server: Server, viewport: dict[str, int] = DESKTOP) -> tuple[Page, PageWatch]:
    context = browser.new_context(viewport=viewport, base_url=server.url)  # type: ignore[arg-type]
    context.set_default_timeout(15_000)
    page = context.new_page()
    watch = PageWatch(origin=server.url)
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.page_errors.append(str(error)))
    context.route("**/*", watch.on_route)
    return page, watch


@pytest.fixture
def page_and_watch(browser: Browser, server: Server) -> Iterator[tuple[Page, PageWatch]]:
    """A fresh desktop page (own context: own sessionStorage) on the module's ``server``; fails the test on
    console errors, uncaught exceptions or requests to other origins that the test did not allow."""
    page, watch = open_page(browser, server)
    try:
        yield page, watch
    finally:
        page.context.close()
    assert not watch.unexpected(), f"unexpected browser events: {watch.unexpected()}"


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
