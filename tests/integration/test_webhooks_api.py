"""Webhooks through the HTTP API: ``POST /generate_background`` with a ``callback_url``, the app's own
runner delivering to a real HTTP receiver on a loopback port (so ``webhook_allow_private`` is on where a
delivery is expected), and ``GET /jobs/{id}`` showing the delivery's progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from models import TextGenerationRequest
from tests.integration.test_jobs import LONG_JOB, PROMPT, assert_error, list_jobs, poll_job, submit
from tests.support.webhooks import WebhookReceiver
from textgen.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, verify

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

SECRET = "s3cret"
SHORT_JOB = {"prompt": PROMPT, "max_new_tokens": 5, "ignore_eos": True, "seed": 3}
WEBHOOK_ENDED = {"delivered", "failed"}


def webhook_ended(view: dict[str, Any]) -> bool:
    return view["webhook"] is not None and view["webhook"]["state"] in WEBHOOK_ENDED


def without_webhook(view: dict[str, Any]) -> dict[str, Any]:
    """A job view minus its ``webhook`` part (which moves on once the delivery is recorded)."""
    return {key: value for key, value in view.items() if key != "webhook"}


async def refused(client: httpx.AsyncClient, callback_url: str, request_id: str) -> str:
    """POST a job with ``callback_url`` expecting a 400 that carries the request id; returns the message."""
    response = await client.post(
        "/generate_background", json={**SHORT_JOB, "callback_url": callback_url}, headers={"X-Request-ID": request_id}
    )
    detail = assert_error(response, 400)
    assert response.json()["request_id"] == request_id
    assert isinstance(detail, str)
    return detail


# ----- deliveries ---------------------------------------------------------------------------------------------


async def test_a_finished_job_is_posted_once_signed_and_shown_delivered(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(webhook_secret=SECRET, webhook_allow_private=True)
    with WebhookReceiver([200]) as receiver:
        async with app_client(settings) as (client, _app):
            accepted = await submit(client, {**SHORT_JOB, "callback_url": receiver.url()})
            view, _ = await poll_job(client, accepted["job_id"], until=webhook_ended)
            # A later job's webhook delivered: the sender, which claims the oldest pending delivery first, has
            # moved past this job's, so a second delivery of it would have been sent by now.
            later = await submit(client, {**SHORT_JOB, "callback_url": receiver.url()})
            await poll_job(client, later["job_id"], until=webhook_ended)
            posts = [p for p in receiver.posts() if p.headers[DELIVERY_HEADER].startswith(f"{accepted['job_id']}:")]

    assert view["state"] == "succeeded", view
    assert view["request"]["callback_url"] == receiver.url()
    webhook = view["webhook"]
    assert webhook["url"] == receiver.url()
    assert webhook["state"] == "delivered"
    assert webhook["attempts"] == 1
    assert webhook["last_error"] is None
    assert webhook["last_attempt_at"] is not None

    [post] = posts
    assert post.path == "/hook"
    assert verify(SECRET, post.body, post.headers[SIGNATURE_HEADER])
    assert not verify("another secret", post.body, post.headers[SIGNATURE_HEADER])
    assert post.headers[EVENT_HEADER] == "job.succeeded"
    assert post.headers[DELIVERY_HEADER] == f"{accepted['job_id']}:1"
    body = post.json()
    assert body["event"] == "job.succeeded"
    # The job as GET /jobs/{id} shows it; only the webhook part has moved on since it was sent.
    assert without_webhook(body["job"]) == without_webhook(view)
    assert body["job"]["result"]["generated_text"] == view["result"]["generated_text"]
    assert body["job"]["webhook"]["url"] == receiver.url()


async def test_a_cancelled_queued_job_gets_a_cancelled_webhook(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    # One job slot, held by a long job: the job with the webhook stays queued until it is cancelled.
    settings = make_settings(webhook_secret=SECRET, webhook_allow_private=True, job_concurrency=1)
    with WebhookReceiver([200]) as receiver:
        async with app_client(settings) as (client, _app):
            running = await submit(client, LONG_JOB)
            queued = await submit(client, {**SHORT_JOB, "callback_url": receiver.url()})
            await poll_job(client, running["job_id"], until=lambda view: view["state"] == "running")
            waiting, _ = await poll_job(client, queued["job_id"], until=lambda view: True)
            assert waiting["state"] == "queued"
            assert waiting["webhook"] == {
                "url": receiver.url(),
                "state": "waiting",
                "attempts": 0,
                "last_error": None,
                "last_attempt_at": None,
            }
            assert receiver.posts() == []

            cancelled = await client.delete(queued["status_url"])
            assert cancelled.status_code == 200, cancelled.text
            view, _ = await poll_job(client, queued["job_id"], until=webhook_ended)
            assert (await client.delete(running["status_url"])).status_code == 200

    assert view["state"] == "cancelled"
    assert view["webhook"]["state"] == "delivered"
    [post] = receiver.posts()
    assert verify(SECRET, post.body, post.headers[SIGNATURE_HEADER])
    assert post.headers[EVENT_HEADER] == "job.cancelled"
    body = post.json()
    assert body["event"] == "job.cancelled"
    assert body["job"]["job_id"] == queued["job_id"]
    assert body["job"]["state"] == "cancelled"
    assert body["job"]["result"] is None
    assert body["job"]["started_at"] is None  # it never ran


async def test_a_receiver_that_keeps_failing_is_shown_failed(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(webhook_secret=SECRET, webhook_allow_private=True, webhook_retry_for_s=0.5)
    with WebhookReceiver([503]) as receiver:
        async with app_client(settings) as (client, _app):
            accepted = await submit(client, {**SHORT_JOB, "callback_url": receiver.url()})
            view, _ = await poll_job(client, accepted["job_id"], until=webhook_ended)

    assert view["state"] == "succeeded"  # the job's own outcome is untouched
    webhook = view["webhook"]
    assert webhook["state"] == "failed"
    assert webhook["attempts"] == len(receiver.posts()) >= 1
    assert "HTTP 503" in webhook["last_error"]
    assert webhook["last_attempt_at"] is not None


# ----- refusals at submission -------------------------------------------------------------------------------------


async def test_without_a_secret_callback_urls_are_refused(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(webhook_allow_private=True)) as (client, _app):
        detail = await refused(client, "http://93.184.215.14/hook", "wh-no-secret")
        assert "TEXTGEN_WEBHOOK_SECRET" in detail
        assert await list_jobs(client) == []  # no job was created


async def test_loopback_callback_url_needs_allow_private(make_settings: MakeSettings, app_client: AppClient) -> None:
    with WebhookReceiver([200]) as receiver:
        async with app_client(make_settings(webhook_secret=SECRET)) as (client, _app):
            detail = await refused(client, receiver.url(), "wh-private")
            assert "TEXTGEN_WEBHOOK_ALLOW_PRIVATE" in detail
            assert "127.0.0.1" in detail
            assert await list_jobs(client) == []
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("callback_url", "says"),
    [
        ("ftp://x/y", "http:// or https://"),
        ("http://user:pw@93.184.215.14/hook", "credentials"),
        ("http:///hook", "no host"),
        ("http://93.184.215.14:99999/hook", "not a valid URL"),
        ("http://93.184.215.14/a\x00b", "not a valid URL"),
    ],
)
async def test_malformed_callback_urls_are_refused(
    callback_url: str, says: str, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(webhook_secret=SECRET, webhook_allow_private=True)) as (client, _app):
        detail = await refused(client, callback_url, "wh-malformed")
        assert says in detail
        assert await list_jobs(client) == []


async def test_a_callback_url_over_the_length_limit_is_a_validation_error(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(webhook_secret=SECRET)) as (client, _app):
        url = "https://example.com/" + "a" * 2048
        response = await client.post("/generate_background", json={**SHORT_JOB, "callback_url": url})
        detail = assert_error(response, 422)
        assert any(error["loc"] == ["body", "callback_url"] for error in detail), detail
        assert await list_jobs(client) == []


# ----- the stored request ------------------------------------------------------------------------------------------


async def test_without_callback_url_the_request_is_stored_in_its_original_shape(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(webhook_secret=SECRET)) as (client, _app):
        accepted = await submit(client, SHORT_JOB)
        view, _ = await poll_job(client, accepted["job_id"])

    assert "callback_url" not in view["request"]
    assert "stream" not in view["request"]
    # (model left out too: a request naming none is stored as the original design wrote it)
    expected = TextGenerationRequest.model_validate(SHORT_JOB).model_dump(mode="json", exclude={"stream", "model"})
    assert view["request"] == expected
    assert view["webhook"] is None
