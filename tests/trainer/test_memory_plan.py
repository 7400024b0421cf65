"""The memory plan: parameter counts from config.json alone (held against the published counts), the
strategy it picks for real model shapes, what it says when nothing fits, and its bytes against the peak
memory of a real training step of the tiny model on the CPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import Workspace, chat_records, jsonl, log_events
from kubetune_trainer import parallel
from kubetune_trainer.contract import LoraConfig, TrainerReason
from kubetune_trainer.errors import EXIT_PERMANENT, TrainerError
from kubetune_trainer.memory_plan import GIB, Request, choose, estimate, model_shape
from kubetune_trainer.parallel import FSDP, SINGLE

# config.json of meta-llama/Llama-3.1-8B and -70B, as published.
LLAMA_3_1_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_3_1_70B: dict[str, Any] = {
    **LLAMA_3_1_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
MODELS = {"Llama-3.1-8B": LLAMA_3_1_8B, "Llama-3.1-70B": LLAMA_3_1_70B}


def gpu_request(method: str, gpus: int, gib: int, tokens: int = 2048) -> Request:
    """A job on ``gpus`` GPUs of ``gib`` GiB, micro-steps of one default-length (2048-token) example."""
    return Request(method=method, processes=gpus, micro_tokens=tokens, device_type="cuda", capacity=gib * GIB)


def test_memory_plan_counts_the_published_parameters_from_config_json_alone() -> None:
    eight, seventy = model_shape(LLAMA_3_1_8B), model_shape(LLAMA_3_1_70B)
    assert eight.parameters == 8_030_261_248
    assert seventy.parameters == 70_553_706_496
    # What PEFT reports as trainable for rank 16 on every linear layer of Llama-3-8B.
    assert eight.lora_parameters(16, None) == 41_943_040
    assert eight.lora_parameters(16, ("q_proj", "v_proj")) == 32 * 16 * ((4096 + 4096) + (4096 + 1024))


@pytest.mark.parametrize(
    ("model", "method", "gpus", "gib", "strategy"),
    [
        ("Llama-3.1-8B", "Full", 1, 80, None),
        ("Llama-3.1-8B", "Full", 8, 80, FSDP),
        ("Llama-3.1-8B", "LoRA", 1, 24, SINGLE),
        ("Llama-3.1-8B", "QLoRA", 1, 24, SINGLE),
        ("Llama-3.1-70B", "QLoRA", 1, 80, SINGLE),
        ("Llama-3.1-70B", "LoRA", 8, 80, FSDP),
    ],
)
def test_memory_plan_table(model: str, method: str, gpus: int, gib: int, strategy: str | None) -> None:
    """``strategy`` None: the job is refused."""
    shape, request = model_shape(MODELS[model]), gpu_request(method, gpus, gib)
    if strategy is None:
        with pytest.raises(TrainerError) as refused:
            choose(shape, request, model)
        assert refused.value.reason == TrainerReason.INSUFFICIENT_GPU_MEMORY
        return
    plan = choose(shape, request, model)
    print(f"{model} {method} on {gpus}x{gib} GiB: {plan.describe()}")
    assert (plan.strategy, plan.world_size) == (strategy, gpus)
    assert plan.fits and plan.total <= gib * GIB


def test_memory_plan_fits_llama_8b_lora_on_24_gib_only_with_activation_checkpointing_or_qlora() -> None:
    shape = model_shape(LLAMA_3_1_8B)
    lora = gpu_request("LoRA", 1, 24)
    assert not estimate(shape, lora, SINGLE, checkpointing=False).fits
    assert choose(shape, lora).activation_checkpointing
    assert estimate(shape, lora, SINGLE, checkpointing=True).fits
    assert choose(shape, gpu_request("QLoRA", 1, 24)).fits
    # The 4-bit base weighs about a third of the bf16 one (embeddings and the head stay bf16).
    qlora = estimate(shape, gpu_request("QLoRA", 1, 24), SINGLE, checkpointing=True)
    bf16 = estimate(shape, lora, SINGLE, checkpointing=True)
    assert 0.3 < qlora.weights / bf16.weights < 0.4


def test_memory_plan_fsdp_shards_the_full_training_state() -> None:
    shape = model_shape(LLAMA_3_1_8B)
    single = estimate(shape, gpu_request("Full", 1, 80), SINGLE, checkpointing=False)
    sharded = estimate(shape, gpu_request("Full", 8, 80), FSDP, checkpointing=False)
    # bf16 weights, fp32 gradients, fp32 master + two AdamW moments: 18 bytes a parameter on one GPU.
    state = single.weights + single.gradients + single.optimizer
    assert state == 18 * 8_030_261_248
    assert sharded.optimizer == single.optimizer // 8
    # Each rank also holds the layers it gathers for compute, a small part of the whole.
    assert state / 8 < sharded.weights + sharded.gradients + sharded.optimizer < state / 8 * 1.1


def test_memory_plan_refusal_gives_the_numbers_and_what_would_fit() -> None:
    shape = model_shape(LLAMA_3_1_8B)
    with pytest.raises(TrainerError) as refused:
        choose(shape, gpu_request("Full", 1, 80), "s3://models/llama-3.1-8b/")
    error = refused.value
    assert error.reason == TrainerReason.INSUFFICIENT_GPU_MEMORY and error.permanent
    message = error.message
    print(message)
    assert "s3://models/llama-3.1-8b/" in message
    assert re.search(r"needs \d+\.\d GiB per GPU", message)
    assert "method LoRA" in message and "method QLoRA" in message
    gpus = int(re.search(r"(\d+) GPUs \(", message).group(1))  # type: ignore[union-attr]
    assert choose(shape, gpu_request("Full", gpus, 80)).fits
    with pytest.raises(TrainerError):
        choose(shape, gpu_request("Full", gpus - 1, 80))

    # A long micro-step that fits once shorter: the advice names the length.
    with pytest.raises(TrainerError) as long_steps:
        choose(shape, gpu_request("LoRA", 1, 24, tokens=32768))
    length = int(re.search(r"dataset.maxSeqLength (\d+)", long_steps.value.message).group(1))  # type: ignore[union-attr]
    assert choose(shape, gpu_request("LoRA", 1, 24, tokens=length)).fits


# ----------------------------------------------------------------------------------------------------
# Against a measurement
# ----------------------------------------------------------------------------------------------------


def measure_training_step(
    method: str, tokens: int, lora_dropout: float, checkpointing: bool
) -> tuple[int, Any]:
    """Peak bytes of one training step of the tiny model on the CPU with the trainer's own code (packed
    batch, fused loss, AdamW), and the model's config. The peak is what the CPU allocator reports to torch's
    profiler during the step, on top of the weights and optimizer state already held."""
    from torch.profiler import ProfilerActivity, profile

    from kubetune_devtools.tiny import build_tiny_model
    from kubetune_trainer.fastpath import loss_sum, prepare_model
    from kubetune_trainer.model import apply_method
    from kubetune_trainer.packing import Example, collate_packed
    from kubetune_trainer.train import make_optimizer

    base, _ = build_tiny_model(seed=0)
    prepare_model(base, "cpu")
    config = base.config.to_dict()
    model = apply_method(base, method, LoraConfig(r=8, alpha=16, dropout=lora_dropout))
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = make_optimizer(model, 1e-3, 0.0)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4):
        ids = torch.randint(5, 500, (length,), generator=generator).tolist()
        examples.append(Example(input_ids=ids, labels=ids))
    batch = collate_packed(examples)

    def step() -> None:
        summed, count = loss_sum(model, batch)
        (summed / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step creates AdamW's moments
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    allocations = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    assert live == 0, "the step should free everything it allocated"
    held = [p for p in model.parameters()] + [t for s in optimizer.state.values() for t in s.values()]
    return sum(t.numel() * t.element_size() for t in held) + peak, config


@pytest.mark.parametrize(
    ("method", "lora_dropout", "checkpointing"),
    [("LoRA", 0.05, False), ("LoRA", 0.0, False), ("Full", 0.0, False), ("LoRA", 0.05, True)],
    ids=["lora", "lora-no-dropout", "full", "lora-activation-checkpointing"],
)
def test_memory_plan_predicts_the_measured_peak_of_a_tiny_model_step(
    method: str, lora_dropout: float, checkpointing: bool
) -> None:
    tokens = 2048
    measured, config = measure_training_step(method, tokens, lora_dropout, checkpointing)
    request = Request(
        method=method,
        processes=1,
        micro_tokens=tokens,
        device_type="cpu",
        lora_r=8,
        lora_dropout=lora_dropout,
    )
    plan = estimate(model_shape(config), request, SINGLE, checkpointing)
    error = plan.total / measured - 1
    print(
        f"memory plan, tiny model, {method} dropout={lora_dropout} checkpointing={checkpointing}, "
        f"{tokens} tokens: planned {plan.total / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, "
        f"error {error:+.1%}"
    )
    assert abs(error) <= 0.15
    # The activations are most of it: a plan without them would be far off.
    assert plan.activations > 0.5 * measured


# ----------------------------------------------------------------------------------------------------
# In the trainer
# ----------------------------------------------------------------------------------------------------


def test_memory_plan_is_logged_and_reported_in_the_termination_summary(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(8)))
    result = ws.run(ws.config(train), monkeypatch)
    assert result.code == 0, result.summary.message
    plan = result.summary.plan
    assert plan is not None
    assert (plan["strategy"], plan["worldSize"], plan["activationCheckpointing"]) == (SINGLE, 1, False)
    assert plan["microStepTokens"] == 512  # hyperparameters.batchTokens, the whole step in one micro-step
    assert set(plan["perGpuGiB"]) == {
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "workspace",
        "total",
    }
    logged = [e for e in log_events(capsys.readouterr().out.splitlines()) if e.get("event") == "memory_plan"]
    assert len(logged) == 1 and logged[0]["strategy"] == SINGLE


def test_memory_plan_refuses_a_job_that_cannot_fit_before_fetching_weights(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    # Only config.json is there: a trainer that went on would fail for the missing weights instead.
    ws.put("model/config.json", json.dumps(LLAMA_3_1_70B).encode())
    train = ws.put("data/train.jsonl", jsonl(chat_records(4)))
    monkeypatch.setattr(parallel, "device_capacity", lambda device: 80 * GIB)
    result = ws.run(
        ws.config(train, base_model=f"s3://{ws.bucket}/model/", method="Full", lora=None), monkeypatch
    )
    assert result.summary.reason == TrainerReason.INSUFFICIENT_GPU_MEMORY, result.summary.message
    assert result.code == EXIT_PERMANENT
    assert f"s3://{ws.bucket}/model/" in result.summary.message
    assert "GPUs" in result.summary.message
