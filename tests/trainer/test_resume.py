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

from conftest import Workspace, chat_records, jsonl, log_events
from kubetune_trainer import contract
from kubetune_trainer.contract import (
    CheckpointConfig,
    LoraConfig,
    OutputConfig,
    TerminationSummary,
    TrainerReason,
)
from kubetune_trainer.errors import EXIT_INTERRUPTED

TOTAL_STEPS = 30


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
    reference_losses = ws.read_json("reference/training_summary.json")["losses"]

    # The interrupted run: SIGTERM once it is past its first periodic checkpoint.
    resumed_config = replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/resumed/"))
    process, termination_log = ws.subprocess(resumed_config, "interrupted")
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
    checkpoints = [e for e in log_events(lines) if e["event"] == "checkpoint"]
    assert checkpoints[0]["step"] == 5
    interrupted_at = checkpoints[-1]["step"]
    assert 7 <= interrupted_at < TOTAL_STEPS
    summary = TerminationSummary.from_json(termination_log.read_text())
    assert summary.outcome == "Failed" and summary.reason == TrainerReason.INTERRUPTED
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
    code, lines = wait(ws.subprocess(resumed_config, "restarted")[0])
    assert code == 0, "\n".join(lines[-20:])
    plan = next(e for e in log_events(lines) if e["event"] == "plan")
    assert plan["resumed_step"] == interrupted_at
    assert plan["resumed_from"].endswith(f"/checkpoints/step-{interrupted_at:08d}/")
    first_progress = next(e for e in log_events(lines) if e["event"] == "progress")
    assert first_progress["step"] == interrupted_at + 1
    resumed_losses = ws.read_json("resumed/training_summary.json")["losses"]
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


def test_checkpoint_rotation_keeps_the_newest_complete_ones_and_a_newer_partial_one(
    ws: Workspace, monkeypatch, tmp_path
) -> None:
    """A checkpoint counts once its manifest is written; pruning drops older complete and stale partial
    ones, but not a partial one newer than every complete one (another pod may be writing it)."""
    from kubetune_trainer.checkpoint import MANIFEST, Checkpointer
    from kubetune_trainer.storage import Storage, make_client

    for key, value in ws.s3.env().items():
        monkeypatch.setenv(key, value)
    storage = Storage(make_client(ws.config("s3://unused/x.jsonl").s3))
    checkpointer = Checkpointer(storage, f"s3://{ws.bucket}/out/", tmp_path, keep=2)
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (6, False)):
        ws.put(f"out/checkpoints/step-{step:08d}/state.json", b"{}")
        if complete:
            ws.put(f"out/checkpoints/step-{step:08d}/{MANIFEST}", b"{}")
    assert checkpointer.complete_steps() == [1, 3, 4]

    checkpointer.prune()

    listed = ws.s3.client().list_objects_v2(Bucket=ws.bucket, Prefix="out/checkpoints/")["Contents"]
    assert sorted({o["Key"].split("/")[2] for o in listed}) == [
        "step-00000003",
        "step-00000004",
        "step-00000006",
    ]
    assert checkpointer.complete_steps() == [3, 4]


def test_an_interrupted_or_altered_checkpoint_is_never_restored(ws: Workspace, monkeypatch, tmp_path) -> None:
    """Without its manifest a checkpoint does not exist; a file that differs from its manifest, or DCP
    metadata naming anything but DCP's own types, ends in StorageError before anything is loaded."""
    import pickle

    import pytest
    import torch

    from kubetune_trainer.checkpoint import MANIFEST, Checkpointer, capture_rng
    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.schedule import Batching, build_plan
    from kubetune_trainer.storage import Storage, make_client

    for key, value in ws.s3.env().items():
        monkeypatch.setenv(key, value)
    storage = Storage(make_client(ws.config("s3://unused/x.jsonl").s3))
    checkpointer = Checkpointer(storage, f"s3://{ws.bucket}/out/", tmp_path, keep=3)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    plan = build_plan([5, 6, 7], Batching(None, 1, 1), seed=0, max_steps=3)
    for step in (1, 2):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        checkpointer.save(step, model, optimizer, {"step": step}, capture_rng(), plan)
    saved = model.weight.detach().clone()

    # The newest upload was cut short before its manifest: the one before it is the newest checkpoint.
    ws.s3.client().delete_object(Bucket=ws.bucket, Key=f"out/checkpoints/step-00000002/{MANIFEST}")
    found = checkpointer.fetch_latest()
    assert found is not None and found.step == 1
    with torch.no_grad():
        model.weight.zero_()
    assert checkpointer.restore(found, model, optimizer) == {"step": 1}
    assert model.weight.abs().sum() > 0 and not torch.equal(model.weight, saved)  # step 1's weights

    key = "out/checkpoints/step-00000001/dcp/.metadata"
    original = ws.s3.client().get_object(Bucket=ws.bucket, Key=key)["Body"].read()
    ws.put(key, original + b"\0")
    with pytest.raises(TrainerError, match="does not match its manifest") as err:
        checkpointer.fetch_latest()
    assert err.value.reason == "StorageError"

    # Metadata that would run code when unpickled is refused even where the manifest vouches for it.
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled",))

    evil = pickle.dumps(Payload())
    ws.put(key, evil)
    manifest = ws.read_json(f"out/checkpoints/step-00000001/{MANIFEST}")
    manifest["files"]["dcp/.metadata"] = __import__("hashlib").sha256(evil).hexdigest()
    ws.put(f"out/checkpoints/step-00000001/{MANIFEST}", json.dumps(manifest).encode())
    found = checkpointer.fetch_latest()
    assert found is not None
    with pytest.raises(TrainerError, match=r"builtins\.print, which it may not"):
        checkpointer.restore(found, model, optimizer)
