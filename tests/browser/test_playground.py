"""The playground at / in a real Chromium, against a real uvicorn on a small random GPT-2.

Generations are short (a few dozen tokens) except where a test needs one to still be running: those
ask for 1000 tokens with ignore_eos and stop it.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import PHONE, PageWatch, open_page, screenshot
from tests.support.server import Server
from tests.support.waiting import wait_until_sync

pytestmark = [pytest.mark.browser, pytest.mark.server]

LONG = 1000  # tokens: many seconds of work on the small model, so there is time to look and to stop it


@pytest.fixture(scope="module")
def server(small_server: Server) -> Server:
    return small_server


@pytest.fixture
def page(page_and_watch: tuple[Page, PageWatch]) -> Page:
    page_and_watch[0].goto("/")
    return page_and_watch[0]


@pytest.fixture
def watch(page_and_watch: tuple[Page, PageWatch]) -> PageWatch:
    return page_and_watch[1]


def fill_generation(
    page: Page, prompt: str, max_new_tokens: int, *, seed: int | None = 7, ignore_eos: bool = True
) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max_new_tokens", str(max_new_tokens))
    page.fill("#seed", "" if seed is None else str(seed))
    page.set_checked("#ignore_eos", ignore_eos)


def test_generation_streams_into_the_page_and_reports_the_result(page: Page, server: Server) -> None:
    fill_generation(page, "Once upon a time", 24)
    # Count how often the output changes while the stream runs: a streamed answer changes it many times.
    page.evaluate(
        "() => { window.outputChanges = 0; new MutationObserver(() => window.outputChanges++)"
        ".observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true}); }"
    )
    with page.expect_request("**/generate") as request_info:
        page.click("#generate")
    body = request_info.value.post_data_json
    assert body["stream"] is True and body["max_new_tokens"] == 24 and body["seed"] == 7

    meta = page.locator("#result-meta")
    expect(meta).to_contain_text("finish reason: length", timeout=30_000)
    expect(meta).to_contain_text("completion tokens: 24")
    expect(meta).to_contain_text(re.compile(r"time to first token: \d+(\.\d+)? m?s"))
    expect(meta).to_contain_text(re.compile(r"tokens/s: \d+\.\d"))
    assert page.evaluate("window.outputChanges") >= 3  # several token events, then the final text

    # Same seed, same request, float32: the streamed text is exactly what the plain JSON route returns.
    plain = httpx.post(f"{server.url}/generate", json={k: v for k, v in body.items() if k != "stream"}, timeout=60)
    assert page.inner_text("#output") == plain.json()["generated_text"]
    expect(page.locator("#stop-button")).to_be_disabled()
    screenshot(page, "playground-desktop")


def test_stop_cancels_the_generation_and_the_stats_panel_follows(page: Page, server: Server) -> None:
    fill_generation(page, "The quick brown fox", LONG)
    page.click("#generate")
    # The live panel (GET /stats every second) shows the sequence in the batch while it runs...
    expect(page.locator("#stat-running")).to_have_text("1", timeout=15_000)
    expect(page.locator("#stat-max-running")).not_to_have_text("–")
    expect(page.locator("#output")).not_to_be_empty(timeout=15_000)
    page.click("#stop-button")
    expect(page.locator("#result-meta")).to_contain_text("stopped after")
    # The page's stream loop has ended (it wrote "stopped after"): what the output holds now is final.
    stopped_at = page.inner_text("#output")
    # ...and the sequence leaves the batch at once, long before 1000 tokens could have been generated.
    wait_until_sync(lambda: httpx.get(f"{server.url}/stats").json()["running"] == 0, 5, "the batch to empty after Stop")
    expect(page.locator("#stat-running")).to_have_text("0", timeout=5_000)
    # Steps later (the server's batch empty, a /stats round trip rendered) the output has not grown.
    assert page.inner_text("#output") == stopped_at
    assert float(page.inner_text("#stat-tps")) > 0
    expect(page.locator("#generate")).to_be_enabled()


def test_a_filter_rejection_is_shown_as_the_api_states_it(page: Page, watch: PageWatch) -> None:
    watch.allow_console("status of 400")  # Chromium logs every 4xx response; this one is the point
    fill_generation(page, "I hate this", 8)
    page.click("#generate")
    error = page.locator("#generate-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("400: The prompt was rejected by the content filter.")
    expect(error).to_contain_text(re.compile(r"request id [0-9a-f]{32}"))
    expect(page.locator("#output")).to_be_empty()


def test_background_job_is_followed_from_queued_to_succeeded(page: Page, server: Server) -> None:
    # One job at a time on this server: a long job runs first, so the page's job has to queue behind it.
    blocker = httpx.post(
        f"{server.url}/generate_background",
        json={"prompt": "Hold the line", "max_new_tokens": LONG, "ignore_eos": True},
    ).json()["job_id"]
    blocker_url = f"{server.url}/jobs/{blocker}"
    wait_until_sync(lambda: httpx.get(blocker_url).json()["state"] == "running", 15, "the blocker to run")

    fill_generation(page, "Continuous batching", 12)
    page.click("#background")
    expect(page.locator("#tab-jobs")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#job-state")).to_have_text("queued")
    expect(page.locator("#job-queue")).to_contain_text("next to start")

    # The recent-jobs list has both; cancelling the blocker from it lets the followed job run.
    blocker_row = page.locator(f"#jobs-body tr[data-job-id='{blocker}']")
    expect(blocker_row).to_contain_text("running")
    blocker_row.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("#job-meta")).to_contain_text("completion tokens: 12")
    expect(page.locator("#job-output")).not_to_be_empty()
    assert httpx.get(f"{server.url}/jobs/{blocker}").json()["state"] == "cancelled"
    followed = page.inner_text("#job-id")
    expect(page.locator(f"#jobs-body tr[data-job-id='{followed}']")).to_contain_text("succeeded")


def test_chat_streams_and_keeps_the_conversation(page: Page) -> None:
    page.click("#tab-chat")
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "Hello there")
    page.click("#chat-send")
    expect(page.locator("#chat-meta")).to_contain_text("finish reason:", timeout=30_000)
    expect(page.locator("#chat-log li")).to_have_count(2)
    expect(page.locator("#chat-log li.assistant .text")).not_to_be_empty()

    page.fill("#chat-input", "And again")
    with page.expect_request("**/v1/chat/completions") as request_info:
        page.click("#chat-send")
    sent = request_info.value.post_data_json
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["stream"] is True
    expect(page.locator("#chat-log li")).to_have_count(4, timeout=30_000)
    expect(page.locator("#chat-meta")).to_contain_text("completion tokens:", timeout=30_000)


def test_phone_width_and_keyboard_only(browser: Browser, server: Server) -> None:
    page, watch = open_page(browser, server, viewport=PHONE)
    try:
        page.goto("/")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px at phone width"
        # Keyboard: Ctrl+Enter in the prompt generates, Escape stops.
        fill_generation(page, "Once upon a time", 16)
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")
        expect(page.locator("#result-meta")).to_contain_text("finish reason: length", timeout=30_000)
        screenshot(page, "playground-phone")
        fill_generation(page, "Once upon a time", LONG)
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")
        expect(page.locator("#output")).not_to_be_empty(timeout=15_000)
        page.keyboard.press("Escape")
        expect(page.locator("#result-meta")).to_contain_text("stopped after")
        # Tabs follow the arrow keys and move the focus.
        page.focus("#tab-generate")
        page.keyboard.press("ArrowRight")
        expect(page.locator("#tab-chat")).to_be_focused()
        expect(page.locator("#panel-chat")).to_be_visible()
        page.keyboard.press("End")
        expect(page.locator("#tab-jobs")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#panel-generate")).to_be_hidden()
    finally:
        page.context.close()
    assert not watch.unexpected(), watch.unexpected()


def test_a_json_schema_shapes_the_output(page: Page) -> None:
    schema = json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    )
    fill_generation(page, "Answer as JSON:", 40, ignore_eos=False)
    page.fill("#json_schema", schema)
    with page.expect_request("**/generate") as request_info:
        page.click("#generate")
    assert request_info.value.post_data_json["json_schema"]["required"] == ["ok"]
    expect(page.locator("#result-meta")).to_contain_text("finish reason: stop", timeout=30_000)
    answer = json.loads(page.inner_text("#output"))
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)
