"""Where constraints are made safe to compile: a sandbox child process that checks a constraint first,
and the large-stack threads the server then compiles it on (``CompileThreads``).

Why a process: llguidance (Rust) recurses while it lowers a grammar, and a deep enough input (a JSON
schema whose ``$ref`` s chain ~1,000 definitions, a Lark grammar chaining ~2,800 rules) overflows an
8 MiB stack. That is a SIGSEGV, not an exception: nothing in-process can catch it. Here it only kills
this child; the parent (``SandboxClient``) sees the pipe close, answers the request 400 and starts a
fresh child for the next constraint.

This file runs as a script (``python -I constraint_sandbox.py``) and imports nothing from ``textgen``
nor torch: the child starts in ~0.1 s and holds ~30 MB. The child checks each constraint on a thread
with a fixed ``SANDBOX_STACK_BYTES`` stack, whatever the machine's ``ulimit -s``; the server compiles
on threads with a far larger stack (``textgen.engine.constraints``), so what passed here has a wide
stack margin there. The child also runs under a memory cap and without core dumps, and the parent
kills it when a check takes longer than its timeout.

Protocol: one JSON object per line each way. Request ``{"kind": ..., "spec": ...}``; answer
``{"error": ""}`` when llguidance accepts the grammar, else the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:  # a TypedDict of llguidance's stub only: not importable at run time
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger(__name__)

SANDBOX_STACK_BYTES = 8 * 1024 * 1024  # the stack a check runs on in the child
COMPILE_THREADS = 2  # the server's compile threads (``CompileThreads``)
COMPILE_STACK_BYTES = 256 * 1024 * 1024  # their stack: 32x the sandbox's
SANDBOX_MEMORY_BYTES = 2 * 1024 * 1024 * 1024  # address space cap of the child (Rust aborts past it)
DEFAULT_TIMEOUT_S = 10.0
VERDICT_CACHE_SIZE = 1024
# Compact JSON (no free whitespace): a small model otherwise tends to loop on newlines and spaces,
# and the output is the same data.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def llguidance_grammar(kind: str, spec: str) -> str:
    """A constraint as llguidance's grammar text (not yet checked). Shared by the child and the server."""
    if kind in ("json_schema", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        # A Lark alternation of string literals (Lark strings take JSON's escapes).
        options = json.loads(spec)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark
    raise ValueError(f"unknown constraint kind {kind!r}")


def check(kind: str, spec: str) -> str:
    """'' when llguidance accepts the constraint's grammar, else why not (without a tokenizer)."""
    try:
        return llguidance.LLMatcher.validate_grammar(llguidance_grammar(kind, spec))
    except Exception as error:  # whatever the client's text breaks is the client's problem
        return str(error) or type(error).__name__


# -- the child ----------------------------------------------------------------------------------------


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write a core file per request
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = SANDBOX_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(SANDBOX_MEMORY_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _check_on_small_stack(kind: str, spec: str) -> str:
    answer: list[str] = []
    worker = threading.Thread(target=lambda: answer.append(check(kind, spec)), name="constraint-check")
    worker.start()
    worker.join()
    return answer[0] if answer else "the check failed"


def serve() -> None:
    """The child's loop: a request per stdin line, an answer per stdout line, until stdin closes."""
    _limit_child()
    threading.stack_size(SANDBOX_STACK_BYTES)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            error = _check_on_small_stack(str(request["kind"]), str(request["spec"]))
        except (ValueError, KeyError, TypeError) as problem:
            error = f"bad sandbox request: {problem}"
        sys.stdout.write(json.dumps({"error": error}) + "\n")
        sys.stdout.flush()


# -- the parent's side -----------------------------------------------------------------------------------


class SandboxDiedError(Exception):
    """The child died (or was killed after its timeout) while checking a constraint."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SandboxClient:
    """Checks constraints in the child process, one at a time (thread-safe), restarting it after a death.

    Verdicts are cached per constraint (LRU), so a constraint is checked once however often it is
    compiled again after the server's compiled-grammar cache dropped it."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.deaths = 0
        self.checks = 0
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._verdicts: OrderedDict[bytes, str] = OrderedDict()

    def check(self, kind: str, spec: str) -> str:
        """'' if the child accepted the constraint, else its reason; SandboxDiedError if it died."""
        key = hashlib.sha256(f"{kind}\0{spec}".encode("utf-8", "surrogatepass")).digest()  # not the spec: memory
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
                return verdict
            verdict = self._ask(kind, spec)
            self.checks += 1
            self._verdicts[key] = verdict
            while len(self._verdicts) > VERDICT_CACHE_SIZE:
                self._verdicts.popitem(last=False)
            return verdict

    def close(self) -> None:
        with self._lock:
            self._stop_child()

    def _start_child(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # a Rust abort prints a line there; the death is logged here
                close_fds=True,
            )
        return self._child

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if child.poll() is None:
            child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()

    def _ask(self, kind: str, spec: str) -> str:
        child = self._start_child()
        assert child.stdin is not None and child.stdout is not None
        line, timed_out = b"", False
        try:
            child.stdin.write(json.dumps({"kind": kind, "spec": spec}).encode() + b"\n")
            child.stdin.flush()
            line, timed_out = self._read_line(child)
        except OSError:  # a broken pipe: the child is gone
            pass
        if line:
            return str(json.loads(line)["error"])
        return self._died(child, kind, timed_out=timed_out)

    def _read_line(self, child: subprocess.Popen[bytes]) -> tuple[bytes, bool]:
        """(the child's answer or b'' when it died, whether it was still busy at the timeout)."""
        assert child.stdout is not None
        deadline = time.monotonic() + self.timeout_s
        remaining = self.timeout_s
        while remaining > 0:
            ready, _, _ = select.select([child.stdout], [], [], remaining)
            if ready:
                return child.stdout.readline(), False
            remaining = deadline - time.monotonic()
        return b"", True

    def _died(self, child: subprocess.Popen[bytes], kind: str, *, timed_out: bool) -> str:
        if timed_out:
            child.kill()
        code = child.wait()
        self._stop_child()
        self.deaths += 1
        if timed_out:
            reason = f"checking it took longer than {self.timeout_s:g} s"
        else:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            reason = f"it exhausted the grammar compiler's stack or memory ({how})"
        logger.warning(
            "The constraint sandbox died checking a %s constraint: %s; it restarts on the next one", kind, reason
        )
        raise SandboxDiedError(reason)


# -- the server's compile threads ---------------------------------------------------------------------------


class CompileThreads:
    """Threads with a large stack that run grammar compiles (``threading.stack_size`` applies to the
    threads created while it is set, so they are made here, once, under a lock)."""

    _creating = threading.Lock()

    def __init__(self, count: int = COMPILE_THREADS, stack_bytes: int = COMPILE_STACK_BYTES) -> None:
        self._count = count
        self._stack_bytes = stack_bytes
        self._work: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._started = threading.Lock()

    def submit(self, work: Callable[[], Any]) -> Future[Any]:
        self._start()
        future: Future[Any] = Future()
        self._work.put((work, future))
        return future

    def close(self) -> None:
        """The threads finish the work queued so far and end (a later ``submit`` starts new ones)."""
        with self._started:
            for _ in self._threads:
                self._work.put(None)
            self._threads = []

    def _start(self) -> None:
        with self._started:
            if self._threads:
                return
            with CompileThreads._creating:
                previous = threading.stack_size(self._stack_bytes)
                try:
                    for n in range(self._count):
                        thread = threading.Thread(target=self._serve, name=f"textgen-grammar-{n}", daemon=True)
                        thread.start()
                        self._threads.append(thread)
                finally:
                    threading.stack_size(previous)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            work, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as error:  # handed to the waiting caller
                future.set_exception(error)


if __name__ == "__main__":
    serve()
