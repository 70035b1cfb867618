"""Integration tests of GET /metrics: Prometheus text, and counters that move by exactly what was done.

Each test builds its own app (so its own registry and job store), scrapes before and after a known
amount of work and compares the difference. Parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

PROMPT = "The future of AI is"
FILTER_PROMPT = "Whatever happens"
FILTER_REQUEST = {"prompt": FILTER_PROMPT, "temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
FAMILIES = {
    "textgen_http_requests",
    "textgen_http_request_duration_seconds",
    "textgen_engine_waiting_sequences",
    "textgen_engine_running_sequences",
    "textgen_kv_cache_blocks",
    "textgen_engine_preemptions",
    "textgen_engine_batch_size",
    "textgen_engine_step_duration_seconds",
    "textgen_generated_tokens",
    "textgen_prompt_tokens",
    "textgen_generation_requests",
    "textgen_time_to_first_token_seconds",
    "textgen_inter_token_latency_seconds",
    "textgen_jobs",
    "textgen_job_queue_wait_seconds",
    "textgen_content_filter_rejections",
    "textgen_model_info",
}


# ----- helpers -------------------------------------------------------------------------------------------


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, /, **labels: str) -> float:
    """The sample with exactly these labels; 0 when it does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, /, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def labels_of(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


async def generate(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/generate", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def sse_payloads(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(event name, data) of a streamed response; "[DONE]" kept as a string."""
    response = await client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events: list[tuple[str, Any]] = []
    name, data = "message", []
    for line in re.split(r"\r\n|\r|\n", response.text):
        if not line:
            if data:
                joined = "\n".join(data)
                events.append((name, joined if joined == "[DONE]" else json.loads(joined)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


_WORD: dict[str, str] = {}


async def blocked_word(make_settings: MakeSettings, app_client: AppClient) -> str:
    """A word (letters only, >= 3, not in the prompt) that the tiny model produces greedily for FILTER_REQUEST."""
    if "word" not in _WORD:
        async with app_client(make_settings(blocked_words=[])) as (client, _app):
            original = (await client.post("/generate", json=FILTER_REQUEST)).json()["generated_text"]
        words = Counter(w.lower() for w in re.findall(r"[^\W_]+", original) if w.isascii() and w.isalpha())
        candidates = [w for w, _ in words.most_common() if len(w) >= 3 and w not in FILTER_PROMPT.lower()]
        assert candidates, f"the greedy output has no word to block: {original!r}"
        _WORD["word"] = candidates[0]
    return _WORD["word"]


# ----- the endpoint --------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["batched", "threadpool"])
async def test_metrics_is_prometheus_text_with_model_info(
    engine: str, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(engine=engine, model_name="tiny-metrics")) as (client, app):
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "version=" in response.headers["content-type"]
        families = {family.name: family for family in text_string_to_metric_families(response.text)}
        samples = await scrape(client)
        state = app.state.textgen

    assert all(name.startswith("textgen_") for name in families), sorted(families)
    assert set(families) >= FAMILIES, sorted(FAMILIES - set(families))
    assert families["textgen_http_requests"].type == "counter"
    assert families["textgen_engine_batch_size"].type == "histogram"
    assert families["textgen_engine_running_sequences"].type == "gauge"
    [info] = labels_of(samples, "textgen_model_info")
    core = {"batched": "textgen-gpt2", "threadpool": "transformers-generate"}[engine]
    assert info == {
        "name": "tiny-metrics", "dtype": "float32", "device": "cpu", "engine": engine, "core": core,
        "weights": "float32",
    }
    assert info["name"] == state.model.name
    assert value(samples, "textgen_model_info", **info) == 1.0
    # Idle: nothing running or waiting, and every job state has a sample.
    assert value(samples, "textgen_engine_running_sequences") == 0
    assert value(samples, "textgen_engine_waiting_sequences", priority="interactive") == 0
    assert value(samples, "textgen_engine_waiting_sequences", priority="background") == 0
    if engine == "batched":  # the paged KV cache: a pool of blocks, none held while idle
        assert value(samples, "textgen_kv_cache_blocks", state="total") > 0
        assert value(samples, "textgen_kv_cache_blocks", state="used") == 0
    job_states = {labels["state"] for labels in labels_of(samples, "textgen_jobs")}
    assert job_states == {"queued", "running", "succeeded", "failed", "cancelled"}


# ----- counters move by exactly what was done ------------------------------------------------------------


async def test_generate_requests_move_the_counters_exactly(make_settings: MakeSettings, app_client: AppClient) -> None:
    budgets = [3, 5, 7]
    async with app_client(make_settings()) as (client, _app):
        before = await scrape(client)
        bodies = [await generate(client, max_new_tokens=n, ignore_eos=True) for n in budgets]
        after = await scrape(client)

    completion = sum(body["completion_tokens"] for body in bodies)
    assert completion == sum(budgets)
    assert delta(before, after, "textgen_http_requests_total", method="POST", route="/generate", status="200") == 3
    assert delta(before, after, "textgen_http_request_duration_seconds_count", method="POST", route="/generate") == 3
    assert delta(before, after, "textgen_generated_tokens_total") == completion
    assert delta(before, after, "textgen_prompt_tokens_total") == sum(body["prompt_tokens"] for body in bodies)
    assert delta(before, after, "textgen_generation_requests_total", finish_reason="length") == 3
    assert delta(before, after, "textgen_time_to_first_token_seconds_count") == 3
    assert delta(before, after, "textgen_inter_token_latency_seconds_count") == 3
    # One decode step per token after the first (the first comes from the prefill); sequential requests
    # mean every step decoded exactly one sequence.
    steps = delta(before, after, "textgen_engine_batch_size_count")
    assert max(budgets) - 1 <= steps <= completion, steps
    assert delta(before, after, "textgen_engine_batch_size_sum") == steps
    assert delta(before, after, "textgen_engine_step_duration_seconds_count") == steps
    # The first scrape is itself counted (after it was answered), by route template.
    assert delta(before, after, "textgen_http_requests_total", method="GET", route="/metrics", status="200") == 1


async def test_streamed_and_openai_requests_count_their_tokens_once(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        before = await scrape(client)
        streamed = await sse_payloads(client, "/generate", {"prompt": PROMPT, "max_new_tokens": 6, "ignore_eos": True})
        completion = await client.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "n": 2, "temperature": 0}
        )
        assert completion.status_code == 200, completion.text
        chat = await sse_payloads(
            client,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 4,
                "temperature": 0,
                "stream_options": {"include_usage": True},
            },
        )
        after = await scrape(client)

    done = streamed[-1]
    assert done[0] == "done", streamed[-1]
    usage_chunk = chat[-2][1]
    assert usage_chunk["choices"] == [], usage_chunk
    tokens = done[1]["completion_tokens"] + completion.json()["usage"]["completion_tokens"]
    tokens += usage_chunk["usage"]["completion_tokens"]
    assert delta(before, after, "textgen_generated_tokens_total") == tokens
    assert delta(before, after, "textgen_time_to_first_token_seconds_count") == 4  # 1 + n=2 + 1
    for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
        assert delta(before, after, "textgen_http_requests_total", method="POST", route=route, status="200") == 1


async def test_blocked_prompts_count_prompt_rejections(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        before = await scrape(client)
        blocked = await client.post("/generate", json={"prompt": "I hate this"})
        assert blocked.status_code == 400
        middle = await scrape(client)
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hate"}]})
        job = await client.post("/generate_background", json={"prompt": "h a t e"})
        assert chat.status_code == job.status_code == 400
        after = await scrape(client)

    prompt_reject = {"where": "prompt", "action": "reject"}
    assert delta(before, middle, "textgen_content_filter_rejections_total", **prompt_reject) == 1
    assert delta(middle, after, "textgen_content_filter_rejections_total", **prompt_reject) == 2
    assert delta(before, after, "textgen_http_requests_total", method="POST", route="/generate", status="400") == 1
    assert delta(before, after, "textgen_generated_tokens_total") == 0
    assert not [
        labels for labels in labels_of(after, "textgen_content_filter_rejections_total") if labels["where"] == "output"
    ]


async def test_output_filter_hits_are_counted(make_settings: MakeSettings, app_client: AppClient) -> None:
    word = await blocked_word(make_settings, app_client)
    async with app_client(make_settings(blocked_words=[word], output_filter_action="redact")) as (client, _app):
        before = await scrape(client)
        redacted = await generate(client, **FILTER_REQUEST)
        streamed = await sse_payloads(client, "/generate", FILTER_REQUEST)
        after = await scrape(client)
    assert "[redacted]" in redacted["generated_text"]
    assert streamed[-1][0] == "done"
    assert delta(before, after, "textgen_content_filter_rejections_total", where="output", action="redact") == 2

    async with app_client(make_settings(blocked_words=[word], output_filter_action="reject")) as (client, _app):
        before = await scrape(client)
        rejected = await client.post("/generate", json=FILTER_REQUEST)
        after = await scrape(client)
    assert rejected.status_code == 400
    assert delta(before, after, "textgen_content_filter_rejections_total", where="output", action="reject") == 1


async def test_streamed_output_rejections_are_counted(make_settings: MakeSettings, app_client: AppClient) -> None:
    word = await blocked_word(make_settings, app_client)
    async with app_client(make_settings(blocked_words=[word], output_filter_action="reject")) as (client, _app):
        before = await scrape(client)
        events = await sse_payloads(client, "/generate", FILTER_REQUEST)
        after = await scrape(client)
    assert events[-1][0] == "error" and events[-1][1]["status"] == 400, events[-1]
    assert delta(before, after, "textgen_content_filter_rejections_total", where="output", action="reject") == 1


async def test_unknown_job_is_labelled_by_route_template(make_settings: MakeSettings, app_client: AppClient) -> None:
    raw_id = "deadbeef0123456789"
    async with app_client(make_settings()) as (client, _app):
        before = await scrape(client)
        assert (await client.get(f"/jobs/{raw_id}")).status_code == 404
        assert (await client.get(f"/jobs/{raw_id}/stream")).status_code == 404
        assert (await client.delete(f"/jobs/{raw_id}")).status_code == 404
        assert (await client.get(f"/no/such/{raw_id}")).status_code == 404
        after = await scrape(client)

    name = "textgen_http_requests_total"
    assert delta(before, after, name, method="GET", route="/jobs/{job_id}", status="404") == 1
    assert delta(before, after, name, method="GET", route="/jobs/{job_id}/stream", status="404") == 1
    assert delta(before, after, name, method="DELETE", route="/jobs/{job_id}", status="404") == 1
    assert delta(before, after, name, method="GET", route="unmatched", status="404") == 1
    routes = {labels["route"] for labels in labels_of(after, name)}
    assert not [route for route in routes if raw_id in route], routes


async def test_jobs_gauge_reflects_a_finished_job(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        before = await scrape(client)
        accepted = await client.post("/generate_background", json={"prompt": PROMPT, "max_new_tokens": 4})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        view: dict[str, Any] = {}

        async def job_ended() -> bool:
            view.update((await client.get(f"/jobs/{job_id}")).json())
            return view["state"] in {"succeeded", "failed"}

        await wait_until(job_ended, 30, f"job {job_id} ending")
        assert view["state"] == "succeeded", view
        after = await scrape(client)

    assert value(before, "textgen_jobs", state="succeeded") == 0
    assert value(after, "textgen_jobs", state="succeeded") == 1
    assert value(after, "textgen_jobs", state="queued") == value(after, "textgen_jobs", state="running") == 0
    assert delta(before, after, "textgen_job_queue_wait_seconds_count") == 1
    assert delta(before, after, "textgen_generated_tokens_total") == view["result"]["completion_tokens"]
    status = "202"
    assert (
        delta(before, after, "textgen_http_requests_total", method="POST", route="/generate_background", status=status)
        == 1
    )


async def test_running_sequences_gauge_follows_the_engine(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        engine = app.state.textgen.engine
        request = {"prompt": PROMPT, "max_new_tokens": 900, "ignore_eos": True, "timeout_s": 30}
        long_request = asyncio.create_task(client.post("/generate", json=request))
        try:
            await wait_until(lambda: engine.stats().running == 1, 10.0, "the long request being admitted")
            busy = await scrape(client)
        finally:
            long_request.cancel()  # cancels the request in the app: its sequence leaves the batch
            with contextlib.suppress(asyncio.CancelledError):
                await long_request
        await wait_until(lambda: engine.stats().running == 0, 5.0, "the sequence leaving the batch")
        idle = await scrape(client)
    assert value(busy, "textgen_engine_running_sequences") == 1
    assert value(idle, "textgen_engine_running_sequences") == 0
