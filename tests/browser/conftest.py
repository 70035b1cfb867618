"""Browser fixtures: Debian's chromium driven by Playwright for Python, against a real uvicorn on a small GPT-2.

The modules share one server on a small random GPT-2 (``small_server``; start-up takes seconds) unless
they need other settings (the API-key module starts its own), and the bundled-model module uses the
session's ``default_server``; each module has one browser. Every page blocks requests that
leave the server's origin and records them, and records console errors and uncaught exceptions; a
test fails if any appear that it did not expect. Screenshots go to ``build/screenshots/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Route, sync_playwright
from transformers import GPT2Config, GPT2LMHeadModel

from tests.support.server import REPO_ROOT, Server, launch_server
from tests.support.tiny_model import EOS, build_tokenizer

SCREENSHOT_DIR = REPO_ROOT / "build" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
# The browser tests' server: fast job polling, one background job at a time (so a second job
# is observably queued behind a first one).
SERVER_ENV = {
    "TEXTGEN_DTYPE": "float32",
    "TEXTGEN_JOB_POLL_INTERVAL_S": "0.05",
    "TEXTGEN_JOB_CONCURRENCY": "1",
    "TEXTGEN_SHUTDOWN_GRACE_S": "1",
    "TEXTGEN_WARMUP": "false",  # start in seconds; nothing here measures the first request
}


def chromium_executable() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run `make setup` as root (scripts/install-chromium.sh) or apt-get it")
    return path


# Module-scoped, not session-scoped: while Playwright's sync driver is open, its event loop counts as
# running in this thread, and pytest-asyncio could not run the async tests of later modules.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
    try:
        yield browser
    finally:
        browser.close()


def save_browser_gpt2(folder: Path) -> Path:
    """The tiny GPT-2's tokenizer with a wider, deeper random model (GPT-2 small's width, half its depth):
    quick to build and load, quick for short generations, but a 1000-token one lasts over 10 s even on a
    fast idle machine (about 13 ms a decode step on one core): long enough to watch it in the live panel,
    stop it, or queue a job behind it without racing it."""
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=768,
        n_layer=6,
        n_head=12,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def browser_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_browser_gpt2(tmp_path_factory.mktemp("browser-gpt2"))


def small_model_server(model_dir: Path, workdir: Path, **env: str) -> Iterator[Server]:
    settings = {**SERVER_ENV, "TEXTGEN_MODEL": str(model_dir), **env}
    with launch_server(settings, workdir=workdir, name="browser-server", ready_timeout_s=120) as server:
        yield server


@pytest.fixture(scope="package")
def small_server(browser_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One small-model server with ``SERVER_ENV`` for every browser module that needs no other settings (the
    docs pages, the playground): one start instead of one per module; stopped when the browser tests end."""
    yield from small_model_server(browser_model_dir, tmp_path_factory.mktemp("small-server"))


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
