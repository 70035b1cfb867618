"""Access control and request hygiene over HTTP: API keys, rate limits, body size, CORS, idempotency."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.test_tenants import prompt_tokens
from textgen.api.security import AccessPolicy, bind_host_from_argv, is_loopback, warn_if_exposed_without_keys

BODY = {"prompt": "The future of AI is", "max_new_tokens": 2}
KEY = {"Authorization": "Bearer secret-key-1"}


async def test_keys_required_except_on_exempt_paths(
    make_settings: Callable[..., Any], app_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(api_keys=["secret-key-1", "secret-key-2"])
    async with app_client(settings) as (client, _app):
        for path in ("/health", "/ready"):
            assert (await client.get(path)).status_code == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic c2VjcmV0"},
            {"Authorization": "Bearer"},
        ):
            response = await client.post("/generate", json=BODY, headers=headers)
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["request_id"] == response.headers["X-Request-ID"]
            assert "secret-key" not in response.text
        assert (await client.get("/jobs", headers={})).status_code == 401
        assert (await client.post("/generate", json=BODY, headers=KEY)).status_code == 200
        ok = await client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"Authorization": "Bearer secret-key-2"}
        )
        assert ok.status_code == 200
    assert "secret-key-1" not in caplog.text and "secret-key-2" not in caplog.text


async def test_rate_limit_per_key_with_retry_after(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    settings = make_settings(api_keys=["a-key", "b-key"], rate_limit_rpm=2)
    async with app_client(settings) as (client, _app):
        statuses = [
            (await client.post("/generate", json=BODY, headers={"Authorization": "Bearer a-key"})).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        limited = await client.post("/generate", json=BODY, headers={"Authorization": "Bearer a-key"})
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert "TEXTGEN_RATE_LIMIT_RPM" in limited.json()["detail"]
        other = await client.post("/generate", json=BODY, headers={"Authorization": "Bearer b-key"})
        assert other.status_code == 200


async def test_token_rate_limit_counts_prompt_and_generated_tokens(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    settings = make_settings(rate_limit_tpm=prompt_tokens(BODY["prompt"]) + 5)
    async with app_client(settings) as (client, _app):
        first = await client.post("/generate", json={**BODY, "max_new_tokens": 5, "ignore_eos": True})
        assert first.status_code == 200 and first.json()["completion_tokens"] == 5
        second = await client.post("/generate", json=BODY)
        assert second.status_code == 429
        assert "TEXTGEN_RATE_LIMIT_TPM" in second.json()["detail"]


async def test_body_size_limit(make_settings: Callable[..., Any], app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(max_body_bytes=2048)) as (client, _app):
        too_big = await client.post("/generate", json={"prompt": "x" * 4000})
        assert too_big.status_code == 413
        assert too_big.json()["request_id"] == too_big.headers["X-Request-ID"]

        async def chunks() -> Any:
            for _ in range(4):
                yield b" " * 1000
            yield b'{"prompt": "hi"}'

        streamed = await client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert (await client.post("/generate", json=BODY)).status_code == 200


async def test_cors_is_off_by_default_and_follows_settings(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    async with app_client(make_settings()) as (client, _app):
        response = await client.options("/generate", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    async with app_client(make_settings(cors_origins=["https://ui.example"])) as (client, _app):
        response = await client.options("/generate", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://ui.example"
        other = await client.options("/generate", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_idempotency_key_returns_the_same_job(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (client, _app):
        headers = {"Idempotency-Key": "order-42"}
        first, second = await asyncio.gather(
            client.post("/generate_background", json=BODY, headers=headers),
            client.post("/generate_background", json=BODY, headers=headers),
        )
        assert first.status_code == second.status_code == 202
        assert first.json()["job_id"] == second.json()["job_id"]
        conflict = await client.post("/generate_background", json={**BODY, "prompt": "Other"}, headers=headers)
        assert conflict.status_code == 409
        assert "Idempotency-Key" in conflict.json()["detail"]
        fresh = await client.post("/generate_background", json=BODY, headers={"Idempotency-Key": "order-43"})
        assert fresh.json()["job_id"] != first.json()["job_id"]
        listed = (await client.get("/jobs", params={"limit": 10})).json()["jobs"]
        assert len(listed) == 2


def test_exposure_warning_only_for_public_addresses_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    open_policy = AccessPolicy.from_sources([], None, [])
    keyed = AccessPolicy.from_sources(["k"], None, [])
    assert warn_if_exposed_without_keys(open_policy, "0.0.0.0")
    assert "SECURITY" in caplog.text
    assert not warn_if_exposed_without_keys(open_policy, "127.0.0.1")
    assert not warn_if_exposed_without_keys(keyed, "0.0.0.0")
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")
    assert bind_host_from_argv(["uvicorn", "main:app", "--host", "0.0.0.0"]) == "0.0.0.0"
    assert bind_host_from_argv(["uvicorn", "main:app", "--host=::1"]) == "::1"
    assert bind_host_from_argv(["uvicorn", "main:app"]) is None


# ----- odd bytes, OPTIONS, /metrics (issue: tenants) -----------------------------------------------------

LONE = b'{"prompt": "a\\ud800b", "max_new_tokens": 2}'
PAIRED = b'{"prompt": "a\\ud83d\\ude00b", "max_new_tokens": 2}'
JSON = {"Content-Type": "application/json"}


async def test_lone_surrogates_are_400_on_every_route(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (client, _app):
        for path in ("/generate", "/generate_background"):
            response = await client.post(path, content=LONE, headers=JSON)
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"detail", "request_id"} and "surrogate" in response.json()["detail"]
        for path, body in (
            ("/v1/completions", LONE),
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\udc00"}]}'),
            ("/v1/completions", b'{"prompt": ["fine", "\\udfff"]}'),
        ):
            response = await client.post(path, content=body, headers=JSON)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and "surrogate" in error["message"]
        no_type = await client.post("/generate", content=LONE)  # FastAPI reads a body without a type as JSON
        assert no_type.status_code == 400
        # A proper pair is one character (an emoji), not an error; "\\\\ud800" is a backslash and text.
        assert (await client.post("/generate", content=PAIRED, headers=JSON)).status_code == 200
        escaped = b'{"prompt": "a\\\\ud800b", "max_new_tokens": 2}'
        assert (await client.post("/generate", content=escaped, headers=JSON)).status_code == 200


async def _raw_request(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """One request straight through the ASGI app, with headers no HTTP client would send."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
        "raw_path": path.encode(), "query_string": b"", "headers": headers, "scheme": "http",
        "server": ("testserver", 80), "client": ("127.0.0.1", 123), "root_path": "",
    }  # fmt: skip
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("value", [b"\xb2", b"1\xb2", b"-1", b"12a", b""])
async def test_content_length_must_be_ascii_digits(
    value: bytes, make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (_client, app):
        status, body = await _raw_request(app, "POST", "/generate", [(b"content-length", value)])
    assert status == 400 and b"Content-Length" in body


async def test_options_needs_a_key_without_cors(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings(api_keys=["secret-key-1"])) as (client, _app):
        anonymous = await client.options("/generate")
        assert anonymous.status_code == 401 and "allow" not in anonymous.headers
        assert (await client.options("/generate", headers=KEY)).status_code == 405


async def test_cors_preflight_still_needs_no_key(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    settings = make_settings(api_keys=["secret-key-1"], cors_origins=["https://app.example"])
    async with app_client(settings) as (client, _app):
        preflight = await client.options(
            "/generate",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


async def test_metrics_need_a_key_when_keys_are_on_unless_opened(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    """Issue 20 (LOW): /metrics was public by default even with API keys on. Now it needs a valid key like
    every other route (Prometheus scrapes with its own key as a bearer token); opening it is a setting."""
    async with app_client(make_settings(api_keys=["secret-key-1"])) as (client, _app):
        refused = await client.get("/metrics")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert "textgen_" not in refused.text
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        scraped = await client.get("/metrics", headers=KEY)
        assert scraped.status_code == 200 and "textgen_http_requests_total" in scraped.text
        assert "secret-key-1" not in scraped.text
        assert (await client.get("/health")).status_code == 200  # health checks stay open
        assert (await client.get("/ready")).status_code == 200
    async with app_client(make_settings(api_keys=["secret-key-1"], metrics_require_key=False)) as (client, _app):
        assert (await client.get("/metrics")).status_code == 200  # opened deliberately
    async with app_client(make_settings()) as (client, _app):
        assert (await client.get("/metrics")).status_code == 200  # no keys configured: nothing needs one
