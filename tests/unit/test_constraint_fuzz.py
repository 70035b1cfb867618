"""Fuzzing the constraint compile path (issue 20): random deep JSON schemas, grammars and regexes go
through ``GrammarCompiler.compile`` (limits, sandbox, compile threads) with 0 deaths of the process
that compiles them.

The fuzzing runs in a child process (this module run as a script), standing in for the server: if an
input killed it, the test sees the signal in its exit status instead of pytest dying with it. Half the
examples run with the structural limits loosened far past the crash thresholds, so the inputs that the
limits would refuse reach the sandbox and the compile threads too. Every example must compile or be
refused with InvalidRequestError; the sandbox child may die (that is its job) and is counted.
Hypothesis is derandomized (the same examples every run, as CI wants); ``TEXTGEN_FUZZ_SEED`` varies them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 40  # per kind and limit setting: 240 compiles, ~30 s on 2 busy cores


def test_fuzzed_constraints_never_kill_the_compiling_process(tiny_model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_constraint_fuzz", str(tiny_model_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the compiling process ended with {done.returncode}:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["examples"] >= 6 * EXAMPLES, report
    assert report["compiled"] > 0 and report["refused"] > 0, report  # both outcomes were reached
    assert report["sandbox_deaths"] > 0, report  # loosened limits let crashing inputs reach the sandbox


# -- the child ----------------------------------------------------------------------------------------------


def _strategies() -> dict[str, Any]:
    from hypothesis import strategies as st

    names = st.sampled_from(["a", "b", "item", "x_1", "$ref", "$defs", "properties", "ключ"])
    leaves = st.sampled_from(
        [
            {"type": "string"},
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"type": "boolean"},
            {"type": "null"},
            {"enum": ["a", "b"]},
            {"type": "string", "pattern": "[a-z]{1,3}"},
            {"$ref": "#"},
            {"$ref": "#/$defs/missing"},
            {"type": "string", "pattern": "("},
            {},
        ]
    )

    def extend(children: Any) -> Any:
        return st.one_of(
            st.builds(
                lambda props: {"type": "object", "properties": props}, st.dictionaries(names, children, max_size=3)
            ),
            st.builds(lambda item: {"type": "array", "items": item, "maxItems": 3}, children),
            st.builds(lambda options: {"anyOf": options}, st.lists(children, min_size=1, max_size=3)),
        )

    nested = st.recursive(leaves, extend, max_leaves=40)

    @st.composite
    def deep(draw: Any) -> dict[str, Any]:
        """A schema nested deeply by hand: one shape repeated up to 300 times."""
        depth = draw(st.one_of(st.integers(1, 40), st.integers(100, 300)))
        shape = draw(st.sampled_from(["object", "array", "anyOf"]))
        schema: dict[str, Any] = draw(leaves)
        for _ in range(depth):
            schema = {
                "object": {"type": "object", "properties": {"a": schema}, "required": ["a"]},
                "array": {"type": "array", "items": schema},
                "anyOf": {"anyOf": [schema, {"type": "null"}]},
            }[shape]
        return schema

    @st.composite
    def ref_chain(draw: Any) -> dict[str, Any]:
        """$defs that refer to one another along a chain up to 3,000 long, with random shapes and loops."""
        count = draw(st.one_of(st.integers(1, 80), st.integers(600, 3000)))
        wrap = draw(st.sampled_from(["bare", "property", "items", "anyOf"]))
        loop_back = draw(st.booleans())
        defs: dict[str, Any] = {}
        for i in range(count):
            target = f"#/$defs/d{0 if loop_back and i == count - 1 else i + 1}"
            ref = {"$ref": target}
            defs[f"d{i}"] = {
                "bare": ref,
                "property": {"type": "object", "properties": {"n": ref}},
                "items": {"type": "array", "items": ref, "maxItems": 2},
                "anyOf": {"anyOf": [ref, {"type": "integer"}]},
            }[wrap]
        defs[f"d{count}"] = draw(leaves)
        return {"$ref": "#/$defs/d0", "$defs": defs}

    @st.composite
    def grammar(draw: Any) -> str:
        """Lark or GBNF: rule chains up to 4,000 long, groups nested up to 300, alternations, junk."""
        rules = draw(st.one_of(st.integers(1, 80), st.integers(900, 4000)))
        nest = draw(st.one_of(st.integers(0, 10), st.integers(50, 300)))
        gbnf = draw(st.booleans())
        sep, first = (" ::= ", "root") if gbnf else (": ", "start")
        body = "(" * nest + '"x"' + ")" * nest
        alternative = draw(st.sampled_from(["", ' | "y"', " | r0", ' "z"*']))
        lines = [f"{first}{sep}r0"]
        lines += [f"r{i}{sep}r{i + 1}{alternative}" for i in range(rules)]
        lines.append(f"r{rules}{sep}{body}")
        junk = draw(st.text(alphabet=':|()[]"/*+?ab \n=', max_size=40))
        return "\n".join(lines) + ("\n" + junk if draw(st.booleans()) else "")

    @st.composite
    def regex(draw: Any) -> str:
        """Nested groups up to 500 deep with quantifiers and alternations, plus random fragments."""
        depth = draw(st.one_of(st.integers(0, 10), st.integers(100, 500)))
        quantifier = draw(st.sampled_from(["", "*", "+", "?", "{1,3}", "|b"]))
        inner = draw(st.text(alphabet="ab.[]^$\\-|(){}0-9", min_size=1, max_size=20))
        return "(" * depth + inner + (")" + quantifier) * depth

    schemas = st.one_of(nested, deep(), ref_chain())
    return {"json_schema": schemas, "grammar": grammar(), "regex": regex()}


def _fuzz(model_dir: str) -> dict[str, int]:
    from hypothesis import HealthCheck, given, seed, settings
    from transformers import AutoTokenizer

    from textgen.engine import constraint_limits
    from textgen.engine.constraints import Constraint, GrammarCompiler
    from textgen.errors import InvalidRequestError

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compiler = GrammarCompiler(tokenizer, frozenset({tokenizer.eos_token_id}), cache_size=16)
    counts = {"examples": 0, "compiled": 0, "refused": 0}
    loose = {"MAX_SCHEMA_DEFINITIONS": 10**9, "MAX_REF_CHAIN": 10**9, "MAX_GRAMMAR_RULES": 10**9,
             "MAX_GRAMMAR_DEPTH": 10**9, "MAX_SCHEMA_DEPTH": 10**9}  # fmt: skip
    strict = {name: getattr(constraint_limits, name) for name in loose}
    make = {"json_schema": _schema_constraint, "grammar": Constraint.grammar, "regex": Constraint.regex}

    def run(kind: str, value: Any) -> None:
        counts["examples"] += 1
        try:
            compiler.compile(make[kind](value))
            counts["compiled"] += 1
        except InvalidRequestError:
            counts["refused"] += 1

    fuzz_seed = int(os.environ.get("TEXTGEN_FUZZ_SEED", "0"))

    def fuzz_kind(kind: str, strategy: Any) -> None:
        @seed(fuzz_seed)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=fuzz_seed == 0,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def check(value: Any) -> None:
            run(kind, value)

        check()

    for kind, strategy in _strategies().items():
        for limits in (strict, loose):
            for name, value in limits.items():
                setattr(constraint_limits, name, value)
            fuzz_kind(kind, strategy)
    compiler.close()
    return {**counts, "sandbox_deaths": compiler.sandbox.deaths}


def _schema_constraint(schema: dict[str, Any]) -> Any:
    from textgen.engine.constraints import Constraint

    return Constraint.json_schema(schema)


if __name__ == "__main__":
    sys.setrecursionlimit(10_000)  # json.dumps of the deepest schemas once the nesting limit is loosened
    print(json.dumps(_fuzz(sys.argv[1])))
