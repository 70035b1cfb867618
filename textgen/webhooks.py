"""Webhooks: when a job with a ``callback_url`` ends, POST it there, signed, retrying for a bounded time.

Safety first: only http/https URLs, and every address the host resolves to must be public unless
``TEXTGEN_WEBHOOK_ALLOW_PRIVATE`` is set, so a callback cannot be used to probe the internal network.
The check runs when the job is submitted (a clear 400) and again before every attempt (DNS can
change). Redirects are not followed: a redirect could point anywhere.

Each POST carries ``X-TextGen-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` keyed with
``TEXTGEN_WEBHOOK_SECRET``; the body holds the job as ``GET /jobs/{id}`` shows it plus the event and
the time it was sent, so a receiver can verify it and drop replays. Delivery is at least once: a
receiver that answered 2xx but whose answer was lost (or a replica that died after the POST) sees
it again, so dedupe by ``X-TextGen-Delivery``'s job id.

This module checks callback URLs and sends (``WebhookSender``); what is delivered when, with claims
and retries, is ``textgen.workers.webhooks``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

from textgen.config import Settings
from textgen.errors import InvalidRequestError

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-TextGen-Signature"
EVENT_HEADER = "X-TextGen-Event"
DELIVERY_HEADER = "X-TextGen-Delivery"
MAX_URL_LENGTH = 2048
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 60.0
_MAX_DOUBLINGS = 32

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeCallbackError(InvalidRequestError):
    """The callback URL is not allowed (scheme, form, or a non-public address)."""


def check_callback_url(url: str) -> str:
    """The URL if its form is acceptable (http/https, a host, no credentials); UnsafeCallbackError if not."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeCallbackError(f"callback_url is longer than {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
        httpx.URL(url)  # what the sender will POST to: it refuses control characters that urlsplit lets through
    except (ValueError, httpx.InvalidURL) as exc:
        raise UnsafeCallbackError(f"callback_url is not a valid URL ({exc}).") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeCallbackError("callback_url must be an http:// or https:// URL.")
    if not parts.hostname:
        raise UnsafeCallbackError("callback_url has no host.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeCallbackError("callback_url must not contain credentials; verify deliveries by their signature.")
    return url


# IPv6 forms that stand for an IPv4 address (checked as that address): NAT64's well-known prefix and the
# deprecated IPv4-compatible form; ipv4_mapped and 6to4 (sixtofour) have their own accessors.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: translation inside one site, never public


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through mapping, 6to4 or NAT64, if it stands for one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    """Globally reachable, judging an IPv6 address that carries an IPv4 one by that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        embedded = embedded_ipv4(address)
        if embedded is not None:
            return embedded.is_global
    return address.is_global


async def resolve(host: str, port: int) -> list[Address]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeCallbackError(f"callback_url host {host!r} does not resolve ({exc}).") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


async def check_destination(url: str, *, allow_private: bool) -> Address:
    """The address to connect to; UnsafeCallbackError unless ``url`` is well formed and (unless allowed)
    resolves only to public addresses."""
    check_callback_url(url)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await resolve(parts.hostname or "", port)
    if not addresses:
        raise UnsafeCallbackError(f"callback_url host {parts.hostname!r} has no address.")
    if allow_private:
        return addresses[0]
    private = sorted({str(a) for a in addresses if not is_public(a)})
    if private:
        raise UnsafeCallbackError(
            f"callback_url resolves to a non-public address ({', '.join(private)}); webhooks only go to public "
            "hosts unless the operator sets TEXTGEN_WEBHOOK_ALLOW_PRIVATE=true."
        )
    return addresses[0]


def pinned_request(client: httpx.AsyncClient, url: str, address: Address, **kwargs: Any) -> httpx.Request:
    """A request that connects to ``address`` (the one just checked) while naming the original host in
    ``Host`` and TLS SNI (so certificates are still verified against it): DNS answering a public address
    to the check and a private one to the connection (rebinding) gains nothing."""
    original = httpx.URL(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    request = client.build_request("POST", original.copy_with(host=host), **kwargs)
    request.headers["Host"] = original.netloc.decode("ascii")
    request.extensions["sni_hostname"] = original.host
    return request


async def check_webhook(url: str, settings: Settings) -> None:
    """What ``/generate_background`` checks before it accepts a ``callback_url``."""
    if not settings.webhook_secret:
        raise InvalidRequestError(
            "Webhooks are off on this server: its operator must set TEXTGEN_WEBHOOK_SECRET (deliveries are "
            "signed with it). Submit without callback_url and poll the job's status_url instead."
        )
    await check_destination(url, allow_private=settings.webhook_allow_private)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver does: constant-time comparison of the header against the body's signature."""
    return hmac.compare_digest(sign(secret, body), signature)


def backoff_s(attempt: int) -> float:
    """Exponential with full jitter: attempt 1 waits up to 1 s, then 2, 4, ... capped at 60 s."""
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)  # 2.0 ** 1024 would overflow a float
    return random.uniform(0, min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2.0**doublings))


class WebhookSender:
    """The one webhook sender: a signed POST to a checked, pinned address, without following redirects.
    Job webhooks (``textgen.workers.webhooks.JobWebhooks``) and the batch webhook
    (``textgen.workers.webhooks.BatchWebhooks``) both send through it; they differ only in what they send
    and how they pace retries."""

    def __init__(
        self,
        *,
        secret: str,
        timeout_s: float,
        allow_private: bool,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._secret = secret
        self._allow_private = allow_private
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, transport=transport)

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, url: str, body: bytes, *, event: str, delivery: str) -> str | None:
        """One signed POST of ``body``; None on a 2xx answer, else what went wrong (safe to show to the
        owner). ``delivery`` (``<id>:<attempt>``) lets a receiver drop a delivery it already has."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "textgen-webhooks/1",
            SIGNATURE_HEADER: sign(self._secret, body),
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery,
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


def sender_from_settings(settings: Settings) -> WebhookSender | None:
    """Deliveries need the signing secret; without it callback URLs are refused at submission."""
    if not settings.webhook_secret:
        return None
    return WebhookSender(
        secret=settings.webhook_secret,
        timeout_s=settings.webhook_timeout_s,
        allow_private=settings.webhook_allow_private,
    )
