"""Kill mid-run, restart, finish: the trainer runs as a subprocess (as in the pod), gets SIGTERM, writes a
checkpoint and exits retryably; the restarted process resumes from that checkpoint and ends with the same
losses as an uninterrupted run with the same seed. The metrics endpoint is scraped while it trains."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from dataclasses import replace
from typing import Any

from conftest import Workspace, chat_records, jsonl
from kubetune_trainer import contract
from kubetune_trainer.contract import CheckpointConfig, LoraConfig, OutputConfig, TerminationSummary
from kubetune_trainer.errors import EXIT_INTERRUPTED, REASON_INTERRUPTED

TOTAL_STEPS = 30


def events(lines: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in lines:
        if line.startswith("{"):
            parsed.append(json.loads(line))
    return parsed


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("kubetune_trainer_"):
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def wait(process: subprocess.Popen[str], timeout: float = 240) -> tuple[int, list[str]]:
    assert process.stdout is not None
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out.splitlines()


def test_sigterm_checkpoints_and_the_restart_resumes_to_the_same_losses(ws: Workspace, monkeypatch) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(64, seed=3)))
    base = ws.config(train)
    config = replace(
        base,
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),  # dropout draws random numbers: the RNG must resume too
        hyperparameters=replace(base.hyperparameters, max_steps=TOTAL_STEPS, learning_rate=5e-3),
        checkpointing=CheckpointConfig(every_steps=5, every_minutes=None, keep=2),
    )

    # Uninterrupted reference run.
    reference = ws.run(replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/reference/")), monkeypatch)
    assert reference.code == 0, reference.summary.message
    reference_losses = json.loads(
        ws.s3.client().get_object(Bucket=ws.bucket, Key="reference/training_summary.json")["Body"].read()
    )["losses"]

    # The interrupted run: SIGTERM once it is past its first periodic checkpoint.
    resumed_config = replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/resumed/"))
    process = ws.subprocess(resumed_config, "interrupted")
    assert process.stdout is not None
    seen: list[str] = []
    port = None
    scraped: dict[str, float] = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event["event"] == "metrics":
            port = event["port"]
        if event["event"] == "progress" and event["step"] >= 7:
            assert port is not None
            scraped = scrape(port)
            process.send_signal(signal.SIGTERM)
            break
    code, rest = wait(process)
    lines = seen + rest
    assert code == EXIT_INTERRUPTED, "\n".join(lines[-20:])
    checkpoints = [e for e in events(lines) if e["event"] == "checkpoint"]
    assert checkpoints[0]["step"] == 5
    interrupted_at = checkpoints[-1]["step"]
    assert 7 <= interrupted_at < TOTAL_STEPS
    log_path = ws.tmp.glob("interrupted-*/termination-log")
    summary = TerminationSummary.from_json(next(iter(log_path)).read_text())
    assert summary.outcome == "Failed" and summary.reason == REASON_INTERRUPTED
    assert summary.checkpoint == {
        "uri": f"s3://{ws.bucket}/resumed/checkpoints/step-{interrupted_at:08d}/",
        "step": interrupted_at,
    }

    # Live metrics while it trained (the names the operator scrapes).
    assert scraped[contract.METRIC_TOTAL_STEPS] == TOTAL_STEPS
    assert scraped[contract.METRIC_STEP] >= 7
    assert scraped[contract.METRIC_TRAIN_LOSS] > 0
    assert scraped[contract.METRIC_LEARNING_RATE] > 0
    assert scraped[contract.METRIC_TRAINED_TOKENS] > 0

    # The restart resumes from the SIGTERM checkpoint and lands on the same losses.
    code, lines = wait(ws.subprocess(resumed_config, "restarted"))
    assert code == 0, "\n".join(lines[-20:])
    plan = next(e for e in events(lines) if e["event"] == "plan")
    assert plan["resumed_step"] == interrupted_at
    assert plan["resumed_from"].endswith(f"/checkpoints/step-{interrupted_at:08d}/")
    first_progress = next(e for e in events(lines) if e["event"] == "progress")
    assert first_progress["step"] == interrupted_at + 1
    resumed_losses = json.loads(
        ws.s3.client().get_object(Bucket=ws.bucket, Key="resumed/training_summary.json")["Body"].read()
    )["losses"]
    assert len(resumed_losses) == len(reference_losses) == TOTAL_STEPS
    print(
        f"resume: interrupted after step {interrupted_at}; final loss reference {reference_losses[-1]!r} "
        f"resumed {resumed_losses[-1]!r}; max |diff| over all steps "
        f"{max(abs(a - b) for a, b in zip(reference_losses, resumed_losses, strict=True))!r}"
    )
    assert abs(resumed_losses[-1] - reference_losses[-1]) < 1e-6
    assert (
        resumed_losses == reference_losses
        or max(abs(a - b) for a, b in zip(reference_losses, resumed_losses, strict=True)) < 1e-6
    )
    assert resumed_losses[-1] < resumed_losses[0]
