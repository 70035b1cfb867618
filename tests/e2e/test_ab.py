"""The README's load example: ApacheBench against /generate on a real server."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support.server import REPO_ROOT, Server

pytestmark = [pytest.mark.e2e, pytest.mark.server]

POST_DATA = REPO_ROOT / "post_data.json"
POST_DATA_BODY = {"prompt": "The future of AI is", "max_length": 50}


def test_ab_load(request: pytest.FixtureRequest) -> None:
    ab = shutil.which("ab")
    if ab is None:
        pytest.fail(
            "ApacheBench (`ab`) is not on PATH: install apache2-utils "
            "(`make setup` installs it via scripts/install-ab.sh, or run `sudo apt-get install apache2-utils`)."
        )
    if not POST_DATA.exists():
        POST_DATA.write_text(json.dumps(POST_DATA_BODY) + "\n")
    server: Server = request.getfixturevalue("default_server")

    # -l: responses legitimately differ in length (sampled text, request ids, timings); without it ab
    # counts every response whose length differs from the first one as a failed request.
    cmd = [ab, "-l", "-n", "10", "-c", "5", "-s", "120", "-p", "post_data.json", "-T", "application/json"]
    completed = subprocess.run(
        [*cmd, f"{server.url}/generate"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240
    )
    output = completed.stdout + completed.stderr

    assert completed.returncode == 0, output
    assert "Complete requests:      10" in output, output
    assert "Failed requests:        0" in output, output
    assert "Non-2xx responses" not in output, output
