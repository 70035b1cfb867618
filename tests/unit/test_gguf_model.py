"""A model read directly from a GGUF file (textgen/gguf_model.py) computes what transformers computes with
the same weights: tiny random Llama and Gemma 3 models written with gguf's writer the way llama.cpp's
converter writes them (query/key rows interleaved for Llama, Gemma's norms stored as 1 + w, a tied output
layer), read back, and run on the own core; the reference is the transformers model holding the file's
exact de-quantized values (gguf-py's reference de-quantization)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from textgen.config import Settings
from textgen.engine.core import CoreOptions, build_core
from textgen.loader import load_model

VOCAB = 272  # 256 byte tokens, two special ones, fillers: a multiple of 16 (the block kernels' tile)
PROMPT = list(range(3, 43))  # 40 tokens: longer than the Gemma model's window
Q = GGMLQuantizationType
LAYER_TYPES = {  # which type each projection is written in: every kernel family
    "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q5_0, "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.Q8_0,
}  # fmt: skip
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_feedforward_layernorm": "post_ffw_norm",
}  # fmt: skip


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, bos_token_id=256, eos_token_id=257,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        bos_token_id=256, eos_token_id=257, pad_token_id=257,
    )  # fmt: skip
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)  # transformers starts them at 0, which would hide a lost 1 + w
    return model


def _gguf_name(hf: str, arch: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    module = ".".join(parts[3:-1])
    names = dict(GGUF_NAMES)
    if arch == "gemma3":
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm"}
    else:
        names |= {"post_attention_layernorm": "ffn_norm"}
    return f"blk.{parts[2]}.{names[module]}.weight" if module in names else None


def _interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from (half, pair) to (pair, half) order."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: PreTrainedModel, arch: str, path: Path) -> PreTrainedModel:
    """Write ``model`` as llama.cpp would; return a transformers copy holding the file's exact values."""
    config = model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", 10_000.0 if arch == "llama" else 1_000_000.0)
    if arch == "gemma3":
        writer.add_uint32(f"{arch}.attention.key_length", config.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", config.head_dim)
        writer.add_uint32(f"{arch}.attention.sliding_window", config.sliding_window)
    else:
        writer.add_uint32(f"{arch}.rope.dimension_count", config.hidden_size // config.num_attention_heads)
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["<s>", "</s>", "ab"] + [f"<unused{i}>" for i in range(VOCAB - 259)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 1] + [5] * (VOCAB - 259))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    exact: dict[str, torch.Tensor] = {}
    for name, parameter in model.state_dict().items():
        target = _gguf_name(name, arch)
        if target is None:
            continue
        values = parameter.detach().float().numpy()
        kind = target.split(".")[-2]
        qtype = LAYER_TYPES.get(kind, Q.Q8_0 if target == "token_embd.weight" else Q.F32)
        stored = values + 1.0 if arch == "gemma3" and kind.endswith("norm") else values
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
            stored = _interleave(stored, heads)
        data = quants.quantize(stored.astype(np.float32), qtype)
        writer.add_tensor(target, data, raw_dtype=qtype)
        back = quants.dequantize(data, qtype).reshape(stored.shape).astype(np.float32)
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            back = _interleave_back(back, heads)
        exact[name] = torch.from_numpy(back - 1.0 if arch == "gemma3" and kind.endswith("norm") else back)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = type(model)(config).eval()
    reference.load_state_dict(exact, strict=False)
    reference.tie_weights()
    return reference


def _interleave_back(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize(("arch", "build"), [("llama", tiny_llama), ("gemma3", tiny_gemma3)])
def test_gguf_model_computes_what_transformers_computes(
    arch: str, build: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    assert callable(build)
    reference = write_gguf(build(), arch, path)
    with torch.inference_mode():
        want = reference(torch.tensor([PROMPT])).logits[0]
    float_settings = Settings(model=str(path), gguf_load="direct", dtype="float32", weights="float")
    loaded = load_model(float_settings)
    assert loaded.gguf_weights is not None and loaded.source_file == path
    assert loaded.tokenizer.chat_template and loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == "user: hi\n"
    core = build_core(loaded, CoreOptions(weights="float", slots=2, positions=64, cache_dir=tmp_path))
    assert core.name == f"textgen-{arch}"
    got = core.score(PROMPT)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # de-quantized: the same arithmetic

    kept = load_model(Settings(model=str(path), gguf_load="direct", dtype="bfloat16"))
    blocks = build_core(kept, CoreOptions(weights="auto", slots=2, positions=64, cache_dir=tmp_path))
    formats = {kernel.format for linear in [blocks.weights.lm_head] for _, kernel in linear.kernels}
    assert formats == {"q8"}  # the tied output layer stays in the embedding's Q8_0 blocks
    approx = blocks.score(PROMPT)
    agree = (approx.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.9, f"block kernels agree with float32 on {agree:.0%} of next tokens"
    assert (approx - want).abs().max() <= 0.05 * want.abs().max()


def test_which_gguf_files_are_read_directly(tmp_path: Path) -> None:
    from textgen.loader import BUNDLED, ModelSource, _reads_directly

    path = tmp_path / "tiny-llama.gguf"
    write_gguf(tiny_llama(), "llama", path)
    folder = ModelSource("folder", str(tmp_path), "tiny-llama", gguf_file=path.name)
    bundled = ModelSource(BUNDLED, str(tmp_path), "tiny-llama", gguf_file=path.name)
    cpu = torch.device("cpu")
    assert _reads_directly("auto", folder, path, cpu)
    assert not _reads_directly("auto", bundled, path, cpu)  # the bundled model keeps its measured path
    assert _reads_directly("direct", bundled, path, cpu)
    assert not _reads_directly("convert", folder, path, cpu)
    other = tmp_path / "other.gguf"
    writer = GGUFWriter(str(other), "bert")  # an architecture the own core has no module for
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not _reads_directly("direct", folder, other, cpu)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    assert not _reads_directly("auto", folder, not_gguf, cpu)


def test_a_file_with_an_unreadable_block_type_is_refused_with_the_fix(tmp_path: Path) -> None:
    from textgen.errors import ModelLoadError
    from textgen.gguf_model import load_gguf

    path = tmp_path / "q2k.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=Q.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"Q2_K.*re-quantize"):
        load_gguf(path, torch.bfloat16)
