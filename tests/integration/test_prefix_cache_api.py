"""The prefix cache over HTTP (tiny GPT-2): cached_tokens on /generate, usage.prompt_tokens_details on /v1,
the same text with the cache on and off, one API key never served another's cached prefix, and the hit
rate in /stats and /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
# ~300 tiny-model tokens: several full 32-token blocks.
SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer with care and cite item {i}." for i in range(10))
BODY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


async def generate(client: Any, prompt: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.post("/generate", json={"prompt": prompt, **BODY}, headers=headers or {})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_generate_reports_cached_tokens_and_the_same_text(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    texts = {}
    for cache in (False, True):
        async with app_client(make_settings(prefix_cache=cache, max_prompt_tokens=900)) as (client, _app):
            first = await generate(client, SYSTEM + " Question one?")
            second = await generate(client, SYSTEM + " Question two, longer than the first?")
            assert first["cached_tokens"] == 0
            assert (second["cached_tokens"] >= 256) == cache, second["cached_tokens"]
            assert second["cached_tokens"] <= second["prompt_tokens"] - 1
            texts[cache] = [first["generated_text"], second["generated_text"]]
            stats = (await client.get("/stats")).json()
            if cache:
                assert stats["prefix_cache_hit_tokens"] == second["cached_tokens"]
                assert 0 < stats["prefix_cache_hit_rate"] < 1
                metrics = (await client.get("/metrics")).text
                assert f"textgen_prefix_cache_hits_total {float(second['cached_tokens'])}" in metrics
            else:
                assert stats["prefix_cache_hit_rate"] is None
    assert texts[True] == texts[False]


async def test_openai_usage_carries_cached_tokens(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(max_prompt_tokens=900)) as (client, _app):
        usages = []
        for question in ("What is rule 3?", "And rule 4?"):
            body = {
                "model": "tiny",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                "max_tokens": 4,
                "temperature": 0,
            }
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            usages.append(response.json()["usage"])
        assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 256


async def test_one_key_never_reuses_anothers_prefix(make_settings: MakeSettings, app_client: AppClient) -> None:
    settings = make_settings(api_keys=["alice-key", "bob-key"], max_prompt_tokens=900)
    async with app_client(settings) as (client, _app):
        assert (await generate(client, SYSTEM + " Alice asks.", ALICE))["cached_tokens"] == 0
        assert (await generate(client, SYSTEM + " Bob asks.", BOB))["cached_tokens"] == 0
        assert (await generate(client, SYSTEM + " Alice again.", ALICE))["cached_tokens"] >= 256
    async with app_client(make_settings(api_keys=["alice-key", "bob-key"], max_prompt_tokens=900,
                                        prefix_cache_shared=True)) as (client, _app):
        await generate(client, SYSTEM + " Alice asks.", ALICE)
        assert (await generate(client, SYSTEM + " Bob asks.", BOB))["cached_tokens"] >= 256


async def test_batch_lines_use_their_owners_cache_only(make_settings: MakeSettings) -> None:
    """A batch output's usage shows cached_tokens: Bob's batch must not find what Alice's request cached."""
    from tests.integration.test_batches import ALICE as ALICE_KEY
    from tests.integration.test_batches import BOB as BOB_KEY
    from tests.integration.test_batches import batch_settings, content, ended, run_batch, serve
    from tests.support.batch_files import completion_line, parse_batch_output

    settings = batch_settings(make_settings, max_prompt_tokens=900)
    async with serve(settings) as (_app, client):
        alice, bob = client(ALICE_KEY), client(BOB_KEY)

        async def cached_in_batch(owner: Any, prompt: str) -> int:
            batch = await run_batch(owner, [completion_line("x", prompt)], "/v1/completions")
            done = await ended(owner, batch.id)
            records = parse_batch_output(await content(owner, done.output_file_id), "/v1/completions")
            return int(records["x"]["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert await cached_in_batch(alice, SYSTEM + " Alice's first line.") == 0
        assert await cached_in_batch(bob, SYSTEM + " Bob's line.") == 0
        assert await cached_in_batch(alice, SYSTEM + " Alice's second line.") >= 256
