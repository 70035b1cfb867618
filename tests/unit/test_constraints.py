"""Structured output inside the batched engine on the tiny GPT-2: JSON schemas, regex, choice,
grammars, mixed batches, finish reasons, compile errors and the compile cache."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
import torch

from tests.support.structured import random_schemas
from textgen.engine.constraints import (
    Constraint,
    GrammarCompiler,
    MaskTimer,
    apply_token_masks,
    constraint_from_fields,
)
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import EngineLimits, FinishReason, GenerationRequest, GenerationResult, SamplingParams
from textgen.errors import InvalidRequestError

PROMPT = "The future of AI is"


@pytest.fixture
async def engine(tiny_loaded: Any) -> AsyncIterator[BatchedEngine]:
    engine = BatchedEngine(tiny_loaded, EngineLimits(max_running=64, max_new_tokens_limit=1000), warmup=False)
    await engine.start()
    yield engine
    await engine.stop(0)


def constrained(engine: BatchedEngine, constraint: Constraint | None, prompt: str = PROMPT, **params: Any) -> Any:
    params.setdefault("max_new_tokens", 400)
    sampling = SamplingParams(constraint=constraint, **params)
    grammar = None if constraint is None else engine.grammars.compile(constraint)
    return engine.submit(GenerationRequest(prompt, sampling, grammar=grammar))


async def results(handles: list[Any]) -> list[GenerationResult]:
    return [await handle.result() for handle in handles]


async def test_fifty_random_schemas_each_output_validates(engine: BatchedEngine) -> None:
    schemas = random_schemas(50, seed=14)
    handles = [
        constrained(engine, Constraint.json_schema(schema), temperature=1.0, seed=i) for i, schema in enumerate(schemas)
    ]
    for schema, result in zip(schemas, await results(handles), strict=True):
        assert result.finish_reason is FinishReason.STOP, (schema, result.text)
        jsonschema.validate(json.loads(result.text), schema)
    assert engine.mask_timer.steps > 0 and engine.mask_timer.per_step_ms > 0


async def test_greedy_json_object_is_an_object(engine: BatchedEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    result = await constrained(engine, Constraint.json_schema(schema), temperature=0.0).result()
    assert json.loads(result.text)["ok"] in (True, False)
    assert result.finish_reason is FinishReason.STOP


async def test_regex_and_choice_outputs_match(engine: BatchedEngine) -> None:
    pattern = r"[a-z]{3,6}-[0-9]{2}"
    options = ["red", "green", "blue and more"]
    handles = [constrained(engine, Constraint.regex(pattern), temperature=1.0, seed=s) for s in range(5)]
    handles += [constrained(engine, Constraint.choice(options), temperature=1.0, seed=s) for s in range(5)]
    outcomes = await results(handles)
    for result in outcomes[:5]:
        assert re.fullmatch(pattern, result.text), result.text
        assert result.finish_reason is FinishReason.STOP
    for result in outcomes[5:]:
        assert result.text in options
        assert result.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(
    "grammar",
    [
        'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/',  # Lark
        'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] [0-9]? [0-9]?',  # GBNF
    ],
)
async def test_a_grammar_shapes_the_output(engine: BatchedEngine, grammar: str) -> None:
    handles = [constrained(engine, Constraint.grammar(grammar), temperature=1.0, seed=s) for s in range(4)]
    for result in await results(handles):
        assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", result.text), result.text


async def test_mixed_batch_leaves_unconstrained_rows_unchanged(engine: BatchedEngine) -> None:
    plain = {"max_new_tokens": 20, "temperature": 0.0, "ignore_eos": True}
    alone = await constrained(engine, None, **plain).result()
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    handles = [constrained(engine, Constraint.json_schema(schema), temperature=0.9, seed=s) for s in range(6)]
    handles.insert(3, constrained(engine, None, **plain))
    outcomes = await results(handles)
    assert outcomes[3].text == alone.text
    for result in outcomes[:3] + outcomes[4:]:
        jsonschema.validate(json.loads(result.text), schema)


async def test_budget_out_mid_structure_is_length(engine: BatchedEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    result = await constrained(engine, Constraint.json_schema(schema), max_new_tokens=3, temperature=0.0).result()
    assert result.finish_reason is FinishReason.LENGTH
    assert result.completion_tokens == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


async def test_stop_strings_and_seeds_keep_working(engine: BatchedEngine) -> None:
    pattern = r"[a-z]{2,8}(,[a-z]{2,8}){1,5}"
    first = await constrained(engine, Constraint.regex(pattern), temperature=1.0, seed=7).result()
    again = await constrained(engine, Constraint.regex(pattern), temperature=1.0, seed=7).result()
    assert first.text == again.text
    stopped = await constrained(engine, Constraint.regex(pattern), temperature=1.0, seed=7, stop=(",",)).result()
    assert stopped.text == first.text.split(",")[0]
    assert stopped.finish_reason is FinishReason.STOP


def test_masks_touch_only_constrained_rows(tiny_loaded: Any) -> None:
    compiler = GrammarCompiler(tiny_loaded.tokenizer, tiny_loaded.eos_token_ids)
    row = compiler.compile(Constraint.choice(["yes", "no"])).start()
    vocab = len(tiny_loaded.tokenizer)
    logits = torch.randn(3, vocab + 7)  # a model may pad its vocabulary past the tokenizer's
    before = logits.clone()
    timer = MaskTimer()
    apply_token_masks(logits, [None, row, None], timer)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    texts = {tiny_loaded.tokenizer.decode([t]) for t in allowed}
    assert allowed and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert not torch.isfinite(logits[1, vocab:]).any()
    assert timer.steps == 1 and timer.rows == 1


def test_unconstrained_batch_costs_nothing() -> None:
    logits = torch.randn(2, 10)
    timer = MaskTimer()
    assert apply_token_masks(logits, [None, None], timer) is logits
    assert timer.steps == 0


@pytest.mark.parametrize(
    ("constraint", "named"),
    [
        (Constraint.json_schema({"type": "nonsense"}), "json_schema"),
        (Constraint.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "json_schema"),
        (Constraint.regex("a(b"), "regex"),
        (Constraint.grammar("start: undefined_rule"), "grammar"),
        (Constraint.grammar("root ::= [unclosed"), "grammar"),
    ],
)
def test_invalid_constraints_are_invalid_requests(tiny_loaded: Any, constraint: Constraint, named: str) -> None:
    compiler = GrammarCompiler(tiny_loaded.tokenizer, tiny_loaded.eos_token_ids)
    with pytest.raises(InvalidRequestError) as raised:
        compiler.compile(constraint)
    assert raised.value.message.startswith(f"{named}: invalid")


def test_at_most_one_constraint() -> None:
    with pytest.raises(InvalidRequestError, match="at most one"):
        constraint_from_fields(json_schema={"type": "object"}, regex="a+")
    with pytest.raises(InvalidRequestError, match="choice"):
        constraint_from_fields(choice=[])
    assert constraint_from_fields() is None
    assert constraint_from_fields(choice=["a"]) == Constraint.choice(["a"])


def test_compile_cache_is_shared_and_bounded(tiny_loaded: Any) -> None:
    compiler = GrammarCompiler(tiny_loaded.tokenizer, tiny_loaded.eos_token_ids, cache_size=2)
    first = compiler.compile(Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    same = compiler.compile(Constraint.json_schema({"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert same is first and compiler.compiled == 1 and compiler.cache_hits == 1
    compiler.compile(Constraint.regex("a+"))
    compiler.compile(Constraint.regex("b+"))
    again = compiler.compile(Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert again is not first and compiler.compiled == 4  # evicted, compiled again


def test_each_row_gets_its_own_parser_state(tiny_loaded: Any) -> None:
    compiled = GrammarCompiler(tiny_loaded.tokenizer, tiny_loaded.eos_token_ids).compile(Constraint.choice(["ab"]))
    one, two = compiled.start(), compiled.start()
    token = tiny_loaded.tokenizer.encode("a")[0]
    assert one.advance(token)
    logits = torch.zeros(2, len(tiny_loaded.tokenizer))
    apply_token_masks(logits, [one, two])
    assert not torch.equal(torch.isfinite(logits[0]), torch.isfinite(logits[1]))
