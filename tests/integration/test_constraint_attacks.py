"""Issue 20, HIGH 1, HIGH 2 and MEDIUM 7 over HTTP on the tiny GPT-2: the constraints that killed the
server (a JSON schema whose $refs chain 1,000 definitions, a Lark grammar chaining 2,800 rules) are
a 400 on /generate, /v1/chat/completions and as a batch line (that line fails, the batch completes),
and the server answers the next request. With the structural limits loosened far past the crash
thresholds the sandbox still takes the blow: the same 400s, no process death (this test process
would die of SIGSEGV otherwise). Batch lines compile on the compile threads, never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.test_batches import (
    ALICE,
    batch_settings,
    chat_line,
    completion_line,
    content,
    ended,
    parse_batch_output,
    run_batch,
    serve,
)
from tests.support.constraint_attacks import chained_lark_grammar, deep_ref_schema
from textgen.config import Settings
from textgen.engine import constraint_limits
from textgen.engine.constraints import GrammarCompiler

MakeSettings = Callable[..., Settings]
SMALL_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture(params=["limits", "sandbox"])
def guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which gate refuses the attack: the structural limits, or (with them loosened past the crash
    thresholds) the sandbox process."""
    if request.param == "sandbox":
        monkeypatch.setattr(constraint_limits, "MAX_SCHEMA_DEFINITIONS", 1_000_000)
        monkeypatch.setattr(constraint_limits, "MAX_REF_CHAIN", 1_000_000)
        monkeypatch.setattr(constraint_limits, "MAX_GRAMMAR_RULES", 1_000_000)
    return str(request.param)


def refusal(guard: str, what: str) -> str:
    return "too complex to compile" if guard == "sandbox" else what


async def answers_normally(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    ok = await client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4, "json_schema": SMALL_SCHEMA})
    assert ok.status_code == 200, ok.text


async def test_generate_and_chat_refuse_the_crashing_constraints(
    guard: str, make_settings: MakeSettings, app_client: Any
) -> None:
    async with app_client(make_settings()) as (client, app):
        for field, value, what in (
            ("json_schema", deep_ref_schema(1000), "number of definitions"),
            ("grammar", chained_lark_grammar(2800), "number of rules"),
        ):
            response = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 4, field: value})
            assert response.status_code == 400, response.text
            assert refusal(guard, what) in response.json()["detail"] and field in response.json()["detail"]
            await answers_normally(client)

        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_ref_schema(1000)}},
        }
        response = await client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 400, response.text
        assert refusal(guard, "number of definitions") in response.json()["error"]["message"]
        await answers_normally(client)
        grammars: GrammarCompiler = app.state.textgen.engine.grammars
        assert grammars.sandbox.deaths == (3 if guard == "sandbox" else 0)


async def test_a_batch_line_with_a_crashing_constraint_fails_alone(
    guard: str, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled_on: list[str] = []
    original = GrammarCompiler._compile_uncached

    def spy(self: GrammarCompiler, constraint: Any) -> Any:
        compiled_on.append(threading.current_thread().name)
        return original(self, constraint)

    monkeypatch.setattr(GrammarCompiler, "_compile_uncached", spy)
    bad = chat_line("bad")
    bad["body"]["response_format"] = {"type": "json_schema", "json_schema": {"schema": deep_ref_schema(1000)}}
    small = chat_line("small")
    small["body"]["response_format"] = {"type": "json_schema", "json_schema": {"schema": SMALL_SCHEMA}}
    lines = [chat_line("plain"), bad, small]
    async with serve(batch_settings(make_settings)) as (app, client):
        oai = client(ALICE)
        batch = await ended(oai, (await run_batch(oai, lines, "/v1/chat/completions")).id, timeout_s=120)
        assert batch.status == "completed", batch
        assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
        errors = parse_batch_output(await content(oai, batch.error_file_id), "/v1/chat/completions")
        assert list(errors) == ["bad"]
        response = errors["bad"]["response"]
        assert response["status_code"] == 400
        assert refusal(guard, "number of definitions") in response["body"]["error"]["message"]
        outputs = parse_batch_output(await content(oai, batch.output_file_id), "/v1/chat/completions")
        assert sorted(outputs) == ["plain", "small"]
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)
        async with http:
            http.headers["Authorization"] = f"Bearer {ALICE}"
            await answers_normally(http)
    # MEDIUM 7: batch lines compiled on the event loop's thread; now every compile runs on a compile thread.
    assert compiled_on and all(name.startswith("textgen-grammar-") for name in compiled_on), compiled_on


async def test_a_completions_batch_line_with_a_crashing_schema_fails_alone(
    make_settings: MakeSettings,
) -> None:
    bad = completion_line(
        "bad", response_format={"type": "json_schema", "json_schema": {"schema": deep_ref_schema(900)}}
    )
    async with serve(batch_settings(make_settings)) as (_app, client):
        oai = client(ALICE)
        batch = await ended(oai, (await run_batch(oai, [completion_line("ok"), bad], "/v1/completions")).id, 120)
        assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
        errors = parse_batch_output(await content(oai, batch.error_file_id), "/v1/completions")
        assert errors["bad"]["response"]["status_code"] == 400
