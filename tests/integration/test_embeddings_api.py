"""POST /v1/embeddings, POST /tokenize and POST /detokenize over HTTP with the tiny GPT-2: every input form
and encoding, the bounds and refusals (OpenAI's error shape), the content filter, rate limits and token
budgets, and an embedding request answered while streams keep running."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests.integration.test_openai_api import assert_openai_error
from tests.integration.test_rate_limits import ALICE, ALICE_RATE_KEY, counted, fake_clock
from tests.integration.test_streaming import streaming_client
from tests.support.app import open_app, tiny_settings
from tests.support.waiting import wait_until

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]
Api = tuple[httpx.AsyncClient, FastAPI]

TEXT = "The quick brown fox"
OTHER = "Once upon a time there was a robot"
HIDDEN = 64  # the tiny GPT-2's n_embd
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest_asyncio.fixture(scope="module")
async def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    folder = tmp_path_factory.mktemp("embeddings-api")
    settings = tiny_settings(tiny_model_dir, folder, max_prompt_tokens=64, embedding_max_inputs=8)
    async with open_app(settings) as (client, app):
        yield client, app


async def embed(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/embeddings", json={"model": "tiny", **body})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"]
    return dict(response.json())


async def token_ids(client: httpx.AsyncClient, text: str) -> list[int]:
    response = await client.post("/tokenize", json={"prompt": text})
    assert response.status_code == 200, response.text
    return list(response.json()["tokens"])


def vectors(body: dict[str, Any]) -> list[list[float]]:
    assert body["object"] == "list"
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    assert all(item["object"] == "embedding" for item in body["data"])
    return [item["embedding"] for item in body["data"]]


def close(a: list[float], b: list[float], tolerance: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# ----- input forms and encodings ---------------------------------------------------------------------------


async def test_every_input_form_embeds_the_same_text_to_the_same_vector(api: Api) -> None:
    client, app = api
    ids, other_ids = await token_ids(client, TEXT), await token_ids(client, OTHER)
    one = await embed(client, input=TEXT)
    several = await embed(client, input=[TEXT, OTHER])
    from_ids = await embed(client, input=ids)
    from_id_lists = await embed(client, input=[other_ids, [float(i) for i in ids]])  # 5.0 is an integer in JSON
    [single] = vectors(one)
    assert len(single) == HIDDEN and math.isclose(math.fsum(x * x for x in single), 1.0, rel_tol=1e-5)
    assert close(vectors(several)[0], single) and close(vectors(from_ids)[0], single)
    assert close(vectors(from_id_lists)[1], single) and close(vectors(from_id_lists)[0], vectors(several)[1])
    assert not close(vectors(several)[1], single, 1e-2)
    assert one["model"] == app.state.textgen.model.name
    assert one["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
    assert several["usage"]["prompt_tokens"] == len(ids) + len(other_ids)
    metrics = {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in (await client.get("/metrics")).text.splitlines())
        if name in ("textgen_embedding_inputs_total", "textgen_embedding_tokens_total")
    }
    assert metrics["textgen_embedding_inputs_total"] >= 6  # the six inputs embedded above (and any before)
    assert metrics["textgen_embedding_tokens_total"] >= 3 * len(ids) + 2 * len(other_ids)


async def test_base64_is_the_float_vector_as_little_endian_float32(api: Api) -> None:
    client, _app = api
    floats = vectors(await embed(client, input=[TEXT, OTHER]))
    encoded = vectors(await embed(client, input=[TEXT, OTHER], encoding_format="base64"))
    for text, expected in zip(encoded, floats, strict=True):
        assert isinstance(text, str)
        raw = base64.b64decode(text)
        assert len(raw) == 4 * HIDDEN
        assert close(list(struct.unpack(f"<{HIDDEN}f", raw)), expected, 0.0)  # the very same float32 values


async def test_dimensions_equal_to_the_model_size_is_accepted_and_any_other_refused(api: Api) -> None:
    client, _app = api
    assert len(vectors(await embed(client, input=TEXT, dimensions=HIDDEN))[0]) == HIDDEN
    error = assert_openai_error(await client.post("/v1/embeddings", json={"input": TEXT, "dimensions": 16}), 400)
    assert error["message"].startswith("dimensions:") and str(HIDDEN) in error["message"]


# ----- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"input": ""}, "input[0]: must not be empty"),
        ({"input": []}, "input: must be a non-empty"),
        ({"input": [TEXT, ""]}, "input[1]: must not be empty"),
        ({"input": [[1, 2], []]}, "input[1]: must be a non-empty list"),
        ({"input": [1, "a"]}, "not a mix"),
        ({"input": [1, True]}, "not a mix"),
        ({"input": [[1, 2.5]]}, "input[0]: must be a non-empty list of integer token ids"),
        ({"input": [[1, 2.0, True]]}, "input[0]: must be a non-empty list of integer token ids"),
        ({"input": {"text": TEXT}}, "input: must be"),
        ({"input": [[1, 400]]}, "input[0]: token id 400 is not in this model's vocabulary"),
        ({"input": [-1]}, "token id -1 is not in this model's vocabulary"),
        ({"input": TEXT, "dimensions": 0}, "dimensions:"),
        ({"input": ["a"] * 9}, "input: 9 inputs; this server embeds at most 8"),
        ({"input": [[1] * 65]}, "input[0]: 65 tokens"),
        ({"input": "fox " * 65}, "tokens; each input may have at most 64"),
        ({"input": "x" * (64 * 32 + 1)}, "characters, more than"),
    ],
)
async def test_bad_inputs_are_refused_before_any_work(api: Api, body: dict[str, Any], expected: str) -> None:
    client, _app = api
    error = assert_openai_error(await client.post("/v1/embeddings", json=body), 400, "invalid_request_error")
    assert expected in error["message"], error


async def test_unknown_fields_and_formats_are_refused_naming_them(api: Api) -> None:
    client, _app = api
    unknown = assert_openai_error(await client.post("/v1/embeddings", json={"input": TEXT, "pooling": "last"}), 400)
    assert unknown["param"] == "pooling"
    bad_format = assert_openai_error(
        await client.post("/v1/embeddings", json={"input": TEXT, "encoding_format": "int8"}), 400
    )
    assert bad_format["param"] == "encoding_format"
    assert (await client.post("/v1/embeddings", json={"input": TEXT, "user": "someone"})).status_code == 200
    # Clients that send every optional field send null for the ones they leave unset.
    nulls = {"input": TEXT, "encoding_format": None, "dimensions": None, "user": None, "model": None}
    answer = await client.post("/v1/embeddings", json=nulls)
    assert answer.status_code == 200 and isinstance(answer.json()["data"][0]["embedding"], list)


async def test_total_tokens_per_request_are_bounded(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(embedding_max_total_tokens=10)) as (client, _app):
        ids = await token_ids(client, TEXT)
        assert len(ids) <= 10 < 2 * len(ids)
        assert (await client.post("/v1/embeddings", json={"input": [ids]})).status_code == 200
        error = assert_openai_error(await client.post("/v1/embeddings", json={"input": [ids, ids]}), 400)
        assert "TEXTGEN_EMBEDDING_MAX_TOTAL_TOKENS" in error["message"]


async def test_inputs_go_through_the_content_filter(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(blocked_words=["pineapple"])) as (client, _app):
        as_text = await client.post("/v1/embeddings", json={"input": ["fine text", "a pineapple here"]})
        assert "content filter" in assert_openai_error(as_text, 400)["message"]
        ids = await token_ids(client, "a pineapple here")
        as_ids = await client.post("/v1/embeddings", json={"input": ids})
        assert "content filter" in assert_openai_error(as_ids, 400)["message"]
        assert (await client.post("/v1/embeddings", json={"input": "fine text"})).status_code == 200


# ----- rate limits and token budgets ------------------------------------------------------------------------


async def test_embeddings_count_against_the_callers_requests_and_tokens(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(api_keys=["alice-key"], rate_limit_rpm=100, rate_limit_tpm=40)
    async with app_client(settings) as (client, app):
        clock = fake_clock(app)
        ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # 10 tokens
        first = await client.post("/v1/embeddings", json={"input": [ids, ids]}, headers=ALICE)
        assert first.status_code == 200, first.text
        assert counted(app, ALICE_RATE_KEY) == (1, 20)  # one request, its 20 tokens
        second = await client.post("/v1/embeddings", json={"input": [ids, ids, ids]}, headers=ALICE)
        refused = assert_openai_error(second, 429)
        assert "TEXTGEN_RATE_LIMIT_TPM" in refused["message"] and int(second.headers["Retry-After"]) >= 1
        assert counted(app, ALICE_RATE_KEY) == (2, 20)  # counted as a request; its tokens reserved nothing
        never = await client.post("/v1/embeddings", json={"input": [ids] * 5}, headers=ALICE)
        assert "can never run" in assert_openai_error(never, 429)["message"]
        clock.next_window()
        assert (await client.post("/v1/embeddings", json={"input": [ids] * 4}, headers=ALICE)).status_code == 200


async def test_requests_per_minute_count_embeddings_and_tokenize(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(api_keys=["alice-key"], rate_limit_rpm=3)) as (client, app):
        fake_clock(app)
        assert (await client.post("/v1/embeddings", json={"input": TEXT}, headers=ALICE)).status_code == 200
        assert (await client.post("/tokenize", json={"prompt": TEXT}, headers=ALICE)).status_code == 200
        assert (await client.post("/detokenize", json={"tokens": [5, 6]}, headers=ALICE)).status_code == 200
        refused = await client.post("/v1/embeddings", json={"input": TEXT}, headers=ALICE)
        assert assert_openai_error(refused, 429) and int(refused.headers["Retry-After"]) >= 1


# ----- beside generation -------------------------------------------------------------------------------------


async def test_an_embedding_request_is_answered_while_streams_keep_running(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    body = {"prompt": "Stream says", "max_tokens": 1000, "temperature": 0.9, "ignore_eos": True, "stream": True}
    async with app_client(make_settings(max_prompt_tokens=64)) as (_client, app), streaming_client(app) as client:
        received = [0, 0, 0]
        embedded = asyncio.Event()
        after_embedding = [0, 0, 0]

        async def stream(index: int) -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    assert "error" not in json.loads(line[6:]), line
                    received[index] += 1
                    after_embedding[index] += embedded.is_set()
                    if after_embedding[index] >= 3:
                        return  # it went on after the embeddings were answered: hang up

        streams = [asyncio.create_task(stream(i)) for i in range(3)]
        await wait_until(lambda: all(received), 60, "every stream's first chunk")
        texts = [f"{TEXT} number {i}" for i in range(8)]
        answers = await asyncio.gather(*(client.post("/v1/embeddings", json={"input": texts}) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert not any(task.done() for task in streams)  # no stream ended (or failed) meanwhile
        embedded.set()
        await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert after_embedding == [3, 3, 3]


# ----- /tokenize and /detokenize -----------------------------------------------------------------------------


async def test_tokenize_and_detokenize_round_trip(api: Api) -> None:
    client, app = api
    response = await client.post("/tokenize", json={"model": "tiny", "prompt": TEXT, "return_token_strs": True})
    assert response.status_code == 200, response.text
    body = response.json()
    tokenizer = app.state.textgen.model.tokenizer
    assert body["tokens"] == tokenizer(TEXT).input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == app.state.textgen.model.context_length
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert (await client.post("/tokenize", json={"prompt": TEXT})).json()["token_strs"] is None
    back = await client.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": TEXT}


async def test_tokenized_chat_counts_what_a_chat_completion_charges(api: Api) -> None:
    client, _app = api
    counted_chat = await client.post("/tokenize", json={"messages": MESSAGES})
    assert counted_chat.status_code == 200, counted_chat.text
    chat = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    assert counted_chat.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    without_cue = await client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})
    assert without_cue.json()["count"] < counted_chat.json()["count"]


@pytest.mark.parametrize(
    ("path", "body", "param", "expected"),
    [
        ("/tokenize", {}, "prompt", "prompt: Field required"),
        ("/tokenize", {"prompt": TEXT, "messages": MESSAGES}, "messages", "messages: Extra inputs"),
        ("/tokenize", {"prompt": "x" * (1024 * 32 + 1)}, "prompt", "characters, more than"),
        ("/tokenize", {"prompt": TEXT, "continue_final_message": True}, "continue_final_message", "Extra inputs"),
        ("/tokenize", {"model": "nope", "prompt": TEXT}, "model", "'nope' does not exist"),
        ("/detokenize", {"tokens": [1, 400]}, "tokens.1", "tokens.1: 400 is not a token id"),
        ("/detokenize", {"tokens": [-3]}, "tokens.0", "greater than or equal to 0"),
        ("/detokenize", {"tokens": [1, "2"]}, "tokens.1", "valid integer"),
        ("/detokenize", {"tokens": [1] * 1025}, "tokens", "more than the model's context"),
    ],
)
async def test_tokenizer_routes_refuse_bad_input_in_openai_shape(
    api: Api, path: str, body: dict[str, Any], param: str | None, expected: str
) -> None:
    """vLLM's tokenizer routes answer errors as vLLM does, in OpenAI's shape (schema errors 400 naming the
    field), not in the native {"detail"} shape: the clients that call them are written for vLLM."""
    client, _app = api
    response = await client.post(path, json=body)
    error = assert_openai_error(response, 404 if param == "model" else 400)
    assert error["param"] == param, error
    assert expected in error["message"], error
