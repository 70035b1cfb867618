"""Schemas of the OpenAI-compatible API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``).

The request and response shapes are the service layer's (``textgen.services.requests``,
``textgen.services.openai_types``: batch lines use them too); the HTTP-only ones are defined here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from textgen.services.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from textgen.services.requests import ChatCompletionRequest, ChatMessage, CompletionRequest

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatLogprobs",
    "ChatMessage",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorDetail",
    "Usage",
]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textgen"
    # Beyond OpenAI's card (clients ignore extra fields): which model an id names, and where it stands.
    root: str | None = Field(None, description="The model this id names (itself, or the model an alias stands for).")
    state: Literal["unloaded", "loading", "loaded", "unloading", "failed"] | None = Field(
        None, description="Loaded or not: models other than the default load on first use and unload when idle."
    )
    memory_bytes: int | None = Field(
        None, description="While loaded: its weights and reserved KV cache (counted against TEXTGEN_MODEL_MEMORY)."
    )
    default: bool | None = Field(None, description="The model a request without 'model' runs on.")
    loaded_at: int | None = Field(None, description="When it was last loaded (Unix seconds).")
    loads: int | None = Field(None, description="How often this process has loaded it.")
    error: str | None = Field(None, description="Why its last load failed (state 'failed'; the next request retries).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
    request_id: str
