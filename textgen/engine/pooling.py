"""Embeddings from a causal language model: mean pooling of the final hidden states, L2-normalised.

The served model has no embedding fine-tune, so there is no trained "sentence token" to read. The last
token's state is trained to predict the next token and swings with the last word; the mean over every
position of the final norm's output (the input of the output layer) keeps what the whole text says and
is the more robust choice for retrieval with a plain decoder. Pooling runs in float32 whatever the
compute dtype, so a bf16 core and the float32 reference agree to bf16's precision.

Shapes: N tokens in the pass, E hidden size, B inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from textgen.engine.padding import left_pad_prompts, positions_from_mask


def mean_pool(hidden: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """hidden [N, E]; spans (start, length) of each input's tokens in it -> [B, E] float32 means."""
    if not spans:
        return torch.empty((0, hidden.shape[-1]), dtype=torch.float32)
    return torch.stack([hidden[start : start + length].float().mean(dim=0) for start, length in spans]).cpu()


def l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    """[B, E] -> each row scaled to unit Euclidean length (float32; an all-zero row stays zero)."""
    return F.normalize(vectors.float(), p=2.0, dim=-1)


@torch.inference_mode()
def transformers_pooled(model: PreTrainedModel, inputs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """One padded forward pass of transformers' own base model (GPT-2's ``transformer``, Llama's ``model``:
    their output is the final norm's) -> [B, E] float32 mean of each input's hidden states, not
    normalised. Used by the transformers core and the threadpool engine; the reference in the tests."""
    input_ids, mask = left_pad_prompts(inputs, pad_id, model.device)
    output = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    hidden: torch.Tensor = output.last_hidden_state.float()  # [B, L, E]
    weights = mask.to(hidden.dtype)[:, :, None]
    return ((hidden * weights).sum(dim=1) / weights.sum(dim=1)).cpu()
