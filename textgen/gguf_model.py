"""A model straight from a GGUF file: config, tokenizer, chat template and weights, with no float copy.

What transformers does with a GGUF file (de-quantize every tensor, then build and save a float model)
takes a minute for a 270M-parameter model with a 262k vocabulary, most of it in gguf-py's reader and in
writing floats. Here:

* the header is parsed by ``textgen.gguf_file`` (under a second);
* the config is rebuilt from the metadata (transformers' own GGUF key mapping), the model class is
  instantiated with its parameters on the ``meta`` device (no memory, no random initialisation), and only
  the small tensors are given real values: norms, biases and the input embeddings;
* the projection weights stay in the file's blocks (``GGUFWeights``), handed to the decode core's linear
  factory under transformers' names, already in transformers' conventions: llama.cpp's interleaved query /
  key row order undone for Llama-style files, Gemma's norm weights stored as 1 + w given back as w;
* the tokenizer is built from the file's vocabulary by transformers' GGUF tokenizer converter, fed the
  metadata this reader already parsed (its own reader would take tens of seconds on a big vocabulary),
  and the chat template comes from ``tokenizer.chat_template``. A SentencePiece file lists no merges
  (Gemma's 262k vocabulary): transformers derives them from the vocabulary (~2 s of Python per start), so
  they are kept beside the other caches derived from the file (``merges.json``, keyed by its path, size
  and modification time) and read back on later starts.

Architectures handled this way: ``DIRECT_ARCHITECTURES``. Others keep transformers' conversion path.
Only the own decode core can run such a model as loaded; ``GGUFWeights.materialize`` writes float weights
into the transformers model for the cores that need them (the transformers fallback, measurements).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.errors import ModelLoadError
from textgen.gguf_file import GGUFError, GGUFFile, read_architecture, read_gguf
from textgen.gguf_formats import (
    CONVERTED,
    FLOAT_TYPES,
    READABLE,
    Blocks,
    dequantize,
    dequantize_rows,
    float_tensor,
    unpack,
)

logger = logging.getLogger(__name__)

# GGUF architecture -> transformers model_type
DIRECT_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
# llama.cpp's converter interleaves the query and key rows of these (its rotary layout): undone on reading
PERMUTED_QK = ("llama", "mistral")
# architectures whose RMSNorm multiplies by (1 + w) and whose GGUF stores 1 + w
NORM_PLUS_ONE = ("gemma3",)
# tokens llama.cpp also ends generation on when the vocabulary has them (end of a turn)
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def hf_name(gguf_name: str, arch: str) -> str | None:
    """transformers' parameter name for a GGUF tensor name, None for tensors the model has no place for."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) != 4 or parts[0] != "blk" or parts[3] not in ("weight", "bias"):
        return None
    kind = parts[2]
    if kind == "ffn_norm":
        module = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    elif kind == "ffn_up":
        module = "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj"
    elif kind in _LAYER_NAMES:
        module = _LAYER_NAMES[kind]
    else:
        return None
    return f"model.layers.{parts[1]}.{module}.{parts[3]}"


@dataclass
class GGUFWeights:
    """The projection weights of a model read from a GGUF file, by transformers' layer name
    ("model.layers.3.mlp.up_proj", "lm_head"), unpacked on request (one layer at a time in memory)."""

    file: GGUFFile
    arch: str
    heads: int
    kv_heads: int
    names: dict[str, str] = field(default_factory=dict)  # layer name -> GGUF tensor name
    converted: Counter[str] = field(default_factory=Counter)  # GGUF types converted on reading, and how many

    def __contains__(self, layer: str) -> bool:
        return layer in self.names

    def type_of(self, layer: str) -> str:
        return self.file.tensors[self.names[layer]].type_name

    def blocks(self, layer: str) -> Blocks | torch.Tensor:
        """A layer's weight [out, in]: Blocks for a quantized one, a float tensor for F32/F16/BF16."""
        info = self.file.tensors[self.names[layer]]
        if len(info.shape) != 2:
            raise ModelLoadError(f"GGUF tensor {info.name} has shape {list(info.shape)}; a projection is 2-D")
        raw = self.file.raw(info.name)
        weight: Blocks | torch.Tensor
        if info.type_name in FLOAT_TYPES:
            weight = float_tensor(raw, info.type_name, info.shape)
        else:
            weight = unpack(raw, info.type_name, (info.shape[0], info.shape[1]))
        if info.type_name in CONVERTED:
            self.converted[info.type_name] += 1
        return self._unpermute(layer, weight)

    def dequantized(self, layer: str) -> torch.Tensor:
        weight = self.blocks(layer)
        return weight.dequantize() if isinstance(weight, Blocks) else weight.to(torch.float32)

    def _unpermute(self, layer: str, weight: Blocks | torch.Tensor) -> Blocks | torch.Tensor:
        if self.arch not in PERMUTED_QK or not layer.endswith(("q_proj", "k_proj")):
            return weight
        heads = self.heads if layer.endswith("q_proj") else self.kv_heads
        rows = weight.shape[0]
        # GGUF row r of a head holds (pair r // 2, half r % 2); transformers' rows are (half, pair)
        order = torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
        return weight.rows(order) if isinstance(weight, Blocks) else weight[order]

    def layers(self) -> Iterator[str]:
        return iter(self.names)

    def formats(self) -> Counter[str]:
        return Counter(self.type_of(layer) for layer in self.names)

    def materialize(self, model: PreTrainedModel, dtype: torch.dtype) -> None:
        """Write every projection's de-quantized weight into the transformers model (for the cores and
        measurements that run it); the blocks stay available."""
        modules = dict(model.named_modules())
        for layer in self.names:
            module = modules[layer]
            module.weight = torch.nn.Parameter(self.dequantized(layer).to(dtype), requires_grad=False)


@dataclass
class GGUFModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights: GGUFWeights
    parameters: int  # elements in the file's tensors


def is_direct(path: Path) -> bool:
    """Whether a GGUF file's architecture loads directly (else transformers converts it)."""
    return read_architecture(path) in DIRECT_ARCHITECTURES


def load_gguf(path: Path, dtype: torch.dtype, cache: Path | None = None) -> GGUFModel:
    """Config, tokenizer, small tensors and the projection blocks of a GGUF file (see the module doc);
    ``cache``: a folder for what is derived from this very file (the tokenizer's merges), None: none."""
    try:
        file = read_gguf(path)
    except GGUFError as error:
        raise ModelLoadError(f"Cannot read {path}: {error}") from None
    arch = str(file.get("general.architecture"))
    if arch not in DIRECT_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not read directly")
    unreadable = sorted({i.type_name for i in file.tensors.values() if i.type_name not in READABLE})
    if unreadable:
        raise ModelLoadError(
            f"{path} stores tensors as {', '.join(unreadable)}, which this server cannot unpack "
            f"(readable: {', '.join(READABLE)}); re-quantize it with llama.cpp's llama-quantize to e.g. Q4_K_M."
        )
    config = _config(file, arch)
    model = _skeleton(config, dtype)
    weights = GGUFWeights(file, arch, int(config.num_attention_heads), int(config.num_key_value_heads))
    _fill(model, file, weights, arch, dtype)
    tokenizer = build_tokenizer(file, arch, None if cache is None else cache / MERGES_FILE)
    eos = _end_of_turn_ids(file)
    model.generation_config.eos_token_id = sorted(eos) if len(eos) > 1 else next(iter(eos), None)
    parameters = sum(info.elements for info in file.tensors.values())
    kept = ", ".join(f"{count} {name}" for name, count in sorted(weights.formats().items()))
    logger.info("Read %s directly (%s): projections kept as %s", path.name, arch, kept)
    return GGUFModel(model, tokenizer, weights, parameters)


def _config(file: GGUFFile, arch: str) -> Any:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    renames: dict[str, str | None] = dict(GGUF_CONFIG_MAPPING.get(arch, {}))  # type: ignore[call-overload]
    values: dict[str, Any] = {}
    for key, hf_key in renames.items():
        value = file.get(f"{arch}.{key}")
        if hf_key is not None and value is not None:
            values[hf_key] = value.tolist() if hasattr(value, "tolist") else value
    tokens = file.get("tokenizer.ggml.tokens") or []
    values["vocab_size"] = int(values.get("vocab_size") or len(tokens))
    values["tie_word_embeddings"] = "output.weight" not in file.tensors
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):  # fmt: skip
        if file.get(f"tokenizer.ggml.{gguf_key}") is not None:
            values[hf_key] = int(file.get(f"tokenizer.ggml.{gguf_key}"))
    if "rope_theta" in values:
        values.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": float(values["rope_theta"])})
    model_type = DIRECT_ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(file.get("general.name", "")).lower():
        model_type = "mistral"
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"{file.path}: cannot build a {model_type} config from its metadata ({error})") from None


def _skeleton(config: Any, dtype: torch.dtype) -> PreTrainedModel:
    """The model class with its parameters on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights  # type: ignore[import-untyped]

    with init_empty_weights(include_buffers=False):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return model


def _fill(model: PreTrainedModel, file: GGUFFile, weights: GGUFWeights, arch: str, dtype: torch.dtype) -> None:
    """Real values for the small tensors, empty placeholders for the projections (held as blocks)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, info in file.tensors.items():
        target = hf_name(name, arch)
        if target is None or target not in params:
            if name not in ("rope_freqs.weight",):
                logger.debug("GGUF tensor %s has no place in the model; skipped", name)
            continue
        layer, _, kind = target.rpartition(".")
        module = modules[layer]
        is_projection = kind == "weight" and isinstance(module, torch.nn.Linear)
        if is_projection:
            weights.names[layer] = name
            module.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            continue
        if len(info.shape) == 2:  # the input embeddings: straight to the model's dtype, in chunks
            value = dequantize_rows(file.raw(name), info.type_name, (info.shape[0], info.shape[1]), dtype)
        else:
            value = dequantize(file.raw(name), info.type_name, info.shape)
        if arch in NORM_PLUS_ONE and layer.endswith("norm"):
            value = value - 1.0  # stored as 1 + w; transformers' Gemma RMSNorm adds the 1 itself
        if arch in PERMUTED_QK and kind == "bias" and layer.endswith(("q_proj", "k_proj")):
            raise ModelLoadError(f"{file.path}: biases on a permuted query/key projection are not supported")
        setattr(module, kind, torch.nn.Parameter(value.to(dtype), requires_grad=False))
    if "lm_head" not in weights.names and "model.embed_tokens" in modules:
        weights.names["lm_head"] = "token_embd.weight"  # tied: the output layer reads the embedding's blocks
        lm_head = modules.get("lm_head")
        if isinstance(lm_head, torch.nn.Linear):
            lm_head.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"{file.path} has no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


def _end_of_turn_ids(file: GGUFFile) -> set[int]:
    tokens = file.get("tokenizer.ggml.tokens") or []
    found = (
        {int(file.get("tokenizer.ggml.eos_token_id"))} if file.get("tokenizer.ggml.eos_token_id") is not None else set()
    )
    wanted = set(END_OF_TURN)
    found.update(i for i, token in enumerate(tokens) if token in wanted)
    return found


# Gemma's turn format, for Gemma files converted without their template (llama.cpp also falls back to a
# built-in one by architecture): system text opens the first user turn, the assistant's role is "model".
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{- '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') + (message['content'] | trim)"
    " + '<end_of_turn>\n' -}}"
    "{%- if role == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
BUILT_IN_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}


def build_tokenizer(file: GGUFFile, arch: str, merges_cache: Path | None = None) -> PreTrainedTokenizerBase:
    """The file's tokenizer (vocabulary, merges or scores, special tokens) and its chat template;
    ``merges_cache``: where merges derived from the vocabulary are kept for the next start."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        add_gguf_special_tokens,
        select_tokenizer_builder,
        set_split_regex,
    )

    tokenizer_dict: dict[str, Any] = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        value = file.get(f"tokenizer.{key}")
        if value is not None:
            tokenizer_dict[name] = value.tolist() if hasattr(value, "tolist") else value
    if not tokenizer_dict.get("tokens"):
        raise ModelLoadError(f"{file.path} has no tokenizer.ggml.tokens: it carries no tokenizer to serve with")
    config: dict[str, Any] = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer_config"].items():
        if file.get(f"tokenizer.{key}") is not None:
            config[name] = file.get(f"tokenizer.{key}")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    if not config.get("chat_template") and arch in BUILT_IN_TEMPLATES:
        logger.info("%s has no tokenizer.chat_template; using the built-in %s template", file.path.name, arch)
        config["chat_template"] = BUILT_IN_TEMPLATES[arch]
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):  # fmt: skip
        token_id = file.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    # transformers' GGUF converter, step by step: its builder's own tokenizer object is kept (converting
    # to the backend and wrapping that again would deep-copy a 262k vocabulary: seconds at every start).
    derives = "merges" not in tokenizer_dict and tokenizer_dict.get("tokenizer_type") == "llama"
    cached = read_merges(merges_cache, len(tokens)) if derives and merges_cache is not None else None
    if cached is not None:
        tokenizer_dict["merges"] = cached  # the builder then takes them as a file's own
    tokenizer: PreTrainedTokenizerBase = select_tokenizer_builder(arch, tokenizer_dict.get("tokenizer_type"))(
        tokenizer_dict
    )
    if derives and cached is None and merges_cache is not None:
        write_merges(merges_cache, len(tokens), getattr(tokenizer, "_merges", None))
    tokenizer = add_gguf_special_tokens(tokenizer, tokenizer_dict)  # type: ignore[no-untyped-call]
    tokenizer = set_split_regex(tokenizer, tokenizer_dict)  # type: ignore[no-untyped-call]
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if name in config:
            setattr(tokenizer, name, config[name])
    tokenizer.add_bos_token = bool(config.get("add_bos_token", False))
    tokenizer.add_eos_token = bool(config.get("add_eos_token", False))
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer


MERGES_FILE = "merges.json"
MERGES_FORMAT = 1


def read_merges(path: Path, vocabulary: int) -> list[str] | None:
    """Merges kept by ``write_merges`` for a vocabulary of this size, as a file lists them ("left right");
    None when there are none or they are unusable (logged: they are derived again and rewritten)."""
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("Ignoring the tokenizer merges kept in %s (%s); deriving them again", path, error)
        return None
    merges = kept.get("merges") if isinstance(kept, dict) else None
    if (
        not isinstance(kept, dict)
        or kept.get("format") != MERGES_FORMAT
        or kept.get("vocabulary") != vocabulary
        or not isinstance(merges, list)
        or not all(isinstance(merge, str) and merge.count(" ") == 1 for merge in merges)
    ):
        logger.warning("Ignoring the tokenizer merges kept in %s (not this vocabulary's); deriving them again", path)
        return None
    return merges


def write_merges(path: Path, vocabulary: int, merges: object) -> None:
    """Keep the merges a tokenizer builder derived, for the next start (written whole or not at all). Not
    kept: merges that a space inside a token would make ambiguous as "left right" text, or none found."""
    if not isinstance(merges, list) or not merges:
        return
    lines: list[str] = []
    for merge in merges:
        if not (isinstance(merge, tuple | list) and len(merge) == 2 and all(isinstance(p, str) for p in merge)):
            return
        if " " in merge[0] or " " in merge[1]:
            return
        lines.append(f"{merge[0]} {merge[1]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"format": MERGES_FORMAT, "vocabulary": vocabulary, "merges": lines}), "utf-8")
        os.replace(partial, path)
    except OSError as error:  # a read-only cache: derived again next time
        logger.warning("Cannot keep the tokenizer merges in %s (%s); they are derived again at each start", path, error)
