"""Data-parallel training, on CPU: ``python -m kubetune_trainer`` with ``KUBETUNE_CPU_PROCESSES=2`` starts two
gloo workers under the trainer's own launcher, the path one process per GPU takes in the pod.

Each optimizer step's micro-batches are shared out between the ranks and the loss is normalised by the step's
label tokens over all ranks, so two processes must train exactly like one on the same steps (fp32, no
dropout: only the order of float additions differs). Rank 0 alone logs, serves metrics, checkpoints and
publishes; the launcher forwards SIGTERM and passes on the exit code the operator's pod failure policy reads.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e.cluster.procs import pid_running

from conftest import Workspace, chat_records, jsonl, log_events
from kubetune_trainer import launch
from kubetune_trainer.contract import (
    CheckpointConfig,
    DatasetConfig,
    Hyperparameters,
    OutputConfig,
    TerminationSummary,
    TrainerReason,
)
from kubetune_trainer.errors import EXIT_INTERRUPTED, EXIT_PERMANENT
from kubetune_trainer.group import child_processes
from kubetune_trainer.recipe import MICRO_BATCH_TOKENS_ENV, resolve_batching
from kubetune_trainer.train import Runtime

# A step of 512 tokens in micro-batches of at most 128: four or more micro-batches, so both ranks work.
STEP_TOKENS = 512
MICRO_TOKENS = "128"
# Two processes against one: the same sums in another order (fp32).
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def start(ws: Workspace, config: Any, name: str, processes: int) -> tuple[subprocess.Popen[str], Path]:
    """The trainer as the pod runs it, with ``processes`` CPU workers; returns the process and its
    termination-log path."""
    return ws.subprocess(
        config, name, **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS, launch.CPU_PROCESSES_ENV: str(processes)}
    )


def published(ws: Workspace, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load

    weights = load(
        ws.s3.client().get_object(Bucket=ws.bucket, Key=f"{prefix}adapter_model.safetensors")["Body"].read()
    )
    return ws.read_json(f"{prefix}training_summary.json"), weights


def distributed_config(ws: Workspace, train: str, steps: int, out: str) -> Any:
    base = ws.config(train)
    return replace(
        base,
        dataset=DatasetConfig(train=train, validation_split=0.2, max_seq_length=128),
        hyperparameters=Hyperparameters(
            max_steps=steps,
            learning_rate=3e-3,
            batch_tokens=STEP_TOKENS,
            warmup_ratio=0.1,
            seed=11,
            eval_every_steps=2,
        ),
        output=OutputConfig(uri=f"s3://{ws.bucket}/{out}/"),
    )


def test_two_cpu_processes_train_exactly_like_one(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(40, seed=5)))
    config = distributed_config(ws, train, steps=6, out="two")
    config = replace(config, checkpointing=CheckpointConfig(every_steps=3, every_minutes=None, keep=2))

    two, two_log = start(ws, config, "two", processes=2)
    # The reference, in this process while the two workers start: one process, the same steps.
    one = ws.run(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/one/")),
        monkeypatch,
        **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS},
    )
    assert one.code == 0, one.summary.message
    output, _ = two.communicate(timeout=180)
    assert two.returncode == 0, output[-3000:]

    summary = TerminationSummary.from_json(two_log.read_text())
    assert summary.outcome == "Succeeded", summary.message
    assert summary.adapter is not None and summary.adapter.uri == f"s3://{ws.bucket}/two/"
    assert summary.provenance is not None and summary.provenance["resolved"]["worldSize"] == 2

    one_summary, one_weights = published(ws, "one/")
    two_summary, two_weights = published(ws, "two/")
    resolved_one, resolved_two = one_summary["provenance"]["resolved"], two_summary["provenance"]["resolved"]
    assert (resolved_one["worldSize"], resolved_two["worldSize"]) == (1, 2)
    # Four micro-batches a step: all four in one process, two in each of two.
    assert resolved_one["gradientAccumulation"] == 2 * resolved_two["gradientAccumulation"] == 4
    assert resolved_one["totalSteps"] == resolved_two["totalSteps"] == 6
    # Each example once per step: the ranks shared the micro-batches out, none was run twice.
    assert one_summary["progress"]["trainedTokens"] == two_summary["progress"]["trainedTokens"]

    loss_diff = max(abs(a - b) for a, b in zip(one_summary["losses"], two_summary["losses"], strict=True))
    eval_diff = abs(one_summary["metrics"]["evalLoss"] - two_summary["metrics"]["evalLoss"])
    grad_norms = one_summary["metrics"]["gradNorm"], two_summary["metrics"]["gradNorm"]
    assert one_weights.keys() == two_weights.keys() and one_weights
    weight_diff = max(float((one_weights[k] - two_weights[k]).abs().max()) for k in one_weights)
    moved = max(float(w.abs().max()) for k, w in one_weights.items() if "lora_B" in k)
    print(
        f"two processes vs one: max |loss diff| {loss_diff:.3g} over {len(one_summary['losses'])} steps, "
        f"eval loss diff {eval_diff:.3g}, last grad norms {grad_norms}, "
        f"max |adapter weight diff| {weight_diff:.3g} (largest lora_B weight {moved:.3g}); "
        f"losses one {one_summary['losses']} two {two_summary['losses']}"
    )
    assert loss_diff < LOSS_TOLERANCE
    assert eval_diff < LOSS_TOLERANCE
    assert abs(grad_norms[0] - grad_norms[1]) < LOSS_TOLERANCE * grad_norms[0]
    assert weight_diff < WEIGHT_TOLERANCE
    assert moved > 100 * WEIGHT_TOLERANCE  # the adapter trained (lora_B starts at zero)
    assert one_summary["losses"][-1] < one_summary["losses"][0]

    # Rank 0 alone logs progress, serves metrics and checkpoints; every rank reports its exit.
    logged = log_events(output.splitlines())
    assert [e["event"] for e in logged].count("plan") == 1
    assert [e["event"] for e in logged].count("metrics") == 1
    assert [e["step"] for e in logged if e["event"] == "checkpoint"] == [3]
    assert all(e.get("rank") == 0 for e in logged if e["event"] != "exit")
    exits = sorted((e["rank"], e["code"]) for e in logged if e["event"] == "exit")
    assert exits == [(0, 0), (1, 0)]
    start_event = next(e for e in logged if e["event"] == "start")
    assert start_event["world_size"] == 2


def test_sigterm_stops_every_rank_at_a_checkpoint(ws: Workspace) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(60, seed=6)))
    config = distributed_config(ws, train, steps=200, out="stopped")
    process, log = start(ws, config, "stopped", processes=2)
    assert process.stdout is not None
    seen: list[str] = []
    workers: set[int] = set()
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        event = log_events([line])
        if event and event[0]["event"] == "progress" and event[0]["step"] >= 2:
            workers = child_processes(process.pid)
            process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=120)
    output = "".join(seen) + rest
    assert len(workers) == 2, output[-3000:]
    assert process.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert not [pid for pid in workers if pid_running(pid)]

    logged = log_events(output.splitlines())
    exits = sorted((e["rank"], e["code"]) for e in logged if e["event"] == "exit")
    assert exits == [(0, EXIT_INTERRUPTED), (1, EXIT_INTERRUPTED)]
    checkpoints = [e["step"] for e in logged if e["event"] == "checkpoint"]
    assert len(checkpoints) == 1 and 2 <= checkpoints[0] < 200
    step = checkpoints[0]
    summary = TerminationSummary.from_json(log.read_text())
    assert summary.reason == TrainerReason.INTERRUPTED
    assert summary.checkpoint == {
        "uri": f"s3://{ws.bucket}/stopped/checkpoints/step-{step:08d}/",
        "step": step,
    }
    assert ws.read_json(f"stopped/checkpoints/step-{step:08d}/manifest.json")["step"] == step


def test_a_permanent_failure_keeps_its_exit_code_through_the_launcher(ws: Workspace) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(4)))
    config = distributed_config(ws, train, steps=2, out="bad")
    config = replace(config, hyperparameters=replace(config.hyperparameters, scheduler="Wavy"))
    process, log = start(ws, config, "bad", processes=2)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PERMANENT, output[-3000:]
    summary = TerminationSummary.from_json(log.read_text())
    assert summary.reason == "InvalidConfig" and "scheduler 'Wavy'" in summary.message, summary.message
    exits = sorted((e["rank"], e["code"]) for e in log_events(output.splitlines()) if e["event"] == "exit")
    assert exits == [(0, EXIT_PERMANENT), (1, EXIT_PERMANENT)]


def test_the_launcher_reports_the_first_failure_or_rank_0() -> None:
    assert launch.pick_report([(1, 0), (0, 0)]) == (0, 0)
    assert launch.pick_report([(1, 1), (0, 143)]) == (1, 1)
    assert launch.pick_report([(0, 2), (1, 2)]) == (0, 2)
    assert launch.pick_report([(1, 0), (0, 1)]) == (0, 1)


def test_cpu_processes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launch.CPU_PROCESSES_ENV, raising=False)
    assert launch.plan_processes(0) == (1, False)
    monkeypatch.setenv(launch.CPU_PROCESSES_ENV, "3")
    assert launch.plan_processes(0) == (3, False)
    monkeypatch.setenv(launch.CPU_PROCESSES_ENV, "two")
    with pytest.raises(ValueError, match=f"{launch.CPU_PROCESSES_ENV}='two' is not a whole number"):
        launch.plan_processes(0)


def test_micro_batch_size_is_per_process() -> None:
    """``microBatchSize`` counts examples per process and micro-step (the CRD's "per GPU"): two processes
    with gradientAccumulation 1 take the steps one process takes with 2."""
    hp = Hyperparameters(max_steps=1, micro_batch_size=3, gradient_accumulation=1)
    two = resolve_batching(hp, None, Runtime(torch.device("cpu"), 0, 2, None), 128)
    one = resolve_batching(
        replace(hp, gradient_accumulation=2), None, Runtime(torch.device("cpu"), 0, 1, None), 128
    )
    assert two == one
    assert (two.examples_per_micro, two.accumulation) == (3, 2)
