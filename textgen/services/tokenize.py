"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes: the served model's tokenizer, without the model.

A prompt is tokenized exactly as the engine tokenizes one; chat messages are rendered by the same chat
template as ``/v1/chat/completions`` first, so ``count`` is the ``usage.prompt_tokens`` that chat would
report. Inputs are bounded before the tokenizer runs (characters against the model's context, ids against
the vocabulary), and the work runs off the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from textgen.engine.types import DEFAULT_PROMPT_TOKENS
from textgen.errors import InvalidRequestError, PromptTooLongError
from textgen.generation import MAX_CHARS_PER_TOKEN, GenerationService
from textgen.loader import LoadedModel
from textgen.services.embeddings import vocabulary_size
from textgen.services.messages import message_texts
from textgen.services.openai import render_chat_prompt
from textgen.services.requests import ChatMessage


class TokenizePromptRequest(BaseModel):
    """vLLM's completion-style tokenize body: a prompt."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "Hello world"}]})

    model: str | None = Field(
        None, description="Which model's tokenizer (a name or alias from GET /v1/models); left out: the default model."
    )
    prompt: str = Field(..., description="Text to tokenize, as the engine tokenizes a prompt.")
    add_special_tokens: bool = Field(
        True, strict=True, description="Add the tokenizer's special tokens (BOS...), as the engine does."
    )
    return_token_strs: bool = Field(False, strict=True, description="Also return each token's string.")


class TokenizeChatRequest(BaseModel):
    """vLLM's chat-style tokenize body: messages, rendered by the model's chat template first."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"messages": [{"role": "user", "content": "Hi"}]}]}
    )

    model: str | None = Field(
        None, description="Which model's tokenizer (a name or alias from GET /v1/models); left out: the default model."
    )
    messages: list[ChatMessage] = Field(
        ..., min_length=1, description="Chat messages, rendered by the model's chat template, then tokenized."
    )
    add_generation_prompt: bool = Field(
        True, strict=True, description="End with the assistant's cue, as a chat completion does."
    )
    add_special_tokens: bool = Field(
        True, strict=True, description="Add the tokenizer's special tokens (BOS...), as the engine does."
    )
    return_token_strs: bool = Field(False, strict=True, description="Also return each token's string.")


TokenizeRequest = TokenizePromptRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tokens": [1, 2, 3]}]})

    model: str | None = Field(
        None, description="Which model's tokenizer (a name or alias from GET /v1/models); left out: the default model."
    )
    tokens: list[Annotated[StrictInt, Field(ge=0)]] = Field(..., description="Token ids of the served model.")


class DetokenizeResponse(BaseModel):
    prompt: str


def max_model_len(service: GenerationService) -> int:
    """The model's context length (what vLLM reports); prompts are further capped by TEXTGEN_MAX_PROMPT_TOKENS."""
    settings = service.settings
    prompt = settings.max_prompt_tokens or DEFAULT_PROMPT_TOKENS
    return service.context_length or prompt + settings.max_new_tokens_limit


def _check_characters(characters: int, limit_tokens: int, what: str) -> None:
    bound = limit_tokens * MAX_CHARS_PER_TOKEN
    if characters > bound:
        raise PromptTooLongError(
            f"{what}: {characters} characters, more than {bound} ({MAX_CHARS_PER_TOKEN} per token of the model's "
            f"context of {limit_tokens}); nothing that long could be sent to the model. Shorten it."
        )


async def tokenize(service: GenerationService, model: LoadedModel, body: TokenizeRequest) -> TokenizeResponse:
    context = max_model_len(service)
    tokenizer = model.tokenizer
    if isinstance(body, TokenizePromptRequest):
        _check_characters(len(body.prompt), context, "prompt")
    else:
        _check_characters(sum(len(text) for text in message_texts(body.messages)), context, "messages")

    def work() -> TokenizeResponse:
        if isinstance(body, TokenizeChatRequest):
            text = render_chat_prompt(tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt)
            _check_characters(len(text), context, "messages")
        else:
            text = body.prompt
        ids = [int(token) for token in tokenizer(text, add_special_tokens=body.add_special_tokens).input_ids]
        strings = [str(token) for token in tokenizer.convert_ids_to_tokens(ids)] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=context, tokens=ids, token_strs=strings)

    return await service.threads.run(work)


async def detokenize(service: GenerationService, model: LoadedModel, body: DetokenizeRequest) -> DetokenizeResponse:
    context, vocab = max_model_len(service), vocabulary_size(model)
    if len(body.tokens) > context:
        raise InvalidRequestError(
            f"tokens: {len(body.tokens)} ids, more than the model's context ({context}); detokenize in parts.",
            param="tokens",
        )
    for index, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise InvalidRequestError(
                f"tokens.{index}: {token} is not a token id of this model (0 to {vocab - 1}).", param=f"tokens.{index}"
            )

    def work() -> DetokenizeResponse:
        decoded: Any = model.tokenizer.decode(list(body.tokens))
        return DetokenizeResponse(prompt=str(decoded))

    return await service.threads.run(work)
