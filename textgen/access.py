"""Who the caller is: API key -> owner id, admin or not, and the client address behind trusted proxies.

Policy only (no HTTP framework): the API-key middleware asks ``AccessPolicy`` to identify a request and
records the answer as a ``Caller`` in ``scope["state"]["caller"]``; the job store, the rate limiter and the
routes read it from there (``caller_of`` / ``owner_id_of``).

- **Owner id**: every job belongs to the owner id of the key that made it: ``key:`` and 16 hex digits of
  the key's sha256, so the key itself is never stored, logged or shown. Without configured keys every
  caller is the one ``anonymous`` owner.
- **Admin keys** (``TEXTGEN_ADMIN_API_KEYS``) see and cancel every owner's jobs.
- **Rate-limit key**: the owner id for keyed callers; without keys, the client address.
- **Client address**: the socket peer unless that peer is one of ``TEXTGEN_TRUSTED_PROXIES`` (then the
  right-most untrusted ``X-Forwarded-For`` entry). This is the only place that decides it: the app takes
  the decision back from uvicorn's own proxy-headers handling at start-up (``textgen.api.security``).
- **Failed keys**: ``FailedKeyLimiter`` throttles missing or invalid keys per client address without
  ever refusing a valid key.
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

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` is one of TEXTGEN_TRUSTED_PROXIES (whose forwarded headers are believed)."""
        return bool(peer and self.trusted_proxies and _in_networks(peer, self.trusted_proxies))

    def client_address(self, peer: str | None, headers: Mapping[str, str]) -> str:
        """The socket peer, or, when that peer is a trusted proxy, the right-most ``X-Forwarded-For``
        address that is not itself a trusted proxy."""
        address = peer or "unknown"
        if not self.trusts(peer):
            return address
        hops = [hop.strip() for hop in headers.get("x-forwarded-for", "").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not _in_networks(hop, self.trusted_proxies):
                return hop
        return hops[0] if hops else address

    def forwarded_scheme(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """``http``/``https`` from a trusted proxy's ``X-Forwarded-Proto``; None otherwise."""
        if not self.trusts(peer):
            return None
        scheme = headers.get("x-forwarded-proto", "").strip().lower()
        return scheme if scheme in ("http", "https") else None

    def identify(self, path: str, authorization: str | None, peer: str | None, headers: Mapping[str, str]) -> Caller:
        """The caller of a request from its socket peer; see ``caller``."""
        return self.caller(path, authorization, self.client_address(peer, headers))

    def caller(self, path: str, authorization: str | None, client: str) -> Caller:
        """The caller of a request from ``client`` (the address ``client_address`` decided);
        UnauthorizedError when keys are on, the path is not exempt and the key is missing or wrong.
        The key is compared with every configured key in constant time, whatever else is going on."""
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


@dataclass(frozen=True)
class KeyFailure:
    """What one missing or invalid key from an address led to."""

    count: int  # failures from the address in the last minute, this one included
    retry_after_s: float | None  # None: answer 401; else the address is locked out: 429 for this long


@dataclass
class _Lockout:
    since: float
    refused: int = 0


class FailedKeyLimiter:
    """Missing or invalid keys per client address in the last minute (this process).

    After ``per_minute`` failures within a minute the address is locked out: its further missing or
    invalid keys get 429 instead of 401 until the ``per_minute``-th most recent failure is a minute old
    (failures while locked out count, so a guesser that keeps going stays locked out). Only failures are
    ever recorded: a valid key is checked like any other (in constant time) and is neither charged nor
    refused, so one client guessing keys cannot lock out the others behind the same NAT or proxy. The
    start and the end of each lockout are logged once; the refusals in between are only counted. Memory:
    at most ``per_minute`` timestamps for each of at most ``MAX_TRACKED`` addresses.
    """

    WINDOW_S = 60.0
    MAX_TRACKED = 10_000  # addresses remembered; the least recently failing ones are forgotten first
    SWEEP_EVERY_S = 1.0  # how often lockouts that ended are looked for (and logged as over)
    UNLIMITED_MEMORY = 64  # failures kept per address when the limit is off (for the log's count)

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lockouts: dict[str, _Lockout] = {}
        self._next_sweep = 0.0

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            return deque(maxlen=self.per_minute if self.per_minute > 0 else self.UNLIMITED_MEMORY)
        cutoff = now - self.WINDOW_S
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return failures

    def _lockout_ends(self, failures: deque[float]) -> float | None:
        # The deque holds at most per_minute failures: full means per_minute of them within the window.
        if self.per_minute <= 0 or len(failures) < self.per_minute:
            return None
        return failures[0] + self.WINDOW_S

    def retry_after_s(self, client: str) -> float | None:
        """Seconds until the lockout of ``client`` ends; None when it is not locked out."""
        now = self._clock()
        self._sweep(now)
        self._end_lockout_if_over(client, now)
        ends = self._lockout_ends(self._recent(client, now))
        return None if ends is None else max(1.0, ends - now)

    def record(self, client: str) -> KeyFailure:
        """Count one missing or invalid key from ``client``."""
        now = self._clock()
        self._sweep(now)
        self._end_lockout_if_over(client, now)
        failures = self._recent(client, now)
        locked = self._lockout_ends(failures) is not None
        failures.append(now)
        self._remember(client, failures)
        ends = self._lockout_ends(failures)
        if locked and ends is not None:
            lockout = self._lockouts.setdefault(client, _Lockout(since=now))
            lockout.refused += 1
            return KeyFailure(len(failures), max(1.0, ends - now))
        if ends is not None:  # this failure used up the budget: answered 401, the next ones 429
            self._start_lockout(client, now, len(failures))
        return KeyFailure(len(failures), None)

    def _remember(self, client: str, failures: deque[float]) -> None:
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self.MAX_TRACKED:
            forgotten, _ = self._failures.popitem(last=False)
            self._lockouts.pop(forgotten, None)

    def _start_lockout(self, client: str, now: float, count: int) -> None:
        self._lockouts[client] = _Lockout(since=now)
        logger.warning(
            "Locking out missing or invalid API keys from %s: %d in the last minute "
            "(TEXTGEN_AUTH_FAILURES_PER_MINUTE=%d). They get 429 until a minute passes with fewer; "
            "valid keys from there still work.",
            client,
            count,
            self.per_minute,
        )

    def sweep(self) -> None:
        """Notice the lockouts that ended (the API-key middleware calls this on every request, so an
        end is logged at the next request, from any address, after it)."""
        self._sweep(self._clock())

    def _sweep(self, now: float) -> None:
        """Log (once) and forget the lockouts that ended; at most once a second, whoever asks."""
        if now < self._next_sweep or not self._lockouts:
            return
        self._next_sweep = now + self.SWEEP_EVERY_S
        for client in list(self._lockouts):
            self._end_lockout_if_over(client, now)

    def _end_lockout_if_over(self, client: str, now: float) -> None:
        lockout = self._lockouts.get(client)
        if lockout is None:
            return
        failures = self._failures.get(client)
        ends = self._lockout_ends(failures) if failures is not None else None
        if ends is not None and ends > now:
            return
        del self._lockouts[client]
        lasted = (ends if ends is not None else now) - lockout.since
        logger.warning(
            "Lockout of missing or invalid API keys from %s is over after %.0f s (%d refused meanwhile).",
            client,
            max(0.0, lasted),
            lockout.refused,
        )


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


MIN_KEY_CHARS = 20  # shorter keys get a start-up warning (see warn_about_short_keys)


def warn_about_short_keys(policy: AccessPolicy) -> bool:
    """A locked-out address still has its keys checked (so that a valid key from behind the same NAT
    works), so a guesser can try keys as fast as the server answers: what bounds guessing is the key's
    length. Say which keys (by owner id, never the key) are short enough to matter."""
    short = [owner_id_for_key(key.decode()) for key in policy.keys if len(key) < MIN_KEY_CHARS]
    if not short:
        return False
    logger.warning(
        "%d API key(s) shorter than %d characters (%s): keys from a locked-out address are still checked, so that "
        "valid ones keep working, so only a key's length bounds guessing. Use long random keys, e.g. "
        "`openssl rand -hex 32`.",
        len(short),
        MIN_KEY_CHARS,
        ", ".join(short),
    )
    return True


UVICORN_DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"  # uvicorn's default (FORWARDED_ALLOW_IPS unset)


def uvicorn_forwarded_allow_ips(argv: list[str], environ: Mapping[str, str]) -> str | None:
    """The --forwarded-allow-ips uvicorn was started with (or its env default), as far as the command
    line shows; None when the process does not look like uvicorn."""
    program = argv[0].replace("\\", "/") if argv else ""
    if program.rsplit("/", 1)[-1] != "uvicorn" and not program.endswith("uvicorn/__main__.py"):
        return None  # not `uvicorn ...` nor `python -m uvicorn ...` (pytest -k uvicorn is not uvicorn)
    if "--no-proxy-headers" in argv:
        return ""
    for index, arg in enumerate(argv):
        if arg == "--forwarded-allow-ips" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--forwarded-allow-ips="):
            return arg.split("=", 1)[1]
    return environ.get("FORWARDED_ALLOW_IPS", UVICORN_DEFAULT_FORWARDED_ALLOW_IPS)


def describe_networks(networks: tuple[IPNetwork, ...]) -> str:
    return ",".join(sorted(str(network) for network in networks))


def trusts_other_proxies(allowed: str | Iterable[str], networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a server's forwarded-allow-ips list (``allowed``) differs from ``networks``."""
    entries = allowed.split(",") if isinstance(allowed, str) else list(allowed)
    try:
        theirs = {str(network) for network in parse_networks(entries)}
    except ConfigError:  # "*" or host names: certainly not what we trust
        return True
    return theirs != {str(network) for network in networks}


def warn_if_uvicorn_trusts_other_proxies(
    policy: AccessPolicy, argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """For a uvicorn the app cannot reach (Ray Serve's HTTP proxy): it rewrites the client address from
    X-Forwarded-For for the peers it trusts (loopback by default) before the app sees it; say so when
    that differs from TEXTGEN_TRUSTED_PROXIES."""
    env = os.environ if environ is None else environ
    allowed = uvicorn_forwarded_allow_ips(sys.argv if argv is None else argv, env)
    if allowed is None or not trusts_other_proxies(allowed, policy.trusted_proxies):
        return False
    logger.warning(
        "uvicorn believes X-Forwarded-For from %s but TEXTGEN_TRUSTED_PROXIES is %r: a caller there could pick "
        "its own client address (and rate-limit bucket). Set FORWARDED_ALLOW_IPS to match TEXTGEN_TRUSTED_PROXIES "
        "(python -m textgen.access prints it).",
        allowed or "nobody",
        describe_networks(policy.trusted_proxies),
    )
    return True


def forwarded_allow_ips() -> str:
    """A uvicorn's FORWARDED_ALLOW_IPS for the configured TEXTGEN_TRUSTED_PROXIES ('' = trust nobody); only
    needed where the app cannot take the decision over itself (Ray Serve's HTTP proxy)."""
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


if __name__ == "__main__":  # `python -m textgen.access`: the value for Ray's FORWARDED_ALLOW_IPS
    sys.stdout.write(forwarded_allow_ips() + "\n")
