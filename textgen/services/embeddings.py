"""OpenAI's embeddings from the served model: how a ``/v1/embeddings`` request becomes engine work and how
the vectors become OpenAI's response.

Inputs are a string, a list of strings, a list of token ids or a list of lists of token ids. Every bound is
checked before any work, cheapest first: the number of inputs and their characters, then (tokenized off the
event loop) each input's tokens against the prompt limit, the request's tokens against
TEXTGEN_EMBEDDING_MAX_TOTAL_TOKENS and token ids against the vocabulary; then the content filter, as for
prompts. The tokens are charged to the caller's token budget like prompt tokens (TEXTGEN_RATE_LIMIT_TPM;
the request itself counted against TEXTGEN_RATE_LIMIT_RPM by the router), and the engine runs the inputs
as prefill-only work beside generation (``textgen.engine.types.EmbeddingRequest``). Vectors are the mean of
the final hidden states, L2-normalised (``textgen.engine.pooling`` says why).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.engine.types import EmbeddingHandle, EmbeddingRequest, EmbeddingResult, prompt_token_limit
from textgen.errors import ContentRejectedError, InvalidRequestError, PromptTooLongError
from textgen.generation import MAX_CHARS_PER_TOKEN, PROMPT_REJECTED, GenerationService
from textgen.loader import LoadedModel

logger = logging.getLogger(__name__)

EncodingFormat = Literal["float", "base64"]

# ``input``'s four shapes, for the documentation (the service checks them itself, with its own messages).
_TOKEN_IDS: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
INPUT_SCHEMAS: Any = [  # JSON, typed loosely for json_schema_extra
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
]


class EmbeddingCreateRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body. ``input`` is checked by the service (its four shapes, each
    with its own message); ``user`` is metadata and ignored; any other field is refused (400 naming it)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "default", "input": ["first text", "second text"]}]},
    )

    input: Any = Field(
        ...,
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids "
        "(the served model's own ids).",
        json_schema_extra={"anyOf": INPUT_SCHEMAS},
    )
    model: str | None = Field(
        None, description="The served name or an alias (GET /v1/models); left out = the served model; else 404."
    )
    encoding_format: EncodingFormat | None = Field(
        "float",
        description="float: lists of numbers (also when null); base64: each vector as little-endian float32 bytes.",
    )
    dimensions: int | None = Field(
        None, ge=1, description="Only the model's own size is accepted: this model cannot shorten its vectors."
    )
    user: str | None = Field(None, max_length=256, description="End-user id (metadata; ignored).")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


@dataclass(frozen=True)
class EmbeddingInputs:
    """The request's inputs as the engine takes them (token ids), and their texts when text was sent."""

    tokens: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...] | None

    @property
    def total_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.tokens)


def embedding_size(model: LoadedModel) -> int:
    """Numbers per vector: the model's hidden size."""
    return int(model.model.config.get_text_config().hidden_size)


def vocabulary_size(model: LoadedModel) -> int:
    """Token ids below this are valid: the tokenizer's ids that the model also has a row for."""
    rows = getattr(model.model.config.get_text_config(), "vocab_size", None)
    size = len(model.tokenizer)
    return min(size, rows) if isinstance(rows, int) else size


def input_token_limit(service: GenerationService) -> int:
    """The most tokens one input may have: the prompt limit (TEXTGEN_MAX_PROMPT_TOKENS), within the model's
    context. Every input is prefilled whole in one step, so this also bounds what one input adds to a step."""
    settings = service.settings
    configured, context = settings.max_prompt_tokens, service.context_length
    if context is None or configured is None:  # unset: the prompt limit's default (context - output budget)
        return prompt_token_limit(configured, settings.max_new_tokens_limit, context)
    return min(configured, context)


def check_dimensions(body: EmbeddingCreateRequest, model: LoadedModel) -> None:
    size = embedding_size(model)
    if body.dimensions is not None and body.dimensions != size:
        raise InvalidRequestError(
            f"dimensions: this model's embeddings have {size} dimensions and cannot be shortened (it was not "
            f"trained for truncated, Matryoshka-style vectors); omit dimensions or pass {size}."
        )


def _is_token_id(value: Any) -> bool:
    """An integer (1.0 counts, as in JSON Schema; true does not)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _raw_inputs(value: Any) -> list[str] | list[list[int]]:
    """The input's shape: a list of texts or a list of token-id lists (400 naming ``input`` otherwise)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "input: must be a non-empty string, a non-empty list of strings, a list of token ids or a list of "
            "lists of token ids."
        )
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(_is_token_id(item) for item in value):
        return [[int(item) for item in value]]
    if all(isinstance(item, list) for item in value):
        for index, item in enumerate(value):
            if not item or not all(_is_token_id(token) for token in item):
                raise InvalidRequestError(f"input[{index}]: must be a non-empty list of integer token ids.")
        return [[int(token) for token in item] for item in value]
    raise InvalidRequestError(
        "input: a list must hold only strings, only token ids, or only lists of token ids (not a mix)."
    )


def _check_sizes(service: GenerationService, raw: list[str] | list[list[int]], request_id: str) -> None:
    """The bounds that need no tokenizer: number of inputs, empty inputs, characters, token-id counts."""
    settings = service.settings
    if len(raw) > settings.embedding_max_inputs:
        raise InvalidRequestError(
            f"input: {len(raw)} inputs; this server embeds at most {settings.embedding_max_inputs} per request "
            "(TEXTGEN_EMBEDDING_MAX_INPUTS). Split them over several requests."
        )
    per_input = input_token_limit(service)
    total_chars = 0
    for index, item in enumerate(raw):
        if not item:
            raise InvalidRequestError(f"input[{index}]: must not be empty.")
        size = len(item)
        what = "characters" if isinstance(item, str) else "tokens"
        bound = per_input * MAX_CHARS_PER_TOKEN if isinstance(item, str) else per_input
        if size > bound:
            raise PromptTooLongError(
                f"input[{index}]: {size} {what}, more than {bound}; each input may have at most {per_input} tokens "
                "(TEXTGEN_MAX_PROMPT_TOKENS and the model's context). Shorten or split it."
            )
        total_chars += size if isinstance(item, str) else 0
    total_bound = settings.embedding_max_total_tokens * MAX_CHARS_PER_TOKEN
    if total_chars > total_bound:
        raise PromptTooLongError(
            f"input: {total_chars} characters in all, more than {total_bound}; a request may embed at most "
            f"{settings.embedding_max_total_tokens} tokens (TEXTGEN_EMBEDDING_MAX_TOTAL_TOKENS). Send fewer inputs."
        )
    logger.info(
        "Embedding request received (%d inputs, %d %s)",
        len(raw),
        sum(len(item) for item in raw),
        "characters" if raw and isinstance(raw[0], str) else "tokens",
        extra={"request_id": request_id},
    )


def _tokenized(service: GenerationService, model: LoadedModel, raw: list[str] | list[list[int]]) -> EmbeddingInputs:
    """In a worker thread: every input as token ids (texts tokenized as prompts are), checked against the
    per-input and per-request token limits and the vocabulary."""
    tokenizer: PreTrainedTokenizerBase = model.tokenizer
    texts = tuple(str(item) for item in raw) if raw and isinstance(raw[0], str) else None
    if texts is not None:
        tokens = tuple(tuple(tokenizer(text, add_special_tokens=True).input_ids) for text in texts)
    else:
        tokens = tuple(tuple(int(token) for token in item) for item in raw)
    per_input, vocab = input_token_limit(service), vocabulary_size(model)
    for index, ids in enumerate(tokens):
        if not ids:
            raise InvalidRequestError(f"input[{index}]: has no tokens.")
        if len(ids) > per_input:
            raise PromptTooLongError(
                f"input[{index}]: {len(ids)} tokens; each input may have at most {per_input} "
                "(TEXTGEN_MAX_PROMPT_TOKENS and the model's context). Shorten or split it."
            )
        if texts is None and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(token for token in ids if token < 0 or token >= vocab)
            raise InvalidRequestError(
                f"input[{index}]: token id {bad} is not in this model's vocabulary (0 to {vocab - 1}); send the "
                "served model's own token ids (POST /tokenize gives them), or send text."
            )
    inputs = EmbeddingInputs(tokens, texts)
    limit = service.settings.embedding_max_total_tokens
    if inputs.total_tokens > limit:
        raise PromptTooLongError(
            f"input: {inputs.total_tokens} tokens in all; a request may embed at most {limit} "
            "(TEXTGEN_EMBEDDING_MAX_TOTAL_TOKENS). Send fewer inputs."
        )
    return inputs


def _screened(service: GenerationService, model: LoadedModel, inputs: EmbeddingInputs, request_id: str) -> None:
    """In a worker thread: the content filter over each input, as over a prompt (token ids are read as the
    text they stand for)."""
    texts = inputs.texts
    if texts is None:
        texts = tuple(str(model.tokenizer.decode(list(ids))) for ids in inputs.tokens)
    matches = sum(len(service.content_filter.find(text)) for text in texts)
    if matches:
        service.metrics.observe_filter("prompt", "reject")
        logger.warning(
            "Embedding input rejected by the content filter (%d matches)", matches, extra={"request_id": request_id}
        )
        raise ContentRejectedError(PROMPT_REJECTED)


async def checked_inputs(
    service: GenerationService, model: LoadedModel, body: EmbeddingCreateRequest, request_id: str
) -> EmbeddingInputs:
    """The request's inputs as token ids, every bound and the content filter checked (400 naming the input
    otherwise); tokenizing and filtering run off the event loop."""
    check_dimensions(body, model)
    raw = _raw_inputs(body.input)
    _check_sizes(service, raw, request_id)

    def tokenize_and_screen() -> EmbeddingInputs:
        inputs = _tokenized(service, model, raw)
        _screened(service, model, inputs, request_id)
        return inputs

    return await service.threads.run(tokenize_and_screen)


async def submit_embedding(
    service: GenerationService, caller: str, inputs: EmbeddingInputs, request_id: str
) -> EmbeddingHandle:
    """Charge the inputs' tokens to ``caller`` (429 when its token budget has no room), then queue them.
    Once queued the tokens stay spent, as a prompt's do; a refused submission gives them back."""
    grant = await service.grant(caller, [], inputs.total_tokens)
    request = EmbeddingRequest(
        inputs=inputs.tokens, request_id=request_id, timeout_s=service.settings.request_timeout_s
    )
    try:
        return service.engine.submit_embedding(request)
    except BaseException:
        reservation = grant.reservation
        await service.rate_limiter.refund(reservation, reservation.tokens if reservation else 0)
        raise


def encode_vectors(result: EmbeddingResult, encoding_format: EncodingFormat) -> list[list[float]] | list[str]:
    """Each vector as a list of floats, or as OpenAI's base64: the float32 values' little-endian bytes."""
    vectors = result.vectors.float().cpu()
    if encoding_format == "float":
        listed: list[list[float]] = vectors.tolist()
        return listed
    little_endian = vectors.numpy().astype("<f4", copy=False)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]


def embedding_response(
    service: GenerationService, result: EmbeddingResult, encoding_format: EncodingFormat
) -> dict[str, Any]:
    """OpenAI's response body (a plain dict: tens of thousands of numbers need no second validation);
    the request is recorded in the metrics (``textgen_embedding_inputs_total`` / ``_tokens_total``)."""
    service.metrics.observe_embeddings(int(result.vectors.shape[0]), result.prompt_tokens)
    data = [
        {"object": "embedding", "index": index, "embedding": vector}
        for index, vector in enumerate(encode_vectors(result, encoding_format))
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": service.model_name, "usage": usage}
