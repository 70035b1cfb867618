"""Structured output: grammars that force a row's tokens (JSON schema, regex, choice, Lark/GBNF).

The grammar engine is llguidance (Rust, no GPU toolchain, the same engine llama.cpp and vLLM use).
Three pieces, one per moment of a request's life:

- ``Constraint`` — what the client asked for (kind + text); hashable, travels in ``SamplingParams``.
- ``GrammarCompiler.compile`` — validates and compiles a constraint for this model's tokenizer into a
  ``CompiledGrammar``; done before the request is queued (``compile_async`` on a compile thread, so
  it blocks neither the event loop nor the inference thread), cached per distinct constraint (LRU,
  bounded). An invalid schema, regex or grammar is an ``InvalidRequestError`` naming the problem.
- ``RowConstraint`` — one admitted row's parser state (a cheap copy of the compiled template),
  advanced in ``SequenceState.accept``; ``apply_token_masks`` masks the logits of constrained rows
  only, every step, before sampling. Unconstrained rows cost nothing.

Compiling in bounded resources. llguidance recurses while it lowers a grammar; on an 8 MiB stack a
JSON schema whose ``$ref`` s chain ~1,000 definitions (77 KB), or a Lark grammar chaining ~2,800 rules
(34 KB), overflows it: SIGSEGV, the whole server gone (measured on llguidance 1.9.1 here: 700-deep ref
chains and 2,600 rules compile, 1,000 and 2,800 crash, with or without a tokenizer; a thread with a
256 MiB stack compiles 5,000-deep chains and 20,000 rules). A signal cannot be caught in-process, so
an uncached constraint passes three gates, each of which alone would stop the issue's reproducers:

1. ``constraint_limits``: cheap structural limits (schema size, nesting, definitions, ``$ref`` chain;
   grammar rules and nesting; regex length), checked iteratively; a 400 naming the limit.
2. ``constraint_sandbox``: the constraint is converted and validated by llguidance in a child process,
   on a thread with an 8 MiB stack, under a memory cap and a timeout. If the child dies, the request
   gets a 400 saying so and the next constraint starts a fresh child; the server never ran the input.
   This is what makes the design hold even if the limits in 1 were looser or llguidance changes.
3. The real compile (with this model's tokenizer; it cannot cross a process boundary) runs on one of
   ``COMPILE_THREADS`` threads created with a ``COMPILE_STACK_BYTES`` (256 MiB, 32x the sandbox's)
   stack: what validated on 8 MiB has a wide margin here. Memory is reserved, not committed, so the
   large stacks cost only what a compile touches.

Why both a sandbox and large stacks, rather than one: the sandbox alone would leave the in-process
compile on an ordinary 8 MiB thread, where a constraint that the tokenizer-less check passes with
little room to spare could still overflow; large stacks alone only move the threshold, and nothing
proves an input stays under it. Together, the only inputs that reach the server's compiler are ones
that compiled on a thirty-second of its stack. Measured cost: ~0.1 s to start a sandbox
(lazily, and again after a death), one pipe round trip per new constraint; verdicts are cached.

Compilation never runs on the event loop: ``compile_async`` waits on the compile thread, and
``cached`` is the only thing a caller on the loop may use. The job runner additionally marks a job
that compiles as being in a risky phase (``textgen.jobs``), so a death there is not retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.engine.constraint_limits import check_constraint_limits, check_schema_value
from textgen.engine.constraint_sandbox import CompileThreads, SandboxClient, SandboxDiedError, llguidance_grammar
from textgen.errors import InvalidRequestError

logger = logging.getLogger(__name__)

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
CONSTRAINT_FIELDS: tuple[ConstraintKind, ...] = ("json_schema", "regex", "choice", "grammar")
DEFAULT_CACHE_SIZE = 128
MAX_ERROR_CHARS = 600


@dataclass(frozen=True)
class Constraint:
    """A request's output constraint. ``spec`` is canonical text (a schema as sorted JSON)."""

    kind: ConstraintKind
    spec: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        check_schema_value(schema)  # before json.dumps, whose recursion a deep schema would exhaust
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object", '{"type":"object"}')

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        return cls("grammar", text)

    @property
    def field(self) -> str:
        """The request field a client used, for error messages."""
        return "json_schema" if self.kind == "json_object" else self.kind


def constraint_from_fields(
    json_schema: dict[str, Any] | None = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
) -> Constraint | None:
    """The one constraint a request names; more than one is an ``InvalidRequestError``."""
    given = {
        name: value
        for name, value in (("json_schema", json_schema), ("regex", regex), ("choice", choice), ("grammar", grammar))
        if value is not None
    }
    if len(given) > 1:
        raise InvalidRequestError(
            f"Send at most one of json_schema, regex, choice and grammar; this request has {', '.join(given)}."
        )
    if json_schema is not None:
        return Constraint.json_schema(json_schema)
    if regex is not None:
        return Constraint.regex(regex)
    if choice is not None:
        if not choice or not all(choice):
            raise InvalidRequestError("choice: give a non-empty list of non-empty strings.")
        return Constraint.choice(choice)
    if grammar is not None:
        return Constraint.grammar(grammar)
    return None


def _invalid(constraint: Constraint, problem: str) -> InvalidRequestError:
    problem = problem.strip()
    if len(problem) > MAX_ERROR_CHARS:
        problem = problem[:MAX_ERROR_CHARS] + "..."
    return InvalidRequestError(f"{constraint.field}: invalid {constraint.kind.replace('_', ' ')}: {problem}")


class CompiledGrammar:
    """A constraint compiled for one tokenizer: a parser template that each row copies."""

    def __init__(self, constraint: Constraint, template: llguidance.LLMatcher, vocab_size: int) -> None:
        self.constraint = constraint
        self._template = template
        self._vocab_size = vocab_size

    def start(self) -> RowConstraint:
        return RowConstraint(self._template.deep_copy(), self._vocab_size)


class RowConstraint:
    """One row's parser state: which tokens may come next, and whether the grammar has ended."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the grammar tokenizer's; the model's logits may be wider

    def advance(self, token_id: int) -> bool:
        """Consume a generated token; False if the grammar refused it (cannot happen under the mask)."""
        return bool(self.matcher.consume_token(token_id))

    @property
    def ended(self) -> bool:
        """The grammar is complete and allows nothing more (or the parser failed)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe, with a bounded LRU cache.

    Every compile runs the limits, then the sandbox check, then the real compile on a compile thread
    (see the module docstring)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: frozenset[int],
        vocab_size: int | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        sandbox: SandboxClient | None = None,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self._eos_token_ids = sorted(eos_token_ids)
        self._vocab_size = vocab_size
        self._cache_size = cache_size
        self._cache: OrderedDict[Constraint, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self.sandbox = sandbox or SandboxClient()
        self._threads = CompileThreads()
        self.compiled = 0
        self.cache_hits = 0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about a second for a 50k vocabulary), then shared."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                started = time.perf_counter()
                vocab = self._vocab_size if self._vocab_size and self._vocab_size > len(self._hf_tokenizer) else None
                eos: list[int] | None = self._eos_token_ids or None
                if not isinstance(self._hf_tokenizer, PreTrainedTokenizerFast):
                    raise ValueError("Only fast tokenizers are supported")  # as llguidance itself says
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=vocab, eos_token=eos)
                logger.info("Grammar tokenizer built in %.2fs", time.perf_counter() - started)
            return self._ll_tokenizer

    def cached(self, constraint: Constraint) -> CompiledGrammar | None:
        """The compiled grammar if it is in the cache (no work: safe on the event loop)."""
        with self._lock:
            found = self._cache.get(constraint)
            if found is not None:
                self._cache.move_to_end(constraint)
                self.cache_hits += 1
            return found

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """Cached; raises ``InvalidRequestError`` naming the problem. Blocks until a compile thread has
        done it: never call it on the event loop (use ``compile_async``)."""
        return self.cached(constraint) or self._threads.submit(lambda: self._compile_and_cache(constraint)).result()

    async def compile_async(self, constraint: Constraint) -> CompiledGrammar:
        """``compile`` for the event loop: the loop only waits."""
        found = self.cached(constraint)
        if found is not None:
            return found
        future = self._threads.submit(lambda: self._compile_and_cache(constraint))
        result: CompiledGrammar = await asyncio.wrap_future(future)
        return result

    def close(self) -> None:
        self._threads.close()
        self.sandbox.close()

    def _compile_and_cache(self, constraint: Constraint) -> CompiledGrammar:
        found = self.cached(constraint)  # another thread may have compiled it meanwhile
        if found is not None:
            return found
        compiled = self._compile_uncached(constraint)
        with self._lock:
            self._cache[constraint] = compiled
            self._cache.move_to_end(constraint)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self.compiled += 1
        return compiled

    def _compile_uncached(self, constraint: Constraint) -> CompiledGrammar:
        started = time.perf_counter()
        check_constraint_limits(constraint.kind, constraint.spec)
        try:
            problem = self.sandbox.check(constraint.kind, constraint.spec)
        except SandboxDiedError as died:
            raise _invalid(constraint, f"too complex to compile: {died.reason}. Simplify it.") from None
        if problem:
            raise _invalid(constraint, problem)
        try:
            grammar = llguidance_grammar(constraint.kind, constraint.spec)
            template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        except Exception as error:  # whatever the client's text breaks is the client's 400
            raise _invalid(constraint, str(error) or type(error).__name__) from None
        if template.is_error():
            raise _invalid(constraint, template.get_error())
        if template.is_stopped():
            raise _invalid(constraint, "it matches only the empty string")
        logger.debug("Compiled a %s constraint in %.1f ms", constraint.kind, 1000 * (time.perf_counter() - started))
        return CompiledGrammar(constraint, template, self.ll_tokenizer.vocab_size)


@dataclass
class MaskTimer:
    """How long computing and applying token masks took: total seconds over steps with any mask."""

    seconds: float = 0.0
    steps: int = 0
    rows: int = 0

    @property
    def per_step_ms(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else 0.0


_executor_lock = threading.Lock()
_executor: llguidance.LLExecutor | None = None


def _mask_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for computing several rows' masks at once (built on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


_buffers = threading.local()


def _bitmask_buffer(rows: int, words: int) -> torch.Tensor:
    """A reused int32 [rows, words] buffer (one per thread): allocating it every step costs more than
    filling it."""
    buffer: torch.Tensor | None = getattr(_buffers, "bitmask", None)
    if buffer is None or buffer.shape[1] != words or buffer.shape[0] < rows:
        buffer = torch.empty((max(rows, 64), words), dtype=torch.int32)
        _buffers.bitmask = buffer
    return buffer[:rows]


def refused_tokens(constraints: Sequence[RowConstraint], vocab: int) -> np.ndarray:
    """bool [R, vocab] (numpy): True where a constrained row may not take the token next."""
    words = (max(vocab, *(c.vocab_size for c in constraints)) + 31) // 32
    bitmask = _bitmask_buffer(len(constraints), words)  # every row is overwritten whole
    # The executor writes rows x words int32 through the pointer: our own contiguous CPU buffer, checked here.
    # (Not through llguidance.torch: importing it runs a torch.compile decorator, which imports torch's
    # compiler stack and adds seconds to every server start for a function this module never calls.)
    assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
    assert bitmask.shape == (len(constraints), words)
    matchers = [(c.matcher, row) for row, c in enumerate(constraints)]
    _mask_executor().unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(constraints))
    # Token t is bit t % 32 of word t // 32, i.e. bit t % 8 of byte t // 8 (little-endian words), so
    # numpy's unpackbits of the inverted bytes gives "refused" per token in one fast pass. A mask
    # narrower than the logits (the model pads its vocabulary) leaves the extra tokens refused.
    inverted = np.invert(bitmask.numpy().view(np.uint8))  # [R, words * 4]
    bits = np.unpackbits(inverted, axis=1, bitorder="little")[:, :vocab]  # [R, vocab] of 0/1
    return np.ascontiguousarray(bits).view(np.bool_)


def apply_token_masks(
    logits: torch.Tensor, constraints: Sequence[RowConstraint | None], timer: MaskTimer | None = None
) -> torch.Tensor:
    """Set refused tokens' logits to -inf in constrained rows; other rows are untouched.

    logits [B, V]; constraints has one entry per row, None for an unconstrained row. Returns the masked
    logits: the same tensor (float32, changed in place), or a float32 copy of lower-precision logits.
    A batch without constrained rows is returned as it is, at no cost.
    """
    rows = [row for row, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    started = time.perf_counter()
    logits = logits.float()
    if logits.device.type == "cpu" and not logits.is_contiguous():
        logits = logits.contiguous()
    refused = refused_tokens([c for c in constraints if c is not None], logits.shape[-1])  # [R, V]
    if logits.device.type == "cpu" and logits.is_contiguous():
        # numpy's single-threaded masked copy: torch's parallel masked_fill_ costs more than the work
        # itself on a small CPU batch.
        target = logits.numpy()
        for slot, row in enumerate(rows):
            np.copyto(target[row], -np.inf, where=refused[slot])
    else:
        mask = torch.from_numpy(refused).to(logits.device, non_blocking=True)
        for slot, row in enumerate(rows):
            logits[row].masked_fill_(mask[slot], float("-inf"))
    if timer is not None:
        timer.seconds += time.perf_counter() - started
        timer.steps += 1
        timer.rows += len(rows)
    return logits
