"""Sharded training (FSDP2) and checkpoints that move between process counts, on CPU with gloo.

Two processes sharding the tiny model must train exactly like one process holding it whole (fp32: only the
order of float additions differs), each holding half of the parameter and optimizer bytes. A checkpoint
written by two processes resumes in one and the other way round, landing on the losses of a run that was
never interrupted; and a stop between the micro-batches of a step replays that step with the same random
numbers (LoRA dropout).
"""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

import pytest
import torch

from conftest import Workspace, chat_records, jsonl, log_events
from kubetune_trainer import fastpath, launch, parallel, publish
from kubetune_trainer.contract import (
    CheckpointConfig,
    DatasetConfig,
    Hyperparameters,
    LoraConfig,
    OutputConfig,
)
from kubetune_trainer.errors import EXIT_INTERRUPTED
from kubetune_trainer.recipe import MICRO_BATCH_TOKENS_ENV
from kubetune_trainer.train import StopFlag

STEPS = 10
MICRO_TOKENS = "128"
RELATIVE_TOLERANCE = 1e-5


def job(ws: Workspace, train: str, out: str, method: str, steps: int = STEPS, **hp: Any) -> Any:
    base = ws.config(train)
    return replace(
        base,
        method=method,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0) if method == "LoRA" else None,
        dataset=DatasetConfig(train=train, validation_split=0.25, max_seq_length=128),
        hyperparameters=Hyperparameters(
            max_steps=steps,
            learning_rate=3e-3 if method == "LoRA" else 1e-3,
            batch_tokens=512,
            warmup_ratio=0.1,
            seed=13,
            eval_every_steps=5,
            **hp,
        ),
        output=OutputConfig(uri=f"s3://{ws.bucket}/{out}/"),
    )


def run_processes(
    ws: Workspace, config: Any, name: str, processes: int, stop_after_step: int | None = None, **env: str
) -> list[dict[str, Any]]:
    """The trainer as the pod runs it with ``processes`` CPU workers sharding the model; SIGTERM once
    ``stop_after_step`` is logged. Returns its log events."""
    process, _ = ws.subprocess(
        config,
        name,
        **{
            MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS,
            launch.CPU_PROCESSES_ENV: str(processes),
            parallel.FORCE_STRATEGY_ENV: parallel.FSDP,
            **env,
        },
    )
    assert process.stdout is not None
    seen: list[str] = []
    if stop_after_step is not None:
        for line in process.stdout:
            seen.append(line)
            event = log_events([line])
            if event and event[0]["event"] == "progress" and event[0]["step"] >= stop_after_step:
                process.send_signal(signal.SIGTERM)
                break
    rest, _ = process.communicate(timeout=300)
    output = "".join(seen) + rest
    expected = 0 if stop_after_step is None else EXIT_INTERRUPTED
    assert process.returncode == expected, output[-4000:]
    return log_events(output.splitlines())


def published_weights(ws: Workspace, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(ws.s3.client().get_object(Bucket=ws.bucket, Key=key)["Body"].read())


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    assert len(a) == len(b)
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("method", ["LoRA", "Full"])
def test_fsdp_two_processes_train_like_one_holding_half_each(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(40, seed=8)))
    merged = method == "LoRA"  # the adapter merged into a whole model, from the shards
    two_config = job(ws, train, "two", method)
    two_config = replace(two_config, output=replace(two_config.output, merge_adapter=merged))
    one_config = replace(two_config, output=replace(two_config.output, uri=f"s3://{ws.bucket}/one/"))
    logged = run_processes(ws, two_config, "two", processes=2)
    capsys.readouterr()
    one = ws.run(one_config, monkeypatch, **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS})
    assert one.code == 0, one.summary.message
    one_logged = log_events(capsys.readouterr().out.splitlines())
    one_summary, two_summary = (
        ws.read_json("one/training_summary.json"),
        ws.read_json("two/training_summary.json"),
    )

    resolved = two_summary["provenance"]["resolved"]
    assert (resolved["strategy"], resolved["worldSize"]) == ("FSDP", 2)
    assert one_summary["provenance"]["resolved"]["strategy"] == "Single"
    differences = relative_differences(two_summary["losses"], one_summary["losses"])
    print(f"{method}: two sharded processes vs one, max relative loss difference {max(differences):.3g}")
    assert len(differences) == STEPS
    assert max(differences) < RELATIVE_TOLERANCE
    assert one_summary["losses"][-1] < one_summary["losses"][0]  # it trained
    # Evaluation too (where its batches do not share out evenly, a process joins forwards it does not count).
    eval_losses = [s["metrics"]["evalLoss"] for s in (one_summary, two_summary)]
    assert abs(eval_losses[1] - eval_losses[0]) < RELATIVE_TOLERANCE * eval_losses[0]

    # The published weights, gathered from two processes' shards, are the one process's.
    for name in [publish.weights_file(method)] + (
        [f"{publish.MERGED_DIR}/model.safetensors"] if merged else []
    ):
        one_weights, two_weights = published_weights(ws, f"one/{name}"), published_weights(ws, f"two/{name}")
        assert one_weights.keys() == two_weights.keys() and one_weights
        weight_diff = max(float((one_weights[k] - two_weights[k]).abs().max()) for k in one_weights)
        print(f"{method}: {name} max |weight difference| {weight_diff:.3g}")
        assert weight_diff < 1e-5

    # Each process holds half of what one process holds whole (a tensor whose rows do not split evenly
    # leaves one process a row more).
    (two_held,) = [e for e in logged if e["event"] == "held_bytes"]
    (one_held,) = [e for e in one_logged if e["event"] == "held_bytes"]
    whole_parameters, whole_optimizer = one_held["parameters"][0], one_held["optimizer"][0]
    print(f"{method}: held bytes one {one_held}, two {two_held}")
    assert whole_optimizer > 0
    for kind, whole in (("parameters", whole_parameters), ("optimizer", whole_optimizer)):
        per_rank = two_held[kind]
        assert len(per_rank) == 2
        assert sum(per_rank) == pytest.approx(whole, rel=0.02)
        assert all(abs(held - whole / 2) <= 0.02 * whole for held in per_rank), (kind, per_rank, whole)


def test_reshard_two_processes_to_one(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA, sharded over two processes, stopped; resumed in one process on a device that would plan
    smaller micro-steps: the checkpoint's step plan is replayed, and the losses are the uninterrupted
    run's."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(48, seed=9)))
    config = job(ws, train, "resumed", "LoRA", steps=12)
    config = replace(config, checkpointing=CheckpointConfig(every_steps=None, every_minutes=None, keep=2))
    stopped = run_processes(ws, config, "two", processes=2, stop_after_step=3)
    (checkpoint,) = [e["step"] for e in stopped if e["event"] == "checkpoint"]
    manifest = ws.read_json(f"resumed/checkpoints/step-{checkpoint:08d}/manifest.json")
    assert manifest["worldSize"] == 2
    # Each process wrote its own shard file; none gathered the whole state.
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata"} <= set(manifest["files"])

    resumed = ws.run(config, monkeypatch, **{MICRO_BATCH_TOKENS_ENV: "48"})
    assert resumed.code == 0, resumed.summary.message
    reference = ws.run(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/reference/")),
        monkeypatch,
        **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS},
    )
    assert reference.code == 0, reference.summary.message
    assert_resumed_like_reference(ws, checkpoint)


def test_reshard_one_process_to_two(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tuning in one process, stopped; resumed sharded over two processes."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(48, seed=10)))
    config = job(ws, train, "resumed", "Full", steps=12)
    stopped = run_processes(ws, config, "one", processes=1, stop_after_step=3)
    (checkpoint,) = [e["step"] for e in stopped if e["event"] == "checkpoint"]
    assert ws.read_json(f"resumed/checkpoints/step-{checkpoint:08d}/manifest.json")["worldSize"] == 1

    logged = run_processes(ws, config, "two", processes=2, **{MICRO_BATCH_TOKENS_ENV: "48"})
    plan = next(e for e in logged if e["event"] == "plan")
    assert plan["resumed_step"] == checkpoint
    reference = ws.run(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/reference/")),
        monkeypatch,
        **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS},
    )
    assert reference.code == 0, reference.summary.message
    assert_resumed_like_reference(ws, checkpoint)


def assert_resumed_like_reference(ws: Workspace, checkpoint: int) -> None:
    resumed, reference = (
        ws.read_json("resumed/training_summary.json"),
        ws.read_json("reference/training_summary.json"),
    )
    assert 3 <= checkpoint < len(reference["losses"])
    plan_of = [s["provenance"]["resolved"]["microBatchTokens"] for s in (resumed, reference)]
    assert plan_of[0] == plan_of[1] == int(MICRO_TOKENS)  # the checkpoint's plan, not one sized anew
    differences = relative_differences(resumed["losses"], reference["losses"])
    print(f"resumed after step {checkpoint}: max relative loss difference {max(differences):.3g}")
    assert max(differences[checkpoint:]) < RELATIVE_TOLERANCE
    assert resumed["progress"]["trainedTokens"] == reference["progress"]["trainedTokens"]


def test_a_stop_between_micro_batches_replays_that_step_with_the_same_dropout(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process, LoRA dropout on, eight micro-batches a step; stopped after three micro-batches of
    step 4. The checkpoint is of step 3 with the RNG state from the start of step 4, so the restart draws
    step 4's dropout masks again and every loss equals the uninterrupted run's."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(64, seed=11)))
    config = job(ws, train, "resumed", "LoRA", steps=8)
    config = replace(config, lora=LoraConfig(r=4, alpha=8, dropout=0.2))
    micro = {MICRO_BATCH_TOKENS_ENV: "64"}
    reference = ws.run(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/reference/")), monkeypatch, **micro
    )
    assert reference.code == 0, reference.summary.message
    reference_summary = ws.read_json("reference/training_summary.json")
    accumulation = reference_summary["provenance"]["resolved"]["gradientAccumulation"]
    assert accumulation >= 4

    flags: list[StopFlag] = []
    monkeypatch.setattr(StopFlag, "install", lambda self: flags.append(self) or self)
    real_loss_sum = fastpath.loss_sum
    forwards = 0

    def counting_loss_sum(model: torch.nn.Module, batch: Any) -> Any:
        nonlocal forwards
        if model.training:
            forwards += 1
            if forwards == 3 * accumulation + 3:
                flags[-1].requested = True
        return real_loss_sum(model, batch)

    monkeypatch.setattr(fastpath, "loss_sum", counting_loss_sum)
    stopped = ws.run(config, monkeypatch, **micro)
    assert stopped.code == EXIT_INTERRUPTED, stopped.summary.message
    assert stopped.summary.checkpoint is not None and stopped.summary.checkpoint["step"] == 3
    monkeypatch.setattr(fastpath, "loss_sum", real_loss_sum)
    resumed = ws.run(config, monkeypatch, **micro)
    assert resumed.code == 0, resumed.summary.message
    resumed_losses = ws.read_json("resumed/training_summary.json")["losses"]
    print(f"stopped mid-step 4, resumed: losses {resumed_losses} reference {reference_summary['losses']}")
    assert max(relative_differences(resumed_losses, reference_summary["losses"])) < 1e-6


def test_strategy_follows_the_plan_unless_forced_and_is_single_for_one_process() -> None:
    assert parallel.run_strategy("FSDP", 1, None) == parallel.SINGLE
    assert parallel.run_strategy("FSDP", 1, "FSDP") == parallel.SINGLE
    assert parallel.run_strategy("FSDP", 4, None) == parallel.FSDP
    assert parallel.run_strategy("DDP", 4, None) == parallel.DDP
    assert parallel.run_strategy(None, 4, None) == parallel.DDP
    assert parallel.run_strategy("DDP", 2, "FSDP") == parallel.FSDP
    with pytest.raises(ValueError, match=f"{parallel.FORCE_STRATEGY_ENV}='ZeRO'"):
        parallel.run_strategy("DDP", 2, "ZeRO")


def test_fsdp_precision_is_bf16_compute_with_fp32_reduction_on_gpus_and_fp32_on_cpu() -> None:
    assert parallel.sharding_precision("cuda") == (torch.bfloat16, torch.float32)
    assert parallel.sharding_precision("cpu") == (None, None)
