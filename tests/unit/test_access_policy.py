"""``textgen.access``: owner ids, admin keys, the client address behind trusted proxies, and the
start-up warning when uvicorn believes X-Forwarded-For from other peers than the service does."""

from __future__ import annotations

import logging

import pytest

from textgen.access import ANONYMOUS_OWNER, AccessPolicy, owner_id_for_key, warn_if_uvicorn_trusts_other_proxies
from textgen.errors import UnauthorizedError


def policy(**kwargs: object) -> AccessPolicy:
    return AccessPolicy.from_sources(["alice", "bob"], None, ["/health"], **kwargs)  # type: ignore[arg-type]


def test_owner_ids_are_stable_and_hide_the_key() -> None:
    assert owner_id_for_key("alice") == owner_id_for_key("alice") != owner_id_for_key("bob")
    assert "alice" not in owner_id_for_key("alice") and owner_id_for_key("alice").startswith("key:")


def test_identify_keys_admins_and_exempt_paths() -> None:
    access = policy(admin_keys=["root"])
    alice = access.identify("/jobs", "Bearer alice", "10.0.0.1", {})
    assert alice.owner_id == owner_id_for_key("alice") == alice.rate_key and not alice.admin
    assert alice.visible_owner == alice.owner_id
    root = access.identify("/jobs", "Bearer root", "10.0.0.1", {})
    assert root.admin and root.visible_owner is None
    with pytest.raises(UnauthorizedError):
        access.identify("/jobs", "Bearer mallory", "10.0.0.1", {})
    health = access.identify("/health", "Bearer stale", "10.0.0.1", {})  # a wrong key is ignored there
    assert health.owner_id == ANONYMOUS_OWNER and health.rate_key == "client:10.0.0.1"
    anonymous = AccessPolicy.from_sources([], None, []).identify("/jobs", None, "10.0.0.9", {})
    assert anonymous.owner_id == ANONYMOUS_OWNER and anonymous.rate_key == "client:10.0.0.9"


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # not a proxy: the header is ignored
        ("10.0.0.5", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.5", "6.6.6.6, 1.2.3.4", "1.2.3.4"),  # the right-most hop the proxy saw, not a spoofed one
        ("10.0.0.5", "1.2.3.4, 10.1.2.3", "1.2.3.4"),  # a chain of trusted proxies
        ("10.0.0.5", "", "10.0.0.5"),
        ("10.0.0.5", "10.1.0.1", "10.1.0.1"),  # only proxies: the left-most
    ],
)
def test_client_address_behind_trusted_proxies(peer: str, forwarded: str, expected: str) -> None:
    access = policy(trusted_proxies=["10.0.0.5", "10.1.0.0/16"])
    assert access.client_address(peer, {"x-forwarded-for": forwarded}) == expected


def test_uvicorn_mismatch_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="textgen.access")
    none = policy()
    assert warn_if_uvicorn_trusts_other_proxies(none, ["uvicorn", "main:app"], {})  # uvicorn trusts loopback
    assert "TEXTGEN_TRUSTED_PROXIES" in caplog.text
    assert not warn_if_uvicorn_trusts_other_proxies(none, ["uvicorn", "main:app", "--forwarded-allow-ips", ""], {})
    assert not warn_if_uvicorn_trusts_other_proxies(none, ["/venv/uvicorn/__main__.py"], {"FORWARDED_ALLOW_IPS": ""})
    proxied = policy(trusted_proxies=["10.0.0.5"])
    assert not warn_if_uvicorn_trusts_other_proxies(proxied, ["uvicorn", "--forwarded-allow-ips=10.0.0.5"], {})
    assert warn_if_uvicorn_trusts_other_proxies(proxied, ["uvicorn", "--forwarded-allow-ips", "*"], {})
    assert not warn_if_uvicorn_trusts_other_proxies(none, ["/usr/bin/pytest"], {})  # not uvicorn: nothing to say
    assert not warn_if_uvicorn_trusts_other_proxies(none, ["/usr/bin/pytest", "-k", "uvicorn"], {})
    assert warn_if_uvicorn_trusts_other_proxies(none, ["/srv/.venv/bin/uvicorn", "main:app"], {})
