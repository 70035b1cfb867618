"""The names a server answers to (textgen.services.models): the served name, TEXTGEN_MODEL_ALIASES and
the GGUF file's stem, in order and without duplicates; anything else is 404 model_not_found."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from textgen.config import load_settings
from textgen.errors import ConfigError, ModelNotFoundError
from textgen.services.models import served_models


def loaded(name: str, source_file: Path | None = None) -> Any:
    return SimpleNamespace(name=name, source_file=source_file)


def test_aliases_then_the_gguf_stem_without_duplicates_or_the_served_name() -> None:
    settings = load_settings(model_aliases="default, gpt-4o-mini,default,SmolLM2")
    models = served_models(settings, loaded("SmolLM2", Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")))
    assert models.ids == ("SmolLM2", "default", "gpt-4o-mini", "SmolLM2-135M-Instruct.Q4_1")
    assert {models.resolve(name) for name in (None, *models.ids)} == {"SmolLM2"}


def test_any_other_name_is_model_not_found_naming_what_to_ask_for() -> None:
    models = served_models(load_settings(model_aliases=""), loaded("served"))
    assert models.ids == ("served",)
    with pytest.raises(ModelNotFoundError) as raised:
        models.resolve("gpt-4o")
    error = raised.value
    assert (error.status_code, error.param, error.code) == (404, "model", "model_not_found")
    assert "'gpt-4o'" in error.message and "'served'" in error.message
    with pytest.raises(ModelNotFoundError) as long:
        models.resolve("y" * 5000)
    assert len(long.value.message) < 400  # the client's input is echoed only in part


@pytest.mark.parametrize("aliases", ["has space", "x" * 257, "tab\there"])
def test_unusable_aliases_fail_at_start_naming_the_variable(aliases: str) -> None:
    with pytest.raises(ConfigError, match="TEXTGEN_MODEL_ALIASES"):
        load_settings(model_aliases=aliases)
