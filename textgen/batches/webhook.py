"""The batch webhook: one signed POST when a batch ends, retried with backoff, built from the job
webhooks' parts (address checks, pinned connection, HMAC signature, backoff) in ``textgen.webhooks``.

The URL is ``metadata["callback_url"]`` of the batch, else ``TEXTGEN_BATCH_WEBHOOK_URL``. Each attempt is
one coordinator step, so a process that dies between attempts leaves the next one to any other process
(delivery is at least once: dedupe on ``X-TextGen-Delivery``'s batch id).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from textgen.batches.store import Batch
from textgen.batches.view import batch_object
from textgen.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    UnsafeCallbackError,
    backoff_s,
    check_destination,
    pinned_request,
    sign,
)

logger = logging.getLogger(__name__)


class BatchWebhooks:
    def __init__(
        self,
        *,
        secret: str,
        timeout_s: float,
        retry_for_s: float,
        allow_private: bool,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._secret = secret
        self._retry_for_s = retry_for_s
        self._allow_private = allow_private
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, transport=transport)

    async def close(self) -> None:
        await self._client.aclose()

    async def attempt(self, batch: Batch) -> dict[str, Any]:
        """One delivery attempt; the batch's new webhook state (``pending`` with ``next_at``, ``delivered``
        or ``failed``)."""
        attempts = int(batch.webhook.get("attempts", 0)) + 1
        event = f"batch.{batch.status.value}"
        body = json.dumps(
            {"event": event, "sent_at": time.time(), "batch": batch_object(batch)}, separators=(",", ":")
        ).encode()
        error = await self._post(batch, body, event, attempts)
        if error is None:
            logger.info("Webhook for batch %s delivered (attempt %d)", batch.id, attempts)
            return {"state": "delivered", "attempts": attempts}
        ended_at = batch.completed_at or batch.cancelled_at or batch.expired_at or batch.failed_at or time.time()
        next_at = time.time() + backoff_s(attempts)
        if next_at - ended_at > self._retry_for_s:
            logger.warning("Webhook for batch %s failed after %d attempt(s): %s", batch.id, attempts, error)
            return {"state": "failed", "attempts": attempts, "error": error}
        return {"state": "pending", "attempts": attempts, "error": error, "next_at": next_at}

    async def _post(self, batch: Batch, body: bytes, event: str, attempt: int) -> str | None:
        url = batch.callback_url or ""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "textgen-webhooks/1",
            SIGNATURE_HEADER: sign(self._secret, body),
            EVENT_HEADER: event,
            DELIVERY_HEADER: f"{batch.id}:{attempt}",
        }
        try:
            address = await check_destination(url, allow_private=self._allow_private)
            response = await self._client.send(
                pinned_request(self._client, url, address, content=body, headers=headers)
            )
        except UnsafeCallbackError as exc:
            return exc.message
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__} while posting to the callback URL"
        if 200 <= response.status_code < 300:
            return None
        return f"the callback URL answered HTTP {response.status_code}"
