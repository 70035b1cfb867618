"""Swagger UI at /docs and ReDoc at /redoc in a real Chromium: they render from the service's own files
(every request to another origin is blocked and fails the test) and Swagger's "Try it out" works."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import PageWatch
from tests.support.server import Server

pytestmark = [pytest.mark.browser, pytest.mark.server]


@pytest.fixture(scope="module")
def server(small_server: Server) -> Server:
    return small_server


def test_swagger_ui_lists_every_operation_and_try_it_out_works(
    page_and_watch: tuple[Page, PageWatch], server: Server
) -> None:
    page, _ = page_and_watch
    page.goto("/docs")
    expect(page.locator(".opblock").first).to_be_visible()
    schema = httpx.get(f"{server.url}/openapi.json").json()
    expected = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    shown = set()
    for block in page.locator(".opblock-summary").all():
        method = block.locator(".opblock-summary-method").inner_text().strip()
        path = block.locator(".opblock-summary-path").get_attribute("data-path")
        shown.add((method, path))
    assert shown == expected
    assert ("POST", "/jobs/{job_id}/cancel") in shown and ("GET", "/stats") in shown

    operation = page.locator("#operations-generation-generate_generate_post")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status").first
    expect(status).to_have_text("200", timeout=30_000)
    expect(operation.locator(".live-responses-table")).to_contain_text("generated_text")
    # The page's icon is the service's own.
    assert page.locator("link[rel='shortcut icon']").get_attribute("href") == "/static/favicon.svg"


def test_redoc_renders_offline(page_and_watch: tuple[Page, PageWatch]) -> None:
    page, _ = page_and_watch
    page.goto("/redoc")
    expect(page.get_by_role("heading", name="textgen").first).to_be_visible(timeout=20_000)
    expect(page.locator("body")).to_contain_text("Generate text and wait for it")


def test_docs_pages_name_no_other_origin(server: Server) -> None:
    """The HTML itself, not only what the browser fetched: no http(s) URL to anywhere."""
    for path in ("/docs", "/redoc", "/"):
        html = httpx.get(f"{server.url}{path}").text
        assert "http://" not in html and "https://" not in html, path
