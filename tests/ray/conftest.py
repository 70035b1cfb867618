"""Ray fixtures: a local Ray cluster started and stopped inside the test module, and the app deployed on it.

``ray_cluster`` (module scope) starts Ray on 2 CPUs with a small object store, no dashboard and no usage
reporting, under its own short temp dir (Unix socket paths must stay under 108 bytes), then Serve's HTTP
proxy on a free loopback port. Its finalizer runs ``serve.shutdown()`` and ``ray.shutdown()`` and fails
if any process started under that temp dir (raylet, gcs_server, workers) outlives them.

``deployer`` (module scope) deploys ``deploy/serve_config.yaml`` the way an operator does, with ``serve
run --non-blocking`` against that cluster, after overriding only what the test needs: the replica count,
half a CPU per replica, a short drain-check loop, and ``TEXTGEN_*`` for the tiny test model and a job
store every replica shares (the session's real redis-server, in a database of its own, flushed first).
Because the config path gives the application a code version from its config, changing only
``num_replicas`` adds or stops replicas without restarting the others, as in production. ``textgen``
(per test) puts the base deployment back if a test changed it and waits until its replicas are all
running. Replica logs are streamed to the driver, so a failing test shows them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.net import free_port
from tests.support.redis import RedisServer
from tests.support.server import require_server_marker
from tests.support.waiting import wait_until_sync
from textgen.backends import job_store_from_url
from textgen.jobs.store import JobStore

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"
APP_NAME = "textgen"
REPLICAS = 2
OBJECT_STORE_BYTES = 100 * 1024 * 1024
REDIS_DB = 7  # tests/unit uses db 0; this module flushes its own
LEASE_S = 2.0
DEPLOYMENT_NAME = "textgen"
CLI_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 90.0
# Environment for Ray itself (inherited by raylet and every worker): no auth tokens, no usage reporting
# (there is no network), no hub downloads.
# FORWARDED_ALLOW_IPS: Ray's HTTP proxy is a uvicorn that reads it (default: believe X-Forwarded-For from
# loopback); empty matches the replicas' empty TEXTGEN_TRUSTED_PROXIES, as deploy/serve_config.yaml says.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "FORWARDED_ALLOW_IPS": "",
}
SHUTDOWN_WAIT_S = 20.0
GRACEFUL_WAIT_LOOP_S = 0.2


@dataclass(frozen=True)
class RayCluster:
    url: str
    temp_dir: Path


@dataclass(frozen=True)
class TextGenOnRay:
    """The app as deployed: Serve's URL and the replicas' environment."""

    url: str
    env: dict[str, str]

    @property
    def job_store(self) -> str:
        return self.env["TEXTGEN_JOB_STORE"]

    @property
    def lease_s(self) -> float:
        return float(self.env["TEXTGEN_JOB_LEASE_S"])

    @property
    def job_concurrency(self) -> int:
        return int(self.env["TEXTGEN_JOB_CONCURRENCY"])


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every process (but this one) whose command line contains ``text``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if text in cmdline:
                found[int(entry.name)] = cmdline
    return found


def wait_until_gone(text: str, timeout_s: float) -> dict[int, str]:
    """Processes still mentioning ``text`` after ``timeout_s`` (empty once all have exited)."""
    with contextlib.suppress(AssertionError):
        wait_until_sync(lambda: not processes_mentioning(text), timeout_s, "Ray's processes exiting", interval_s=0.2)
    return processes_mentioning(text)


def stop_ray(temp_dir: Path) -> None:
    """Serve, then Ray; fail (after killing them) if processes of this cluster are left behind."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():  # else serve.shutdown() would start a Ray of its own to connect to
            serve.shutdown()
    finally:
        ray.shutdown()
    left = wait_until_gone(str(temp_dir), SHUTDOWN_WAIT_S)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes outlived ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    import ray
    from ray import serve

    require_server_marker()  # Serve's HTTP proxy is a real server process

    # Short and ours: socket paths must fit in 108 bytes, and leftovers are found by this path.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_ENV.items():
            env.setenv(name, value)
        try:
            ray.init(
                num_cpus=2,
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                _temp_dir=str(temp_dir),
                log_to_driver=True,
            )
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield RayCluster(f"http://127.0.0.1:{port}", temp_dir)
        finally:
            stop_ray(temp_dir)


@pytest.fixture(scope="module")
def job_store_url(redis_server: RedisServer) -> str:
    import redis

    url = redis_server.url(REDIS_DB)
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        client.flushdb()
    return url


def replica_env(model_dir: Path, cache_dir: Path, job_store: str) -> dict[str, str]:
    return {
        "TEXTGEN_MODEL": str(model_dir),
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_JOB_STORE": job_store,
        "TEXTGEN_JOB_POLL_INTERVAL_S": "0.1",
        "TEXTGEN_JOB_LEASE_S": str(LEASE_S),
        "TEXTGEN_JOB_CONCURRENCY": "8",
        # Spurious lease losses on a busy 2-core machine must not fail a job before it can finish.
        "TEXTGEN_JOB_MAX_ATTEMPTS": "5",
        "TEXTGEN_SHUTDOWN_GRACE_S": "2",
        "TEXTGEN_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        # Replicas import deploy.ray_serve and main from the checkout, as on a real cluster.
        "PYTHONPATH": str(REPO_ROOT),
    }


def serve_config(env: dict[str, str], replicas: int) -> dict[str, Any]:
    """deploy/serve_config.yaml with the test's environment, replica count and CPU share."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    (application,) = config["applications"]
    application["runtime_env"]["env_vars"] = {**application["runtime_env"]["env_vars"], **env}
    (deployment,) = application["deployments"]
    deployment["num_replicas"] = replicas
    # Half a CPU each leaves room for the replacement Ray starts after a replica is killed, and for
    # starting all new replicas of a changed config at once (the surge) instead of one by one.
    deployment["ray_actor_options"]["num_cpus"] = 0.5
    deployment["max_surge_percent"] = 100
    # Ray sleeps one wait loop before its first look for open requests, even on an idle replica: with the
    # config's 2 s every stop (redeploy, scale-down, shutdown) took 2 s longer than its drain needs.
    deployment["graceful_shutdown_wait_loop_s"] = GRACEFUL_WAIT_LOOP_S
    return dict(config)


def deployment_state() -> tuple[str, int, int]:
    """(application status, running replicas, all replicas) as Serve's controller reports them."""
    from ray import serve

    application = serve.status().applications.get(APP_NAME)
    if application is None or DEPLOYMENT_NAME not in application.deployments:
        return "MISSING", 0, 0
    states = application.deployments[DEPLOYMENT_NAME].replica_states
    return str(application.status.value), states.get("RUNNING", 0), sum(states.values())


class Deployer:
    """Applies serve configs with Serve's own CLI and waits until the replicas match them."""

    def __init__(self, cluster: RayCluster, base_env: dict[str, str], workdir: Path) -> None:
        self.cluster = cluster
        self.base_env = base_env
        self.workdir = workdir
        self.applied: dict[str, Any] | None = None

    def deploy(self, replicas: int = REPLICAS, **env: str) -> TextGenOnRay:
        """Deploy unless this exact config is already applied, then wait until ``replicas`` run."""
        import ray

        require_server_marker()

        full_env = {**self.base_env, **env}
        config = serve_config(full_env, replicas)
        started = time.monotonic()
        if config != self.applied:
            path = self.workdir / "serve_config.yaml"
            path.write_text(yaml.safe_dump(config))
            address = ray.get_runtime_context().gcs_address
            run_serve_cli("run", "--non-blocking", "--address", address, str(path))
            self.applied = config
        wait_for_replicas(replicas)
        logger.info("%d replica(s) of %s running after %.1f s", replicas, APP_NAME, time.monotonic() - started)
        return TextGenOnRay(self.cluster.url, full_env)


def run_serve_cli(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "serve"), *args]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def wait_for_replicas(replicas: int, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Until the app is RUNNING with exactly ``replicas`` replicas, none starting or stopping.

    Serve marks the app DEPLOYING before ``serve run`` returns, so an old set of replicas is never
    mistaken for the new one."""
    wanted = ("RUNNING", replicas, replicas)
    try:
        wait_until_sync(lambda: deployment_state() == wanted, timeout_s, "the replicas", interval_s=0.2)
    except AssertionError:
        raise AssertionError(
            f"(status, running, all replicas) {deployment_state()}, not {wanted} in {timeout_s} s"
        ) from None


@pytest.fixture(scope="module")
def deployer(
    ray_cluster: RayCluster, tiny_model_dir: Path, job_store_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Deployer:
    env = replica_env(tiny_model_dir, tmp_path_factory.mktemp("ray-cache"), job_store_url)
    return Deployer(ray_cluster, env, tmp_path_factory.mktemp("ray-config"))


@pytest.fixture
def textgen(deployer: Deployer) -> TextGenOnRay:
    """Two replicas, TEXTGEN_JOB_LEASE_S=2, eight jobs at a time per replica; re-applied if a test
    changed the deployment, and waited for if Ray is still replacing a killed replica."""
    return deployer.deploy()


@contextlib.asynccontextmanager
async def open_store(url: str) -> AsyncIterator[JobStore]:
    """The replicas' job store, opened by the test to read owners and attempts the API does not show."""
    store = job_store_from_url(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
