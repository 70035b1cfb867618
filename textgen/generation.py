"""What every way into the engine shares: schema → engine request, content checks, engine → response.

The sync route, the job runner and (later) the streaming and OpenAI routes all go through this one
``GenerationService``, so a rule such as "filter prompts and outputs" has exactly one home.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from models import TextGenerationRequest, TextGenerationResponse, Timings
from textgen.config import Settings
from textgen.content_filter import ContentFilter
from textgen.engine.types import Engine, GenerationRequest, GenerationResult, Handle, Priority, SamplingParams
from textgen.errors import ContentRejectedError

logger = logging.getLogger(__name__)

PROMPT_REJECTED = "The prompt was rejected by the content filter."
OUTPUT_REJECTED = "The generated text was withheld by the content filter."


def prompt_fingerprint(prompt: str) -> str:
    """Length and short hash: enough to correlate log lines without logging user text."""
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"len={len(prompt)} sha256={digest}"


def sampling_params_from(body: TextGenerationRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=body.max_new_tokens,
        max_length=body.max_length,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos,
    )


@dataclass
class GenerationService:
    engine: Engine
    content_filter: ContentFilter
    settings: Settings
    model_name: str

    def check_prompt(self, prompt: str, request_id: str) -> None:
        logger.info("Prompt received (%s)", prompt_fingerprint(prompt), extra={"request_id": request_id})
        logger.debug("Prompt text: %r", prompt, extra={"request_id": request_id})
        matches = self.content_filter.find(prompt)
        if matches:
            logger.warning(
                "Prompt rejected by the content filter (%d matches)", len(matches), extra={"request_id": request_id}
            )
            raise ContentRejectedError(PROMPT_REJECTED)

    def submit(self, body: TextGenerationRequest, request_id: str, priority: Priority) -> Handle:
        request = GenerationRequest(
            prompt=body.prompt,
            params=sampling_params_from(body),
            request_id=request_id,
            priority=priority,
            timeout_s=body.timeout_s or self.settings.request_timeout_s,
        )
        return self.engine.submit(request)

    def filter_output(self, text: str, request_id: str) -> str:
        matches = self.content_filter.find(text)
        if not matches:
            return text
        logger.warning(
            "Generated text matched the content filter (%d matches, action=%s)",
            len(matches),
            self.settings.output_filter_action,
            extra={"request_id": request_id},
        )
        if self.settings.output_filter_action == "reject":
            raise ContentRejectedError(OUTPUT_REJECTED)
        return self.content_filter.redact(text)

    def response(self, result: GenerationResult, request_id: str) -> TextGenerationResponse:
        return TextGenerationResponse(
            generated_text=self.filter_output(result.text, request_id),
            model=self.model_name,
            request_id=request_id,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason.value,
            timings=Timings(
                queue_s=result.timings.queue_s,
                time_to_first_token_s=result.timings.time_to_first_token_s,
                total_s=result.timings.total_s,
            ),
        )
