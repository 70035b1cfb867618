"""The playground on a server with API keys (and a per-key rate limit): the page loads without a key,
asks for one, keeps it in this tab's sessionStorage and sends it as a Bearer token; a 429 is shown as
the API states it, with its Retry-After."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import PageWatch, open_page, small_model_server
from tests.support.server import Server

pytestmark = [pytest.mark.browser, pytest.mark.server]

KEY = "browser-test-key"
LIMITED_KEY = "browser-limited-key"  # its own rate-limit budget, whatever order the tests run in
# Every API route counts, the live panel's once-a-second /stats polls too: room for a test's worth of them.
RATE_LIMIT_RPM = 100


@pytest.fixture(scope="module")
def server(browser_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from small_model_server(
        browser_model_dir,
        tmp_path_factory.mktemp("keys"),
        TEXTGEN_API_KEYS=f"{KEY},{LIMITED_KEY}",
        TEXTGEN_RATE_LIMIT_RPM=str(RATE_LIMIT_RPM),
    )


def generate_short(page: Page) -> None:
    page.fill("#prompt", "Once upon a time")
    page.fill("#max_new_tokens", "4")
    page.click("#generate")


def test_the_key_is_asked_for_kept_in_the_tab_and_sent_as_bearer(
    page_and_watch: tuple[Page, PageWatch], browser: Browser, server: Server
) -> None:
    page, watch = page_and_watch
    watch.allow_console("status of 401")  # the page finds out that a key is needed from a 401
    page.goto("/")
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#key-status")).to_contain_text("needs a valid API key")
    expect(page.locator("#stats-error")).to_contain_text("401")
    page.wait_for_timeout(2_500)  # the live panel waits for a key instead of failing every second
    assert sum("status of 401" in m for m in watch.console_errors) == 1, watch.console_errors

    page.fill("#api-key", "wrong-key")
    page.click("#key-form button[type=submit]")
    generate_short(page)
    expect(page.locator("#generate-error")).to_contain_text("401: Missing or invalid API key")

    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#stat-ready")).to_have_text("yes")
    with page.expect_request("**/generate") as request_info:
        generate_short(page)
    assert request_info.value.headers["authorization"] == f"Bearer {KEY}"
    expect(page.locator("#result-meta")).to_contain_text("finish reason:", timeout=30_000)
    expect(page.locator("#generate-error")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('textgen.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0  # never kept beyond the tab

    page.reload()  # same tab: the key survives
    expect(page.locator("#stat-ready")).to_have_text("yes")
    expect(page.locator("#api-key")).to_have_value(KEY)

    other, other_watch = open_page(browser, server)  # another tab (own session): asked again
    other_watch.allow_console("status of 401")
    try:
        other.goto("/")
        expect(other.locator("#key-status")).to_contain_text("needs a valid API key")
        expect(other.locator("#api-key")).to_have_value("")
    finally:
        other.context.close()
    assert not other_watch.unexpected(), other_watch.unexpected()

    page.click("#key-forget")
    assert page.evaluate("sessionStorage.getItem('textgen.apiKey')") is None


def test_a_rate_limit_is_shown_with_its_retry_after(page_and_watch: tuple[Page, PageWatch], server: Server) -> None:
    page, watch = page_and_watch
    watch.allow_console("status of 401", "status of 429")
    page.goto("/")
    page.fill("#api-key", LIMITED_KEY)
    page.click("#key-form button[type=submit]")
    error = page.locator("#generate-error")
    # The key's minute is used up from outside the page, then the page's next request is refused; a minute
    # that rolls over in between gives the key a fresh budget, so that is tried again (twice at most).
    for _ in range(3):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {LIMITED_KEY}"}) as client:
            codes = [client.get("/v1/models").status_code for _ in range(RATE_LIMIT_RPM + 1)]
            assert codes[-1] == 429, codes
        generate_short(page)
        expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
        if error.is_visible():
            break
    expect(error).to_contain_text("429: Rate limit exceeded")
    expect(error).to_contain_text(re.compile(r"Retry-After: \d+ s"))
