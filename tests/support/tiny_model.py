"""A tiny GPT-2 (random weights, byte-level BPE trained on a few sentences), saved to a folder.

It goes through the same loader as real models (``TEXTGEN_MODEL=<folder>``) and loads in well under a
second, so unit and integration tests exercise the real transformers code path without the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
CORPUS = [
    "The future of AI is bright and full of promise.",
    "Once upon a time there was a robot who learned to paint.",
    "Continuous batching lets many requests share each decode step.",
    "The quick brown fox jumps over the lazy dog.",
    "I love this, it is wonderful. Whatever happens, stay curious.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ! ? ; - ( ) \" '",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def save_tiny_gpt2(folder: Path, *, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
