"""Real client libraries (openai, langchain-openai, litellm, pydantic-ai, instructor) against a live server.

One ``uvicorn main:app`` on the bundled model serves the whole layer (session-scoped, started by the first
test that needs it): every test here is about what a real client gets back, and most of them need a model
that follows an instruction or fills a tool's arguments sensibly, so the bundled model is the one to drive.
Requests stay short (a few dozen tokens at most) and greedy where one answer is compared with another.

The libraries are pinned in requirements.txt (instructor through the Makefile). None of them may reach the
network: litellm reads its bundled model cost map (``LITELLM_LOCAL_MODEL_COST_MAP``), and LangChain's
embeddings skip their tiktoken length check (tiktoken would download its vocabulary).
"""

from __future__ import annotations

import json
import os

# litellm fetches its model cost map from the network at import unless told to use the bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from tests.support.server import MODEL_NAME, Server

# Tools shared by the modules: strict JSON schemas, as agent frameworks send them. Free text is bounded
# (maxLength) as frameworks bound it, so a call always fits the tests' token budgets whatever a 135M model
# writes: greedy text differs between machines (the measured weight plan), and a call cut at max_tokens is
# a different answer (finish_reason length), not the one a test is about.
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {
                "timezone": {"type": "string", "description": "IANA name, e.g. Europe/Paris", "maxLength": 40}
            },
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def tool_schema(name: str) -> dict[str, Any]:
    [tool] = [tool for tool in TOOLS if tool["function"]["name"] == name]
    return dict(tool["function"]["parameters"])


def assert_valid_arguments(name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    """The call names one of TOOLS and its arguments (a JSON string, or already parsed) fit that tool's schema."""
    assert name in {tool["function"]["name"] for tool in TOOLS}, name
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(parsed, tool_schema(name))
    return dict(parsed)


@pytest.fixture(scope="session")
def clients_server(default_server: Server) -> Server:
    """The session's default bundled-model server (shared with the e2e and browser layers: one start)."""
    return default_server


@pytest.fixture(scope="session")
def base_url(clients_server: Server) -> str:
    """The OpenAI base URL every client library is pointed at."""
    return clients_server.url + "/v1"


@pytest.fixture(scope="session")
def oai(base_url: str) -> Iterator[OpenAI]:
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def model() -> str:
    return MODEL_NAME
