"""A refused kernel folder does not slow the server down unseen: /ready names the reason (issue 20, HIGH 3).

The kernel folder is found through XDG_CACHE_HOME (the user's cache); here it points at a folder another
user created first, as an attacker on the same machine would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from textgen.engine.core import fused

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]


async def test_ready_reports_a_refused_kernel_folder(
    make_settings: MakeSettings,
    app_client: AppClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    foreign = tmp_path / "xdg-cache" / "textgen" / "kernels"
    foreign.mkdir(parents=True, mode=0o755)
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
    else:  # without root, this process pretends to be another uid: its own folder is then foreign
        real = os.geteuid()
        monkeypatch.setattr(fused.os, "geteuid", lambda: real + 1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    kernel_log = logging.getLogger("textgen.engine.core.fused")  # the app's logging stops at "textgen"
    kernel_log.addHandler(caplog.handler)
    try:
        async with app_client(make_settings()) as (client, _app):
            ready = await client.get("/ready")
    finally:
        kernel_log.removeHandler(caplog.handler)
    assert ready.status_code == 200
    state = ready.json()["details"]["fused_kernels"]
    assert state.startswith(f"off: kernel folder {foreign} is owned by uid"), state
    assert "fix:" in state
    assert caplog.text.count("Fused CPU kernels off") == 1  # the core and the sampler: one warning


async def test_ready_reports_the_core_and_its_kernels(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        details = (await client.get("/ready")).json()["details"]
    assert details["core"] == "textgen-gpt2"
    # GPT-2 has no fused step (the Llama family has), and says so rather than a bare "off"
    assert details["fused_kernels"] in ("on", "off: no fused step for gpt2")
