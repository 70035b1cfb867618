"""``schemathesis run --checks all`` against a real uvicorn on the tiny GPT-2: the independent check of
the whole contract (schema vs behaviour), as a user would run it.

Every check is on (no-5xx, status codes, content types, response headers and schemas, schema-valid
data accepted and schema-invalid data rejected, unsupported methods and their ``Allow`` header, missing
headers, auth, and the stateful checks that follow links between operations). Generation is
deterministic, so CI sees the same cases every run.

A few answers break a check by design; each is listed in ``KNOWN_BY_DESIGN`` with the reason, and is
matched by operation, check code, status and a piece of the response body. Any other failure fails the
test, with schemathesis's own report of it (including a curl command to reproduce it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.server import Server, launch_server

SEED = "20261130"
MAX_EXAMPLES = 50  # fuzzed cases per operation (schemathesis's default is 100)
MIN_CASES = 1000  # far more than the operations x phases: a run that silently covers little fails


@dataclass(frozen=True)
class ByDesign:
    operations: tuple[str, ...]
    code: str  # schemathesis's failure code, e.g. ST202 (schema-valid request rejected)
    status: int
    body: str  # a piece of the response body that identifies the case
    why: str


GENERATING = (
    "POST /generate",
    "POST /generate_background",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /v1/responses",
)
RESPONSES = ("POST /v1/responses",)
# Routes that read OpenAI chat messages: the rules per role (which role may carry tool_calls, which needs
# content or a tool_call_id) are OpenAI's and checked by the server; one message schema cannot state them.
CHAT_MESSAGES = ("POST /v1/chat/completions", "POST /tokenize")
MESSAGE_RULES = (
    "only assistant messages carry",
    "message needs content",
    "names the call it answers",
    "names the function it answers",
    "takes text only",
    "unknown content part type",
    "needs its text as a string",
)

KNOWN_BY_DESIGN = [
    *(
        ByDesign(CHAT_MESSAGES, "ST202", 400, rule, "a per-role message rule of OpenAI's, checked by the server")
        for rule in MESSAGE_RULES
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        "Send at most one of json_schema",
        "two structured-output constraints at once: 'at most one of' is checked by the server",
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        ": invalid ",
        "a regex, grammar or JSON schema the grammar engine cannot compile: checked by compiling it",
    ),
    ByDesign(
        ("POST /v1/completions", "POST /v1/chat/completions"),
        "ST202",
        400,
        "response_format:",
        "response_format must name a known type with its schema: checked as OpenAI does",
    ),
    ByDesign(
        ("POST /v1/chat/completions",),
        "ST202",
        400,
        "set logprobs to true",
        "top_logprobs without logprobs: refused, as OpenAI does",
    ),
    ByDesign(
        ("POST /v1/completions",),
        "ST202",
        400,
        '"param":"best_of"',
        "best_of other than n: refused with a 400 naming it (the server does not rank extra candidates)",
    ),
    ByDesign(
        ("POST /v1/completions",),
        "ST202",
        400,
        "0 only with echo",
        "max_tokens 0 without echo: refused (0 is only for scoring a prompt with echo)",
    ),
    ByDesign(
        ("POST /v1/completions", "POST /v1/chat/completions"),
        "ST202",
        400,
        "only allowed when stream is true",
        "stream_options without stream: true: refused, as OpenAI does",
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        "not in this model's vocabulary",
        "a token id (prompt or logit_bias) past the served model's vocabulary: checked against the tokenizer",
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        "between 0 and",
        "a token id (prompt or logit_bias) past the served model's vocabulary, as the engine checks it",
    ),
    ByDesign(
        ("POST /generate",),
        "ST101",
        504,
        "did not finish before its deadline (timeout_s)",
        "the client chose a deadline that cannot be met (timeout_s: 5e-324): 504 is the documented answer",
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        "this server accepts at most",
        "the prompt is longer than TEXTGEN_MAX_PROMPT_TOKENS: a limit in tokens, which a schema cannot state",
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        "rejected by the content filter",
        "the prompt contains a blocked word (TEXTGEN_BLOCKED_WORDS)",
    ),
    ByDesign(
        GENERATING,
        "ST202",
        400,
        "TEXTGEN_MAX_LOGPROBS_PER_REQUEST",
        "choices x tokens x (1 + alternatives) is more log-probabilities than one response may carry",
    ),
    ByDesign(
        ("POST /generate_background",),
        "ST202",
        400,
        "Webhooks are off on this server",
        "callback_url is refused until the operator sets TEXTGEN_WEBHOOK_SECRET",
    ),
    ByDesign(
        ("POST /v1/completions", "POST /v1/chat/completions"),
        "ST202",
        400,
        "this server holds at most",
        "prompts x n is more than the server can ever hold at once (TEXTGEN_MAX_RUNNING + TEXTGEN_MAX_WAITING)",
    ),
    ByDesign(
        ("POST /v1/embeddings",),
        "ST202",
        400,
        "is not in this model's vocabulary",
        "a token id past the served model's vocabulary: a limit of the model, which the schema cannot state",
    ),
    ByDesign(
        ("POST /detokenize",),
        "ST202",
        400,
        "is not a token id of this model",
        "a token id past the served model's vocabulary: a limit of the model, which the schema cannot state",
    ),
    ByDesign(
        ("POST /v1/embeddings",),
        "ST202",
        400,
        "dimensions: this model's embeddings have",
        "dimensions other than the model's own size: the model cannot shorten its vectors (OpenAI refuses too)",
    ),
    ByDesign(
        ("POST /v1/embeddings",),
        "ST202",
        400,
        "TEXTGEN_EMBEDDING_MAX",
        "more inputs or tokens than TEXTGEN_EMBEDDING_MAX_INPUTS / _MAX_TOTAL_TOKENS allow: settings, not schema",
    ),
    ByDesign(
        ("POST /v1/embeddings",),
        "ST202",
        400,
        "each input may have at most",
        "an input longer than TEXTGEN_MAX_PROMPT_TOKENS: a limit in tokens, which a schema cannot state",
    ),
    ByDesign(
        ("POST /v1/embeddings",),
        "ST202",
        400,
        "rejected by the content filter",
        "an input contains a blocked word (TEXTGEN_BLOCKED_WORDS)",
    ),
    ByDesign(
        ("POST /tokenize", "POST /detokenize"),
        "ST202",
        400,
        "the model's context",
        "more text or ids than the model's context could ever hold: a limit of the model, not of the schema",
    ),
    ByDesign(
        RESPONSES,
        "ST202",
        400,
        "takes text only",
        "image, audio and file parts are described so that they get a clear refusal: the model takes text only",
    ),
    ByDesign(
        RESPONSES, "ST202", 400, "stream_options: only allowed with stream", "as OpenAI: stream_options needs stream"
    ),
    ByDesign(RESPONSES, "ST202", 400, "background response must be stored", "background with store: false (as OpenAI)"),
    ByDesign(RESPONSES, "ST202", 400, "background response is not streamed", "background with stream: poll it instead"),
    ByDesign(RESPONSES, "ST202", 400, "needs tools", "tool_choice required or a named function without tools"),
    ByDesign(
        RESPONSES,
        "ST202",
        400,
        "continue from a completed one",
        "previous_response_id names a background response that has no output yet",
    ),
    ByDesign(
        RESPONSES,
        "ST202",
        400,
        "two functions are named",
        "tools with the same name twice: each function needs its own name (checked by the chat path)",
    ),
    ByDesign(
        RESPONSES,
        "ST202",
        400,
        "no function named",
        "tool_choice names a function the request does not offer (checked by the chat path)",
    ),
    ByDesign(
        RESPONSES,
        "ST202",
        400,
        "must be a JSON schema of an object",
        "a function's parameters must describe an object, as OpenAI requires (checked by the chat path)",
    ),
    ByDesign(
        RESPONSES,
        "ST201",
        413,
        "TEXTGEN_MAX_BODY_BYTES",
        "a body over the size limit is refused (413) before it is read, whatever else in it is invalid",
    ),
    ByDesign(
        ("POST /v1/responses/{response_id}/cancel",),
        "ST202",
        400,
        "Only background responses can be cancelled",
        "as OpenAI: an interactive response has nothing to cancel",
    ),
    ByDesign(
        ("GET /v1/responses/{response_id}",),
        "ST202",
        400,
        "replaying a stored response as a stream is not supported",
        "stream=true on GET is refused by name rather than ignored",
    ),
    ByDesign(
        ("GET /v1/responses/{response_id}/input_items",),
        "ST202",
        400,
        "in this response's input",
        "after names an item the response's input does not have",
    ),
    ByDesign(
        ("Stateful tests",),
        "ST301",
        200,
        '"state":"cancelled"',
        "DELETE /jobs/{id} cancels a job (as POST /jobs/{id}/cancel does); the job stays readable, cancelled",
    ),
    ByDesign(
        ("Stateful tests",),
        "ST301",
        200,
        'data: {"state": "cancelled"}',
        "DELETE /jobs/{id} cancels a job; its event stream (GET /jobs/{id}/stream) stays readable, cancelled",
    ),
]

SERVER_ENV = {
    "TEXTGEN_DTYPE": "float32",
    "TEXTGEN_MAX_NEW_TOKENS_LIMIT": "8",
    "TEXTGEN_MAX_PROMPT_TOKENS": "64",
    "TEXTGEN_MAX_RUNNING": "8",
    "TEXTGEN_MAX_WAITING": "64",
    "TEXTGEN_JOB_CONCURRENCY": "2",
    "TEXTGEN_JOB_POLL_INTERVAL_S": "0.05",
}


@dataclass(frozen=True)
class Finding:
    operation: str
    code: str
    status: int
    text: str

    def known(self) -> ByDesign | None:
        for entry in KNOWN_BY_DESIGN:
            if (
                self.operation in entry.operations
                and self.code == entry.code
                and self.status == entry.status
                and entry.body in self.text
            ):
                return entry
        return None


def findings_from_junit(path: Path) -> list[Finding]:
    """One finding per numbered case in each failed test case of schemathesis's JUnit report."""
    findings = []
    for testcase in ET.parse(path).iter("testcase"):
        for failure in [*testcase.findall("failure"), *testcase.findall("error")]:
            cases = re.split(r"\n(?=\d+\. Test Case ID)", failure.text or "")
            parsed = [
                Finding(str(testcase.get("name")), code, int(status), case)
                for case in cases
                for code, status in re.findall(r"- (ST\d+) .*?\n\[(\d{3})\]", case, flags=re.DOTALL)
            ]
            # Something schemathesis reported that has no status (a timeout, a broken connection) is never known.
            findings += parsed or [Finding(str(testcase.get("name")), "unparsed", 0, failure.text or "")]
    return findings


HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def operations(server: Server) -> set[str]:
    """Every operation of the served OpenAPI document, named as schemathesis names them ("POST /generate")."""
    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    return {f"{method.upper()} {path}" for path, item in paths.items() for method in item if method in HTTP_METHODS}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {**SERVER_ENV, "TEXTGEN_MODEL": str(tiny_model_dir)}
    with launch_server(env, workdir=tmp_path_factory.mktemp("schemathesis-cli"), name="contract") as server:
        yield server


@pytest.mark.server
def test_schemathesis_all_checks_find_only_known_by_design_cases(server: Server, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--seed",
        SEED,
        "--generation-deterministic",
        # Every operation still runs every phase (examples, coverage, fuzzing, stateful); only the fuzzing
        # phase's cases per operation are capped (the default is 100). The coverage phase, which walks each
        # schema's boundaries and invalid values, is not capped by this, and the run still generates more
        # than MIN_CASES cases, so the run stays a broad contract check at about half the CI time.
        "--max-examples",
        str(MAX_EXAMPLES),
        "--no-shrink",
        "--output-sanitize",
        "false",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, cwd=tmp_path)
    summary = run.stdout[-3000:]
    assert "Schema Loading Error" not in run.stdout, summary
    cases = re.search(r"(\d+) generated", run.stdout)
    assert cases is not None and int(cases.group(1)) >= MIN_CASES, summary
    # The case cap (MAX_EXAMPLES) must not leave an operation out: each one has its own test case in the report.
    reported = {str(testcase.get("name")) for testcase in ET.parse(junit).iter("testcase")}
    missing = operations(server) - reported
    assert not missing, f"operations schemathesis did not test: {sorted(missing)}"
    findings = findings_from_junit(junit)
    unexplained = [f for f in findings if f.known() is None]
    print(f"\nschemathesis --checks all: {cases.group(1)} cases; known by design:")
    for finding in findings:
        entry = finding.known()
        if entry is not None:
            print(f"  {finding.operation} {finding.code} {finding.status}: {entry.why}")
    assert not unexplained, "\n\n".join(f"{f.operation} {f.code} {f.status}\n{f.text[:2000]}" for f in unexplained)
    # Exit code 1 means failures, all of them explained above; anything else is an error of the run itself.
    assert run.returncode in (0, 1), summary + run.stderr[-2000:]
    assert run.returncode == 0 or findings, summary
