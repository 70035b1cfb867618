"""Embeddings in the engine, on the tiny GPT-2: pooling and normalisation, agreement with the model's own
forward pass, independence from batch neighbours, every engine path, and prefill-only work that shares
steps with running streams without stopping them."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.support.engines import engines_stopped_after
from tests.support.waiting import wait_until
from textgen.engine.core import CoreOptions, sequence_positions
from textgen.engine.pooling import l2_normalise, mean_pool
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.threadpool import ThreadPoolEngine
from textgen.engine.types import (
    EmbeddingRequest,
    EmbeddingResult,
    EngineLimits,
    GenerationRequest,
    RequestTimings,
    SamplingParams,
)
from textgen.errors import (
    DeadlineExceededError,
    EngineError,
    GenerationCancelledError,
    InvalidRequestError,
    PromptTooLongError,
)
from textgen.services.embeddings import encode_vectors

TEXTS = ["The quick brown fox", "Once upon a time there was a robot who learned to paint.", "Hi"]
STREAM = SamplingParams(max_new_tokens=900, ignore_eos=True, temperature=0.9)


@pytest.fixture
async def make_engine(tiny_loaded: Any) -> AsyncIterator[Callable[..., Any]]:
    async with engines_stopped_after() as engines:

        async def build(*, engine: str = "batched", core: str = "auto", **limits: Any) -> Any:
            limits.setdefault("max_new_tokens_limit", 1000)
            built: Any
            if engine == "threadpool":
                built = ThreadPoolEngine(tiny_loaded, EngineLimits(**limits), workers=2, warmup=False)
            else:
                engine_limits = EngineLimits(**limits)
                options = CoreOptions(
                    core=core,
                    slots=engine_limits.max_running + engine_limits.embedding_slots,
                    positions=sequence_positions(engine_limits.max_prompt_tokens, engine_limits.max_new_tokens_limit),
                )
                built = BatchedEngine(tiny_loaded, engine_limits, core_options=options, warmup=False)
            return await engines.start(built)

        yield build


def ids_of(tiny_loaded: Any, text: str) -> tuple[int, ...]:
    return tuple(tiny_loaded.tokenizer(text).input_ids)


def reference(tiny_loaded: Any, tokens: tuple[int, ...]) -> torch.Tensor:
    """The model's own forward pass on the same tokens, alone: mean of the last hidden states (after the
    final LayerNorm), scaled to unit length."""
    with torch.no_grad():
        output = tiny_loaded.model(torch.tensor([tokens]), output_hidden_states=True)
    return F.normalize(output.hidden_states[-1][0].float().mean(dim=0), dim=0)


def embed_request(*inputs: tuple[int, ...], timeout_s: float | None = None) -> EmbeddingRequest:
    return EmbeddingRequest(inputs=tuple(inputs), timeout_s=timeout_s)


# ----- pooling ------------------------------------------------------------------------------------------


def test_mean_pool_averages_each_span_and_normalising_gives_unit_rows() -> None:
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)  # rows [0,1] [2,3] ... [10,11]
    pooled = mean_pool(hidden, [(0, 2), (2, 1), (3, 3)])
    assert pooled.tolist() == [[1.0, 2.0], [4.0, 5.0], [8.0, 9.0]]
    vectors = l2_normalise(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(vectors, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))  # a zero row stays zero, no NaN
    assert mean_pool(hidden, []).shape == (0, 2)


def test_base64_decodes_to_the_float_vector() -> None:
    vectors = l2_normalise(torch.randn(3, 5))
    result = EmbeddingResult(vectors, prompt_tokens=7, timings=RequestTimings(0.0, None, 0.0))
    floats = encode_vectors(result, "float")
    encoded = encode_vectors(result, "base64")
    for text, expected in zip(encoded, floats, strict=True):
        assert isinstance(text, str) and isinstance(expected, list)
        assert list(struct.unpack("<5f", base64.b64decode(text))) == expected  # exactly, bit for bit


# ----- agreement with the model ---------------------------------------------------------------------------


@pytest.mark.parametrize(("engine", "core"), [("batched", "auto"), ("batched", "transformers"), ("threadpool", "-")])
async def test_each_engine_path_matches_the_models_own_forward(
    make_engine: Callable[..., Any], tiny_loaded: Any, engine: str, core: str
) -> None:
    built = await make_engine(engine=engine, core=core)
    inputs = [ids_of(tiny_loaded, text) for text in TEXTS]
    result = await built.submit_embedding(embed_request(*inputs)).result()
    assert result.vectors.shape == (len(TEXTS), tiny_loaded.model.config.n_embd)
    assert result.prompt_tokens == sum(len(ids) for ids in inputs)
    for vector, ids in zip(result.vectors, inputs, strict=True):
        assert torch.allclose(vector, reference(tiny_loaded, ids), atol=1e-5)
        assert abs(float(vector.norm()) - 1.0) < 1e-5


async def test_same_text_same_vector_whatever_its_neighbours(make_engine: Callable[..., Any], tiny_loaded: Any) -> None:
    engine = await make_engine()
    target = ids_of(tiny_loaded, TEXTS[1])
    alone = (await engine.submit_embedding(embed_request(target)).result()).vectors[0]
    # In one request between other inputs, beside other embedding requests and beside running streams.
    streams = [engine.submit(GenerationRequest(f"Stream {i} says", STREAM)) for i in range(8)]
    await wait_until(lambda: all(s.text_so_far for s in streams), 30, "every stream's first text")
    others = [engine.submit_embedding(embed_request(ids_of(tiny_loaded, t))) for t in TEXTS]
    crowded = engine.submit_embedding(embed_request(ids_of(tiny_loaded, TEXTS[0]), target, ids_of(tiny_loaded, "Hi")))
    results = await asyncio.gather(crowded.result(), *(o.result() for o in others))
    for stream in streams:
        stream.cancel()
    assert torch.allclose(results[0].vectors[1], alone, atol=1e-5)
    assert torch.allclose(results[2].vectors[0], alone, atol=1e-5)  # the same text in another request
    assert not torch.allclose(results[0].vectors[0], alone, atol=1e-2)  # other texts really differ


# ----- sharing steps with generation ----------------------------------------------------------------------


async def test_embedding_inputs_share_steps_with_streams_that_keep_moving(
    make_engine: Callable[..., Any], tiny_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine(prefill_step_tokens=64)
    shared: list[tuple[int, int]] = []  # (decoding rows, embedding inputs) of every step that had inputs
    real_step = engine.core.step_pooled

    def recording_step(decode_slots: Any, tokens: Any, slots: Any, prompts: Any, pool_slots: Any, pool: Any) -> Any:
        if pool:  # DecodeCore.step calls step_pooled too: generation-only steps have no inputs
            shared.append((len(decode_slots), len(pool)))
        return real_step(decode_slots, tokens, slots, prompts, pool_slots, pool)

    monkeypatch.setattr(engine.core, "step_pooled", recording_step)
    streams = [engine.submit(GenerationRequest(f"Stream {i} says", STREAM)) for i in range(4)]
    await wait_until(lambda: all(s.text_so_far for s in streams), 30, "every stream's first text")
    text = "Continuous batching lets many requests share each decode step. " * 3
    one_input = ids_of(tiny_loaded, text)[:60]  # one input per 64-token step budget
    result = await engine.submit_embedding(embed_request(*[one_input] * 20)).result()
    assert result.vectors.shape[0] == 20
    # The 20 inputs went one per step (the step's prefill budget), each step decoding all four streams.
    assert shared == [(4, 1)] * 20
    assert all(not s.done for s in streams)
    for stream in streams:
        stream.cancel()


async def test_while_streams_decode_embeddings_are_paced_to_their_share_of_the_step(
    make_engine: Callable[..., Any], tiny_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[int] = []  # embedding inputs of every step while the request is out
    # A small prefill_step_tokens also keeps the assumed floor on an embedding token's cost (a decode step per
    # 4 x 16 tokens) high: 5% of a step buys at most 3.2 tokens, however cheap the tiny model measures them.
    engine = await make_engine(embedding_step_share=0.05, prefill_step_tokens=16)
    real_step = engine.core.step_pooled

    def recording_step(decode_slots: Any, tokens: Any, slots: Any, prompts: Any, pool_slots: Any, pool: Any) -> Any:
        steps.append(len(pool))
        return real_step(decode_slots, tokens, slots, prompts, pool_slots, pool)

    streams = [engine.submit(GenerationRequest(f"Stream {i} says", STREAM)) for i in range(4)]
    await wait_until(lambda: all(s.text_so_far for s in streams), 30, "every stream's first text")
    monkeypatch.setattr(engine.core, "step_pooled", recording_step)
    one_input = ids_of(tiny_loaded, "Continuous batching lets many requests share each decode step.")
    result = await engine.submit_embedding(embed_request(*[one_input] * 4)).result()
    assert result.vectors.shape[0] == 4
    # 5% of a step buys a few tokens: most steps only decode, and the four inputs (23 tokens each) went in
    # separate steps once their credit had saved up for them (at least 7 steps each).
    first, last = steps.index(1), len(steps) - 1 - steps[::-1].index(1)
    between = steps[first : last + 1]
    assert sum(between) == 4 and between.count(0) >= 3 * 3
    assert all(not s.done for s in streams)
    for stream in streams:
        stream.cancel()


async def test_embeddings_run_while_every_generation_slot_is_taken(
    make_engine: Callable[..., Any], tiny_loaded: Any
) -> None:
    engine = await make_engine(max_running=2)
    streams = [engine.submit(GenerationRequest(f"Stream {i} says", STREAM)) for i in range(2)]
    await wait_until(lambda: all(s.text_so_far for s in streams), 30, "both streams' first text")
    many = [ids_of(tiny_loaded, text) for text in TEXTS * 6]  # more inputs than the scratch slots
    result = await engine.submit_embedding(embed_request(*many)).result()
    assert result.vectors.shape[0] == len(many)
    assert all(not s.done for s in streams)
    for stream in streams:
        stream.cancel()


# ----- refusals, cancellation, deadlines, failures ----------------------------------------------------------


async def test_inputs_that_would_fail_a_step_are_refused_at_submission(
    make_engine: Callable[..., Any], tiny_loaded: Any
) -> None:
    engine = await make_engine(max_prompt_tokens=32, max_new_tokens_limit=32)
    vocab = tiny_loaded.model.config.vocab_size
    with pytest.raises(InvalidRequestError):
        engine.submit_embedding(embed_request((1, vocab)))
    with pytest.raises(InvalidRequestError):
        engine.submit_embedding(embed_request((1, -1)))
    with pytest.raises(InvalidRequestError):
        engine.submit_embedding(embed_request((1, 2), ()))
    with pytest.raises(InvalidRequestError):
        engine.submit_embedding(EmbeddingRequest(inputs=()))
    with pytest.raises(PromptTooLongError):
        engine.submit_embedding(embed_request(tuple([1] * (engine.core.capacity + 1))))


class HeldStep:
    """Wraps the core's step_pooled: the first call waits until ``release`` (so requests pile up behind
    it), and ``fail`` makes the next call raise."""

    def __init__(self, engine: BatchedEngine) -> None:
        self.real = engine.core.step_pooled
        self.entered = threading.Event()
        self.released = threading.Event()
        self.fail = False

    def __call__(self, *args: Any) -> Any:
        if self.fail:
            self.fail = False
            raise RuntimeError("injected failure")
        if not self.entered.is_set():
            self.entered.set()
            self.released.wait(30)
        return self.real(*args)


async def test_cancelled_and_expired_requests_end_without_running(
    make_engine: Callable[..., Any], tiny_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    held = HeldStep(engine)
    monkeypatch.setattr(engine.core, "step_pooled", held)
    first = engine.submit_embedding(embed_request(ids_of(tiny_loaded, "Hi")))
    await wait_until(held.entered.is_set, 30, "the first step")
    cancelled = engine.submit_embedding(embed_request(ids_of(tiny_loaded, "Hi")))
    cancelled.cancel()
    expired = engine.submit_embedding(embed_request(ids_of(tiny_loaded, "Hi"), timeout_s=0.001))
    with pytest.raises(DeadlineExceededError):
        await expired.result()  # answered by its deadline timer while the engine is busy
    held.released.set()
    assert (await first.result()).vectors.shape[0] == 1
    with pytest.raises(GenerationCancelledError):
        await cancelled.result()


async def test_a_failing_step_fails_its_embeddings_and_the_engine_goes_on(
    make_engine: Callable[..., Any], tiny_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    held = HeldStep(engine)
    held.entered.set()  # no holding: only the failure
    held.fail = True
    monkeypatch.setattr(engine.core, "step_pooled", held)
    with pytest.raises(EngineError):
        await engine.submit_embedding(embed_request(ids_of(tiny_loaded, "Hi"))).result()
    after = await engine.submit_embedding(embed_request(ids_of(tiny_loaded, "Hi"))).result()
    assert after.vectors.shape[0] == 1 and engine.ready
    limits = EngineLimits()
    assert engine.core.free_slots == limits.max_running + limits.embedding_slots  # the scratch slots came back
