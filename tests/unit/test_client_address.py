"""The client address is the app's decision, not uvicorn's.

uvicorn (0.54, pinned) wraps the app it serves in ``ProxyHeadersMiddleware``, which rewrites
``scope["client"]`` from X-Forwarded-For for the peers in ``--forwarded-allow-ips`` (loopback by
default) and keeps no copy of the socket peer. ``take_over_forwarded_headers`` unwraps it on a real
uvicorn ``Config`` before connections are made; ``ClientAddressMiddleware`` then decides from the socket
peer and TEXTGEN_TRUSTED_PROXIES. The real-process checks are in tests/integration/test_proxy_headers.py.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from main import TextGenApp
from textgen.access import AccessPolicy, parse_networks
from textgen.api.security import ClientAddressMiddleware, server_config_of, take_over_forwarded_headers
from textgen.errors import ConfigError


async def inner_app(scope: Any, receive: Any, send: Any) -> None:  # what uvicorn would serve
    raise AssertionError("not called")


def uvicorn_config(**kwargs: Any) -> Config:
    config = Config(app=inner_app, **kwargs)
    config.load()
    return config


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("textgen")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_plain_uvicorn_wraps_the_app_in_its_proxy_headers_middleware_trusting_loopback() -> None:
    """What the take-over relies on (uvicorn 0.54): so a version bump that changes it fails here."""
    config = uvicorn_config()
    assert isinstance(config.loaded_app, ProxyHeadersMiddleware) and config.loaded_app.app is inner_app
    assert "127.0.0.1" in config.loaded_app.trusted_hosts and "::1" in config.loaded_app.trusted_hosts


def test_the_take_over_unwraps_uvicorns_rewrite(logged: list[logging.LogRecord]) -> None:
    config = uvicorn_config()
    take_over_forwarded_headers(config, ())
    assert config.loaded_app is inner_app  # connections made from now on call the app directly
    assert [r.getMessage() for r in logged if r.levelno >= logging.WARNING] == []  # the default: no alarm
    assert any("X-Forwarded-For is believed from nobody" in r.getMessage() for r in logged)


@pytest.mark.parametrize(
    ("allowed", "trusted", "warned"),
    [
        ("*", "", True),
        ("10.0.0.5", "", True),
        ("10.0.0.5", "10.0.0.5", False),
        ("10.0.0.0/8, 127.0.0.1", "127.0.0.1,10.0.0.0/8", False),
        ("", "", False),
    ],
)
def test_an_operators_uvicorn_list_that_differs_is_overruled_with_a_warning(
    logged: list[logging.LogRecord], allowed: str, trusted: str, warned: bool
) -> None:
    config = uvicorn_config(forwarded_allow_ips=allowed)
    take_over_forwarded_headers(config, parse_networks(trusted.split(",")))
    assert not isinstance(config.loaded_app, ProxyHeadersMiddleware)
    warnings = [r.getMessage() for r in logged if r.levelno >= logging.WARNING]
    assert bool(warnings) == warned, warnings
    assert all("set TEXTGEN_TRUSTED_PROXIES" in w for w in warnings)


def test_no_proxy_headers_leaves_nothing_to_take_over() -> None:
    config = uvicorn_config(proxy_headers=False)
    take_over_forwarded_headers(config, ())
    assert config.loaded_app is inner_app


def test_a_uvicorn_the_app_cannot_reach_must_not_trust_other_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/uvicorn", "main:app", "--log-level", "trace"])
    with pytest.raises(ConfigError, match="--forwarded-allow-ips"):
        take_over_forwarded_headers(None, ())
    monkeypatch.setattr(sys, "argv", ["uvicorn", "main:app", "--forwarded-allow-ips", "10.0.0.5"])
    take_over_forwarded_headers(None, parse_networks(["10.0.0.5"]))  # consistent: starts
    monkeypatch.setattr(sys, "argv", ["uvicorn", "main:app", "--no-proxy-headers"])
    take_over_forwarded_headers(None, ())
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pytest"])  # not uvicorn (tests, Ray replicas): nothing to say
    take_over_forwarded_headers(None, ())


async def test_the_app_finds_the_uvicorn_serving_it_from_the_lifespan() -> None:
    assert server_config_of(inner_app) is None
    app = TextGenApp()
    config = Config(app=app)
    config.load()
    lifespan = LifespanOn(config)
    assert server_config_of(lifespan.receive) is config
    await lifespan.startup()  # through uvicorn's ProxyHeadersMiddleware and FastAPI's own wrapping
    try:
        assert app.state.asgi_server is config
    finally:
        await lifespan.shutdown()


def echo_app(trusted: list[str]) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        scope = request.scope
        return JSONResponse({"decided": scope["state"]["client_address"], "client": scope["client"][0],
                             "scheme": scope["scheme"]})  # fmt: skip

    app = Starlette(routes=[Route("/", echo)])
    app.add_middleware(ClientAddressMiddleware)
    app.state.textgen = SimpleNamespace(access=AccessPolicy.from_sources([], None, [], trusted_proxies=trusted))
    return app


async def seen(app: Starlette, peer: str, headers: list[tuple[str, str]]) -> dict[str, str]:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/", headers=httpx.Headers(headers))
        return dict(response.json())


async def test_only_a_trusted_proxy_may_vouch_for_the_client_and_scheme() -> None:
    app = echo_app(["10.0.0.5"])
    forwarded = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.4"), ("X-Forwarded-Proto", "https")]
    assert await seen(app, "10.0.0.5", forwarded) == {"decided": "203.0.113.4", "client": "203.0.113.4",
                                                      "scheme": "https"}  # fmt: skip
    assert await seen(app, "127.0.0.1", forwarded) == {"decided": "127.0.0.1", "client": "127.0.0.1",
                                                       "scheme": "http"}  # fmt: skip
    assert (await seen(app, "10.0.0.5", [("X-Forwarded-Proto", "gopher")]))["scheme"] == "http"
