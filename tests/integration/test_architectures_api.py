"""A model folder of each newly supported family served over HTTP as a user would point TEXTGEN_MODEL at it:
/ready names the architecture's own core, and /v1/completions answers greedily what the transformers core
answers for the same folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import tiny_settings
from tests.support.tiny_families import save_tiny_family

AppClient = Callable[..., Any]


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3-window"])
async def test_a_family_folder_is_served_on_its_own_core(name: str, app_client: AppClient, tmp_path: Path) -> None:
    folder = save_tiny_family(tmp_path / "model", name)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    answers = {}
    for core in ("auto", "transformers"):
        settings = tiny_settings(folder, tmp_path / core, core=core)
        async with app_client(settings) as (client, _app):
            ready = (await client.get("/ready")).json()
            expected = f"textgen-{name.split('-')[0]}" if core == "auto" else "transformers"
            assert ready["details"]["core"] == expected, ready
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            answers[core] = response.json()["choices"][0]["text"]
    assert answers["auto"] == answers["transformers"]
    assert answers["auto"]
