"""``litellm`` with the ``openai/<served name>`` route and ``api_base``: tool calling and embeddings."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from tests.clients.conftest import TOOLS, WEATHER_QUESTION, assert_valid_arguments

pytestmark = [
    pytest.mark.clients,
    pytest.mark.server,
    # litellm's own TypedDicts, built at first use: noise about its types, not about the server.
    pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning"),
]


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    """litellm, imported by this module's first test rather than at collection: its import is ~5 s of CPU
    that every pytest worker would otherwise pay, whether or not it runs these tests."""
    import litellm

    return litellm


def test_plain_completion_and_stream(litellm: ModuleType, base_url: str, model: str) -> None:
    route = {"model": f"openai/{model}", "api_base": base_url, "api_key": "unused", "num_retries": 0}
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = litellm.completion(**route, messages=question, max_tokens=8, temperature=0)
    content = reply.choices[0].message.content
    assert content and "paris" in content.lower(), reply
    chunks = litellm.completion(**route, messages=question, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == content


def test_completion_with_tools(litellm: ModuleType, base_url: str, model: str) -> None:
    reply = litellm.completion(
        model=f"openai/{model}",
        api_base=base_url,
        api_key="unused",
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=96,
        temperature=0,
        num_retries=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert_valid_arguments(call.function.name, call.function.arguments)


def test_embedding(litellm: ModuleType, base_url: str, model: str) -> None:
    reply = litellm.embedding(
        model=f"openai/{model}", api_base=base_url, api_key="unused", input=["The cat sat on the mat.", "Hello"]
    )
    vectors = np.array([item["embedding"] for item in reply.data], dtype=np.float64)
    assert vectors.shape[0] == 2 and vectors.shape[1] > 1
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert reply.usage.prompt_tokens > 0
