"""Schemas of the OpenAI-compatible API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``).

The request and response shapes are the service layer's (``textgen.services.requests``,
``textgen.services.openai_types``: batch lines use them too); the HTTP-only ones are defined here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

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
