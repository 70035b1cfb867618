"""Unit tests for settings (``textgen.config``): defaults, TEXTGEN_* env vars, and ConfigError messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from textgen.config import ENV_PREFIX, Settings, load_settings
from textgen.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TEXTGEN_* variable from the outer environment leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    return str(info.value)


# --- defaults ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings.model == "bundled"
    assert settings.model_name is None
    assert settings.dtype == "auto"
    assert settings.device == "auto"
    assert settings.cache_dir == Path.home() / ".cache" / "textgen"
    assert settings.torch_threads is None
    assert settings.warmup is True
    assert settings.engine == "batched"
    assert settings.max_running == 64
    assert settings.max_waiting == 256
    assert settings.max_prompt_tokens is None  # the model's context minus the generation budget
    assert settings.max_new_tokens_limit == 1024
    assert settings.max_prefill_tokens == 4096
    assert settings.request_timeout_s == 300.0
    assert settings.threadpool_workers == 4
    assert settings.background_share == 4
    assert settings.shutdown_grace_s == 10.0
    assert settings.job_store == "sqlite:///data/jobs.db"
    assert settings.job_ttl_s == 7 * 24 * 3600.0
    assert settings.job_concurrency == 16
    assert settings.job_poll_interval_s == 0.5
    assert settings.blocked_words == ["hate", "hateful*", "hatred*", "violen*"]
    assert settings.blocked_words_file is None
    assert settings.output_filter_action == "redact"
    assert settings.log_format == "text"
    assert settings.log_level == "INFO"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.max_running = 2  # type: ignore[misc]


# --- environment variables ---------------------------------------------------------------------------


def test_env_vars_with_prefix_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEXTGEN_MODEL", "gpt2")
    monkeypatch.setenv("TEXTGEN_MODEL_NAME", "my-model")
    monkeypatch.setenv("TEXTGEN_ENGINE", "threadpool")
    monkeypatch.setenv("TEXTGEN_MAX_RUNNING", "8")
    monkeypatch.setenv("TEXTGEN_DTYPE", "bfloat16")
    monkeypatch.setenv("TEXTGEN_DEVICE", "cpu")
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TEXTGEN_WARMUP", "false")
    monkeypatch.setenv("TEXTGEN_REQUEST_TIMEOUT_S", "12.5")
    monkeypatch.setenv("TEXTGEN_JOB_STORE", "sqlite:////tmp/x.db")
    monkeypatch.setenv("TEXTGEN_OUTPUT_FILTER_ACTION", "reject")
    monkeypatch.setenv("TEXTGEN_LOG_FORMAT", "json")
    settings = load_settings()
    assert settings.model == "gpt2"
    assert settings.model_name == "my-model"
    assert settings.engine == "threadpool"
    assert settings.max_running == 8
    assert settings.dtype == "bfloat16"
    assert settings.device == "cpu"
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.warmup is False
    assert settings.request_timeout_s == 12.5
    assert settings.job_store == "sqlite:////tmp/x.db"
    assert settings.output_filter_action == "reject"
    assert settings.log_format == "json"


def test_unprefixed_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_RUNNING", "3")
    monkeypatch.setenv("ENGINE", "threadpool")
    settings = load_settings()
    assert settings.max_running == 64
    assert settings.engine == "batched"


def test_explicit_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_MAX_RUNNING", "8")
    assert load_settings(max_running=4).max_running == 4
    assert load_settings().max_running == 8


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a, b ,,c", ["a", "b", "c"]),
        ("hate", ["hate"]),
        ("kill yourself, idiot", ["kill yourself", "idiot"]),
        (" , ,", []),
    ],
)
def test_blocked_words_env_is_a_comma_list(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("TEXTGEN_BLOCKED_WORDS", raw)
    assert load_settings().blocked_words == expected


def test_blocked_words_override_accepts_a_string_or_a_list() -> None:
    assert load_settings(blocked_words="x,y").blocked_words == ["x", "y"]
    assert load_settings(blocked_words=["x", "y z"]).blocked_words == ["x", "y z"]


@pytest.mark.parametrize("raw", ["debug", "Debug", "DEBUG", "warning", "error", "info"])
def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("TEXTGEN_LOG_LEVEL", raw)
    assert load_settings().log_level == raw.upper()
    assert load_settings(log_level=raw).log_level == raw.upper()


# --- invalid values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_name", "raw"),
    [
        ("TEXTGEN_ENGINE", "foo"),
        ("TEXTGEN_MAX_RUNNING", "0"),
        ("TEXTGEN_MAX_RUNNING", "2000"),
        ("TEXTGEN_MAX_RUNNING", "many"),
        ("TEXTGEN_DTYPE", "int8"),
        ("TEXTGEN_LOG_FORMAT", "xml"),
        ("TEXTGEN_LOG_LEVEL", "verbose"),
        ("TEXTGEN_OUTPUT_FILTER_ACTION", "ignore"),
        ("TEXTGEN_REQUEST_TIMEOUT_S", "0"),
        ("TEXTGEN_JOB_CONCURRENCY", "0"),
        ("TEXTGEN_TORCH_THREADS", "0"),
        ("TEXTGEN_WARMUP", "perhaps"),
    ],
)
def test_invalid_env_value_raises_config_error_naming_the_var(
    monkeypatch: pytest.MonkeyPatch, env_name: str, raw: str
) -> None:
    monkeypatch.setenv(env_name, raw)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("Invalid settings, fix these environment variables:")
    assert env_name in message
    assert repr(raw).lower() in message.lower()  # the offending value is shown (log level upper-cased)
    # A clean one-line error for a deployment log, not a pydantic traceback chain.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "\n" not in message


def test_invalid_override_is_named_by_its_env_var() -> None:
    message = config_error(max_running=0)
    assert "TEXTGEN_MAX_RUNNING" in message


def test_several_bad_vars_are_all_named_in_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_ENGINE", "foo")
    monkeypatch.setenv("TEXTGEN_MAX_RUNNING", "0")
    monkeypatch.setenv("TEXTGEN_DTYPE", "int8")
    monkeypatch.setenv("TEXTGEN_LOG_FORMAT", "xml")
    message = config_error()
    for env_name in ("TEXTGEN_ENGINE", "TEXTGEN_MAX_RUNNING", "TEXTGEN_DTYPE", "TEXTGEN_LOG_FORMAT"):
        assert env_name in message
    assert message.count(";") == 3  # one entry per bad variable


def test_prefill_smaller_than_prompt_limit_is_rejected_naming_both() -> None:
    message = config_error(max_prompt_tokens=2048, max_prefill_tokens=1024)
    assert "TEXTGEN_MAX_PREFILL_TOKENS" in message
    assert "TEXTGEN_MAX_PROMPT_TOKENS" in message


def test_prefill_limit_rejected_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_MAX_PREFILL_TOKENS", "100")
    monkeypatch.setenv("TEXTGEN_MAX_PROMPT_TOKENS", "101")
    message = config_error()
    assert "TEXTGEN_MAX_PREFILL_TOKENS" in message and "TEXTGEN_MAX_PROMPT_TOKENS" in message


def test_prefill_equal_to_prompt_limit_is_accepted() -> None:
    settings = load_settings(max_prompt_tokens=512, max_prefill_tokens=512)
    assert settings.max_prefill_tokens == settings.max_prompt_tokens == 512


def test_config_error_is_not_a_validation_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(engine="foo")
    assert not isinstance(info.value, ValidationError)


# --- .env and *_FILE secrets (issue: tenants) -----------------------------------------------------------


def test_a_dotenv_file_in_the_working_directory_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TEXTGEN_API_KEYS=from-dotenv\nTEXTGEN_MAX_RUNNING=7\n", encoding="utf-8")
    settings = load_settings()
    assert settings.api_keys == ["from-dotenv"] and settings.max_running == 7
    monkeypatch.setenv("TEXTGEN_MAX_RUNNING", "9")  # a real environment variable wins over the file
    assert load_settings().max_running == 9


def test_secret_file_variants(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "webhook").write_text("s3cret-webhook\n", encoding="utf-8")
    (tmp_path / "store").write_text("redis://:hunter2@127.0.0.1:6379/0\n", encoding="utf-8")
    (tmp_path / "admins").write_text("# admins\nadmin-1\n\nadmin-2\n", encoding="utf-8")
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET_FILE", str(tmp_path / "webhook"))
    monkeypatch.setenv("TEXTGEN_JOB_STORE_FILE", str(tmp_path / "store"))
    monkeypatch.setenv("TEXTGEN_ADMIN_API_KEYS_FILE", str(tmp_path / "admins"))
    settings = load_settings()
    assert settings.webhook_secret == "s3cret-webhook"
    assert settings.job_store == "redis://:hunter2@127.0.0.1:6379/0"
    from textgen.access import AccessPolicy

    policy = AccessPolicy.from_settings(settings)
    assert policy.identify("/jobs", "Bearer admin-2", "127.0.0.1", {}).admin
    # The settings' repr (what a start-up dump or a traceback shows) never holds a secret.
    shown = repr(settings) + str(settings)
    assert "s3cret-webhook" not in shown and "hunter2" not in shown and "admin-2" not in shown


def test_a_secret_and_its_file_together_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "webhook").write_text("one", encoding="utf-8")
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET_FILE", str(tmp_path / "webhook"))
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET", "two")
    message = config_error()
    assert "TEXTGEN_WEBHOOK_SECRET or TEXTGEN_WEBHOOK_SECRET_FILE" in message and "two" not in message


def test_an_unreadable_or_empty_secret_file_says_which(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEXTGEN_JOB_STORE_FILE", str(tmp_path / "missing"))
    assert "TEXTGEN_JOB_STORE_FILE" in config_error() and "cannot be read" in config_error()
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    monkeypatch.setenv("TEXTGEN_JOB_STORE_FILE", str(tmp_path / "empty"))
    assert "is empty" in config_error()


def test_validation_errors_never_echo_a_secret() -> None:
    message = config_error(job_store=["redis://:hunter2@host/0"], api_keys=123)
    assert "TEXTGEN_JOB_STORE" in message and "hunter2" not in message


@pytest.mark.parametrize("entry", ["*", "not-an-ip", "10.0.0.0/33"])
def test_trusted_proxies_must_be_addresses(entry: str) -> None:
    from textgen.access import AccessPolicy

    with pytest.raises(ConfigError, match="TEXTGEN_TRUSTED_PROXIES"):
        AccessPolicy.from_settings(load_settings(trusted_proxies=[entry]))
