"""Constraints compile in bounded resources (issue 20, HIGH 1): the structural limits checked before
compiling, the sandbox process that survives what would kill the server, and the compile threads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.constraint_attacks import chained_lark_grammar, deep_ref_schema
from tests.support.structured import random_schemas
from textgen.content_filter import ContentFilter
from textgen.engine import constraint_limits as limits
from textgen.engine.constraint_sandbox import COMPILE_STACK_BYTES, SandboxClient, SandboxDiedError
from textgen.engine.constraints import Constraint, GrammarCompiler
from textgen.engine.types import Priority, SamplingParams
from textgen.errors import InvalidRequestError, QueueFullError
from textgen.generation import GenerationService
from textgen.metrics import Metrics

REPO_ROOT = Path(__file__).resolve().parents[2]


def refused(kind: str, spec: str) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        limits.check_constraint_limits(kind, spec)
    return caught.value.message


def schema_spec(schema: Any) -> str:
    return Constraint.json_schema(schema).spec


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def chain(hops: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    defs[f"d{hops}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


# A tool schema of the kind agent frameworks send: nested models through $defs, arrays, enums, anyOf.
AGENT_TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "What to search for"},
        "filters": {"$ref": "#/$defs/Filters"},
        "pages": {"type": "array", "items": {"$ref": "#/$defs/Page"}, "maxItems": 5},
        "mode": {"enum": ["fast", "thorough"]},
    },
    "required": ["query"],
    "$defs": {
        "Filters": {
            "type": "object",
            "properties": {
                "after": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "owner": {"$ref": "#/$defs/Person"},
            },
        },
        "Person": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "manager": {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]},
            },
        },
        "Page": {"type": "object", "properties": {"url": {"type": "string"}, "owner": {"$ref": "#/$defs/Person"}}},
    },
}


# -- the limits -------------------------------------------------------------------------------------------


def test_issue_reproducers_are_refused_before_compiling_naming_the_limit() -> None:
    assert "number of definitions" in refused("json_schema", schema_spec(deep_ref_schema(1000)))
    assert "512" in refused("json_schema", schema_spec(deep_ref_schema(1000)))
    message = refused("grammar", chained_lark_grammar(2800))
    assert "number of rules" in message and "1,000" in message and "2,802" in message


def test_ref_chains_count_hops_and_recursive_schemas_are_fine() -> None:
    limits.check_constraint_limits("json_schema", schema_spec(chain(limits.MAX_REF_CHAIN - 1)))
    message = refused("json_schema", schema_spec(chain(limits.MAX_REF_CHAIN + 5)))
    assert "$ref chain" in message and f"{limits.MAX_REF_CHAIN} $ref hops" in message
    assert limits.longest_ref_chain([((), ("$defs", "a")), (("$defs", "a", "items"), ("$defs", "a"))]) == 1  # recursion
    limits.check_constraint_limits("json_schema", schema_spec(AGENT_TOOL_SCHEMA))  # Person refers to itself
    limits.check_constraint_limits("json_schema", schema_spec({"type": "array", "items": {"$ref": "#"}}))


def test_real_schemas_and_grammars_pass() -> None:
    for schema in [AGENT_TOOL_SCHEMA, nested(20), *random_schemas(30, seed=3)]:
        limits.check_constraint_limits("json_schema", schema_spec(schema))
    json_gbnf = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""
    limits.check_constraint_limits("grammar", json_gbnf)
    assert limits.grammar_depth(json_gbnf) <= 4  # character classes and strings are not groups
    limits.check_constraint_limits("grammar", chained_lark_grammar(limits.MAX_GRAMMAR_RULES - 2))


def test_schema_nesting_is_refused_even_before_serialising() -> None:
    assert "nesting" in refused("json_schema", json.dumps(nested(40)))  # 81 levels of JSON objects
    with pytest.raises(InvalidRequestError, match="nesting"):
        Constraint.json_schema(nested(5000))  # json.dumps would exhaust Python's recursion first


def test_schema_size_regex_choice_and_grammar_nesting() -> None:
    big = {"type": "object", "description": "x" * limits.MAX_SCHEMA_CHARS}
    assert "size" in refused("json_schema", schema_spec(big))
    assert "pattern's length" in refused("regex", "a" * (limits.MAX_REGEX_CHARS + 1))
    assert "options" in refused("choice", json.dumps(["x" * limits.MAX_CHOICE_CHARS]))
    deep = "start: " + "(" * (limits.MAX_GRAMMAR_DEPTH + 1) + '"x"' + ")" * (limits.MAX_GRAMMAR_DEPTH + 1)
    assert "nesting of groups" in refused("grammar", deep)
    assert "grammar's length" in refused("grammar", "start: " + '"x" ' * limits.MAX_GRAMMAR_CHARS)


def test_limit_checks_are_iterative() -> None:
    """Inputs far deeper than Python's recursion limit are measured, not crashed on."""
    assert limits.json_depth_over(_deep_list(50_000), 64)
    assert limits.grammar_depth("start: " + "(" * 50_000) == 50_000
    assert limits.longest_ref_chain([(("$defs", f"d{i}"), ("$defs", f"d{i + 1}")) for i in range(20_000)]) == 20_000


def _deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# -- the sandbox and the compile threads -------------------------------------------------------------------


@pytest.fixture
def compiler(tiny_loaded: Any) -> Any:
    grammars = GrammarCompiler(tiny_loaded.tokenizer, tiny_loaded.eos_token_ids)
    yield grammars
    grammars.close()


@pytest.fixture
def loose_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits far looser than the crash thresholds: what if they had been set wrong?"""
    monkeypatch.setattr(limits, "MAX_SCHEMA_DEFINITIONS", 1_000_000)
    monkeypatch.setattr(limits, "MAX_REF_CHAIN", 1_000_000)
    monkeypatch.setattr(limits, "MAX_GRAMMAR_RULES", 1_000_000)


@pytest.mark.usefixtures("loose_limits")
@pytest.mark.parametrize(
    "constraint",
    [Constraint.json_schema(deep_ref_schema(1000)), Constraint.grammar(chained_lark_grammar(2800))],
    ids=["deep-ref-schema", "2800-rule-grammar"],
)
def test_without_the_limits_the_sandbox_dies_instead_of_the_server(
    compiler: GrammarCompiler, constraint: Constraint
) -> None:
    with pytest.raises(InvalidRequestError, match="too complex to compile") as caught:
        compiler.compile(constraint)
    assert "SIGSEGV" in caught.value.message or "SIGABRT" in caught.value.message
    assert compiler.sandbox.deaths == 1
    # This process lives on (it would have died with SIGSEGV), and a fresh sandbox takes the next one.
    assert compiler.compile(Constraint.json_schema(deep_ref_schema(50))) is not None
    assert compiler.sandbox.deaths == 1


def test_a_sandbox_check_past_its_timeout_is_killed_and_refused() -> None:
    sandbox = SandboxClient(timeout_s=0.001)  # the child cannot even start in that time
    try:
        with pytest.raises(SandboxDiedError, match=r"longer than 0\.001 s"):
            sandbox.check("regex", "[a-z]+")
        assert sandbox.deaths == 1
        sandbox.timeout_s = 30.0
        assert sandbox.check("regex", "[a-z]+") == ""
        assert sandbox.check("regex", "(") != ""  # llguidance's own error, from the child
    finally:
        sandbox.close()


async def test_compiles_run_on_large_stack_threads_never_on_the_loop(compiler: GrammarCompiler) -> None:
    seen: list[str] = []
    original = compiler._compile_uncached

    def spy(constraint: Constraint) -> Any:
        seen.append(threading.current_thread().name)
        return original(constraint)

    compiler._compile_uncached = spy  # type: ignore[method-assign]
    loop_thread = threading.current_thread().name
    await asyncio.gather(*(compiler.compile_async(Constraint.regex(f"[a-z]{{{n}}}")) for n in range(1, 5)))
    assert len(seen) == 4 and all(name.startswith("textgen-grammar-") and name != loop_thread for name in seen)
    assert threading.stack_size() != COMPILE_STACK_BYTES  # the large stack was not left as everyone's default
    assert compiler.cached(Constraint.regex("[a-z]{1}")) is not None


STACK_PROBE = """
import importlib.util, json, sys, threading
import llguidance
from tests.support.constraint_attacks import deep_ref_schema
# By file, not through textgen.engine (whose package imports torch: seconds per probe).
spec = importlib.util.spec_from_file_location("sandbox", "textgen/engine/constraint_sandbox.py")
sandbox = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
grammar = sandbox.llguidance_grammar("json_schema", json.dumps(deep_ref_schema(2000)))
if sys.argv[1] == "compile-thread":
    print(repr(sandbox.CompileThreads(count=1).submit(lambda: llguidance.LLMatcher.validate_grammar(grammar)).result()))
else:
    threading.stack_size(sandbox.SANDBOX_STACK_BYTES)
    worker = threading.Thread(target=lambda: llguidance.LLMatcher.validate_grammar(grammar))
    worker.start()
    worker.join()
"""


@pytest.mark.parametrize(("where", "survives"), [("compile-thread", True), ("8-MiB-thread", False)])
def test_the_compile_threads_stack_holds_what_an_8_mib_one_cannot(where: str, survives: bool) -> None:
    """Measured in a child process, since the losing side dies of SIGSEGV: a 2,000-deep $ref chain (twice
    the issue's) on a compile thread versus a thread with the sandbox's 8 MiB stack."""
    done = subprocess.run(
        [sys.executable, "-c", STACK_PROBE, where], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    if survives:
        assert done.returncode == 0 and done.stdout.strip() == "''", done.stderr[-2000:]
    else:
        assert done.returncode < 0, (done.returncode, done.stderr[-2000:])


def test_submit_on_the_event_loop_never_compiles(make_settings: Any) -> None:
    """MEDIUM 7: ``submit`` runs on the event loop; a constraint that ``prepare`` did not leave in the
    cache is a 503 to retry, never a compile there."""

    def compile_on_the_loop(constraint: Constraint) -> Any:
        raise AssertionError("compiled on the event loop")

    class Engine:
        name = "batched"
        grammars = SimpleNamespace(cached=lambda constraint: None, compile=compile_on_the_loop)

    service = GenerationService(Engine(), ContentFilter([]), make_settings(), "tiny", Metrics())  # type: ignore[arg-type]
    params = SamplingParams(constraint=Constraint.regex("[a-z]+"))
    with pytest.raises(QueueFullError) as caught:
        service.submit("Hello", params, "req-1", Priority.INTERACTIVE)
    assert caught.value.status_code == 503 and caught.value.retry_after_s == 1
