"""Model checks and error shapes on /v1 (the app in-process on the tiny GPT-2).

- ``model`` is checked: the served name or an alias (TEXTGEN_MODEL_ALIASES) is served, a missing one
  means the served model, any other name is OpenAI's 404 ``model_not_found`` (param ``model``) before any
  work, on the routes, in streams, through the official client, and on Batch API lines.
- ``GET /v1/models`` and ``GET /v1/models/{id}``.
- Every /v1 error in OpenAI's ``{"error": {message, type, param, code}}`` with a meaningful ``param``:
  unknown path (404), wrong method (405 + Allow), JSON syntax (where it breaks; param null), schema (400
  naming the field), body too large (413), no key (401), rate limit (429); outside /v1 the native shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from fastapi import FastAPI
from openai import AsyncOpenAI

from tests.integration.test_batches import ALICE, batch_settings, content, ended, run_batch, serve
from tests.support.app import open_app, tiny_settings
from tests.support.batch_files import chat_line, completion_line, parse_batch_output

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]
Api = tuple[httpx.AsyncClient, FastAPI]

SERVED = "tiny-served"
ALIASES = ("gpt-4o-mini", "local/tiny")
PROMPT = "The future of AI is"
CHAT = [{"role": "user", "content": "Hello"}]
ROUTES = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
]


@pytest_asyncio.fixture(scope="module")
async def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    folder = tmp_path_factory.mktemp("openai-models")
    settings = tiny_settings(tiny_model_dir, folder, model_name=SERVED, model_aliases=",".join(ALIASES))
    async with open_app(settings) as (client, app):
        yield client, app


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """OpenAI's exact error shape (plus our request id); the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["request_id"] == response.headers["X-Request-ID"]
    return dict(body["error"])


def assert_model_not_found(response: httpx.Response, name: str) -> None:
    error = openai_error(response, 404)
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert name in error["message"] and SERVED in error["message"]  # what was asked, and what to ask for


# ----- models ----------------------------------------------------------------------------------------------


async def test_models_list_and_cards(api: Api) -> None:
    client, _app = api
    listed = (await client.get("/v1/models")).json()
    assert [card["id"] for card in listed["data"]] == [SERVED, *ALIASES]
    for model_id in (SERVED, *ALIASES):
        card = await client.get(f"/v1/models/{model_id}")
        assert card.status_code == 200, card.text
        assert card.json() == next(c for c in listed["data"] if c["id"] == model_id)
    assert_model_not_found(await client.get("/v1/models/gpt-5"), "gpt-5")
    assert_model_not_found(await client.get("/v1/models/local/other"), "local/other")


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_the_served_name_an_alias_or_no_model_is_served(api: Api, path: str, body: dict[str, Any]) -> None:
    """Responses name the served model, whatever name was asked for (as OpenAI returns the resolved one)."""
    client, _app = api
    for asked in ({}, {"model": SERVED}, {"model": ALIASES[0]}, {"model": ALIASES[1]}):
        response = await client.post(path, json={**body, **asked})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == SERVED


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_an_unknown_model_is_404_before_any_work(api: Api, path: str, body: dict[str, Any], stream: bool) -> None:
    client, app = api
    for name in ("gpt-4o", "Tiny-Served", SERVED + " ", "x" * 300):  # exact names only
        response = await client.post(path, json={**body, "model": name, "stream": stream})
        assert_model_not_found(response, name[:100])
    # Checked before anything else: a prompt the content filter would refuse (400) still gets the 404.
    hateful = (
        {"prompt": "I hate this"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "I hate you"}]}
    )
    assert_model_not_found(await client.post(path, json={**body, **hateful, "model": "gpt-4o"}), "gpt-4o")
    stats = app.state.textgen.engine.stats()
    assert stats.running == stats.waiting_interactive == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/embeddings", {"input": "hello"}), ("/v1/responses", {"input": "hi", "max_output_tokens": 2})],
)
async def test_embeddings_and_responses_check_the_model_too(api: Api, path: str, body: dict[str, Any]) -> None:
    client, _app = api
    for asked in ({}, {"model": SERVED}, {"model": ALIASES[0]}):
        response = await client.post(path, json={**body, **asked})
        assert response.status_code == 200, response.text
    for name in ("gpt-4o", "text-embedding-3-small"):
        hateful = {"input": "I hate you"}  # checked before the content filter too
        assert_model_not_found(await client.post(path, json={**body, **hateful, "model": name}), name)


async def test_the_official_client_raises_not_found_for_an_unknown_model(api: Api) -> None:
    client, _app = api
    oai = AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        await oai.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("gpt-4o")
    assert (await oai.models.retrieve(ALIASES[0])).id == ALIASES[0]
    reply = await oai.completions.create(model=ALIASES[0], prompt=PROMPT, max_tokens=2)
    assert reply.model == SERVED


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_a_batch_line_naming_an_unknown_model_fails_with_model_not_found(
    make_settings: MakeSettings, endpoint: str
) -> None:
    make_line = completion_line if endpoint == "/v1/completions" else chat_line
    lines = [make_line("served"), make_line("unknown"), make_line("unnamed")]
    lines[1]["body"]["model"] = "gpt-4o"
    del lines[2]["body"]["model"]
    async with serve(batch_settings(make_settings)) as (_app, client):
        oai = client(ALICE)
        done = await ended(oai, (await run_batch(oai, lines, endpoint)).id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        good = parse_batch_output(await content(oai, done.output_file_id), endpoint)
        bad = parse_batch_output(await content(oai, done.error_file_id), endpoint)
    assert sorted(good) == ["served", "unnamed"] and list(bad) == ["unknown"]
    response = bad["unknown"]["response"]
    assert response["status_code"] == 404
    error = response["body"]["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "gpt-4o" in error["message"]


# ----- errors in OpenAI's shape ----------------------------------------------------------------------------


async def test_unknown_path_and_wrong_method(api: Api) -> None:
    client, _app = api
    missing = openai_error(await client.post("/v1/chat/complete", json={}), 404)
    assert missing["type"] == "invalid_request_error" and missing["param"] is None
    assert "POST /v1/chat/complete" in missing["message"]
    wrong = await client.get("/v1/chat/completions")
    error = openai_error(wrong, 405)
    assert wrong.headers["Allow"] == "POST"
    assert "GET /v1/chat/completions" in error["message"] and "POST" in error["message"]
    native = await client.get("/no-such-route")  # outside /v1: the native shape stays
    assert native.status_code == 404 and set(native.json()) == {"detail", "request_id"}


async def test_json_syntax_error_says_where_and_names_no_field(api: Api) -> None:
    client, _app = api
    broken = b'{"prompt": "hi",\n  "max_tokens": }'
    response = await client.post("/v1/completions", content=broken, headers={"Content-Type": "application/json"})
    error = openai_error(response, 400)
    assert error["param"] is None  # not the byte offset ("9") it used to be
    assert "not valid JSON" in error["message"] and "line 2, column 17" in error["message"], error
    native = await client.post("/generate", content=broken, headers={"Content-Type": "application/json"})
    assert native.status_code == 422 and "detail" in native.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"prompt": PROMPT, "stop": 5}, "stop"),  # not "stop.str" (pydantic's union tags are no field)
        ({"prompt": PROMPT, "n": 0}, "n"),
        ({"prompt": PROMPT, "model": 7}, "model"),
        ({}, "prompt"),
    ],
)
async def test_schema_errors_name_the_field(api: Api, body: dict[str, Any], param: str) -> None:
    client, _app = api
    error = openai_error(await client.post("/v1/completions", json=body), 400)
    assert error["param"] == param and error["message"].startswith(param), error


async def test_a_body_that_is_not_json_says_what_to_send(api: Api) -> None:
    client, _app = api
    sent = await client.post("/v1/completions", content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert "application/json" in openai_error(sent, 400)["message"]
    empty = await client.post("/v1/completions", content=b"", headers={"Content-Type": "application/json"})
    assert "empty" in openai_error(empty, 400)["message"]


async def test_middleware_errors_take_openai_shape_under_v1(make_settings: MakeSettings, app_client: AppClient) -> None:
    """413 (body limit), 401 (no key) and 429 (rate limit) are answered before routing; under /v1 they are
    OpenAI's shape too, elsewhere the native one."""
    settings = make_settings(api_keys="k", max_body_bytes=2048, rate_limit_rpm=3)
    key = {"Authorization": "Bearer k"}
    async with app_client(settings) as (client, _app):
        too_large = await client.post("/v1/completions", json={"prompt": "x" * 4096}, headers=key)
        assert "TEXTGEN_MAX_BODY_BYTES" in openai_error(too_large, 413)["message"]
        no_key = await client.post("/v1/completions", json={"prompt": PROMPT})
        assert openai_error(no_key, 401)["type"] == "authentication_error"
        assert no_key.headers["WWW-Authenticate"] == "Bearer"
        native = await client.post("/generate", json={"prompt": PROMPT})
        assert native.status_code == 401 and set(native.json()) == {"detail", "request_id"}
        responses = [await client.get("/v1/models", headers=key) for _ in range(4)]  # past 3 a minute
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    openai_error(limited[0], 429)
    assert int(limited[0].headers["Retry-After"]) >= 1
