"""The original seed's three API tests, on today's httpx (ASGITransport + the app lifespan), plus their
modern equivalents: the response's newer fields and the meaning of ``max_length``/``max_new_tokens``.

Fixtures (``make_settings``, ``app_client``) live in the root ``conftest.py``; the model is the tiny
random-weights GPT-2 from ``tests/support/tiny_model.py``, so text is gibberish but deterministic when seeded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

PROMPT = "The future of AI is"


async def test_generate_concurrent_requests(make_settings: Callable[..., Any], app_client: Callable[..., Any]) -> None:
    """Seed test 1: five concurrent POST /generate all succeed with text, model and request id."""
    async with app_client(make_settings()) as (client, app):
        responses = await asyncio.gather(
            *(client.post("/generate", json={"prompt": PROMPT, "max_length": 50, "seed": seed}) for seed in range(5))
        )
        bodies = [r.json() for r in responses]
        assert [r.status_code for r in responses] == [200] * 5, bodies
        for response, body in zip(responses, bodies, strict=True):
            assert isinstance(body["generated_text"], str) and body["generated_text"], body
            assert body["model"] == app.state.textgen.model.name
            assert body["model"].startswith("tiny-gpt2")  # the model folder's name
            assert body["request_id"] and body["request_id"] == response.headers["X-Request-ID"]
        assert len({body["request_id"] for body in bodies}) == 5

        # A seed fixes the text: the same five requests, now one at a time, give the same texts.
        again = [
            (await client.post("/generate", json={"prompt": PROMPT, "max_length": 50, "seed": seed})).json()
            for seed in range(5)
        ]
        assert [b["generated_text"] for b in again] == [b["generated_text"] for b in bodies]


async def test_empty_prompt_is_422(make_settings: Callable[..., Any], app_client: Callable[..., Any]) -> None:
    """Seed test 2: an empty prompt is a schema violation."""
    async with app_client(make_settings()) as (client, _app):
        response = await client.post("/generate", json={"prompt": "", "max_length": 50})
        assert response.status_code == 422
        body = response.json()
        assert isinstance(body["detail"], list)
        assert any(error["loc"][-1] == "prompt" for error in body["detail"])
        assert body["request_id"] == response.headers["X-Request-ID"]


async def test_blocked_prompt_is_400(make_settings: Callable[..., Any], app_client: Callable[..., Any]) -> None:
    """Seed test 3: "I hate this" is rejected by the content filter (default blocked word "hate")."""
    async with app_client(make_settings()) as (client, _app):
        response = await client.post("/generate", json={"prompt": "I hate this", "max_length": 50})
        assert response.status_code == 400
        body = response.json()
        assert "content filter" in body["detail"]
        assert body["request_id"] == response.headers["X-Request-ID"]


async def test_response_has_token_counts_finish_reason_and_timings(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "seed": 3})
        assert response.status_code == 200
        body = response.json()
        assert body["prompt_tokens"] > 0
        assert 1 <= body["completion_tokens"] <= 8
        assert body["finish_reason"] in ("length", "eos", "stop")
        if body["finish_reason"] == "length":
            assert body["completion_tokens"] == 8
        timings = body["timings"]
        assert 0 <= timings["queue_s"] <= timings["total_s"]
        assert timings["time_to_first_token_s"] is not None
        assert timings["queue_s"] <= timings["time_to_first_token_s"] <= timings["total_s"]


async def test_max_length_counts_prompt_plus_completion(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    """``max_length`` keeps its original meaning: prompt tokens + generated tokens."""
    async with app_client(make_settings()) as (client, _app):
        for seed in range(3):
            body = (await client.post("/generate", json={"prompt": PROMPT, "max_length": 20, "seed": seed})).json()
            assert body["prompt_tokens"] + body["completion_tokens"] <= 20, body
        exact = (await client.post("/generate", json={"prompt": PROMPT, "max_length": 20, "ignore_eos": True})).json()
        assert exact["prompt_tokens"] + exact["completion_tokens"] == 20, exact
        assert exact["finish_reason"] == "length"


async def test_max_new_tokens_wins_over_max_length(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (client, _app):
        body = (
            await client.post(
                "/generate", json={"prompt": PROMPT, "max_length": 10, "max_new_tokens": 15, "ignore_eos": True}
            )
        ).json()
        assert body["completion_tokens"] == 15, body
        assert body["prompt_tokens"] + body["completion_tokens"] > 10
