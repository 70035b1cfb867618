"""The playground on the real bundled model (SmolLM2-135M-Instruct): a streamed generation and a chat
turn, then the screenshot the README shows (build/screenshots/playground-bundled.png; copied by hand
to docs/playground.png when the page changes)."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import PageWatch, screenshot
from tests.support.server import Server

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.server]


@pytest.fixture(scope="module")
def server(default_server: Server) -> Server:
    """The session's bundled-model server (one background job at a time; the page runs none)."""
    return default_server


def test_playground_on_the_bundled_model(page_and_watch: tuple[Page, PageWatch]) -> None:
    page, _ = page_and_watch
    page.goto("/")
    expect(page.locator("#stat-model")).to_have_text("SmolLM2-135M-Instruct")

    page.click("#tab-chat")
    page.fill("#chat-max-tokens", "16")
    page.fill("#chat-input", "Say hello in French.")
    page.click("#chat-send")
    expect(page.locator("#chat-meta")).to_contain_text("finish reason:", timeout=120_000)
    expect(page.locator("#chat-log li.assistant .text")).not_to_be_empty()

    page.click("#tab-generate")
    page.fill("#prompt", "The three most useful things to know about continuous batching are")
    page.fill("#max_new_tokens", "32")
    page.fill("#seed", "3")
    page.click("#generate")
    expect(page.locator("#result-meta")).to_contain_text("completion tokens:", timeout=120_000)
    assert len(page.inner_text("#output")) > 20
    screenshot(page, "playground-bundled")
