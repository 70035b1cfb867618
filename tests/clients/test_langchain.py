"""``langchain-openai`` pointed at the server: ``bind_tools``, an agent step with a ``ToolMessage``,
``with_structured_output(method="function_calling")`` and ``OpenAIEmbeddings``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.clients.conftest import TOOLS, assert_valid_arguments

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

# LangChain is imported in the tests, not here: langchain_openai (with langchain_core and langsmith) is ~1 s of
# CPU at import, which every pytest worker would otherwise pay at collection, whether or not it runs this module.

pytestmark = [pytest.mark.clients, pytest.mark.server]


def chat_model(base_url: str, model: str, max_tokens: int = 96) -> ChatOpenAI:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=model, base_url=base_url, api_key="unused", temperature=0, max_tokens=max_tokens, max_retries=0
    )


def test_plain_chat_and_stream(base_url: str, model: str) -> None:
    llm = chat_model(base_url, model, max_tokens=8)
    question = "What is the capital of France? Answer in one word."
    answer = llm.invoke(question)
    assert isinstance(answer.content, str) and "paris" in answer.content.lower(), answer
    streamed = "".join(str(chunk.content) for chunk in llm.stream(question))
    assert streamed == answer.content


def test_bind_tools_and_an_agent_step_with_a_tool_message(base_url: str, model: str) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    llm = chat_model(base_url, model).bind_tools(TOOLS, tool_choice="get_weather", parallel_tool_calls=False)
    question = HumanMessage("What is the weather like in Paris right now?")
    called = llm.invoke([question])
    assert isinstance(called, AIMessage)
    [call] = called.tool_calls
    assert call["name"] == "get_weather"
    assert_valid_arguments("get_weather", call["args"])

    # The agent runs the tool and sends its result back; the model answers from it.
    result = ToolMessage("It is 23 degrees celsius and sunny in Paris.", tool_call_id=call["id"])
    answer = chat_model(base_url, model, max_tokens=24).bind_tools(TOOLS).invoke([question, called, result])
    assert isinstance(answer, AIMessage)
    assert isinstance(answer.content, str) and answer.content.strip(), answer
    assert "23" in answer.content, answer.content


class CityFacts(BaseModel):
    """Facts about a city."""

    # Bounded, as the bundled-model tool tests' schemas are: the grammar guarantees that what is written is
    # valid, not that a 135M model closes an open string within max_tokens (greedy, it rambled past 96 tokens
    # once the weight plan measured on the machine chose w8a8 rather than bf16 for the 139-token prompt).
    city: str = Field(description="The city's name", max_length=40)
    country: str = Field(description="The country it is in", max_length=40)


def test_with_structured_output_function_calling(base_url: str, model: str) -> None:
    structured = chat_model(base_url, model).with_structured_output(CityFacts, method="function_calling")
    facts = structured.invoke("Give the facts about Paris.")
    assert isinstance(facts, CityFacts), facts
    assert facts.city.strip() and facts.country.strip()


def test_openai_embeddings(base_url: str, model: str, oai: OpenAI) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: LangChain's length check tokenizes with tiktoken, which downloads its
    # vocabulary (no network here) and is not this model's tokenizer anyway; the server checks lengths.
    embeddings = OpenAIEmbeddings(
        model=model, base_url=base_url, api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    texts = ["The cat sat on the mat.", "Stock markets fell sharply on Monday."]
    documents = np.array(embeddings.embed_documents(texts))
    query = np.array(embeddings.embed_query(texts[0]))
    assert documents.shape[0] == 2 and documents.shape[1] == query.shape[0] > 1
    np.testing.assert_allclose(query, documents[0], atol=1e-5)
    direct = oai.embeddings.create(model=model, input=texts, encoding_format="float")
    np.testing.assert_allclose(documents, np.array([item.embedding for item in direct.data]), atol=1e-5)
