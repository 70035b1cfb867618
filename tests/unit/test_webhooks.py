"""Webhooks (``textgen.webhooks``): which callback URLs are accepted, signatures, backoff, and the sender
delivering to a real HTTP receiver on a loopback port with a real SQLite job store.

No external DNS: hosts are IP literals, ``localhost`` (from /etc/hosts) or names that fail to encode
before any lookup. The sender's retry pacing (``backoff_s``) is shortened where a test retries.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tests.support.webhooks import WebhookReceiver
from tests.unit.conftest import StoreClock
from textgen.errors import InvalidRequestError
from textgen.jobs.store import Job, JobState, JobStore, WebhookState
from textgen.jobs.view import job_payload
from textgen.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    MAX_URL_LENGTH,
    SIGNATURE_HEADER,
    UnsafeCallbackError,
    WebhookSender,
    backoff_s,
    check_callback_url,
    check_destination,
    check_webhook,
    sign,
    verify,
)
from textgen.workers.webhooks import JobWebhooks

SECRET = "s3cret"
OWNER = "test-host:1:sender"
REQUEST = {"prompt": "The future of AI is", "max_new_tokens": 3}
RESULT = {
    "generated_text": " bright",
    "model": "tiny",
    "prompt_tokens": 5,
    "completion_tokens": 1,
    "finish_reason": "stop",
    "request_id": "req-1",
}


# ----- a real receiver ----------------------------------------------------------------------------------


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., WebhookReceiver]]:
    """``receiver_factory(statuses)`` starts a receiver; every one started is shut down after the test."""
    started: list[WebhookReceiver] = []

    def start(statuses: Sequence[int] = (200,)) -> WebhookReceiver:
        receiver = WebhookReceiver(statuses).__enter__()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.__exit__(None, None, None)


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (the port was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


# ----- store, job and sender helpers ----------------------------------------------------------------------


async def finished_job(store: JobStore, callback_url: str) -> Job:
    """A job with ``callback_url`` that ran and succeeded, so its webhook is pending."""
    job = await store.create(REQUEST, request_id="req-1", callback_url=callback_url)
    claimed = await store.claim_next("runner-host:2:runner", 60.0)
    assert claimed is not None and claimed.id == job.id
    assert await store.finish(job.id, "runner-host:2:runner", JobState.SUCCEEDED, result=RESULT)
    finished = await store.get(job.id)
    assert finished.webhook_state is WebhookState.PENDING
    return finished


def make_sender(
    store: JobStore, *, owner: str = OWNER, retry_for_s: float = 5.0, allow_private: bool = True
) -> JobWebhooks:
    """Job webhook delivery (``textgen.workers.webhooks``) through the one sender, not started: tests call
    ``claim`` and ``deliver`` themselves."""
    sender = WebhookSender(secret=SECRET, timeout_s=5.0, allow_private=allow_private)
    return JobWebhooks(store, owner, sender, view=job_payload, retry_for_s=retry_for_s)


async def claimed_delivery(sender: JobWebhooks, store: JobStore, callback_url: str) -> Job:
    job = await finished_job(store, callback_url)
    claimed = await sender.claim()
    assert claimed is not None and claimed.id == job.id
    return claimed


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry pacing of 50 ms instead of seconds (the pacing is a knob, not what these tests check)."""
    monkeypatch.setattr("textgen.webhooks.backoff_s", lambda attempt: 0.05)


# ----- check_callback_url -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http:///hook", "no host"),
        ("http://user:pw@example.com/hook", "credentials"),
        ("https://token@example.com/hook", "credentials"),
        ("http://example.com:99999/hook", "not a valid URL"),
        ("http://example.com:port/hook", "not a valid URL"),
        ("http://[::1/hook", "not a valid URL"),
        ("http://93.184.215.14/a\x00b", "not a valid URL"),  # control characters: no request could carry it
        ("http://93.184.215.14/\x7f", "not a valid URL"),
        ("https://example.com/" + "a" * MAX_URL_LENGTH, f"longer than {MAX_URL_LENGTH}"),
    ],
)
def test_check_callback_url_refuses_bad_forms(url: str, says: str) -> None:
    with pytest.raises(UnsafeCallbackError) as caught:
        check_callback_url(url)
    assert says in caught.value.message
    assert "callback_url" in caught.value.message
    assert isinstance(caught.value, InvalidRequestError)  # the API answers it with a 400


@pytest.mark.parametrize(
    "url", ["http://example.com/hook", "https://example.com:8443/a/b?x=1", "HTTPS://Example.COM/hook"]
)
def test_check_callback_url_accepts_http_and_https(url: str) -> None:
    assert check_callback_url(url) == url


def test_url_of_exactly_the_maximum_length_is_accepted() -> None:
    url = "https://example.com/"
    url += "a" * (MAX_URL_LENGTH - len(url))
    assert check_callback_url(url) == url


# ----- check_destination ----------------------------------------------------------------------------------------

PRIVATE_URLS = [
    "http://127.0.0.1/hook",
    "http://localhost:8080/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.1/hook",
    "http://172.16.5.4/hook",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://0.0.0.0/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fd00::1]/hook",
    "http://[fe80::1]/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one number
    "http://0x7f000001/hook",  # and in hex
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_private_destinations_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(UnsafeCallbackError) as caught:
        await check_destination(url, allow_private=False)
    assert "non-public address" in caught.value.message
    assert "TEXTGEN_WEBHOOK_ALLOW_PRIVATE" in caught.value.message

    await check_destination(url, allow_private=True)  # no error


@pytest.mark.parametrize(
    ("url", "reaches"),
    [
        ("http://[64:ff9b::a01:203]/hook", "10.1.2.3 through NAT64"),
        ("http://[64:ff9b::7f00:1]/hook", "127.0.0.1 through NAT64"),
        ("http://[64:ff9b:1::a01:203]/hook", "a site-local NAT64 prefix"),
        ("http://[2002:a01:203::1]/hook", "10.1.2.3 through 6to4"),
        ("http://[::127.0.0.1]/hook", "127.0.0.1, IPv4-compatible form"),
    ],
)
async def test_ipv6_forms_of_private_ipv4_addresses_are_refused(url: str, reaches: str) -> None:
    with pytest.raises(UnsafeCallbackError, match="non-public address"):
        await check_destination(url, allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.215.14/hook",
        "https://93.184.215.14:8443/hook",
        "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/hook",
        "http://[::ffff:93.184.215.14]/hook",
        "http://[64:ff9b::5db8:d70e]/hook",  # 93.184.215.14 through NAT64
    ],
)
async def test_public_addresses_are_accepted(url: str) -> None:
    await check_destination(url, allow_private=False)


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_host_that_does_not_resolve_is_refused(allow_private: bool) -> None:
    host = "a" * 64 + ".example"  # a 64-character label: the lookup fails before any DNS query
    with pytest.raises(UnsafeCallbackError) as caught:
        await check_destination(f"http://{host}/hook", allow_private=allow_private)
    assert "does not resolve" in caught.value.message
    assert host in caught.value.message


async def test_check_destination_checks_the_form_too() -> None:
    with pytest.raises(UnsafeCallbackError, match="http:// or https://"):
        await check_destination("ftp://93.184.215.14/x", allow_private=True)


async def test_check_webhook_needs_the_secret(make_settings: Callable[..., Any]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await check_webhook("http://93.184.215.14/hook", make_settings())
    assert "TEXTGEN_WEBHOOK_SECRET" in caught.value.message
    assert not isinstance(caught.value, UnsafeCallbackError)

    await check_webhook("http://93.184.215.14/hook", make_settings(webhook_secret=SECRET))
    with pytest.raises(UnsafeCallbackError, match="TEXTGEN_WEBHOOK_ALLOW_PRIVATE"):
        await check_webhook("http://127.0.0.1/hook", make_settings(webhook_secret=SECRET))
    await check_webhook("http://127.0.0.1/hook", make_settings(webhook_secret=SECRET, webhook_allow_private=True))


# ----- signatures and backoff ------------------------------------------------------------------------------------


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"event":"job.succeeded","job":{"job_id":"abc"}}'
    signature = sign(SECRET, body)
    assert signature.startswith("sha256=") and len(signature) == len("sha256=") + 64
    assert verify(SECRET, body, signature)
    assert sign(SECRET, body) == signature  # deterministic

    assert not verify(SECRET, body.replace(b"abc", b"abd"), signature)  # body changed
    assert not verify("other-secret", body, signature)  # wrong key
    assert not verify(SECRET, body, signature[:-1] + ("0" if signature[-1] != "0" else "1"))  # signature changed
    assert not verify(SECRET, body, signature.removeprefix("sha256="))  # scheme missing
    assert not verify(SECRET, body + b" ", signature)  # the raw body counts, whitespace included


@pytest.mark.parametrize(("attempt", "cap"), [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (7, 60.0), (50, 60.0)])
def test_backoff_is_jittered_below_a_growing_cap(attempt: int, cap: float) -> None:
    waits = [backoff_s(attempt) for _ in range(400)]
    assert all(0.0 <= wait <= cap for wait in waits)
    # Full jitter spreads the waits over the whole range (400 draws all in one half: p = 2 ** -400).
    assert max(waits) > cap / 2
    assert min(waits) < cap / 2


def test_backoff_stays_capped_for_huge_attempt_counts() -> None:
    # A long TEXTGEN_WEBHOOK_RETRY_FOR_S can reach attempt numbers where 2 ** n no longer fits a float.
    for attempt in (1025, 5000, 10**6):
        assert 0.0 <= backoff_s(attempt) <= 60.0


# ----- job webhook delivery against a real receiver ---------------------------------------------------------------


async def test_delivered_on_first_200_with_a_verifiable_signed_body(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver]
) -> None:
    receiver = receiver_factory([200])
    sender = make_sender(store)
    try:
        job = await claimed_delivery(sender, store, receiver.url())
        before = time.time()
        assert await sender.deliver(job) is WebhookState.DELIVERED
        after = time.time()
    finally:
        await sender.stop()

    [post] = receiver.requests
    assert post.method == "POST" and post.path == "/hook"
    assert verify(SECRET, post.body, post.headers[SIGNATURE_HEADER])
    assert post.headers[EVENT_HEADER] == "job.succeeded"
    assert post.headers[DELIVERY_HEADER] == f"{job.id}:1"
    assert post.headers["Content-Type"] == "application/json"

    body = post.json()
    assert set(body) == {"event", "sent_at", "job"}
    assert body["event"] == "job.succeeded"
    assert before <= body["sent_at"] <= after
    assert body["job"]["job_id"] == job.id
    assert body["job"]["state"] == "succeeded"
    assert body["job"]["result"]["generated_text"] == RESULT["generated_text"]
    assert body["job"]["request"] == REQUEST
    assert body["job"]["webhook"]["url"] == receiver.url()

    stored = await store.get(job.id)
    assert stored.webhook_state is WebhookState.DELIVERED
    assert stored.webhook_attempts == 1
    assert stored.webhook_error is None
    assert stored.webhook_at is not None and before <= stored.webhook_at <= after
    assert await sender.claim() is None  # nothing left to deliver


async def test_retries_until_a_2xx_and_records_the_attempts(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver], quick_retries: None
) -> None:
    receiver = receiver_factory([500, 500, 200])
    sender = make_sender(store)
    try:
        job = await claimed_delivery(sender, store, receiver.url())
        assert await sender.deliver(job) is WebhookState.DELIVERED
    finally:
        await sender.stop()

    posts = receiver.posts()
    assert [p.headers[DELIVERY_HEADER] for p in posts] == [f"{job.id}:1", f"{job.id}:2", f"{job.id}:3"]
    for post in posts:  # every attempt is signed over its own body
        assert verify(SECRET, post.body, post.headers[SIGNATURE_HEADER])
        assert post.json()["job"]["job_id"] == job.id
    sent_at = [p.json()["sent_at"] for p in posts]
    assert sent_at == sorted(sent_at) and sent_at[0] < sent_at[-1]  # each says when it was sent

    stored = await store.get(job.id)
    assert stored.webhook_state is WebhookState.DELIVERED
    assert stored.webhook_attempts == 3
    assert stored.webhook_error is None


async def test_gives_up_when_the_retry_window_closes(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver], quick_retries: None
) -> None:
    receiver = receiver_factory([500])
    retry_for_s = 1.5
    sender = make_sender(store, retry_for_s=retry_for_s)
    try:
        job = await claimed_delivery(sender, store, receiver.url())
        started = time.monotonic()
        assert await sender.deliver(job) is WebhookState.FAILED
    finally:
        await sender.stop()

    posts = receiver.posts()
    assert len(posts) >= 2
    # It kept retrying until the window was about to close, and then stopped (the slack only absorbs
    # the event loop's and the receiver thread's scheduling delays).
    slack_s = 0.5
    assert started + retry_for_s - slack_s <= posts[-1].at <= started + retry_for_s + slack_s
    stored = await store.get(job.id)
    assert stored.webhook_state is WebhookState.FAILED
    assert stored.webhook_attempts == len(posts)
    assert stored.webhook_error is not None and "HTTP 500" in stored.webhook_error
    assert await sender.claim() is None  # a failed delivery is final


async def test_a_redirect_is_not_followed(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver], quick_retries: None
) -> None:
    receiver = receiver_factory([302, 200])
    sender = make_sender(store)
    try:
        job = await claimed_delivery(sender, store, receiver.url())
        assert await sender.deliver(job) is WebhookState.DELIVERED
    finally:
        await sender.stop()

    # The 302 counted as a failed attempt; its Location was never visited.
    assert [(r.method, r.path) for r in receiver.requests] == [("POST", "/hook"), ("POST", "/hook")]
    assert (await store.get(job.id)).webhook_attempts == 2


async def test_a_redirect_alone_never_delivers(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver], quick_retries: None
) -> None:
    receiver = receiver_factory([302])
    sender = make_sender(store, retry_for_s=0.5)
    try:
        job = await claimed_delivery(sender, store, receiver.url())
        assert await sender.deliver(job) is WebhookState.FAILED
    finally:
        await sender.stop()

    assert {r.path for r in receiver.requests} == {"/hook"}
    stored = await store.get(job.id)
    assert stored.webhook_error is not None and "HTTP 302" in stored.webhook_error


async def test_receiver_down_fails_with_a_connection_error(store: JobStore, quick_retries: None) -> None:
    sender = make_sender(store, retry_for_s=0.5)
    try:
        job = await claimed_delivery(sender, store, closed_port_url())
        assert await sender.deliver(job) is WebhookState.FAILED
    finally:
        await sender.stop()

    stored = await store.get(job.id)
    assert stored.webhook_state is WebhookState.FAILED
    assert stored.webhook_attempts >= 1
    assert stored.webhook_error is not None and "ConnectError" in stored.webhook_error


async def test_a_private_destination_is_refused_at_delivery_time(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver], quick_retries: None
) -> None:
    receiver = receiver_factory([200])
    sender = make_sender(store, retry_for_s=0.3, allow_private=False)
    try:
        job = await claimed_delivery(sender, store, receiver.url())
        assert await sender.deliver(job) is WebhookState.FAILED
    finally:
        await sender.stop()

    assert receiver.requests == []  # never contacted
    stored = await store.get(job.id)
    assert stored.webhook_error is not None and "non-public address" in stored.webhook_error


async def test_a_delivery_taken_over_by_another_owner_stops(
    store: JobStore, store_clock: StoreClock, receiver_factory: Callable[..., WebhookReceiver], quick_retries: None
) -> None:
    receiver = receiver_factory([500])
    sender = make_sender(store)
    try:
        job = await finished_job(store, receiver.url())
        mine = await store.claim_webhook(OWNER, 0.05)  # a claim that lapses at once...
        assert mine is not None and mine.id == job.id
        store_clock.advance(1.0)  # the store's clock moves past that lease
        theirs = await store.claim_webhook("other-host:3:other", 60.0)  # ...so another process takes it over
        assert theirs is not None and theirs.id == job.id

        assert await sender.deliver(mine) is WebhookState.PENDING
    finally:
        await sender.stop()

    assert len(receiver.posts()) == 1  # it stopped after the attempt whose progress it could not record
    stored = await store.get(job.id)
    assert stored.webhook_state is WebhookState.PENDING  # left to the new owner, untouched
    assert stored.webhook_attempts == 0
    assert stored.webhook_error is None


async def test_the_connection_goes_to_the_checked_address_with_the_original_host(
    store: JobStore, receiver_factory: Callable[..., WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding gains nothing: the POST goes to the address that passed the check (here the
    receiver's loopback address, as this test's resolver answers), never to a second lookup, and the
    receiver still sees the host name it was given."""
    receiver = receiver_factory([200])
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr("textgen.webhooks.resolve", resolver)
    sender = make_sender(store)
    try:
        job = await claimed_delivery(sender, store, f"http://hooks.example.invalid:{receiver.port}/hook")
        assert await sender.deliver(job) is WebhookState.DELIVERED
    finally:
        await sender.stop()
    [post] = receiver.requests
    assert post.headers["Host"] == f"hooks.example.invalid:{receiver.port}"
    assert lookups == ["hooks.example.invalid"]  # one lookup, the checked one; httpx never resolved the name
