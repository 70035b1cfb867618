"""Each architecture module of the own core (Llama with its rope scalings, Mistral, Qwen2, Qwen3, Phi-3)
against transformers in float32 on tiny random configs (tests/support/tiny_families.py), the fused bf16
step on each, the registry's choice and reasons, and the start-up log.

Tolerance: the float32 core computes what transformers computes, in the same order for the most part;
logits agree within 1e-4 (absolute and relative; the tiny models' logits reach ~4) and greedy tokens are
equal. Every weight is random, norm weights and biases included (transformers initialises those to 1 and
0), so a norm or bias the module forgot, or a scaling it ignored, shows up far outside the tolerance.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from tests.support.tiny_core import build_kernels
from tests.support.tiny_families import FAMILIES, VOCAB, save_tiny_family, tiny
from textgen.engine.core import CoreOptions, build_core
from textgen.engine.core.decoder import DecodeCore, architecture_for
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.hf import TransformersCore
from textgen.engine.core.linear import W8A8Kernel
from textgen.engine.core.weights import LinearFactory, WeightPlan
from textgen.loader import LoadedModel

ATOL = RTOL = 1e-4
STEPS = 10
PROMPTS = [[5, 17, 23, 9, 41, 3, 88, 12], [7, 7, 60], [11, 2, 90, 33, 8, 21, 64, 70, 12, 19, 1, 45, 99, 30]]
SCALED_ROPE = ["llama3-rope", "llama-yarn", "phi3-longrope"]


def core_of(
    model: PreTrainedModel, fmt: str = "float32", fused: FusedKernels | None = None, capacity: int = 64, **factory: Any
) -> DecodeCore:
    arch, reason = architecture_for(model, capacity)
    assert arch is not None, reason
    dtype = getattr(torch, fmt) if fmt in ("float32", "bfloat16") else torch.bfloat16
    model = copy.deepcopy(model).to(dtype)  # type: ignore[arg-type]
    plan = WeightPlan.single(fmt)
    maker = LinearFactory(plan, dtype, torch.device("cpu"), fused=fused, **factory)
    return DecodeCore(model, arch, plan, maker, slots=4, capacity=capacity, fused=fused)


def reference_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """transformers' forward over the whole sequence, no cache: next-token logits [V] float32."""
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor([ids])).logits
    return logits[0, -1].float()


def greedy_run(
    core: DecodeCore, steps: int = STEPS, forced: list[list[int]] | None = None
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """All PROMPTS prefilled in one step (three lengths), then greedy decode steps: the sequences and the
    logits [3, V] of every step. With ``forced`` (sequences from another run) each step is fed those tokens
    instead of its own choice, so two runs' logits stay comparable after a near tie."""
    sequences = [list(p) for p in PROMPTS]
    slots = [core.allocate() for _ in PROMPTS]
    logits = core.prefill(slots, PROMPTS)
    seen = []
    for step in range(steps):
        seen.append(logits.float())
        chosen = logits.argmax(-1)
        for row, ids in enumerate(sequences):
            ids.append(int(chosen[row]))
        if forced is not None:
            chosen = torch.tensor([ids[len(PROMPTS[row]) + step] for row, ids in enumerate(forced)])
        logits = core.decode(slots, chosen)
    core.free(slots)
    return sequences, seen


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    return build_kernels(tmp_path_factory.mktemp("fused"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_registry_runs_each_family_on_its_own_module(name: str) -> None:
    arch, why = architecture_for(tiny(name), 64)
    assert arch is not None and arch.name == FAMILIES[name].module, why
    assert why == f"model type {tiny(name).config.model_type!r} runs on the {arch.name} module"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefill_and_greedy_decode_match_transformers_in_float32(name: str) -> None:
    """Three prompts of different lengths prefilled together, then decoded step by step: every row's
    logits within 1e-4 of transformers' over the whole sequence, and the greedy tokens equal."""
    model = tiny(name)
    sequences, seen = greedy_run(core_of(model))
    for step, logits in enumerate(seen):
        for row, ids in enumerate(sequences):
            context = ids[: len(PROMPTS[row]) + step]
            torch.testing.assert_close(logits[row], reference_logits(model, context), atol=ATOL, rtol=RTOL)
    for row, ids in enumerate(sequences):  # transformers' own greedy continuation, token by token
        expected = list(PROMPTS[row])
        for _ in range(STEPS):
            expected.append(int(reference_logits(model, expected).argmax()))
        assert ids == expected


@pytest.mark.parametrize("name", SCALED_ROPE)
def test_the_rope_scaling_is_what_the_match_depends_on(name: str) -> None:
    """The same weights with plain rotary angles answer far outside the tolerance, so matching transformers
    above means the module applied the scaling (frequencies, and yarn's/longrope's cos/sin factor)."""
    scaled = tiny(name)
    theta = scaled.config.rope_parameters["rope_theta"]
    plain = tiny(name, rope_parameters={"rope_type": "default", "rope_theta": theta})
    plain.load_state_dict(scaled.state_dict())
    ids = PROMPTS[2] * 2
    assert (reference_logits(plain, ids) - reference_logits(scaled, ids)).abs().max() > 100 * ATOL
    core = core_of(scaled)
    logits = core.prefill([core.allocate()], [ids])[0]
    torch.testing.assert_close(logits, reference_logits(scaled, ids), atol=ATOL, rtol=RTOL)


def test_qwen3_without_its_query_key_norms_would_be_far_off() -> None:
    model = tiny("qwen3")
    core = core_of(model)
    for layer in core.weights.layers:
        layer.qk_norm = None  # type: ignore[attr-defined]
    logits = core.prefill([core.allocate()], [PROMPTS[0]])[0]
    assert (logits - reference_logits(model, PROMPTS[0])).abs().max() > 100 * ATOL


def test_a_window_on_some_layers_only_falls_back_unless_it_is_as_wide_as_a_slot() -> None:
    """Qwen2's max_window_layers leaves the first layers global: one window for all layers is what the decoder
    takes. A window at least as wide as a slot never hides a position, so plain causal attention is exact."""
    model = tiny("qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=1)
    arch, why = architecture_for(model, 25)
    assert arch is None and why == (
        "model type 'qwen2': the qwen2 module cannot run sliding-window attention on some layers only "
        "(24 < 25 positions per slot)"
    )
    core = core_of(model, capacity=24)  # the longest prompt (14) + 10 steps = 24 positions
    assert core.weights.window == 0  # type: ignore[attr-defined]
    sequences, seen = greedy_run(core)
    for row, ids in enumerate(sequences):
        torch.testing.assert_close(seen[-1][row], reference_logits(model, ids[:-1]), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("name", "overrides", "positions", "reason"),
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, 64,
         "sliding-window attention on some layers only (16 < 64 positions per slot)"),
        ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, 32,
         "partial rotary embedding"),
        ("phi3-longrope", {}, 65, "longrope beyond its original 64 positions (slots of 65: lower "
         "TEXTGEN_MAX_PROMPT_TOKENS + TEXTGEN_MAX_NEW_TOKENS_LIMIT to at most that)"),
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, 32,
         "rope type 'dynamic'"),
        ("qwen3", {"hidden_act": "gelu"}, 32, "activation 'gelu'"),
    ],
)
def test_what_a_module_cannot_run_falls_back_with_the_reason(
    name: str, overrides: dict[str, Any], positions: int, reason: str
) -> None:
    model = tiny(name, **overrides)
    arch, why = architecture_for(model, positions)
    assert arch is None
    assert why == f"model type {model.config.model_type!r}: the {FAMILIES[name].module} module cannot run {reason}"


def test_a_model_type_without_a_module_names_the_ones_there_are() -> None:
    arch, why = architecture_for(SimpleNamespace(config=SimpleNamespace(model_type="mamba")), 64)
    assert arch is None
    assert why == (
        "model type 'mamba' has no textgen module (textgen runs gemma3_text, gpt2, llama, mistral, phi3, qwen2, qwen3)"
    )


# ----- the fused step (bf16, fused.c) ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama3-rope", "mistral", "qwen2", "qwen3", "phi3", "phi3-window", "phi3-longrope"])
def test_the_fused_bf16_step_is_as_close_to_float32_as_the_pytorch_bf16_path(
    name: str, kernels: FusedKernels
) -> None:
    """Prompts of three lengths in one step, then decode steps (fed the float32 run's tokens), all through
    fused.c (counted): no further from transformers' float32 answer than the PyTorch bf16 path, and the same
    greedy token wherever float32's best token leads the next by more than bf16's rounding can move it."""
    model = tiny(name)
    reference_tokens, reference = greedy_run(core_of(model))
    _, eager = greedy_run(core_of(model, "bfloat16"), forced=reference_tokens)
    fused_core = core_of(model, "bfloat16", kernels)
    assert fused_core.describe()["fused_kernels"] is True
    arch = fused_core._arch
    original = arch.step_fused
    assert original is not None
    calls = []

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    object.__setattr__(arch, "step_fused", counting)
    try:
        _, fused = greedy_run(fused_core, forced=reference_tokens)
    finally:
        object.__setattr__(arch, "step_fused", original)
    assert calls == [sum(map(len, PROMPTS))] + [3] * STEPS
    # bf16 keeps 8 bits: both paths round (fused.c once per group of operations, PyTorch after every
    # operator), so which is further off at one step is chance (measured: 0.04-0.14 each); over all steps
    # fused.c is no further off. A wrong mask, norm or rotation is off by far more (~0.5 and up).
    fused_errors = torch.stack([(fast - ref).abs().max() for ref, fast in zip(reference, fused, strict=True)])
    eager_errors = torch.stack([(slow - ref).abs().max() for ref, slow in zip(reference, eager, strict=True)])
    assert fused_errors.max() <= 1.5 * eager_errors.max() + 1e-3
    assert fused_errors.mean() <= 1.25 * eager_errors.mean() + 1e-3
    clear = 0
    for ref, fast in zip(reference, fused, strict=True):
        error = (fast - ref).abs().max()
        assert torch.nn.functional.cosine_similarity(fast, ref, dim=-1).min() > 0.998
        top = ref.topk(2, dim=-1).values
        lead = top[:, 0] - top[:, 1]
        for row in range(ref.shape[0]):
            if lead[row] > 2 * error:
                assert fast[row].argmax() == ref[row].argmax()
                clear += 1
    assert clear >= len(reference) * len(PROMPTS) // 2  # most steps are decided, not near ties


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3"])
def test_the_fused_w8a8_step_runs_each_family(name: str, kernels: FusedKernels) -> None:
    """int8 weights and activations through fused.c's quantize/rescale (qwen2's q/k/v biases in the rescale,
    qwen3's head norms between it and the rotary attention): close to float32 within int8's error."""
    model = tiny(name)
    ids = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))

    def ranges() -> dict[str, torch.Tensor]:
        from textgen.engine.core.activations import input_ranges

        tokenizer = lambda text, return_tensors: SimpleNamespace(input_ids=ids)  # noqa: E731
        return input_ranges(model, tokenizer)  # type: ignore[arg-type]

    core = core_of(model, "w8a8", kernels, input_ranges=ranges)
    assert isinstance(core.weights.layers[0].qkv.kernel_for(3), W8A8Kernel)  # type: ignore[attr-defined]
    assert core.weights.layers[0].qkv.kernel_for(3).fused is not None  # type: ignore[attr-defined]
    _, reference = greedy_run(core_of(model), steps=4)
    _, quantized = greedy_run(core, steps=4)
    for ref, got in zip(reference, quantized, strict=True):
        assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.995


# ----- choosing the core: build_core, the start-up log, and the scheduler on each family ----------------------


def loaded_model(model: PreTrainedModel) -> LoadedModel:
    """What the loader hands build_core, around a model built here (the fallback core reads the pad id)."""
    tokenizer: Any = SimpleNamespace(pad_token_id=0)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name="tiny", device=torch.device("cpu"), dtype=torch.float32,
        eos_token_ids=frozenset({2}), load_seconds=0.0, context_length=128,
    )


def test_the_start_up_log_names_the_core_and_why(caplog: pytest.LogCaptureFixture) -> None:
    options = CoreOptions(weights="float", slots=2, positions=32, fused=False)
    with caplog.at_level(logging.INFO, logger="textgen.engine.core"):
        core = build_core(loaded_model(tiny("qwen3")), options)
        assert core.name == "textgen-qwen3"
        windowed = tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
        assert isinstance(build_core(loaded_model(windowed), options), TransformersCore)
        forced = CoreOptions(core="transformers", slots=2, positions=32)
        assert isinstance(build_core(loaded_model(tiny("phi3")), forced), TransformersCore)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Model core:")]
    assert messages[0].startswith("Model core: textgen-qwen3 (model type 'qwen3' runs on the qwen3 module); weights")
    assert messages[1] == (
        "Model core: transformers (model type 'qwen2': the qwen2 module cannot run sliding-window attention on "
        "some layers only (16 < 32 positions per slot))"
    )
    assert messages[2] == (
        "Model core: transformers (TEXTGEN_CORE=transformers, though model type 'phi3' runs on the phi3 module)"
    )


@pytest.mark.parametrize("name", ["llama3-rope", "mistral", "qwen2", "qwen3", "phi3-window"])
async def test_the_scheduler_gives_transformers_greedy_text_on_each_family(name: str, tmp_path: Path) -> None:
    """Saved and loaded like a user's folder (the tiny GPT-2's tokenizer), served batched by the engine on the
    textgen core: the same greedy text as on the transformers core."""
    from textgen.config import load_settings
    from textgen.engine.scheduler import BatchedEngine
    from textgen.engine.types import EngineLimits, GenerationRequest, SamplingParams
    from textgen.loader import load_model

    loaded = load_model(load_settings(model=str(save_tiny_family(tmp_path, name)), dtype="float32"))
    prompts = ["The quick brown fox", "Once upon a time there was a robot who learned to paint", "Hi"]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    texts = {}
    for core in ("textgen", "transformers"):
        engine = BatchedEngine(
            loaded, EngineLimits(max_running=4), warmup=False,
            core_options=CoreOptions(core=core, weights="float", slots=4, positions=64),
        )
        await engine.start()
        try:
            handles = [engine.submit(GenerationRequest(p, params)) for p in prompts]
            texts[core] = [r.text for r in await asyncio.gather(*(h.result() for h in handles))]
        finally:
            await engine.stop(0)
    assert texts["textgen"] == texts["transformers"]
    assert all(texts["textgen"])
