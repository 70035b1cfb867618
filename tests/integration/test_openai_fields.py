"""Every OpenAI request field of /v1/completions and /v1/chat/completions is honoured, refused with a 400
naming it, or accepted as metadata (docs/api.md, "Request fields"). Each test here would fail if its field
were silently ignored: it compares the output with and without the field (greedy decoding on the tiny GPT-2,
so outputs are deterministic), or checks the 400 and its ``param``.

``FIELD_TESTS`` maps every field of the docs table to the tests that cover it (here or elsewhere); the last
test holds the table and the map together.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests.integration.test_openai_api import assert_openai_error, post_ok, stream_chunks
from tests.support.app import open_app, tiny_settings

Api = tuple[httpx.AsyncClient, FastAPI]

PROMPT = "The future of AI is"
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest_asyncio.fixture(scope="module")
async def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    folder = tmp_path_factory.mktemp("openai-fields")
    async with open_app(tiny_settings(tiny_model_dir, folder)) as (client, app):
        yield client, app


@pytest_asyncio.fixture(scope="module")
async def threadpool_api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    folder = tmp_path_factory.mktemp("openai-fields-threadpool")
    async with open_app(tiny_settings(tiny_model_dir, folder, engine="threadpool")) as (client, app):
        yield client, app


def tokenizer_of(app: FastAPI) -> Any:
    return app.state.textgen.model.tokenizer


async def complete(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    return await post_ok(client, "/v1/completions", {"prompt": PROMPT, **GREEDY, **body})


async def text_of(client: httpx.AsyncClient, **body: Any) -> str:
    return str((await complete(client, **body))["choices"][0]["text"])


async def generated_ids(client: httpx.AsyncClient, app: FastAPI, **body: Any) -> list[int]:
    tokenizer = tokenizer_of(app)
    return list(tokenizer(await text_of(client, **body), add_special_tokens=False).input_ids)


async def refused(client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str) -> str:
    """The 400 for ``body``: it names ``param`` (in ``param`` and in the message); returns the message."""
    response = await client.post(path, json=body)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}:"), error
    assert "constrained" not in error["message"] and "function-after" not in error["message"], error
    return str(error["message"])


# ----- penalties, logit_bias, min_p, top_k, repetition_penalty, min_tokens -------------------------------

# A prompt the tiny model continues by repeating one token when decoding greedily.
REPETITIVE = {"prompt": PROMPT}


async def test_frequency_and_presence_penalties_break_greedy_repetition(api: Api) -> None:
    client, app = api
    plain = await generated_ids(client, app, **REPETITIVE)
    assert len(set(plain)) < len(plain) / 2, f"the baseline must repeat itself for this test to mean much: {plain}"
    for field in ("frequency_penalty", "presence_penalty"):
        penalised = await generated_ids(client, app, **REPETITIVE, **{field: 2.0})
        assert penalised != plain, field
        assert max(penalised.count(t) for t in penalised) < max(plain.count(t) for t in plain), (field, penalised)
    # A negative penalty encourages repetition: the opposite direction from a positive one.
    assert await generated_ids(client, app, **REPETITIVE, frequency_penalty=-2.0) != (
        await generated_ids(client, app, **REPETITIVE, frequency_penalty=2.0)
    )


async def test_penalties_on_chat(api: Api) -> None:
    client, _app = api
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    plain = await post_ok(client, "/v1/chat/completions", body)
    penalised = await post_ok(client, "/v1/chat/completions", {**body, "frequency_penalty": 2.0})
    assert penalised["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_logit_bias_forces_and_bans_tokens(api: Api, path: str) -> None:
    client, app = api
    tokenizer = tokenizer_of(app)
    forced = tokenizer(" fox", add_special_tokens=False).input_ids[0]
    body: dict[str, Any] = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
    body |= {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    answer = await post_ok(client, path, {**body, "logit_bias": {str(forced): 100}})
    choice = answer["choices"][0]
    text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
    assert text == tokenizer.decode([forced] * 4)
    # -100 bans the greedy choice: the first token changes.
    plain = await post_ok(client, path, {**body, "logprobs": 0} if path == "/v1/completions" else body)
    if path == "/v1/completions":
        first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(plain["choices"][0]["logprobs"]["tokens"][0]))[0]
        banned = await post_ok(client, path, {**body, "logprobs": 0, "logit_bias": {str(first): -100}})
        assert banned["choices"][0]["logprobs"]["tokens"][0] != plain["choices"][0]["logprobs"]["tokens"][0]


async def test_min_p_one_keeps_only_the_likeliest_token(api: Api) -> None:
    client, _app = api
    greedy = await text_of(client)
    hot = {"temperature": 2.0, "seed": 7}
    assert await text_of(client, **hot) != greedy, "sampling at temperature 2 must differ from greedy here"
    assert await text_of(client, **hot, min_p=1.0) == greedy


async def test_top_k_one_is_greedy_on_v1(api: Api) -> None:
    client, _app = api
    greedy = await text_of(client)
    hot = {"temperature": 2.0, "seed": 7}
    assert await text_of(client, **hot) != greedy
    assert await text_of(client, **hot, top_k=1) == greedy
    assert await text_of(client, **hot, top_k=-1) == await text_of(client, **hot)  # vLLM's "no limit"


async def test_repetition_penalty_on_v1(api: Api) -> None:
    client, app = api
    plain = await generated_ids(client, app, **REPETITIVE)
    penalised = await generated_ids(client, app, **REPETITIVE, repetition_penalty=5.0)
    assert penalised != plain


async def test_min_tokens_holds_off_end_of_sequence(api: Api) -> None:
    client, app = api
    eos = app.state.textgen.model.tokenizer.eos_token_id
    body = {"ignore_eos": False, "max_tokens": 10, "logit_bias": {str(eos): 100}}
    ended = await complete(client, **body)
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["text"] == ""
    held = await complete(client, **body, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 6  # five tokens, then the end-of-sequence token
    assert held["choices"][0]["finish_reason"] == "stop" and held["choices"][0]["text"]


async def test_min_tokens_holds_off_stop_strings(api: Api) -> None:
    client, app = api
    tokenizer = tokenizer_of(app)
    forced = tokenizer(" fox", add_special_tokens=False).input_ids[0]
    word = tokenizer.decode([forced])
    body = {"max_tokens": 10, "logit_bias": {str(forced): 100}, "stop": [word]}
    stopped = await complete(client, **body)
    assert stopped["choices"][0]["text"] == "" and stopped["usage"]["completion_tokens"] == 1
    held = await complete(client, **body, min_tokens=3)
    # Stop strings count from the third token on: it is the stop string, and the text ends before it.
    assert held["choices"][0]["text"] == word * 2 and held["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 3


# ----- echo, best_of, token-id prompts -------------------------------------------------------------------


async def test_echo_prepends_the_prompt(api: Api) -> None:
    client, _app = api
    plain = await text_of(client)
    echoed = await complete(client, echo=True, n=2)
    assert [choice["text"] for choice in echoed["choices"]] == [PROMPT + plain] * 2
    scored = await complete(client, echo=True, max_tokens=0)
    assert scored["choices"][0]["text"] == PROMPT and scored["usage"]["completion_tokens"] == 0


async def test_echo_with_logprobs_scores_the_prompt(api: Api) -> None:
    """The prompt's token logprobs are the model's: the last prompt token's equals the logprob the same
    token got when it was generated after the shorter prompt."""
    client, app = api
    tokenizer = tokenizer_of(app)
    ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    generated = await post_ok(
        client, "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 2}
    )
    [token] = generated["choices"][0]["logprobs"]["tokens"]
    next_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(token))[0]
    body = {"prompt": [*ids, next_id], "echo": True, "max_tokens": 0, "logprobs": 2}
    echoed = (await post_ok(client, "/v1/completions", body))["choices"][0]["logprobs"]
    assert echoed["tokens"] == [tokenizer.decode([t]) for t in [*ids, next_id]]
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert all(isinstance(value, float) for value in echoed["token_logprobs"][1:])
    when_generated = generated["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][-1] == pytest.approx(when_generated["token_logprobs"][0], abs=1e-4)
    assert echoed["top_logprobs"][-1] == pytest.approx(when_generated["top_logprobs"][0], abs=1e-4)
    assert echoed["text_offset"][:2] == [0, len(echoed["tokens"][0])]


async def test_echo_with_logprobs_and_generation_continues_offsets(api: Api) -> None:
    client, _app = api
    answer = await complete(client, echo=True, logprobs=0, max_tokens=3)
    logprobs = answer["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == answer["choices"][0]["text"]
    assert logprobs["text_offset"][-1] + len(logprobs["tokens"][-1]) == len(answer["choices"][0]["text"])
    assert logprobs["token_logprobs"][0] is None and None not in logprobs["token_logprobs"][1:]


async def test_streamed_echo_starts_with_the_prompt(api: Api) -> None:
    client, _app = api
    body = {"prompt": PROMPT, **GREEDY, "echo": True, "stream": True}
    plain = await complete(client, echo=True)
    _response, chunks = await stream_chunks(client, "/v1/completions", body)
    streamed = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)
    assert streamed == plain["choices"][0]["text"]


async def test_best_of_equal_to_n_is_accepted_more_is_refused(api: Api) -> None:
    client, _app = api
    assert len((await complete(client, best_of=2, n=2, max_tokens=2))["choices"]) == 2
    assert len((await complete(client, best_of=1, max_tokens=2))["choices"]) == 1
    message = await refused(client, "/v1/completions", {"prompt": PROMPT, "best_of": 3, "n": 1}, "best_of")
    assert "set best_of to n" in message
    await refused(client, "/v1/completions", {"prompt": PROMPT, "best_of": 1, "n": 2}, "best_of")


async def test_token_id_prompts(api: Api) -> None:
    client, app = api
    ids = tokenizer_of(app)(PROMPT, add_special_tokens=False).input_ids
    by_text = await complete(client)
    by_ids = await complete(client, prompt=ids)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    several = await complete(client, prompt=[ids, ids[:2]])
    assert len(several["choices"]) == 2 and several["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert several["usage"]["prompt_tokens"] == len(ids) + 2


@pytest.mark.parametrize(
    "prompt",
    [[], [[]], [1, "a"], [True], [-1], [10**9], [[1], 2], 3, {"a": 1}],
    ids=["empty", "empty-inner", "mixed", "bool", "negative", "outside-vocab", "nested-mixed", "number", "object"],
)
async def test_bad_token_id_prompts_name_prompt(api: Api, prompt: Any) -> None:
    client, _app = api
    await refused(client, "/v1/completions", {"prompt": prompt, "max_tokens": 2}, "prompt")


# ----- refused, metadata, unknown, stream_options --------------------------------------------------------

REFUSED = [
    ("/v1/completions", "suffix", "and then"),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "reasoning_effort", "low"),
    ("/v1/chat/completions", "verbosity", "low"),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/completions", "top_logprobs", 2),  # chat's field, unknown to completions
    ("/v1/chat/completions", "echo", True),  # completions' field, unknown to chat
    ("/v1/completions", "guided_json", {}),  # another server's extension
    ("/v1/chat/completions", "frequency_penalty_typo", 1),
]


def _base(path: str) -> dict[str, Any]:
    return {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}


@pytest.mark.parametrize(("path", "field", "value"), REFUSED, ids=[f"{p.split('/')[-1]}-{f}" for p, f, _ in REFUSED])
async def test_fields_we_cannot_honour_are_400_naming_them(api: Api, path: str, field: str, value: Any) -> None:
    client, app = api
    for stream in (False, True):
        await refused(client, path, {**_base(path), "max_tokens": 2, "stream": stream, field: value}, field)
    assert app.state.textgen.engine.stats().running == 0


async def test_null_refused_fields_pass(api: Api) -> None:
    """Clients that send every field send null for the ones they do not use."""
    client, _app = api
    await post_ok(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "suffix": None})
    await post_ok(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "audio": None})


METADATA = {
    "/v1/completions": {"user": "user-1"},
    "/v1/chat/completions": {
        "user": "user-1",
        "metadata": {"team": "a"},
        "store": True,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "safety_identifier": "s",
        "modalities": ["text"],
    },
}


@pytest.mark.parametrize("path", list(METADATA))
async def test_metadata_fields_are_accepted_and_change_nothing(api: Api, path: str) -> None:
    client, _app = api
    body = {**_base(path), **GREEDY}
    plain = await post_ok(client, path, body)
    tagged = await post_ok(client, path, {**body, **METADATA[path]})
    assert tagged["choices"] == plain["choices"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_options_need_stream(api: Api, path: str) -> None:
    client, _app = api
    options = {"include_usage": True}
    await refused(client, path, {**_base(path), "stream_options": options}, "stream_options")
    await refused(client, path, {**_base(path), "stream": False, "stream_options": options}, "stream_options")
    _response, chunks = await stream_chunks(
        client, path, {**_base(path), "max_tokens": 2, "stream": True, "stream_options": options}
    )
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


BAD_VALUES = [
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("logit_bias", {"1": 101}),
    ("logit_bias", {"fox": 1}),
    ("logit_bias", {str(10**6): 1}),
    ("logit_bias", {str(i): 1 for i in range(301)}),
    ("logit_bias", [1]),
    ("min_p", 1.5),
    ("min_tokens", -1),
    ("top_k", -2),
    ("repetition_penalty", 0),
    ("repetition_penalty", 5e-324),  # dividing by it would overflow the logits
    ("echo", "yes"),
    ("max_tokens", 0),  # 0 only with echo
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_VALUES)])
async def test_bad_values_are_400_naming_the_field(api: Api, field: str, value: Any) -> None:
    client, _app = api
    await refused(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, field: value}, field)


# ----- the threadpool engine: honoured or refused there too ---------------------------------------------


async def test_threadpool_engine_honours_or_refuses(threadpool_api: Api) -> None:
    client, app = threadpool_api
    tokenizer = tokenizer_of(app)
    forced = tokenizer(" fox", add_special_tokens=False).input_ids[0]
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 3}
    answer = await post_ok(client, "/v1/completions", {**body, "logit_bias": {str(forced): 100}})
    assert answer["choices"][0]["text"] == tokenizer.decode([forced] * 3)
    ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    by_ids = await post_ok(client, "/v1/completions", {**body, "prompt": ids})
    assert by_ids["choices"][0]["text"] == (await post_ok(client, "/v1/completions", body))["choices"][0]["text"]
    eos = tokenizer.eos_token_id
    ending = {"max_tokens": 8, "logit_bias": {str(eos): 100}}
    assert (await post_ok(client, "/v1/completions", {**body, **ending}))["usage"]["completion_tokens"] == 1
    held = await post_ok(client, "/v1/completions", {**body, **ending, "min_tokens": 4})
    assert held["usage"]["completion_tokens"] >= 4
    for field in ("presence_penalty", "frequency_penalty"):
        message = await refused(client, "/v1/completions", {**body, field: 1.0}, field)
        assert "batched" in message
    plain = (await post_ok(client, "/v1/completions", body))["choices"][0]["text"]
    echoed = await post_ok(client, "/v1/completions", {**body, "echo": True})
    assert echoed["choices"][0]["text"] == PROMPT + plain


# ----- the docs table and this file agree ----------------------------------------------------------------

# Every field of docs/api.md's table -> the tests that fail if it were silently ignored ("module::test").
HERE = "tests/integration/test_openai_fields.py"
API = "tests/integration/test_openai_api.py"
FIELD_TESTS: dict[str, list[str]] = {
    "model": [
        "tests/integration/test_openai_models_errors.py::test_an_unknown_model_is_404_before_any_work",
        "tests/integration/test_openai_models_errors.py::test_the_served_name_an_alias_or_no_model_is_served",
    ],
    "prompt": [f"{HERE}::test_token_id_prompts", f"{HERE}::test_bad_token_id_prompts_name_prompt"],
    "messages": [f"{API}::test_chat_completion_shape_and_usage"],
    "max_tokens": [f"{HERE}::test_echo_prepends_the_prompt", f"{API}::test_completion_shape_and_usage"],
    "max_completion_tokens": [f"{API}::test_chat_max_completion_tokens_wins"],
    "temperature": [f"{HERE}::test_min_p_one_keeps_only_the_likeliest_token"],
    "top_p": ["tests/unit/test_sampling.py"],
    "n": [f"{API}::test_completion_n_and_seed"],
    "seed": [f"{API}::test_completion_n_and_seed"],
    "stop": [f"{API}::test_completion_stop_strings"],
    "stream": [f"{API}::test_completion_stream"],
    "stream_options": [f"{HERE}::test_stream_options_need_stream"],
    "logprobs": [f"{API}::test_completion_shape_and_usage", "tests/unit/test_logprobs.py"],
    "top_logprobs": ["tests/integration/test_prompt_checks.py", "tests/unit/test_logprobs.py"],
    "echo": [f"{HERE}::test_echo_prepends_the_prompt", f"{HERE}::test_echo_with_logprobs_scores_the_prompt"],
    "best_of": [f"{HERE}::test_best_of_equal_to_n_is_accepted_more_is_refused"],
    "presence_penalty": [f"{HERE}::test_frequency_and_presence_penalties_break_greedy_repetition"],
    "frequency_penalty": [f"{HERE}::test_frequency_and_presence_penalties_break_greedy_repetition"],
    "logit_bias": [f"{HERE}::test_logit_bias_forces_and_bans_tokens"],
    "response_format": ["tests/integration/test_structured_api.py"],
    "suffix": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "audio": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "prediction": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "reasoning_effort": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "verbosity": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "web_search_options": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "modalities": [f"{HERE}::test_fields_we_cannot_honour_are_400_naming_them"],
    "user": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "metadata": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "store": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "service_tier": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "prompt_cache_key": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "prompt_cache_retention": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "safety_identifier": [f"{HERE}::test_metadata_fields_are_accepted_and_change_nothing"],
    "top_k": [f"{HERE}::test_top_k_one_is_greedy_on_v1"],
    "min_p": [f"{HERE}::test_min_p_one_keeps_only_the_likeliest_token"],
    "repetition_penalty": [f"{HERE}::test_repetition_penalty_on_v1"],
    "min_tokens": [
        f"{HERE}::test_min_tokens_holds_off_end_of_sequence",
        f"{HERE}::test_min_tokens_holds_off_stop_strings",
    ],
    "ignore_eos": [f"{API}::test_ignore_eos_extension_generates_exactly_max_tokens"],
    # tool calling: owned by textgen.services.tools and its tests
    "tools": [],
    "tool_choice": [],
    "parallel_tool_calls": [],
    "functions": [],
    "function_call": [],
}
TOOL_FIELDS = {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"}


def docs_table_fields() -> set[str]:
    """The fields of docs/api.md's "Request fields" table (first column, in backticks)."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("### Request fields", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return {match.group(1) for match in re.finditer(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)}


def test_every_documented_field_has_a_test_and_every_declared_field_is_documented() -> None:
    from textgen.services.requests import (
        REFUSED_CHAT_FIELDS,
        REFUSED_COMPLETION_FIELDS,
        ChatCompletionRequest,
        CompletionRequest,
    )

    documented = docs_table_fields()
    declared = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert declared | set(REFUSED_CHAT_FIELDS) | set(REFUSED_COMPLETION_FIELDS) <= documented, (
        "declared or refused but missing from docs/api.md's table"
    )
    assert documented == set(FIELD_TESTS), "docs/api.md's table and FIELD_TESTS disagree"
    root = Path(__file__).resolve().parents[2]
    for field, tests in FIELD_TESTS.items():
        assert tests or field in TOOL_FIELDS, f"{field} has no test"
        for test in tests:
            path, _, name = test.partition("::")
            source = (root / path).read_text(encoding="utf-8")
            assert not name or f"def {name}(" in source, f"{test} (for {field}) does not exist"


# ----- the same fields on /generate ---------------------------------------------------------------------


async def test_native_generate_takes_the_same_fields(api: Api) -> None:
    client, app = api
    tokenizer = tokenizer_of(app)
    forced = tokenizer(" fox", add_special_tokens=False).input_ids[0]
    base = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 12, "ignore_eos": True}

    async def generated(**fields: Any) -> str:
        response = await client.post("/generate", json={**base, **fields})
        assert response.status_code == 200, response.text
        return str(response.json()["generated_text"])

    plain = await generated()
    assert await generated(logit_bias={str(forced): 100}) == tokenizer.decode([forced] * 12)
    assert await generated(frequency_penalty=2.0) != plain
    assert await generated(presence_penalty=2.0) != plain
    assert await generated(temperature=2.0, seed=7, min_p=1.0) == plain
    eos = tokenizer.eos_token_id
    ending = {"ignore_eos": False, "logit_bias": {str(eos): 100}, "min_tokens": 3}
    ended = await client.post("/generate", json={**base, **ending})
    assert ended.json()["completion_tokens"] == 4, ended.text
    refused_bias = await client.post("/generate", json={**base, "logit_bias": {"999999": 1}})
    assert refused_bias.status_code == 400 and "logit_bias" in refused_bias.text


async def test_echoed_prompt_logprobs_count_against_the_logprobs_limit(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """echo with logprobs returns an entry per prompt token too: they count toward
    TEXTGEN_MAX_LOGPROBS_PER_REQUEST, so a long prompt cannot make an unbounded response."""
    settings = tiny_settings(tiny_model_dir, tmp_path, max_logprobs_per_request=40)
    async with open_app(settings) as (client, _app):
        body = {"prompt": PROMPT, "max_tokens": 2, "logprobs": 1}
        await post_ok(client, "/v1/completions", body)  # 2 tokens x 2 entries: fine
        message = await refused(client, "/v1/completions", {**body, "prompt": PROMPT * 4, "echo": True}, "logprobs")
        assert "echo" in message and "TEXTGEN_MAX_LOGPROBS_PER_REQUEST" in message


# ----- every float sampling field: extremes, denormals, NaN and infinities ------------------------------------

FLOAT_FIELDS = {
    "/generate": ["temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"],
    "/v1/completions": [
        "temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p",
    ],
    "/v1/chat/completions": [
        "temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p",
    ],
}  # fmt: skip
# The smallest double (a denormal), float32's denormals and underflow, and what JSON parsers let through.
EXTREMES: list[float] = [
    5e-324, 1e-310, 1e-45, 1e-40, 1e-39, 1e-30, 1e-300, 1e308, float("nan"), float("inf"), -float("inf"),
]  # fmt: skip


def _generation_body(path: str, field: str, value: float | dict[str, float]) -> dict[str, Any]:
    if path == "/generate":
        return {"prompt": PROMPT, "max_new_tokens": 3, "logprobs": 2, "seed": 1, field: value}
    if path == "/v1/completions":
        return {"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "seed": 1, field: value}
    return {"messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "seed": 1, field: value}


def _logprob_values(path: str, body: dict[str, Any]) -> list[float]:
    if path == "/generate":
        entries = body["token_logprobs"] or []
        return [e["logprob"] for e in entries] + [t["logprob"] for e in entries for t in e["top_logprobs"]]
    choice = body["choices"][0]
    if path == "/v1/completions":
        logprobs = choice["logprobs"]
        return list(logprobs["token_logprobs"]) + [v for top in logprobs["top_logprobs"] for v in top.values()]
    entries = choice["logprobs"]["content"]
    return [e["logprob"] for e in entries] + [t["logprob"] for e in entries for t in e["top_logprobs"]]


async def test_float_sampling_fields_give_finite_logprobs_or_a_400_naming_them(api: Api) -> None:
    """A sampling value the engine cannot compute with (5e-324 for repetition_penalty divided the logits
    into NaN; a float32 denormal; NaN and infinities, which Python's JSON parser accepts) is refused naming
    the field, or the answer's log-probabilities are all finite: never NaN or a 500."""
    client, _app = api
    problems: list[str] = []
    cases = [(path, field, value) for path, fields in FLOAT_FIELDS.items() for field in fields for value in EXTREMES]
    cases += [(path, "logit_bias", {"5": value}) for path in FLOAT_FIELDS if path != "/generate" for value in EXTREMES]
    for path, field, value in cases:
        body = json.dumps(_generation_body(path, field, value))  # NaN and Infinity as Python writes them
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        where = f"{path} {field}={value}: {response.status_code}"
        if response.status_code in (400, 422):
            if field not in response.text:
                problems.append(f"{where} does not name the field: {response.text[:200]}")
            continue
        if response.status_code != 200:
            problems.append(f"{where} {response.text[:200]}")
            continue
        values = _logprob_values(path, json.loads(response.text))
        if not values or not all(isinstance(v, float | int) and math.isfinite(v) for v in values):
            problems.append(f"{where} logprobs {values[:6]}")
    for field in ("temperature", "top_p"):  # the Responses API's two sampling fields
        for value in EXTREMES:
            body = json.dumps({"input": "Hi", "max_output_tokens": 3, field: value})
            response = await client.post("/v1/responses", content=body, headers={"content-type": "application/json"})
            if response.status_code not in (200, 400) or (response.status_code == 400 and field not in response.text):
                problems.append(f"/v1/responses {field}={value}: {response.status_code} {response.text[:200]}")
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:20])
