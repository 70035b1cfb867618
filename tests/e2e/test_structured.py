"""Structured output on the real bundled model through a real uvicorn: 10 random JSON schemas (sent
together, so they share batches), a json_object chat through the ``openai`` client, and logprobs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.support.server import MODEL_NAME, Server
from tests.support.structured import random_schemas

pytestmark = [pytest.mark.e2e, pytest.mark.server]

PROMPT = "Fill in this record as compact JSON.\nRecord:"


@pytest.fixture(scope="module")
def oai(default_server: Server) -> Iterator[OpenAI]:
    client = OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        yield client
    finally:
        client.close()


def _generate(server: Server, schema: dict[str, Any], seed: int) -> dict[str, Any]:
    # Seeded sampling: greedy decoding can repeat one digit of a number until the budget runs out.
    with httpx.Client(base_url=server.url, timeout=300) as client:
        body = {"prompt": PROMPT, "json_schema": schema, "max_new_tokens": 160, "temperature": 0.7, "seed": seed}
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_ten_random_schemas_validate_on_the_bundled_model(default_server: Server) -> None:
    schemas = random_schemas(10, seed=2014)
    with ThreadPoolExecutor(max_workers=10) as pool:
        bodies = list(pool.map(lambda pair: _generate(default_server, *pair), zip(schemas, range(10), strict=True)))
    finished = [(schema, body) for schema, body in zip(schemas, bodies, strict=True) if body["finish_reason"] == "stop"]
    # A 135M model can run a number's digits on until the budget (the grammar allows any length); that
    # is the model's limit, not the mask's. Every answer that ends must validate, and most must end.
    assert len(finished) >= 8, [body["generated_text"][-80:] for body in bodies]
    for schema, body in finished:
        jsonschema.validate(json.loads(body["generated_text"]), schema)


def test_chat_json_object_with_logprobs(oai: OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Give the name and age of a fictional person as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    [choice] = reply.choices
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content or ""), dict)
    assert choice.logprobs is not None and choice.logprobs.content
    for entry in choice.logprobs.content:
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-5


def test_choice_classifies(default_server: Server) -> None:
    with httpx.Client(base_url=default_server.url, timeout=300) as client:
        body = {
            "prompt": "Review: 'Wonderful film, I loved it.' Sentiment:",
            "choice": ["positive", "negative"],
            "temperature": 0.0,
        }
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"] in ("positive", "negative")
    assert response.json()["finish_reason"] == "stop"
