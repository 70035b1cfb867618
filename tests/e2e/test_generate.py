"""Synchronous generation on the real bundled model through a real uvicorn process."""

from __future__ import annotations

import httpx
import pytest

from tests.support.server import MODEL_NAME, Server

pytestmark = [pytest.mark.e2e, pytest.mark.server]

GREEDY = {"prompt": "The capital of France is", "max_new_tokens": 12, "temperature": 0}


def test_health_and_ready(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["model"] == MODEL_NAME


def test_generate_continues_the_prompt(client: httpx.Client) -> None:
    response = client.post("/generate", json=GREEDY)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated_text"].strip(), body
    assert not body["generated_text"].startswith(GREEDY["prompt"]), "the continuation, not the prompt, is returned"
    assert "paris" in body["generated_text"].lower(), body["generated_text"]
    assert body["model"] == MODEL_NAME
    assert 0 < body["completion_tokens"] <= 12
    assert body["prompt_tokens"] > 0
    assert body["finish_reason"] in ("length", "eos", "stop")
    assert body["timings"]["total_s"] > 0
    assert response.headers["X-Request-ID"] == body["request_id"]
    assert body["request_id"]


def test_greedy_generation_is_repeatable(client: httpx.Client) -> None:
    first = client.post("/generate", json=GREEDY, headers={"X-Request-ID": "e2e-greedy-1"})
    second = client.post("/generate", json=GREEDY, headers={"X-Request-ID": "e2e-greedy-2"})

    assert first.status_code == second.status_code == 200
    assert first.json()["generated_text"] == second.json()["generated_text"]
    assert first.json()["request_id"] == first.headers["X-Request-ID"] == "e2e-greedy-1"
    assert second.json()["request_id"] == second.headers["X-Request-ID"] == "e2e-greedy-2"


def test_seeded_sampling_is_repeatable(client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 12, "temperature": 0.9, "seed": 1234, "ignore_eos": True}
    first = client.post("/generate", json=body)
    second = client.post("/generate", json=body)

    assert first.status_code == second.status_code == 200
    assert first.json()["completion_tokens"] == 12
    assert first.json()["generated_text"] == second.json()["generated_text"]


def test_max_length_counts_the_prompt(client: httpx.Client) -> None:
    """The original request shape: max_length is prompt + generated tokens."""
    response = client.post("/generate", json={"prompt": "The future of AI is", "max_length": 10, "ignore_eos": True})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt_tokens"] + body["completion_tokens"] == 10


def test_invalid_request_is_422_with_request_id(default_server: Server, client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": "", "max_new_tokens": 5})

    assert response.status_code == 422
    assert response.json()["request_id"] == response.headers["X-Request-ID"]
    assert default_server.proc.poll() is None
