"""How one line of a Batch API file is planned and answered: the job kinds the job runner runs besides
plain ``/generate_background`` jobs, registered where the state is built (``textgen.state``).

``batch_line_planner`` is what the coordinator (``textgen.workers.coordinator``) asks before it submits a
line, to charge the line to its owner's limits; ``batch_line_executor`` is what the runner calls for such
a job: the same request checks and response building as ``/v1/completions`` and ``/v1/chat/completions``
(``textgen.services.openai``), with the OpenAI batch line's ``{status_code, request_id, body}`` as the
job's result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from textgen.engine.types import GenerationResult, Handle, Priority
from textgen.errors import (
    GenerationCancelledError,
    ModelUnavailableError,
    NotReadyError,
    StoreUnavailableError,
    TextGenError,
)
from textgen.generation import GenerationService
from textgen.jobs.store import Job, JobState
from textgen.services.model_registry import ModelRegistry
from textgen.services.openai import (
    chat_max_tokens,
    chat_response,
    choice_params,
    completion_response,
    count_prompt_tokens,
    error_body,
    names_no_output_limit,
    prompts_of,
    response_format_constraint,
    submit_chat,
    submit_completion,
)
from textgen.services.requests import ChatCompletionRequest, CompletionRequest, describe_validation_errors
from textgen.workers.coordinator import BATCH_LINE_KIND, LinePlan, LinePlanner
from textgen.workers.runner import ExecutorFactory, JobExecutor, JobOutcome


async def _results(handles: Sequence[Handle]) -> list[GenerationResult]:
    try:
        return list(await asyncio.gather(*(handle.result() for handle in handles)))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise


def batch_line_executor(service: GenerationService, models: ModelRegistry) -> JobExecutor:
    """The runner's executor for ``batch_line`` jobs (registered in ``textgen.state.build_state``): each
    line runs on the model its body names (``models``), loaded if it is not."""

    async def execute(job: Job, request_id: str, track: Callable[[Handle], None]) -> JobOutcome:
        url, body = job.request["url"], job.request["body"]
        if job.request.get("refused"):  # it could never fit its owner's token limit (see the coordinator)
            return _failed(429, str(job.request["refused"]), request_id)
        granted = job.request.get("max_new_tokens")  # named no output limit: what its reservation covers
        if isinstance(body, dict) and isinstance(granted, int):
            body = {**body, "max_tokens": granted, "max_completion_tokens": None}
        try:
            response: Any
            if url == "/v1/chat/completions":
                chat = ChatCompletionRequest.model_validate(body)
                # A line naming a model this server does not serve fails with 404 model_not_found.
                async with models.use(chat.model) as serving:
                    line_service = serving.service
                    handles = await submit_chat(
                        line_service, serving.model.tokenizer, chat, request_id, Priority.BACKGROUND, tenant=job.tenant
                    )
                    for handle in handles:
                        track(handle)
                    results = [await line_service.finish(result, request_id) for result in await _results(handles)]
                response = chat_response(line_service, chat, results)
            else:
                completion = CompletionRequest.model_validate(body)
                async with models.use(completion.model) as serving:
                    line_service = serving.service
                    await line_service.prepare_constraint(response_format_constraint(completion.response_format))
                    handles = await submit_completion(
                        line_service, completion, request_id, Priority.BACKGROUND, tenant=job.tenant
                    )
                    for handle in handles:
                        track(handle)
                    results = [await line_service.finish(result, request_id) for result in await _results(handles)]
                response = completion_response(line_service, completion, results)
        except (NotReadyError, GenerationCancelledError, StoreUnavailableError):
            raise  # the runner hands the job back or records nothing
        except ModelUnavailableError as error:
            if error.retry_after_s is not None:
                raise  # busy models fill TEXTGEN_MODEL_MEMORY: the runner hands the line back to the queue
            return _failed(error.status_code, error.message, request_id, error.shown_param, error.code)
        except TextGenError as error:
            return _failed(error.status_code, error.message, request_id, error.shown_param, error.code)
        except ValidationError as error:
            param, message = describe_validation_errors(error.errors())
            return _failed(400, message, request_id, param)
        line = {"status_code": 200, "request_id": request_id, "body": response.model_dump(mode="json")}
        return JobState.SUCCEEDED, {"result": line}

    return execute


def batch_line_planner(service: GenerationService, models: ModelRegistry) -> LinePlanner:
    """The coordinator's planner: a line's prompts as the engine will see them (the chat template
    applied), their tokens counted in a worker thread, and one ``SamplingParams`` per choice, exactly as
    the executor above will submit them, on the model the line names (loaded to plan it, as its line will
    run on it next). A line naming another model raises (``ModelNotFoundError``): the coordinator then
    charges it as a request only, and the executor fails it."""

    async def plan(url: str, body: dict[str, Any]) -> LinePlan:
        request: CompletionRequest | ChatCompletionRequest
        chat = url == "/v1/chat/completions"
        request = ChatCompletionRequest.model_validate(body) if chat else CompletionRequest.model_validate(body)
        async with models.use(request.model) as serving:
            line_service = serving.service
            if isinstance(request, ChatCompletionRequest):
                max_tokens: int | None = chat_max_tokens(line_service, request)
            else:
                max_tokens = request.max_tokens
            prompts = await asyncio.to_thread(prompts_of, serving.model.tokenizer, request)
            prompt_tokens = await count_prompt_tokens(line_service, prompts, request)
        return LinePlan(
            prompt_tokens=prompt_tokens,
            params=choice_params(prompts, request, max_tokens),
            open_ended=names_no_output_limit(request),
        )

    return plan


# Job kinds the runner runs besides plain /generate_background jobs (registered by textgen.state.build_state).
JOB_EXECUTORS: dict[str, ExecutorFactory] = {BATCH_LINE_KIND: batch_line_executor}


def _failed(
    status: int, message: str, request_id: str, param: str | None = None, code: str | None = None
) -> JobOutcome:
    line = {"status_code": status, "request_id": request_id, "body": error_body(status, message, param, code)}
    return JobState.FAILED, {"result": line, "error": message}
