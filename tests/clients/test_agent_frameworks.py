"""Agent frameworks on top of the openai client: pydantic-ai (a tool-based ``output_type`` and a function tool
the agent really calls) and instructor (its default TOOLS mode)."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import instructor
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from pydantic_ai.models.openai import OpenAIChatModel

pytestmark = [pytest.mark.clients, pytest.mark.server]


@pytest.fixture(scope="module")
def pydantic_ai() -> ModuleType:
    """pydantic_ai, imported by this module's first test that uses it rather than at collection: its import is
    ~1 s of CPU that every pytest worker would otherwise pay, whether or not it runs these tests."""
    import pydantic_ai

    return pydantic_ai


def served_model(base_url: str, model: str) -> OpenAIChatModel:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(model, provider=OpenAIProvider(base_url=base_url, api_key="unused"))


def test_pydantic_ai_text_output(pydantic_ai: ModuleType, base_url: str, model: str) -> None:
    agent = pydantic_ai.Agent(served_model(base_url, model), model_settings={"temperature": 0, "max_tokens": 8})
    result = agent.run_sync("What is the capital of France? Answer in one word.")
    assert isinstance(result.output, str) and "paris" in result.output.lower(), result.output


class Population(BaseModel):
    """The answer: a city and its population."""

    city: str = Field(max_length=40)  # bounded, so the call fits max_tokens whatever the model writes
    population: int = Field(description="Number of inhabitants", ge=0, le=10**10)


def test_pydantic_ai_tool_output_and_function_tool(pydantic_ai: ModuleType, base_url: str, model: str) -> None:
    agent = pydantic_ai.Agent(
        served_model(base_url, model),
        output_type=Population,  # the default ToolOutput: the answer comes as a call of the final_result tool
        instructions="Always call lookup_population first, then give the final result.",
        model_settings={"temperature": 0, "max_tokens": 96},
    )
    looked_up: list[str] = []

    @agent.tool_plain
    def lookup_population(city: str) -> int:
        """Look up the number of inhabitants of a city."""
        looked_up.append(city)
        return 2_102_650

    result = agent.run_sync("How many people live in Paris?")
    assert looked_up, "the agent never called lookup_population"
    assert "paris" in looked_up[0].lower(), looked_up
    assert isinstance(result.output, Population), result.output  # through the final_result output tool
    assert "paris" in result.output.city.lower(), result.output


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)


def test_instructor_tools_mode(oai: OpenAI, model: str) -> None:
    client = instructor.from_openai(oai)  # default mode: TOOLS (a forced call of the model's tool)
    person = client.chat.completions.create(
        model=model,
        response_model=Person,
        messages=[{"role": "user", "content": "Extract the person: John Smith is 42 years old."}],
        max_tokens=96,
        temperature=0,
        max_retries=0,
    )
    # instructor raises unless the answer is exactly one call whose arguments validate as a Person; what the
    # 135M model puts in them is its own (greedy, it reads the age as 22), so the name is what is compared.
    assert isinstance(person, Person), person
    assert person.name == "John Smith", person
