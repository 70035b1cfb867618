"""The textgen FastAPI app on Ray Serve: N replicas, each with its own model, engine and job runner.

Run it (from the repository root, with the venv's ``ray`` / ``serve``; every machine needs the same
checkout and venv, and ``PYTHONPATH`` pointing at it so replicas can import ``deploy`` and ``main``)::

    PYTHONPATH=$PWD ray start --head --port 6380            # once per cluster (6379 is Redis's port)
    PYTHONPATH=$PWD ray start --address=HEAD_IP:6380        # on every other machine
    serve run deploy/serve_config.yaml                      # or: serve deploy deploy/serve_config.yaml
    serve run deploy.ray_serve:app                          # code defaults, TEXTGEN_* from the shell

The app is not copied into the deployment: ``serve.ingress(build_app)`` hands Ray a builder function
that each replica calls, so every replica runs ``main.create_app()`` and its lifespan (Ray Serve runs
the ASGI lifespan through uvicorn's ``LifespanOn``): settings from ``TEXTGEN_*`` (``runtime_env`` in the
config), the model, the engine and a job runner whose owner id (``host:pid:token``) is unique per
replica process. All replicas must share one job store: ``TEXTGEN_JOB_STORE=redis://...`` across
machines (a SQLite file works only for replicas on one machine). When Ray stops a replica gracefully
(scale-down, redeploy, ``serve shutdown``) it first drains open requests, then runs the lifespan
shutdown, which hands the replica's running jobs back to the queue; a replica that dies outright loses
its job leases after ``TEXTGEN_JOB_LEASE_S`` and a live replica runs those jobs again. (The lifespan's
SIGTERM/SIGINT hook, ``drain_on_signals``, installs nothing here: Ray runs user code off the main
thread, where ``signal.signal`` raises ``ValueError``, which that hook expects; Ray's graceful stop is
what starts the drain.)

Each response carries ``X-TextGen-Replica``: the answering replica's job-runner owner id, the same id
the job store records as a running job's ``owner``, so "who answered" and "who runs this job" can be
matched in logs and in the store.

Nothing here starts Ray: importing the module only declares the deployment.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen.config import Settings

REPLICA_HEADER = b"x-textgen-replica"
REQUEST_ID_HEADER = b"x-request-id"
DEPLOYMENT_NAME = "textgen"

# One replica's engine decodes up to TEXTGEN_MAX_RUNNING (default 64) sequences per step; Ray must let
# that many requests into a replica or the batches stay small. The headroom is for cheap requests
# (/health, /jobs reads, streams of background jobs) that would otherwise wait behind generations.
MAX_ONGOING_REQUESTS = 96
# Past this, Ray answers 503 itself instead of queueing without bound, like TEXTGEN_MAX_WAITING does
# inside one process.
MAX_QUEUED_REQUESTS = 256
# Ray force-kills a replica this long after asking it to stop. The lifespan shutdown needs
# TEXTGEN_SHUTDOWN_GRACE_S for running requests plus a little to hand jobs back and close the store;
# raise it with TEXTGEN_SHUTDOWN_GRACE_S (deploy/serve_config.yaml does).
HANDBACK_MARGIN_S = 10.0
GRACEFUL_SHUTDOWN_TIMEOUT_S = float(Settings.model_fields["shutdown_grace_s"].default) + HANDBACK_MARGIN_S


class ReplicaHeaderMiddleware:
    """Adds ``X-TextGen-Replica: <job-runner owner id>`` to every HTTP response (no buffering).

    It also drops the app's ``X-Request-ID`` when it repeats the id Ray's proxy put in the request: the
    proxy appends that same header to every response, and clients would otherwise get it twice.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replica = replica_id(scope)
        proxy_request_id = header_value(scope.get("headers", []), REQUEST_ID_HEADER)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if (k.lower(), v) != proxy_request_id]
                if replica is not None:
                    headers.append((REPLICA_HEADER, replica.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_replica)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> tuple[bytes, bytes] | None:
    """The first ``(name, value)`` pair of ``headers`` named ``name`` (lower-case), if any."""
    return next(((key.lower(), value) for key, value in headers if key.lower() == name), None)


def replica_id(scope: Scope) -> str | None:
    """The owner id of this process's job runner; None before the lifespan built the service."""
    state = getattr(getattr(scope.get("app"), "state", None), "textgen", None)
    runner = getattr(state, "runner", None)
    owner = getattr(runner, "owner", None)
    return owner if isinstance(owner, str) else None


def build_app() -> FastAPI:
    """Called on each replica: the same app ``uvicorn main:app`` serves, plus the replica header."""
    # Imported here, on the replica: ``main`` pulls in torch, which the driver and controller never need.
    from main import create_app
    from textgen.access import AccessPolicy, warn_if_uvicorn_trusts_other_proxies
    from textgen.config import load_settings

    # Ray's HTTP proxy is a uvicorn configured only by FORWARDED_ALLOW_IPS in the cluster's environment
    # (default: believe X-Forwarded-For from loopback); say so when it differs from TEXTGEN_TRUSTED_PROXIES.
    warn_if_uvicorn_trusts_other_proxies(AccessPolicy.from_settings(load_settings()), argv=["uvicorn"])
    app = create_app()
    app.add_middleware(ReplicaHeaderMiddleware)
    return app


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
    health_check_period_s=10.0,
    health_check_timeout_s=30.0,
)
@serve.ingress(build_app)
class TextGenDeployment:
    """One replica. Routes, lifespan and middleware are the app's; this class adds Ray's health check."""

    # Provided at run time by serve.ingress's wrapper class (ASGIAppReplicaWrapper.app): the app
    # build_app returned on this replica.
    app: FastAPI

    async def check_health(self) -> None:
        """Ray calls this every ``health_check_period_s``; raising marks the replica unhealthy, and after
        three failures in a row Ray replaces it (the old one's lifespan shutdown hands its jobs back).

        Unhealthy means the engine stopped while nobody asked it to (its inference thread died). A
        replica that is draining is stopping on purpose and stays healthy so Ray lets it finish. It runs
        on the replica's event loop, so a blocked loop also fails it (by timeout). The job store is not
        probed: a store outage would fail every replica at once, and restarting them would not help.
        """
        state = getattr(self.app.state, "textgen", None)
        if state is None:
            raise RuntimeError("the app's lifespan did not build the service")
        if not state.engine.ready and not state.shutting_down:
            raise RuntimeError(f"the {state.engine.name} engine is not running")


app = TextGenDeployment.bind()
