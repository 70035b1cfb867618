"""``TEXTGEN_JOB_STORE``, parsed once: which backend it means, and where.

``parse_store_url`` is the one place that decides between SQLite and Redis and validates the URL;
every error is a ``ConfigError`` that names the setting, shows the URL without its password and
lists the accepted forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from textgen.errors import ConfigError

SQLITE_FORMS = "sqlite:///relative/path/jobs.db (relative to the current directory) or sqlite:////absolute/path/jobs.db"
REDIS_FORMS = "redis://host:port/db (or rediss:// for TLS; redis://:password@host:port/db with a password)"

_DB_PATH_RE = re.compile(r"/?\d*")


def redact_url(url: str) -> str:
    """Hide any ``user:password@`` part before a URL goes into an error message or a log line."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def hide_password(text: str, url: str) -> str:
    """``text`` (an error message from a client library) with the URL's password masked."""
    password = urlparse(url).password
    return text.replace(password, "***") if password else text


def is_redis_url(url: str) -> bool:
    return url.strip().lower().startswith(("redis://", "rediss://"))


@dataclass(frozen=True)
class StoreURL:
    """A validated ``TEXTGEN_JOB_STORE``: a SQLite file (``path``) or a Redis server (``url``)."""

    kind: Literal["sqlite", "redis"]
    url: str  # as given, without surrounding whitespace (it may hold a password: log ``redacted``)
    path: Path | None = None  # the SQLite file, resolved against the current directory

    @property
    def redacted(self) -> str:
        return redact_url(self.url)


def parse_store_url(url: str) -> StoreURL:
    """The backend ``url`` names; ConfigError saying how to fix an unusable one."""
    text = url.strip()
    if is_redis_url(text):
        check_redis_url(text)
        return StoreURL("redis", text)
    return StoreURL("sqlite", text, sqlite_path_from_url(text))


def sqlite_path_from_url(url: str) -> Path:
    """The database file named by a ``TEXTGEN_JOB_STORE`` URL (relative paths resolved against the
    current directory); ConfigError for other schemes, in-memory or malformed URLs."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme != "sqlite" or not sep or not rest.startswith("/") or len(rest) < 2 or "?" in rest:
        raise ConfigError(f"Invalid TEXTGEN_JOB_STORE {redact_url(text)!r}. Use {SQLITE_FORMS}.")
    target = rest[1:]
    if target == ":memory:" or target.startswith("file::memory:"):
        raise ConfigError(
            "TEXTGEN_JOB_STORE=sqlite:///:memory: is not supported: jobs must be durable (survive restarts "
            f"and be shared by all workers). Point it at a file: {SQLITE_FORMS}."
        )
    path = Path(target)
    return path if path.is_absolute() else Path.cwd() / path


def invalid_redis_url(url: str, why: str) -> ConfigError:
    return ConfigError(f"Invalid TEXTGEN_JOB_STORE {redact_url(url)!r} ({why}). Use {REDIS_FORMS}.")


def check_redis_url(url: str) -> None:
    """ConfigError for what redis-py would accept silently (a db that is not a number) or choke on later."""
    try:
        parsed = urlparse(url)
        port = parsed.port  # raises ValueError when it is not a number in range
    except ValueError:
        port = 0
    if port == 0:
        raise invalid_redis_url(url, "the port is not a number from 1 to 65535")
    if parsed.scheme.lower() not in ("redis", "rediss"):
        raise invalid_redis_url(url, "the scheme must be redis:// or rediss://")
    if not parsed.hostname:
        raise invalid_redis_url(url, "no host")
    if not _DB_PATH_RE.fullmatch(parsed.path):
        raise invalid_redis_url(url, "the path must be a database number, such as /0")
