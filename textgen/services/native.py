"""The native request in the generation service's form: ``/generate``, ``/generate_background`` and
the job runner (a stored request, validated again) all convert here, once."""

from __future__ import annotations

from textgen.engine.constraints import constraint_from_fields
from textgen.engine.types import SamplingParams
from textgen.generation import TextRequest
from textgen.services.requests import TextGenerationRequest


def text_request(body: TextGenerationRequest) -> TextRequest:
    """The generation service's form of a native request."""
    return TextRequest(
        prompt=body.prompt,
        params=SamplingParams(
            max_new_tokens=body.max_new_tokens,
            max_length=body.max_length,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=tuple(body.stop or ()),
            ignore_eos=body.ignore_eos,
            constraint=constraint_from_fields(body.json_schema, body.regex, body.choice, body.grammar),
            logprobs=body.logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=tuple(sorted((body.logit_bias or {}).items())),
            min_p=body.min_p,
            min_tokens=body.min_tokens,
        ),
        timeout_s=body.timeout_s,
        open_ended=not body.model_fields_set & {"max_new_tokens", "max_length"},  # the defaults apply
    )
