"""SIGTERM: stop accepting, finish in-flight interactive requests, hand running jobs back; nothing lost.

A real server (``TEXTGEN_JOB_CONCURRENCY=2``, ``TEXTGEN_SHUTDOWN_GRACE_S=20``) gets six long background
jobs; once two of them run, four interactive ``/generate`` requests are sent, and as soon as the server
has them, the uvicorn process (only it, no SIGKILL follow-up) gets SIGTERM. Then:

* while the in-flight requests still run, a new request is answered 503 with Retry-After (the port stays
  open during the drain; it closes once the drain is over);
* every in-flight interactive request completes with 200 and its full token budget;
* the process exits by itself, well within the grace period, logging the hand-back;
* the store (read directly) has no job ``running``: the two that ran are ``queued`` again (attempt 1
  spent), the four others never started;
* a new server on the same store finishes all six exactly once: attempts 2 for the handed-back jobs,
  1 for the rest, one "succeeded" line per job over both lives, no result produced twice.

``test_sigterm_grace_period_bounds_a_long_request`` checks the other half of the
promise: a request longer than the grace period does not keep the process up, and no job is claimed
after SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import Server, enter_together, launch_server, submit_job, wait_until_terminal
from tests.support.waiting import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.server]

JOBS = 6
JOB_TOKENS = 192  # long enough to still run after the interactive requests have drained
INTERACTIVE = 4
INTERACTIVE_TOKENS = 64
GRACE_S = 20
COMMON = {"TEXTGEN_TORCH_THREADS": "1"}  # see test_overload.py: avoids OpenMP oversubscription on small CPUs
FIRST_ENV = {**COMMON, "TEXTGEN_JOB_CONCURRENCY": "2", "TEXTGEN_SHUTDOWN_GRACE_S": str(GRACE_S)}
# The second life may run all six at once; the point is what it runs, not how fast.
SECOND_ENV = {**COMMON, "TEXTGEN_JOB_CONCURRENCY": str(JOBS)}


def rows_on_disk(job_store: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(job_store)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT id, state, attempts, owner, started_at FROM jobs").fetchall()
    finally:
        conn.close()
    return {row["id"]: dict(row) for row in rows}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, server: Server) -> None:
    try:
        wait_until_sync(condition, timeout_s, what, still_ok=server.assert_alive)
    except AssertionError as error:
        raise AssertionError(f"{error}:\n{server.log_tail()}") from None


def interactive_in_batch(server: Server) -> int:
    """Interactive sequences in the engine's batch now (none waiting for a slot): what the engine holds beyond
    the running jobs' sequences. A job that ends between the two reads can only make this smaller."""
    stats = server.stats()
    if stats["waiting_interactive"]:
        return 0
    return int(stats["running"] + stats["waiting_background"] - stats["jobs_running"])


def refused_during_drain(url: str) -> bool:
    """A new generation request sent right after SIGTERM is answered 503 with Retry-After (and /ready 503)."""
    with httpx.Client(base_url=url, timeout=10.0) as probe:
        ready = probe.get("/ready")
        response = probe.post("/generate", json={"prompt": "during the drain", "max_new_tokens": 2})
    return (
        ready.status_code == 503
        and response.status_code == 503
        and int(response.headers.get("Retry-After", "0")) >= 1
        and "shutting down" in response.json()["detail"]
    )


def send_interactive(url: str, results: dict[str, Any]) -> list[threading.Thread]:
    def one(request_id: str) -> None:
        body = {
            "prompt": f"{request_id}: a haiku about autumn",
            "max_new_tokens": INTERACTIVE_TOKENS,
            "ignore_eos": True,
        }
        try:
            with httpx.Client(base_url=url, timeout=120.0) as client:
                results[request_id] = client.post("/generate", json=body, headers={"X-Request-ID": request_id})
        except httpx.HTTPError as error:
            results[request_id] = error

    threads = [
        threading.Thread(target=one, args=(f"inflight-{i}",), name=f"inflight-{i}", daemon=True)
        for i in range(INTERACTIVE)
    ]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.timeout(400)
def test_sigterm_drains_requests_and_hands_jobs_back(start_server: Callable[..., Server]) -> None:
    first = start_server(FIRST_ENV)
    with first.client() as client:
        body = {"max_new_tokens": JOB_TOKENS, "ignore_eos": True}
        job_ids = [submit_job(client, {"prompt": f"Chapter {i}: the long road", **body})["job_id"] for i in range(JOBS)]

        def running_jobs() -> int:
            listed = client.get("/jobs", params={"state": "running", "limit": 100}).json()["jobs"]
            return sum(job["job_id"] in job_ids for job in listed)

        wait_for(lambda: running_jobs() == 2, 60, "two jobs running", first)

    results: dict[str, Any] = {}
    threads = send_interactive(first.url, results)
    # SIGTERM only once the server has every interactive request (its log names each request id).
    wait_for(
        lambda: all(f"[inflight-{i}] Prompt received" in first.log_text() for i in range(INTERACTIVE)),
        60,
        "the interactive requests reaching the server",
        first,
    )
    wait_for(lambda: interactive_in_batch(first) >= INTERACTIVE, 60, "the interactive requests in the batch", first)
    in_flight_at_sigterm = sum(thread.is_alive() for thread in threads)
    sigterm_at = time.monotonic()
    os.kill(first.pid, signal.SIGTERM)

    # Stop taking work: a new request during the drain gets 503 + Retry-After while the in-flight ones run.
    refused = refused_during_drain(first.url)
    still_in_flight = sum(thread.is_alive() for thread in threads)

    for thread in threads:
        thread.join(timeout=GRACE_S + 60)
    code = first.proc.wait(timeout=GRACE_S + 60)
    exit_s = time.monotonic() - sigterm_at
    on_disk = rows_on_disk(first.job_store)
    states = Counter(row["state"] for row in on_disk.values())
    print(
        f"\nSIGTERM: exit code {code} after {exit_s:.1f} s; new request answered 503 during the drain: {refused} "
        f"({in_flight_at_sigterm} requests in flight at SIGTERM, {still_in_flight} then); interactive: "
        f"{ {k: getattr(v, 'status_code', repr(v)) for k, v in sorted(results.items())} }; store after exit: "
        f"{dict(states)}"
    )

    assert code in (0, -signal.SIGTERM), first.log_tail()
    assert exit_s < GRACE_S + 30, "the server did not exit within its grace period"
    assert in_flight_at_sigterm == INTERACTIVE, "the interactive requests finished before SIGTERM: nothing drained"
    assert refused, "a new request during the drain was not answered 503 with Retry-After"
    assert still_in_flight > 0, "the in-flight requests were done before the probe: it proved nothing"
    for request_id in (f"inflight-{i}" for i in range(INTERACTIVE)):
        response = results.get(request_id)
        assert isinstance(response, httpx.Response), f"{request_id}: {response!r}\n{first.log_tail()}"
        assert response.status_code == 200, f"{response.text}\n{first.log_tail()}"
        assert response.json()["completion_tokens"] == INTERACTIVE_TOKENS

    first_log = first.log_text()
    assert "Handed 2 running job(s) back to the queue for the next start" in first_log, first.log_tail()
    assert "Shutdown complete" in first_log, first.log_tail()
    assert "Traceback" not in first_log, first.log_tail()

    assert set(on_disk) == set(job_ids)
    assert states == {"queued": JOBS}, f"after a graceful stop nothing may stay running or be lost: {on_disk}"
    handed_back = {job_id for job_id, row in on_disk.items() if row["attempts"] == 1}
    never_started = {job_id for job_id, row in on_disk.items() if row["attempts"] == 0}
    assert len(handed_back) == 2 and len(never_started) == JOBS - 2, on_disk
    assert all(row["owner"] is None and row["started_at"] is None for row in on_disk.values()), on_disk
    for job_id in handed_back:
        assert f"Job {job_id} started (attempt 1)" in first_log

    second = start_server(SECOND_ENV)
    assert second.job_store == first.job_store
    with second.client() as client:
        jobs = wait_until_terminal(client, job_ids, timeout_s=180)
    second_log = second.log_text()

    assert {job_id: job["state"] for job_id, job in jobs.items()} == dict.fromkeys(job_ids, "succeeded")
    for job_id, job in jobs.items():
        assert job["attempts"] == (2 if job_id in handed_back else 1), (job_id, job)
        assert job["result"]["completion_tokens"] == JOB_TOKENS
        assert job["error"] is None
    # A graceful stop leaves nothing for the dead-process recovery to find.
    assert "left running by a process that died" not in second_log, second.log_tail()
    logs = first_log + second_log
    for job_id in job_ids:
        assert logs.count(f"Job {job_id} succeeded") == 1, job_id
        assert f"Job {job_id} result" not in logs, f"a second result of {job_id} was produced and discarded"
    for job_id in handed_back:
        assert f"Job {job_id} started (attempt 2)" in second_log
    for job_id in never_started:
        assert f"Job {job_id} started" not in first_log
        assert f"Job {job_id} started (attempt 1)" in second_log


SHORT_GRACE_S = 2
SHORT_GRACE_ENV = {
    **COMMON,
    "TEXTGEN_SHUTDOWN_GRACE_S": str(SHORT_GRACE_S),
    "TEXTGEN_JOB_CONCURRENCY": "1",
    "TEXTGEN_MAX_NEW_TOKENS_LIMIT": "4096",
}


@pytest.fixture(scope="module")
def short_grace_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """A fresh server (its own job store) with a short grace period for each test below that SIGTERMs one,
    both started side by side, so the two starts overlap."""
    names = ("long-request", "streams")
    with contextlib.ExitStack() as stack:
        launchers = [launch_server(SHORT_GRACE_ENV, workdir=tmp_path_factory.mktemp(name), name=name) for name in names]
        yield dict(zip(names, enter_together(stack, launchers), strict=True))


@pytest.mark.timeout(300)
def test_sigterm_grace_period_bounds_a_long_request(short_grace_servers: dict[str, Server]) -> None:
    server = short_grace_servers["long-request"]
    with server.client() as client:
        body = {"max_new_tokens": 16, "ignore_eos": True}
        job_ids = [submit_job(client, {"prompt": f"Note {i}", **body})["job_id"] for i in range(8)]
    results: dict[str, Any] = {}

    def long_request() -> None:
        body = {"prompt": "An endless story:", "max_new_tokens": 3000, "ignore_eos": True}
        try:
            with httpx.Client(base_url=server.url, timeout=300.0) as client:
                results["long"] = client.post("/generate", json=body, headers={"X-Request-ID": "long-one"})
        except httpx.HTTPError as error:
            results["long"] = error

    thread = threading.Thread(target=long_request, name="long-request", daemon=True)
    thread.start()
    wait_for(lambda: "[long-one] Prompt received" in server.log_text(), 60, "the long request arriving", server)
    wait_for(lambda: interactive_in_batch(server) >= 1, 60, "the long request in the batch", server)
    os.kill(server.pid, signal.SIGTERM)
    sigterm_at = time.monotonic()
    try:
        code: int | None = server.proc.wait(timeout=SHORT_GRACE_S + 10)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = time.monotonic() - sigterm_at
    log = server.log_text()
    after_sigterm = log[log.find("Shutting down") :] if "Shutting down" in log else ""
    claimed_after = after_sigterm.count("started (attempt")
    print(f"\nshort grace: exit code {code} after {exit_s:.1f} s; jobs claimed after SIGTERM: {claimed_after}")

    assert code is not None, f"still running {exit_s:.0f} s after SIGTERM with a {SHORT_GRACE_S} s grace period"
    assert claimed_after == 0, f"{claimed_after} job(s) were claimed after SIGTERM"
    on_disk = rows_on_disk(server.job_store)
    assert set(on_disk) == set(job_ids)
    assert not [row for row in on_disk.values() if row["state"] == "running"], on_disk


STREAM_GRACE_S = SHORT_GRACE_S
LONG_TOKENS = 3000  # far longer than the grace period at this model's speed


def follow_stream(
    url: str, path: str, body: dict[str, Any] | None, name: str, results: dict[str, Any], started: threading.Event
) -> None:
    """Read one event stream to its end: (how it ended, its lines, when it ended)."""
    lines: list[str] = []
    try:
        with httpx.Client(base_url=url, timeout=60.0) as client:
            method = "POST" if body is not None else "GET"
            with client.stream(method, path, json=body, headers={"X-Request-ID": name}) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if line == "event: token" or (line.startswith("data:") and '"choices"' in line):
                        started.set()
        results[name] = ("complete", lines, time.monotonic())
    except httpx.HTTPError as error:  # an incomplete chunked body: the stream was cut
        results[name] = (repr(error), lines, time.monotonic())


def last_data(lines: list[str], skip_done: bool = False) -> tuple[str | None, str]:
    """The last event's name (None without one) and data."""
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = line.split(":", 1)[1].strip()
            if not (skip_done and data == "[DONE]"):
                events.append((name, data))
            name = None
    assert events, lines
    return events[-1]


@pytest.mark.timeout(300)
def test_sigterm_ends_open_streams_with_their_final_event(short_grace_servers: dict[str, Server]) -> None:
    """Before: every open stream was cut within 0.4 s of SIGTERM with no final event (an incomplete chunked
    body; uvicorn logged "ASGI callable returned without completing response"). Now: /generate and /v1 streams
    get the grace period like sync requests, then end with an `error` event (OpenAI's error chunk and
    `[DONE]` under /v1); a job's stream ends with an `error` event saying the job went back to the queue."""
    server = short_grace_servers["streams"]  # SHORT_GRACE_ENV: a STREAM_GRACE_S grace period
    long = {"max_new_tokens": LONG_TOKENS, "ignore_eos": True}
    with server.client() as client:
        job_id = submit_job(client, {"prompt": "A long job", **long})["job_id"]
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["state"] == "running", 60, "the job running", server)
    streams = {
        "generate-stream": ("/generate", {"prompt": "An endless story:", "stream": True, **long}),
        "v1-stream": (
            "/v1/completions",
            {"prompt": "Once", "max_tokens": LONG_TOKENS, "stream": True, "ignore_eos": True},
        ),
        "job-stream": (f"/jobs/{job_id}/stream", None),
    }
    results: dict[str, Any] = {}
    started = {name: threading.Event() for name in streams}
    threads = [
        threading.Thread(
            target=follow_stream, args=(server.url, path, body, name, results, started[name]), name=name, daemon=True
        )
        for name, (path, body) in streams.items()
    ]
    for thread in threads:
        thread.start()
    for name, event in started.items():
        assert event.wait(60), f"{name} produced no token:\n{server.log_tail()}"

    sigterm_at = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    refused = refused_during_drain(server.url)
    for thread in threads:
        thread.join(timeout=STREAM_GRACE_S + 30)
    code = server.proc.wait(timeout=30)
    log = server.log_text()
    ended = {name: round(result[2] - sigterm_at, 2) for name, result in results.items()}
    print(f"\nstreams after SIGTERM: { {name: result[0] for name, result in results.items()} }; ended after {ended} s")

    assert code in (0, -signal.SIGTERM), server.log_tail()
    assert refused, "a new request during the drain was not answered 503 with Retry-After"
    for name in streams:
        assert results[name][0] == "complete", f"{name} was cut: {results[name][0]}\n{server.log_tail()}"
    generated = last_data(results["generate-stream"][1])
    assert generated[0] == "error", generated
    assert json.loads(generated[1])["status"] == 503 and "shutting down" in generated[1], generated
    v1_lines = results["v1-stream"][1]
    assert last_data(v1_lines) == (None, "[DONE]"), v1_lines[-4:]
    v1_error = json.loads(last_data(v1_lines, skip_done=True)[1])
    assert "shutting down" in v1_error["error"]["message"], v1_error
    job_event = last_data(results["job-stream"][1])
    assert job_event[0] == "error" and "went back to the queue" in job_event[1], job_event
    # The generation streams had the grace period (not cut at once) and not much more.
    for name in ("generate-stream", "v1-stream"):
        assert STREAM_GRACE_S - 0.3 <= ended[name] <= STREAM_GRACE_S + 5, ended
    assert "ASGI callable returned without completing response" not in log, server.log_tail()
    assert "Traceback" not in log, server.log_tail()
    assert "Shutdown complete" in log, server.log_tail()
