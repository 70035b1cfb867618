"""The browser-facing routes (playground, offline docs, /stats) and the exact API contract of issue 13:
strict booleans and numbers, documented Idempotency-Key constraints, non-empty /v1 prompts, a correct
``Allow`` header on 405, and cancel at ``POST /jobs/{id}/cancel`` beside ``DELETE /jobs/{id}``.

The pages themselves run in a real browser in ``tests/browser/``; here they are checked over HTTP.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.waiting import wait_until

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]
URL = re.compile(r"https?://")


# ----- Pages and their files ---------------------------------------------------------------------------


async def test_playground_page_and_files_come_from_the_service(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _):
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert not URL.search(page.text)
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):
            response = await client.get(asset)
            assert response.status_code == 200, asset
            assert not URL.search(response.text) or asset.endswith(".svg"), asset  # SVG's xmlns is no request
        icon = await client.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", ["/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css", "/static/favicon.svg"]),
        ("/redoc", ["/static/docs/redoc.standalone.js", "/static/favicon.svg"]),
    ],
)
async def test_docs_pages_load_only_local_assets(
    make_settings: MakeSettings, app_client: AppClient, page: str, assets: list[str]
) -> None:
    async with app_client(make_settings()) as (client, _):
        html = (await client.get(page)).text
        assert not URL.search(html), html
        for asset in assets:
            assert asset in html
            response = await client.get(asset)
            assert response.status_code == 200 and len(response.content) > 100, asset
    assert "cdn.redoc.ly" not in (await _redoc_bundle(make_settings, app_client))


async def _redoc_bundle(make_settings: MakeSettings, app_client: AppClient) -> str:
    async with app_client(make_settings()) as (client, _):
        return (await client.get("/static/docs/redoc.standalone.js")).text


async def test_pages_load_without_a_key_but_the_api_still_needs_one(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(api_keys=["k1"])) as (client, _):
        for path in ("/", "/static/playground.js", "/static/playground.css", "/favicon.ico"):
            assert (await client.get(path)).status_code == 200, path
        for path in ("/stats", "/jobs", "/openapi.json", "/docs"):
            assert (await client.get(path)).status_code == 401, path
        assert (await client.get("/stats", headers={"Authorization": "Bearer k1"})).status_code == 200


async def test_stats_reports_the_engine_and_the_job_queue(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(max_running=5, job_concurrency=1)) as (client, _):
        idle = (await client.get("/stats")).json()
        assert idle["ready"] is True and idle["engine"] == "batched" and idle["max_running"] == 5
        assert idle["running"] == 0 and idle["waiting_interactive"] == 0 and idle["jobs_queued"] == 0
        body = {"prompt": "Once upon a time", "max_new_tokens": 400, "ignore_eos": True}
        generation = asyncio.ensure_future(client.post("/generate", json=body))
        jobs = [(await client.post("/generate_background", json=body)).json()["job_id"] for _ in range(3)]
        seen: dict[str, int] = {}

        async def busy_seen() -> bool:
            stats = (await client.get("/stats")).json()
            for key in ("running", "jobs_running", "jobs_queued"):
                seen[key] = max(seen.get(key, 0), stats[key])
            return seen["running"] >= 1 and seen["jobs_queued"] >= 1

        await wait_until(busy_seen, 30, f"a running sequence and a queued job in /stats ({seen})")
        assert seen["running"] >= 1 and seen["jobs_queued"] >= 1, seen
        for job_id in jobs:
            await client.post(f"/jobs/{job_id}/cancel")
        assert (await generation).status_code == 200
        assert (await client.get("/stats")).json()["tokens_per_s"] > 0


# ----- The contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{"stream": 0}, {"stream": "true"}, {"ignore_eos": 0}, {"seed": True}, {"top_k": "3"}, {"temperature": False}],
)
async def test_generate_takes_json_booleans_and_numbers_only(
    make_settings: MakeSettings, app_client: AppClient, extra: dict[str, Any]
) -> None:
    async with app_client(make_settings()) as (client, _):
        response = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, **extra})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", next(iter(extra))]


async def test_integral_floats_still_count_as_integers(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _):
        response = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2.0, "top_k": 5.0})
        assert response.status_code == 200, response.text
        assert response.json()["completion_tokens"] <= 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Hi", "stream": 0}),
        ("/v1/completions", {"prompt": "Hi", "ignore_eos": 1}),
        ("/v1/completions", {"prompt": "Hi", "n": True}),
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": []}),
        ("/v1/completions", {"prompt": ["ok", ""]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": "4"}),
    ],
)
async def test_openai_routes_reject_what_the_schema_rejects(
    make_settings: MakeSettings, app_client: AppClient, path: str, body: dict[str, Any]
) -> None:
    async with app_client(make_settings()) as (client, _):
        response = await client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_schema_states_what_the_server_enforces(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        schema = app.openapi()
        components = schema["components"]["schemas"]
        assert components["TextGenerationRequest"]["properties"]["stream"]["type"] == "boolean"
        prompt = components["CompletionRequest"]["properties"]["prompt"]["anyOf"]
        assert prompt[0]["minLength"] == 1 and prompt[1]["minItems"] == 1 and prompt[1]["items"]["minLength"] == 1
        # token ids: a non-empty list of non-negative integers, or a non-empty list of such lists
        assert prompt[2]["minItems"] == 1 and prompt[2]["items"] == {"minimum": 0, "type": "integer"}
        assert prompt[3]["minItems"] == 1 and prompt[3]["items"]["items"]["minimum"] == 0
        (header,) = schema["paths"]["/generate_background"]["post"]["parameters"]
        key_schema = header["schema"]["anyOf"][0]
        assert key_schema["maxLength"] == 255 and key_schema["minLength"] == 1
        pattern = re.compile(key_schema["pattern"])
        assert pattern.search("order-42 retry") and not pattern.search(" padded") and not pattern.search("é")
        # What the schema allows, the server accepts; one character past it, the schema and the server refuse.
        accepted = await client.post(
            "/generate_background", json={"prompt": "Hi", "max_new_tokens": 1}, headers={"Idempotency-Key": "k" * 255}
        )
        assert accepted.status_code == 202, accepted.text
        refused = await client.post(
            "/generate_background", json={"prompt": "Hi", "max_new_tokens": 1}, headers={"Idempotency-Key": "k" * 256}
        )
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
        seed_limit = components["TextGenerationRequest"]["properties"]["seed"]["anyOf"][0]["maximum"]
        assert float(seed_limit) == seed_limit  # exactly representable in every JSON client
        over = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1, "seed": seed_limit + 1})
        assert over.status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/jobs/abc", "DELETE, GET, HEAD"),
        ("PUT", "/jobs/abc", "DELETE, GET, HEAD"),
        ("GET", "/jobs/abc/cancel", "POST"),
        ("PATCH", "/generate", "POST"),
        ("POST", "/stats", "GET, HEAD"),
    ],
)
async def test_405_allow_lists_every_method_of_the_path(
    make_settings: MakeSettings, app_client: AppClient, method: str, path: str, allow: str
) -> None:
    async with app_client(make_settings()) as (client, _):
        response = await client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == allow
        assert set(response.json()) == {"detail", "request_id"}


@pytest.mark.parametrize("cancel", ["post", "delete"])
async def test_cancel_by_post_or_delete_keeps_the_job_readable(
    make_settings: MakeSettings, app_client: AppClient, cancel: str
) -> None:
    async with app_client(make_settings(job_concurrency=1)) as (client, _):
        body = {"prompt": "Once upon a time", "max_new_tokens": 400, "ignore_eos": True}
        job_id = (await client.post("/generate_background", json=body)).json()["job_id"]

        async def do_cancel() -> httpx.Response:
            if cancel == "post":
                return await client.post(f"/jobs/{job_id}/cancel")
            return await client.delete(f"/jobs/{job_id}")

        first = await do_cancel()
        assert first.status_code == 200 and first.json()["state"] == "cancelled"
        assert (await client.get(f"/jobs/{job_id}")).json()["state"] == "cancelled"
        again = await do_cancel()
        assert again.status_code == 409
        assert (await client.post("/jobs/no-such-job/cancel")).status_code == 404
