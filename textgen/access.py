"""Who the caller is: API key -> owner id, admin or not, and the client address behind trusted proxies.

Policy only (no HTTP framework): the API-key middleware asks ``AccessPolicy`` to identify a request and
records the answer as a ``Caller`` in ``scope["state"]["caller"]``; the job store, the rate limiter and the
routes read it from there (``caller_of`` / ``owner_id_of``).

- **Owner id**: every job belongs to the owner id of the key that made it: ``key:`` and 16 hex digits of
  the key's sha256, so the key itself is never stored, logged or shown. Without configured keys every
  caller is the one ``anonymous`` owner.
- **Admin keys** (``TEXTGEN_ADMIN_API_KEYS``) see and cancel every owner's jobs.
- **Rate-limit key**: the owner id for keyed callers; without keys, the client address, which is the
  socket peer unless that peer is one of ``TEXTGEN_TRUSTED_PROXIES`` (then the right-most untrusted
  ``X-Forwarded-For`` entry).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textgen.errors import ConfigError, UnauthorizedError

logger = logging.getLogger(__name__)

ANONYMOUS_OWNER = "anonymous"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def owner_id_for_key(key: str) -> str:
    """The stable owner id of an API key (a short sha256; the key cannot be recovered from it)."""
    return "key:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class Caller:
    """The identified caller of one request."""

    owner_id: str  # whose jobs these are: owner_id_for_key(key), or ANONYMOUS_OWNER without keys
    rate_key: str  # what rate limits count against: the owner id, or "client:<address>" without keys
    client: str  # the client address (after trusted proxies)
    admin: bool = False

    @property
    def visible_owner(self) -> str | None:
        """The owner whose jobs this caller may see: its own, or None (= every owner) for an admin."""
        return None if self.admin else self.owner_id


def parse_networks(entries: Iterable[str], setting: str = "TEXTGEN_TRUSTED_PROXIES") -> tuple[IPNetwork, ...]:
    """Addresses or CIDR networks; ConfigError naming ``setting`` for anything else."""
    networks: list[IPNetwork] = []
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        if text == "*":
            raise ConfigError(
                f"{setting}='*' would believe X-Forwarded-For from anyone; list the proxies' addresses or networks."
            )
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(
                f"{setting}: {text!r} is not an IP address or network; use e.g. 10.0.0.5,10.1.0.0/16."
            ) from None
    return tuple(networks)


def _in_networks(host: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(address in network for network in networks)


def _read_keys_file(path: Path, setting: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise ConfigError(f"Cannot read {setting} {path}: {reason}.") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _matches_any(candidate: bytes, keys: tuple[bytes, ...]) -> bool:
    # Compare against every key, without stopping early, so timing says nothing about the keys.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


@dataclass(frozen=True)
class AccessPolicy:
    keys: tuple[bytes, ...]  # every accepted key, admin keys included
    exempt_paths: frozenset[str]
    admin_keys: tuple[bytes, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = field(default_factory=tuple)

    @classmethod
    def from_sources(
        cls,
        keys: Iterable[str],
        keys_file: Path | None,
        exempt_paths: Iterable[str],
        *,
        admin_keys: Iterable[str] = (),
        admin_keys_file: Path | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> AccessPolicy:
        all_keys = [k.strip() for k in keys if k.strip()]
        if keys_file is not None:
            all_keys += _read_keys_file(keys_file, "TEXTGEN_API_KEYS_FILE")
        admins = [k.strip() for k in admin_keys if k.strip()]
        if admin_keys_file is not None:
            admins += _read_keys_file(admin_keys_file, "TEXTGEN_ADMIN_API_KEYS_FILE")
        every_key = list(dict.fromkeys([*all_keys, *admins]))
        return cls(
            keys=tuple(k.encode() for k in every_key),
            exempt_paths=frozenset(exempt_paths),
            admin_keys=tuple(k.encode() for k in admins),
            trusted_proxies=parse_networks(trusted_proxies),
        )

    @classmethod
    def from_settings(cls, settings: Any) -> AccessPolicy:
        """The policy ``Settings`` describe (keys, admin keys, exempt paths, trusted proxies)."""
        exempt = [p for p in settings.auth_exempt_paths if not (settings.metrics_require_key and p == "/metrics")]
        return cls.from_sources(
            settings.api_keys,
            settings.api_keys_file,
            exempt,
            admin_keys=settings.admin_api_keys,
            admin_keys_file=settings.admin_api_keys_file,
            trusted_proxies=settings.trusted_proxies,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def _bearer(self, authorization: str | None) -> bytes:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError()
        return token.strip().encode("utf-8", "surrogateescape")

    def principal_for(self, authorization: str | None) -> str:
        """The owner id for a valid ``Bearer`` key; UnauthorizedError otherwise."""
        candidate = self._bearer(authorization)
        if not _matches_any(candidate, self.keys):
            raise UnauthorizedError()
        return owner_id_for_key(candidate.decode("utf-8", "surrogateescape"))

    def client_address(self, peer: str | None, headers: Mapping[str, str]) -> str:
        """The socket peer, or, when that peer is a trusted proxy, the right-most ``X-Forwarded-For``
        address that is not itself a trusted proxy."""
        address = peer or "unknown"
        if not self.trusted_proxies or not _in_networks(address, self.trusted_proxies):
            return address
        hops = [hop.strip() for hop in headers.get("x-forwarded-for", "").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not _in_networks(hop, self.trusted_proxies):
                return hop
        return hops[0] if hops else address

    def identify(self, path: str, authorization: str | None, peer: str | None, headers: Mapping[str, str]) -> Caller:
        """The caller of a request; UnauthorizedError when keys are on, the path is not exempt and the
        key is missing or wrong."""
        client = self.client_address(peer, headers)
        anonymous = Caller(owner_id=ANONYMOUS_OWNER, rate_key=f"client:{client}", client=client)
        if not self.enabled:
            return anonymous
        try:
            candidate = self._bearer(authorization)
            if not _matches_any(candidate, self.keys):
                raise UnauthorizedError()
        except UnauthorizedError:
            if path in self.exempt_paths:  # health checks and scrapers need no key (a wrong one is ignored)
                return anonymous
            raise
        owner = owner_id_for_key(candidate.decode("utf-8", "surrogateescape"))
        return Caller(owner_id=owner, rate_key=owner, client=client, admin=_matches_any(candidate, self.admin_keys))


class FailedKeyLimiter:
    """Wrong or missing keys per client address in the last minute (this process): after
    ``per_minute`` failures the address gets 429 until the oldest failure is a minute old."""

    WINDOW_S = 60.0
    MAX_TRACKED = 10_000  # addresses remembered; the least recently failing ones are forgotten first

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            return deque()
        cutoff = self._clock() - self.WINDOW_S
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return failures

    def retry_after_s(self, client: str) -> float | None:
        """Seconds until ``client`` may try a key again; None when it may now."""
        if self.per_minute <= 0:
            return None
        failures = self._recent(client)
        if len(failures) < self.per_minute:
            return None
        return max(1.0, failures[-self.per_minute] + self.WINDOW_S - self._clock())

    def record(self, client: str) -> int:
        """Count one failure; returns the failures of ``client`` in the last minute."""
        failures = self._recent(client)
        failures.append(self._clock())
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self.MAX_TRACKED:
            self._failures.popitem(last=False)
        return len(failures)


def is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_host_from_argv(argv: list[str] | None = None) -> str | None:
    """The --host uvicorn was started with, if visible (``uvicorn main:app --host 0.0.0.0``)."""
    args = sys.argv if argv is None else argv
    for index, arg in enumerate(args):
        if arg == "--host" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def warn_if_exposed_without_keys(policy: AccessPolicy, host: str | None) -> bool:
    if policy.enabled or is_loopback(host):
        return False
    logger.warning(
        "!!! SECURITY: serving on %s without API keys: anyone who can reach this address can use the model. "
        "Set TEXTGEN_API_KEYS (or TEXTGEN_API_KEYS_FILE), or bind to 127.0.0.1. !!!",
        host,
    )
    return True


def _uvicorn_forwarded_allow_ips(argv: list[str], environ: Mapping[str, str]) -> str | None:
    """The --forwarded-allow-ips uvicorn was started with (or its env default); None when the process
    does not look like uvicorn."""
    if not argv or not any("uvicorn" in part for part in argv[:3]):
        return None
    for index, arg in enumerate(argv):
        if arg == "--forwarded-allow-ips" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--forwarded-allow-ips="):
            return arg.split("=", 1)[1]
    return environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")


def warn_if_uvicorn_trusts_other_proxies(
    policy: AccessPolicy, argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """uvicorn rewrites the client address from X-Forwarded-For for the peers it trusts (loopback by
    default) before the app sees it; say so when that differs from TEXTGEN_TRUSTED_PROXIES."""
    env = os.environ if environ is None else environ
    allowed = _uvicorn_forwarded_allow_ips(sys.argv if argv is None else argv, env)
    if allowed is None:
        return False
    ours = {str(network) for network in policy.trusted_proxies}
    try:
        theirs = {str(network) for network in parse_networks(allowed.split(","))}
    except ConfigError:  # "*" or host names: certainly not what we trust
        theirs = {allowed}
    if theirs == ours:
        return False
    logger.warning(
        "uvicorn believes X-Forwarded-For from %s but TEXTGEN_TRUSTED_PROXIES is %r: a caller there could pick "
        "its own client address (and rate-limit bucket). Start uvicorn with --forwarded-allow-ips matching "
        "TEXTGEN_TRUSTED_PROXIES (`make run` and the Procfile do: python -m textgen.access prints it).",
        allowed or "nobody",
        ",".join(sorted(ours)),
    )
    return True


def forwarded_allow_ips() -> str:
    """uvicorn's --forwarded-allow-ips for the configured TEXTGEN_TRUSTED_PROXIES ('' = trust nobody)."""
    from textgen.config import load_settings

    return ",".join(str(network) for network in parse_networks(load_settings().trusted_proxies))


def caller_of(scope: Mapping[str, Any]) -> Caller:
    """The caller the API-key middleware identified (anonymous when it did not run, as in unit tests)."""
    caller = scope.get("state", {}).get("caller")
    if isinstance(caller, Caller):
        return caller
    client = scope.get("client")
    address = str(client[0]) if client else "unknown"
    return Caller(owner_id=ANONYMOUS_OWNER, rate_key=f"client:{address}", client=address)


def owner_id_of(scope: Mapping[str, Any]) -> str:
    """The owner id of the request's caller: what every job, batch or file it creates is stored under."""
    return caller_of(scope).owner_id


if __name__ == "__main__":  # `python -m textgen.access`: the value for uvicorn's --forwarded-allow-ips
    sys.stdout.write(forwarded_allow_ips() + "\n")
