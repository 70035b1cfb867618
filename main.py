"""The FastAPI app. Run it with ``uvicorn main:app``.

No proxy flags are needed: the app decides the client address from the socket peer and
TEXTGEN_TRUSTED_PROXIES, and takes that decision back from uvicorn's own X-Forwarded-For handling at
start-up (``textgen.api.security.take_over_forwarded_headers``).

Nothing is loaded at import time: settings, the model, the engine, the job store and the job runner
are built in the lifespan (``textgen.state``), so tests can build apps with their own settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import Receive, Scope, Send

from textgen.access import parse_networks
from textgen.api import batches, embeddings, files, generate, health, jobs, metrics, openai, responses, stats
from textgen.api.deps import count_request
from textgen.api.errors import install_error_handlers
from textgen.api.middleware import QuietStartupFailure, RequestIdMiddleware
from textgen.api.security import (
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
    ClientAddressMiddleware,
    SettingsCORSMiddleware,
    TextHygieneMiddleware,
    server_config_of,
    take_over_forwarded_headers,
)
from textgen.api.ui import install_ui
from textgen.config import Settings, load_settings
from textgen.errors import ConfigError
from textgen.loader import load_model
from textgen.logging import setup_logging
from textgen.state import ModelLoader, build_state, drain_on_signals, shutdown_state

logger = logging.getLogger("textgen")

# Not counted against TEXTGEN_RATE_LIMIT_RPM: /health, /ready (health.py) and /metrics are polled by
# orchestrators, load balancers and scrapers, often many per minute from one address, and a 429 there
# would take a healthy replica out of service. They do no work for a caller (the playground page and
# its static files, installed by install_ui, are not counted either). Every other route counts.
UNMETERED_ROUTERS = (health, metrics)


class StartupError(SystemExit):
    """Ends the process with one clear log line instead of a traceback."""


class TextGenApp(FastAPI):
    """The FastAPI app, plus one thing only the object the server calls can see: the lifespan's own
    ``receive``, before any layer wraps it, which leads to the serving uvicorn's config
    (``app.state.asgi_server``) so that the lifespan can take X-Forwarded-For handling over from it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.state.asgi_server = server_config_of(receive)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, model_loader: ModelLoader = load_model) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            effective = settings or load_settings()
            setup_logging(effective.log_format, effective.log_level)
            # Before anything is served: only TEXTGEN_TRUSTED_PROXIES may vouch for a client address.
            take_over_forwarded_headers(
                getattr(app.state, "asgi_server", None), parse_networks(effective.trusted_proxies)
            )
            app.state.textgen = await build_state(effective, model_loader)
        except ConfigError as error:
            setup_logging("text", "INFO")
            logger.critical("Cannot start: %s", error)
            raise StartupError(1) from None
        try:
            with drain_on_signals(app.state.textgen):
                yield
        finally:
            await shutdown_state(app.state.textgen)

    app = TextGenApp(
        title="textgen",
        version="0.1.0",
        description="Text generation with continuous batching, durable background jobs and a content filter.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc are served offline by textgen/api/ui.py
        redoc_url=None,
    )
    # Added innermost first: the client address is decided before anything else looks at it; request
    # ids wrap CORS, which wraps the body limit, which wraps auth, which wraps the lone-surrogate check
    # (so only authenticated, size-checked bodies are parsed early).
    app.add_middleware(TextHygieneMiddleware)
    app.add_middleware(APIKeyMiddleware)
    app.add_middleware(BodySizeLimitMiddleware)
    app.add_middleware(SettingsCORSMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(QuietStartupFailure, marker=StartupError.__name__)
    app.add_middleware(ClientAddressMiddleware)
    install_error_handlers(app)
    # Every API route counts against the caller's request limit; the probes do not (see UNMETERED_ROUTERS).
    for module in (generate, jobs, openai, responses, files, batches, health, metrics, stats):
        metered = module not in UNMETERED_ROUTERS
        app.include_router(module.router, dependencies=[Depends(count_request)] if metered else None)
    for router in (embeddings.router, embeddings.tokenizer_router):
        app.include_router(router, dependencies=[Depends(count_request)])
    install_ui(app)
    return app


app = create_app()
