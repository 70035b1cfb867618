"""Several models in one server (TEXTGEN_MODELS), in-process on tiny GPT-2s with different weights.

Routing by ``model`` on /v1 completions and chat, /generate, /generate_background, tokenize and Batch API
lines; GET /v1/models with each model's state; unknown names 404; models load on first use, unload after
the keep-alive, make room under TEXTGEN_MODEL_MEMORY (least recently used first); a request for a model
that is loading waits for it within its deadline; /stats and /metrics per model.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_batches import ALICE, content, ended, run_batch, serve
from tests.support.app import multi_settings, open_app
from tests.support.batch_files import completion_line, parse_batch_output
from tests.support.tiny_model import save_tiny_gpt2
from tests.support.waiting import wait_until
from textgen.config import Settings
from textgen.loader import LoadedModel, load_model

PROMPT = "The future of AI is"
GREEDY = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny GPT-2s of one shape (one size) and different weights (different greedy text)."""
    return {name: save_tiny_gpt2(tmp_path_factory.mktemp(f"tiny-{name}"), seed=seed) for seed, name in enumerate("abc")}


def settings_for(folders: dict[str, Path], tmp_path: Path, *names: str, **overrides: Any) -> Settings:
    return multi_settings({name: folders[name] for name in names or ("a", "b")}, tmp_path, **overrides)


async def models_listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {card["id"]: card for card in response.json()["data"]}


async def completion(client: httpx.AsyncClient, model: str | None, **body: Any) -> dict[str, Any]:
    payload = {**GREEDY, **body} | ({} if model is None else {"model": model})
    response = await client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    return dict(response.json())


def logprobs(response: dict[str, Any]) -> list[float]:
    return list(response["choices"][0]["logprobs"]["token_logprobs"])


async def test_requests_choose_the_model_and_others_load_on_first_use(folders: dict[str, Path], tmp_path: Path) -> None:
    async with open_app(settings_for(folders, tmp_path, model_keep_alive_s=-1)) as (client, _app):
        listed = await models_listed(client)
        assert listed["a"]["state"] == "loaded" and listed["a"]["default"] is True
        assert listed["a"]["memory_bytes"] > 0
        assert listed["b"]["state"] == "unloaded" and listed["b"]["memory_bytes"] is None
        assert listed["default"]["root"] == "a"  # TEXTGEN_MODEL_ALIASES name the default model

        from_a = await completion(client, "a")
        from_b = await completion(client, "b")
        assert from_a["model"] == "a" and from_b["model"] == "b"
        # Other weights, other numbers (random tiny models may well agree on the greedy text).
        assert logprobs(from_a) != logprobs(from_b)
        assert logprobs(await completion(client, None)) == logprobs(from_a)
        assert (await models_listed(client))["b"]["state"] == "loaded"

        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        assert chat.status_code == 200 and chat.json()["model"] == "b"
        native = await client.post(
            "/generate", json={"prompt": PROMPT, "model": "b", "max_new_tokens": 8, "temperature": 0}
        )
        assert native.status_code == 200 and native.json()["model"] == "b"
        assert native.json()["generated_text"] == from_b["choices"][0]["text"]
        tokens = await client.post("/tokenize", json={"model": "b", "prompt": PROMPT})
        assert tokens.status_code == 200

        stats = (await client.get("/stats")).json()
        assert {m["name"]: m["state"] for m in stats["models"]} == {"a": "loaded", "b": "loaded"}
        metrics = (await client.get("/metrics")).text
        assert 'textgen_model_loaded{model="b"} 1.0' in metrics
        assert 'textgen_model_generated_tokens_total{model="b"}' in metrics


async def test_an_unknown_model_is_404_everywhere(folders: dict[str, Path], tmp_path: Path) -> None:
    async with open_app(settings_for(folders, tmp_path)) as (client, _app):
        for path, body in [
            ("/v1/completions", {**GREEDY, "model": "nope"}),
            ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}),
            ("/v1/embeddings", {"model": "nope", "input": "Hi"}),
        ]:
            response = await client.post(path, json=body)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] == "model_not_found"
        for path in ("/generate", "/generate_background"):
            response = await client.post(path, json={"prompt": PROMPT, "model": "nope"})
            assert response.status_code == 404, (path, response.text)
            assert "'a'" in response.json()["detail"] and "'b'" in response.json()["detail"]
        assert (await client.get("/v1/models/nope")).status_code == 404
        assert (await client.get("/v1/models/b")).json()["state"] == "unloaded"
        assert (await models_listed(client))["b"]["state"] == "unloaded"  # nothing loaded for a bad name


async def test_background_jobs_and_batch_lines_run_on_the_model_they_name(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    settings = settings_for(folders, tmp_path, api_keys=ALICE, batch_poll_interval_s=0.05, job_concurrency=4)
    async with serve(settings) as (_app, client_for):
        oai = client_for(ALICE)
        http = oai._client  # the same ASGI transport, with the key
        headers = {"Authorization": f"Bearer {ALICE}"}
        accepted = await http.post(
            "http://testserver/generate_background",
            json={"prompt": PROMPT, "model": "b", "max_new_tokens": 4},
            headers=headers,
        )
        assert accepted.status_code == 202, accepted.text
        job_url = "http://testserver" + accepted.json()["status_url"]

        async def job_done() -> bool:
            return (await http.get(job_url, headers=headers)).json()["state"] == "succeeded"

        await wait_until(job_done, what="the job on model b")
        job = (await http.get(job_url, headers=headers)).json()
        assert job["result"]["model"] == "b"

        lines = [
            completion_line("to-a", model="a"),
            completion_line("to-b", model="b"),
            completion_line("to-x", model="x"),
        ]
        batch = await ended(oai, (await run_batch(oai, lines, "/v1/completions")).id)
        outputs = parse_batch_output(await content(oai, batch.output_file_id), "/v1/completions")
        errors = parse_batch_output(await content(oai, batch.error_file_id), "/v1/completions")
        assert outputs["to-a"]["response"]["body"]["model"] == "a"
        assert outputs["to-b"]["response"]["body"]["model"] == "b"
        assert errors["to-x"]["response"]["body"]["error"]["code"] == "model_not_found"


async def test_an_idle_model_unloads_after_the_keep_alive_and_loads_again(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    async with open_app(settings_for(folders, tmp_path, model_keep_alive_s=0)) as (client, app):
        first = await completion(client, "b")
        serving = app.state.textgen.registry.entries["b"].serving
        # The unloaded model's engine and weights must be freed, not kept alive by a stray reference.
        engine, weights = (weakref.ref(serving.engine), weakref.ref(serving.model.model)) if serving else (None, None)
        del serving

        async def b_unloaded() -> bool:
            return (await models_listed(client))["b"]["state"] == "unloaded"

        await wait_until(b_unloaded, what="model b unloaded once idle")
        gc.collect()
        assert engine is not None and engine() is None and weights is not None and weights() is None
        assert (await models_listed(client))["a"]["state"] == "loaded"  # the default stays
        again = await completion(client, "b")  # loads again, same weights, same text
        assert logprobs(again) == logprobs(first)
        assert (await client.get("/v1/models/b")).json()["loads"] == 2
        metrics = (await client.get("/metrics")).text
        assert 'textgen_model_unloads_total{model="b",reason="keep_alive"}' in metrics


async def test_loading_past_the_memory_budget_unloads_the_least_recently_used(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    async with open_app(settings_for(folders, tmp_path / "measure")) as (client, _app):
        size = (await models_listed(client))["a"]["memory_bytes"]  # all three have this size
    budget = int(size * 2.5)  # room for two of them
    # No minimum residency here: this is about which model goes (the next test holds them).
    settings = settings_for(
        folders, tmp_path, "a", "b", "c", model_memory=budget, model_keep_alive_s=-1, model_min_residency_s=0
    )
    async with open_app(settings) as (client, _app):
        await completion(client, "b")
        await completion(client, "a")
        await completion(client, "c")  # b is the least recently used idle model: it goes
        states = {name: card["state"] for name, card in (await models_listed(client)).items() if name in "abc"}
        assert states == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        await completion(client, "b")  # and now c goes (a, the default, is kept)
        states = {name: card["state"] for name, card in (await models_listed(client)).items() if name in "abc"}
        assert states == {"a": "loaded", "b": "loaded", "c": "unloaded"}
        listed = await models_listed(client)
        assert sum(listed[name]["memory_bytes"] or 0 for name in "abc") <= budget


async def test_alternating_models_under_a_tight_budget_get_503_not_a_reload_each(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    async with open_app(settings_for(folders, tmp_path / "measure")) as (client, _app):
        size = (await models_listed(client))["a"]["memory_bytes"]
    budget = int(size * 2.5)  # the default and one other
    settings = settings_for(folders, tmp_path, "a", "b", "c", model_memory=budget, model_keep_alive_s=-1)
    async with open_app(settings) as (client, _app):
        await completion(client, "b")
        for _ in range(3):  # c does not fit beside a and b, which was just loaded
            refused = await client.post("/v1/completions", json={**GREEDY, "model": "c"})
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "model_unavailable" and "TEXTGEN_MODEL_MIN_RESIDENCY_S" in error["message"]
            assert 1 <= int(refused.headers["Retry-After"]) <= 30
            await completion(client, "b")
        listed = await models_listed(client)
        assert (listed["b"]["state"], listed["b"]["loads"]) == ("loaded", 1)
        # c's weight files may underestimate it: then its first request loads it, measures it and unloads it
        # again (the 503 is the same); every later one is refused before loading.
        assert listed["c"]["state"] == "unloaded" and listed["c"]["loads"] <= 1


def gated_loader(gate: threading.Event, slow: str) -> Callable[[Settings], LoadedModel]:
    """The real loader, except that model ``slow`` takes until ``gate`` is set."""

    def load(settings: Settings) -> LoadedModel:
        if settings.model_name == slow:
            assert gate.wait(60), "the test never opened the gate"
        return load_model(settings)

    return load


async def test_requests_for_a_loading_model_wait_within_their_deadline(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    gate = threading.Event()
    try:
        async with open_app(settings_for(folders, tmp_path), model_loader=gated_loader(gate, "b")) as (client, app):
            body = {"prompt": PROMPT, "model": "b", "max_new_tokens": 4, "temperature": 0}
            late = await client.post("/generate", json={**body, "timeout_s": 0.2})
            assert late.status_code == 504, late.text
            assert "still loading" in late.json()["detail"]
            assert (await models_listed(client))["b"]["state"] == "loading"
            assert (await completion(client, "a"))["model"] == "a"  # the other model serves meanwhile

            waiting = app.state.textgen.registry.entries["b"]
            tasks = [asyncio.ensure_future(client.post("/generate", json=body)) for _ in range(2)]
            await wait_until(lambda: waiting.leases == 2, what="two requests waiting for model b")
            gate.set()
            responses = await asyncio.gather(*tasks)
            assert [r.status_code for r in responses] == [200, 200]
            assert {r.json()["model"] for r in responses} == {"b"}
            assert waiting.loads == 1  # one load served them all
    finally:
        gate.set()
