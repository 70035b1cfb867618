"""Integration tests of the HTTP API: every route and every status code of the design's map.

Status-code map: 422 schema violation · 400 content rejected or prompt too long · 404 unknown job ·
409 job not cancellable · 503 queue full or not ready (with Retry-After) · 504 deadline passed ·
500 anything else (no internals). Every error body is ``{"detail", "request_id"}`` and every response
carries ``X-Request-ID`` equal to the body's request id.

Each test builds its own app (the tiny random GPT-2 loads in well under a second) through the root
``conftest.py`` fixtures, so settings can differ per test. Background-job routes are in ``test_jobs.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from main import create_app
from textgen.content_filter import ContentFilter
from textgen.errors import ContentRejectedError

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

PROMPT = "The future of AI is"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
ENGINES = ["batched", "threadpool"]


def assert_error(response: httpx.Response, status: int) -> Any:
    """The one error shape: exactly detail + request_id, and the header matches the body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "request_id"}, body
    assert body["request_id"], body
    assert response.headers["X-Request-ID"] == body["request_id"]
    return body["detail"]


async def generate(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/generate", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def greedy_text(client: httpx.AsyncClient, prompt: str, max_new_tokens: int) -> str:
    body = await generate(client, prompt=prompt, temperature=0, max_new_tokens=max_new_tokens)
    return str(body["generated_text"])


# ----- 200: shape, sampling controls ---------------------------------------------------------------


async def test_generate_200_shape(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        response = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "ignore_eos": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert set(body) >= {  # newer fields are additive
            "generated_text",
            "model",
            "request_id",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "timings",
        }
        assert body["generated_text"]
        assert body["model"] == app.state.textgen.model.name
        assert HEX_ID.match(body["request_id"])
        assert response.headers["X-Request-ID"] == body["request_id"]
        tokenizer = app.state.textgen.model.tokenizer
        assert body["prompt_tokens"] == len(tokenizer(PROMPT).input_ids)
        assert body["completion_tokens"] == 6
        assert body["finish_reason"] == "length"
        assert set(body["timings"]) == {"queue_s", "time_to_first_token_s", "total_s"}
        assert body["timings"]["total_s"] > 0


async def test_seed_makes_text_reproducible(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        request = {"max_new_tokens": 12, "ignore_eos": True, "temperature": 1.0, "top_p": 1.0}
        first = await generate(client, seed=1234, **request)
        second = await generate(client, seed=1234, **request)
        other = await generate(client, seed=4321, **request)
        assert first["generated_text"] == second["generated_text"]
        # The seed is what fixes the text: another seed gives other text.
        assert other["generated_text"] != first["generated_text"]


async def test_seeded_request_gives_the_same_text_inside_a_batch(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    """Batched engine: each seeded row draws from its own generator, so batch neighbours do not matter."""
    async with app_client(make_settings()) as (client, _app):
        request = {"prompt": "Once upon a time", "max_new_tokens": 12, "ignore_eos": True, "seed": 77}
        alone = await generate(client, **request)
        neighbours = [
            generate(client, prompt=f"Neighbour number {i} says", max_new_tokens=20, ignore_eos=True) for i in range(3)
        ]
        together, *_ = await asyncio.gather(generate(client, **request), *neighbours)
        assert together["generated_text"] == alone["generated_text"]


async def test_greedy_is_repeatable_and_ignores_the_seed(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        request = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
        texts = {(await generate(client, seed=seed, **request))["generated_text"] for seed in (None, 1, 2)}
        assert len(texts) == 1
        assert texts.pop()


async def test_stop_string_ends_the_text_before_it(make_settings: MakeSettings, app_client: AppClient) -> None:
    prompt = "Once upon a time"
    async with app_client(make_settings()) as (client, _app):
        full = await generate(client, prompt=prompt, temperature=0, max_new_tokens=40, ignore_eos=True)
        text = full["generated_text"]
        # A printable two-character piece from the middle whose first occurrence is not at the start.
        candidates = [text[i : i + 2] for i in range(len(text) // 2, len(text) - 2)]
        usable = [s for s in candidates if s.isascii() and s.isprintable() and s.strip() and text.find(s) > 0]
        assert usable, f"no usable stop string in greedy output {text!r}"
        stop = usable[0]
        cut = text.find(stop)

        stopped = await generate(
            client, prompt=prompt, temperature=0, max_new_tokens=40, ignore_eos=True, stop=["never-there", stop]
        )
        assert stopped["finish_reason"] == "stop"
        assert stopped["generated_text"] == text[:cut]
        assert stop not in stopped["generated_text"]
        assert stopped["completion_tokens"] < full["completion_tokens"]

        # A stop string that never appears changes nothing.
        unstopped = await generate(
            client, prompt=prompt, temperature=0, max_new_tokens=40, ignore_eos=True, stop=["never-there"]
        )
        assert unstopped["generated_text"] == text
        assert unstopped["finish_reason"] == "length"


async def test_ignore_eos_generates_exactly_max_new_tokens(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        bodies = await asyncio.gather(
            *(generate(client, max_new_tokens=24, ignore_eos=True, seed=seed) for seed in range(4))
        )
        for body in bodies:
            assert body["completion_tokens"] == 24, body
            assert body["finish_reason"] == "length"


async def test_budget_is_capped_by_the_model_context(make_settings: MakeSettings, app_client: AppClient) -> None:
    """The tiny GPT-2 has 1024 positions: prompt + completion never goes past them (no 500)."""
    async with app_client(make_settings()) as (client, app):
        context = app.state.textgen.model.context_length
        assert context == 1024
        prompt = prompt_of_tokens(app, context - 10)
        body = await generate(client, prompt=prompt, max_new_tokens=100, ignore_eos=True)
        assert body["prompt_tokens"] == context - 10
        assert body["prompt_tokens"] + body["completion_tokens"] == context
        assert body["finish_reason"] == "length"

        too_long = await client.post("/generate", json={"prompt": prompt_of_tokens(app, context), "max_new_tokens": 1})
        detail = assert_error(too_long, 400)
        assert str(context - 1) in detail


def prompt_of_tokens(app: Any, count: int) -> str:
    """A prompt that the model's tokenizer turns into exactly ``count`` tokens."""
    tokenizer = app.state.textgen.model.tokenizer
    unit = " fox"
    per_unit = len(tokenizer(unit * 10).input_ids) / 10
    prompt = "fox" + unit * max(0, round(count / per_unit) - 1)
    while len(tokenizer(prompt).input_ids) > count:
        prompt = prompt[: -len(unit)]
    while len(tokenizer(prompt).input_ids) < count:
        prompt += "!"
    assert len(tokenizer(prompt).input_ids) == count
    return prompt


# ----- 400: content filter and prompt length ---------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "I hate this",
        "HATE",
        "ＨＡＴＥ",  # fullwidth letters
        "h\u200bate",  # zero-width space inside the word
        "I h a t e you",  # spaced out
        "h4te",  # leetspeak
        "hating everything",  # inflection
        "I hаte it",  # Cyrillic "а"
    ],
)
async def test_blocked_prompt_is_400(prompt: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": 4})
        detail = assert_error(response, 400)
        assert detail == "The prompt was rejected by the content filter."
        assert prompt not in response.text  # the offending text is not echoed back


@pytest.mark.parametrize("prompt", ["whatever", "Chateau", "The theater was great", "c h a t e a u"])
async def test_innocent_words_pass_the_filter(prompt: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        body = await generate(client, prompt=prompt, max_new_tokens=3, ignore_eos=True)
        assert body["completion_tokens"] == 3


async def test_configured_blocked_words_replace_the_default(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(blocked_words=["pineapple"])) as (client, _app):
        assert_error(await client.post("/generate", json={"prompt": "I like PINEAPPLES"}), 400)
        assert (await client.post("/generate", json={"prompt": "I hate this", "max_new_tokens": 2})).status_code == 200


async def test_prompt_too_long_is_400_and_names_the_limit(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(max_prompt_tokens=8)) as (client, app):
        at_limit = await generate(client, prompt=prompt_of_tokens(app, 8), max_new_tokens=2, ignore_eos=True)
        assert at_limit["prompt_tokens"] == 8

        response = await client.post("/generate", json={"prompt": prompt_of_tokens(app, 9), "max_new_tokens": 2})
        detail = assert_error(response, 400)
        assert "9 tokens" in detail
        assert "at most 8" in detail
        assert "TEXTGEN_MAX_PROMPT_TOKENS" in detail


@pytest.mark.parametrize("limit", [1, 8])
async def test_service_starts_with_a_small_prompt_limit(
    limit: int, make_settings: MakeSettings, app_client: AppClient
) -> None:
    """Regression: the engine's warm-up prompt once exceeded small limits and start-up died."""
    async with app_client(make_settings(max_prompt_tokens=limit)) as (client, app):
        assert (await client.get("/ready")).status_code == 200
        body = await generate(client, prompt=prompt_of_tokens(app, limit), max_new_tokens=2, ignore_eos=True)
        assert body["prompt_tokens"] == limit


# ----- 422: schema violations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"max_length": 50}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 123}, "prompt"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"prompt": "Hi", "max_length": 0}, "max_length"),
        ({"prompt": "Hi", "max_length": 2049}, "max_length"),
        ({"prompt": "Hi", "max_length": "fifty"}, "max_length"),
        ({"prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "Hi", "temperature": -1}, "temperature"),
        ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "Hi", "top_p": 0}, "top_p"),
        ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "Hi", "top_k": -1}, "top_k"),
        ({"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "Hi", "seed": -1}, "seed"),
        ({"prompt": "Hi", "stop": "not-a-list"}, "stop"),
        ({"prompt": "Hi", "stop": [str(i) for i in range(9)]}, "stop"),
        ({"prompt": "Hi", "ignore_eos": "maybe"}, "ignore_eos"),
        ({"prompt": "Hi", "timeout_s": 0}, "timeout_s"),
    ],
)
async def test_schema_violation_is_422(
    body: dict[str, Any], field: str, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.post("/generate", json=body)
        detail = assert_error(response, 422)
        assert isinstance(detail, list) and detail
        assert all({"type", "loc", "msg"} <= set(error) for error in detail)
        assert any(error["loc"] == ["body", field] for error in detail), detail


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b""])
async def test_body_that_is_not_an_object_is_422(
    content: bytes, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.post("/generate", content=content, headers={"content-type": "application/json"})
        detail = assert_error(response, 422)
        assert isinstance(detail, list) and detail


# ----- 503: queue full, not ready ------------------------------------------------------------------------


async def test_queue_full_is_503_with_retry_after(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(max_running=1, max_waiting=0)) as (client, _app):
        request = {"prompt": PROMPT, "max_new_tokens": 120, "ignore_eos": True}
        responses = await asyncio.gather(*(client.post("/generate", json=request) for _ in range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 503, 503, 503], [r.text for r in responses]
        for response in responses:
            if response.status_code == 503:
                detail = assert_error(response, 503)
                assert "capacity" in detail
                retry_after = response.headers["Retry-After"]
                assert retry_after.isdigit() and int(retry_after) >= 1
            else:
                assert response.json()["completion_tokens"] == 120
        # The rejected requests held no slot: once the long one is done, the next request is served.
        assert (await generate(client, max_new_tokens=2))["completion_tokens"] >= 1


async def test_service_starts_with_one_slot_and_no_queue(make_settings: MakeSettings, app_client: AppClient) -> None:
    """Regression: the warm-up once sent two requests at once, which this queue refused, and start-up died."""
    async with app_client(make_settings(max_running=1, max_waiting=0)) as (client, _app):
        assert (await client.get("/ready")).status_code == 200
        assert (await generate(client, max_new_tokens=2, ignore_eos=True))["completion_tokens"] == 2


async def test_not_ready_while_shutting_down(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        ready = await client.get("/ready")
        assert ready.status_code == 200

        app.state.textgen.shutting_down = True
        try:
            not_ready = await client.get("/ready")
            detail = assert_error(not_ready, 503)
            assert "not ready" in detail
            assert int(not_ready.headers["Retry-After"]) >= 1

            refused = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
            assert_error(refused, 503)
            assert int(refused.headers["Retry-After"]) >= 1

            assert (await client.get("/health")).json() == {"status": "ok"}  # still alive
        finally:
            app.state.textgen.shutting_down = False
        assert (await client.get("/ready")).status_code == 200


async def test_not_ready_before_startup(make_settings: MakeSettings) -> None:
    """Before the lifespan has built the state, /ready and /generate answer 503, /health 200."""
    app = create_app(make_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/ready")
        assert_error(ready, 503)
        assert ready.headers["Retry-After"] == "1"
        assert_error(await client.post("/generate", json={"prompt": PROMPT}), 503)


# ----- 504: deadline -------------------------------------------------------------------------------------


async def test_request_timeout_is_504(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        request = {"prompt": PROMPT, "max_new_tokens": 800, "ignore_eos": True, "timeout_s": 0.001}
        detail = assert_error(await client.post("/generate", json=request), 504)
        assert "deadline" in detail
        # The engine keeps serving.
        assert (await generate(client, max_new_tokens=2, ignore_eos=True))["completion_tokens"] == 2


@pytest.mark.parametrize("engine", ENGINES)
async def test_default_deadline_stops_a_long_generation(
    engine: str, make_settings: MakeSettings, app_client: AppClient
) -> None:
    """TEXTGEN_REQUEST_TIMEOUT_S applies when the request sets none, and ends generation early."""
    async with app_client(make_settings(engine=engine, request_timeout_s=0.3)) as (client, _app):
        started = time.perf_counter()
        response = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 1000, "ignore_eos": True})
        elapsed = time.perf_counter() - started
        assert_error(response, 504)
        assert elapsed < 5, f"the deadline did not stop generation ({elapsed:.1f}s)"  # 1000 tokens take ~10s+
        # A request with its own, longer deadline still succeeds.
        body = await generate(client, max_new_tokens=3, ignore_eos=True, timeout_s=60)
        assert body["completion_tokens"] == 3


# ----- 500: internal errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_model_failure_is_500_without_internals(
    engine: str, make_settings: MakeSettings, app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client(make_settings(engine=engine)) as (client, app):
        state = app.state.textgen
        # The batched engine runs the model through its core; the threadpool baseline calls the model itself.
        target, name = (state.engine.core, "step") if engine == "batched" else (state.model.model, "forward")
        real_forward = getattr(target, name)
        calls = {"failed": 0}

        def fail_once(*args: Any, **kwargs: Any) -> Any:
            if calls["failed"] == 0:
                calls["failed"] += 1
                raise RuntimeError("secret internal detail")
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(target, name, fail_once)
        response = await client.post(
            "/generate", json={"prompt": PROMPT, "max_new_tokens": 4}, headers={"X-Request-ID": "boom-1"}
        )
        detail = assert_error(response, 500)
        assert calls["failed"] == 1
        assert response.json()["request_id"] == "boom-1"
        assert "request id" in detail
        for leak in ("secret", "RuntimeError", "Traceback", "forward"):
            assert leak not in response.text

        # The engine kept serving.
        body = await generate(client, max_new_tokens=3, ignore_eos=True)
        assert body["completion_tokens"] == 3


async def test_unhandled_route_error_is_500_with_request_id(
    make_settings: MakeSettings, app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client(make_settings()) as (_client, app):

        async def broken_get(job_id: str) -> Any:
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(app.state.textgen.store, "get", broken_get)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/jobs/some-job", headers={"X-Request-ID": "boom-2"})
        assert response.status_code == 500
        body = response.json()
        assert body == {
            "detail": "Internal server error; quote the request id when reporting it.",
            "request_id": "boom-2",
        }
        assert "secret" not in response.text
        assert response.headers.get("X-Request-ID") == "boom-2"


async def test_sampling_failure_at_admission_is_500(
    make_settings: MakeSettings, app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an error while sampling a new row's first token once left the request unanswered
    (past its own deadline) and leaked its running slot."""
    from textgen.engine import scheduler

    real_select = scheduler.select_next_tokens
    calls = {"failed": 0}

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if calls["failed"] == 0:
            calls["failed"] += 1
            raise RuntimeError("secret internal detail")
        return real_select(*args, **kwargs)

    async with app_client(make_settings(shutdown_grace_s=0.2)) as (client, app):
        monkeypatch.setattr(scheduler, "select_next_tokens", fail_once)
        request = {"prompt": PROMPT, "max_new_tokens": 4, "timeout_s": 20}
        response = await asyncio.wait_for(client.post("/generate", json=request), timeout=30)
        assert_error(response, 500)
        assert "secret" not in response.text
        assert app.state.textgen.engine.stats().running == 0  # the slot was released
        assert (await generate(client, max_new_tokens=2, ignore_eos=True))["completion_tokens"] == 2


# ----- output filter ------------------------------------------------------------------------------------


async def test_output_filter_redacts_or_rejects_generated_text(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    """Block a word the tiny model is known (greedily, deterministically) to produce for a prompt."""
    prompt = "Whatever happens"
    request = {"prompt": prompt, "temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    async with app_client(make_settings()) as (client, _app):
        original = (await generate(client, **request))["generated_text"]
    words = [w for w in re.findall(r"[a-z]{3,}", original.lower()) if w not in prompt.lower()]
    assert words, f"greedy output has no word to block: {original!r}"
    word = words[0]

    async with app_client(make_settings(blocked_words=[word], output_filter_action="redact")) as (client, _app):
        redacted = (await generate(client, **request))["generated_text"]
        assert "[redacted]" in redacted
        assert word not in redacted.lower()
        assert redacted == ContentFilter([word]).redact(original)

    async with app_client(make_settings(blocked_words=[word], output_filter_action="reject")) as (client, _app):
        response = await client.post("/generate", json=request)
        detail = assert_error(response, 400)
        assert detail == "The generated text was withheld by the content filter."
        assert word not in response.text


async def test_filter_output_service(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(blocked_words=["hate"], output_filter_action="redact")) as (_client, app):
        service = app.state.textgen.service
        assert service.filter_output("fine text", "r1") == "fine text"
        assert service.filter_output("I HATE ｈａｔｅ it", "r1") == "I [redacted] [redacted] it"
    async with app_client(make_settings(blocked_words=["hate"], output_filter_action="reject")) as (_client, app):
        service = app.state.textgen.service
        assert service.filter_output("fine text", "r1") == "fine text"
        with pytest.raises(ContentRejectedError):
            service.filter_output("so much h4te", "r1")


# ----- health, readiness --------------------------------------------------------------------------------


async def test_health_and_ready(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        assert HEX_ID.match(health.headers["X-Request-ID"])

        ready = await client.get("/ready")
        assert ready.status_code == 200
        body = ready.json()
        assert body == {"status": "ready", "model": app.state.textgen.model.name, "engine": "batched",
                        "details": body["details"]}
        assert body["details"]["core"] == "textgen-gpt2"  # what computes, and whether fused.c is on (and why not)


# ----- request ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "json", "status"),
    [
        ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 2}, 200),
        ("POST", "/generate", {"prompt": "I hate this"}, 400),
        ("POST", "/generate", {"prompt": ""}, 422),
        ("GET", "/jobs/no-such-job", None, 404),
        ("GET", "/no-such-route", None, 404),
        ("DELETE", "/health", None, 405),
        ("GET", "/health", None, 200),
    ],
)
async def test_client_request_id_is_echoed(
    method: str,
    path: str,
    json: Any,
    status: int,
    make_settings: MakeSettings,
    app_client: AppClient,
) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.request(method, path, json=json, headers={"X-Request-ID": "abc-123"})
        assert response.status_code == status
        assert response.headers["X-Request-ID"] == "abc-123"
        assert len(response.headers.get_list("X-Request-ID")) == 1
        if path != "/health":
            assert response.json()["request_id"] == "abc-123"


@pytest.mark.parametrize("bad_id", ["x" * 200, "has spaces", "semi;colon", "slash/id", "   "])
async def test_invalid_request_id_is_replaced(bad_id: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        ok = await client.post(
            "/generate", json={"prompt": PROMPT, "max_new_tokens": 2}, headers={"X-Request-ID": bad_id}
        )
        assert ok.status_code == 200
        assert HEX_ID.match(ok.headers["X-Request-ID"])
        assert ok.json()["request_id"] == ok.headers["X-Request-ID"]

        missing = await client.get("/jobs/nope", headers={"X-Request-ID": bad_id})
        assert_error(missing, 404)
        assert HEX_ID.match(missing.json()["request_id"])


async def test_each_request_gets_its_own_id(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        ids = {(await client.get("/health")).headers["X-Request-ID"] for _ in range(5)}
        assert len(ids) == 5
        assert all(HEX_ID.match(i) for i in ids)


# ----- OpenAPI and docs -------------------------------------------------------------------------------


async def test_openapi_documents_routes_and_errors(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.get("/openapi.json")
        assert response.status_code == 200
        spec = response.json()
        paths = spec["paths"]
        for path in ("/generate", "/generate_background", "/jobs", "/jobs/{job_id}", "/health", "/ready"):
            assert path in paths, sorted(paths)

        def codes(path: str, method: str) -> set[str]:
            return set(paths[path][method]["responses"])

        assert {"200", "400", "422", "500", "503", "504"} <= codes("/generate", "post")
        assert {"202", "400", "422"} <= codes("/generate_background", "post")
        assert {"200", "422"} <= codes("/jobs", "get")
        assert {"200", "404"} <= codes("/jobs/{job_id}", "get")
        assert {"200", "404", "409"} <= codes("/jobs/{job_id}", "delete")
        assert {"200", "503"} <= codes("/ready", "get")
        error_schema = paths["/generate"]["post"]["responses"]["503"]["content"]["application/json"]["schema"]
        assert error_schema["$ref"].endswith("/ErrorResponse")
        assert set(spec["components"]["schemas"]["ErrorResponse"]["required"]) == {"detail", "request_id"}
        request_schema = spec["components"]["schemas"]["TextGenerationRequest"]
        assert request_schema["required"] == ["prompt"]
        assert {"max_length", "max_new_tokens", "seed", "stop", "ignore_eos", "timeout_s"} <= set(
            request_schema["properties"]
        )

        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["content-type"].startswith("text/html")
        assert "swagger" in docs.text.lower()


# ----- both engines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_engine_generates_reproducibly(engine: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(engine=engine)) as (client, _app):
        ready = (await client.get("/ready")).json()
        assert ready["engine"] == engine
        request = {"max_new_tokens": 10, "ignore_eos": True, "seed": 5}
        first = await generate(client, **request)
        second = await generate(client, **request)
        assert first["generated_text"] and first["generated_text"] == second["generated_text"]
        assert first["completion_tokens"] == 10
        assert first["finish_reason"] == "length"

        greedy = [await greedy_text(client, "Once upon a time", 10) for _ in range(2)]
        assert greedy[0] == greedy[1]


@pytest.mark.parametrize("engine", ENGINES)
async def test_engine_rejects_blocked_prompt(engine: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(engine=engine)) as (client, _app):
        assert_error(await client.post("/generate", json={"prompt": "ＨＡＴＥ speech"}), 400)
        assert_error(await client.post("/generate", json={"prompt": "Hi", "top_p": 0}), 422)


@pytest.mark.parametrize("engine", ENGINES)
async def test_repetition_penalty(engine: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    """Regression (batched, float32): the penalty once edited an inference tensor in place -> error + hang."""
    async with app_client(make_settings(engine=engine, shutdown_grace_s=0.2)) as (client, _app):
        request = {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0, "timeout_s": 20}
        plain = await generate(client, **request)
        response = await asyncio.wait_for(
            client.post("/generate", json={**request, "repetition_penalty": 5.0}), timeout=30
        )
        assert response.status_code == 200, response.text
        penalized = response.json()["generated_text"]
        # The greedy text of this model repeats one token (" is is is ..."); a strong penalty breaks that.
        assert penalized != plain["generated_text"]


@pytest.mark.parametrize("prompt", ["Violence is the answer", "I hate this", "They acted violently", "pure hatred"])
async def test_the_seeds_blocked_prompts_are_400_by_default(
    prompt: str, make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (client, _app):
        for path, body in (
            ("/generate", {"prompt": prompt}),
            ("/generate_background", {"prompt": prompt}),
            ("/v1/completions", {"prompt": prompt, "max_tokens": 2}),
        ):
            response = await client.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
        innocent_prompt = {"prompt": "Whatever the violin at the chateau", "max_length": 12}
        innocent = await client.post("/generate", json=innocent_prompt)
        assert innocent.status_code == 200
