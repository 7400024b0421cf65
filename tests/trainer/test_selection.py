"""output.select BestEval and hyperparameters.earlyStoppingPatience on real runs of the tiny model that
overfit (a few random answers to memorise, many steps): the published weights are those of the step with
the lowest validation loss, proven three ways (a plain-loop evaluation of the loaded result, tensor equality
with a run that simply stopped at that step, and a restart that resumes past the best step and still
publishes it), and early stopping ends the run Succeeded before its planned steps."""

from __future__ import annotations

import json
import random
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import Workspace, jsonl, log_events
from kubetune_trainer import launch, parallel
from kubetune_trainer.contract import (
    DatasetConfig,
    Hyperparameters,
    LoraConfig,
    OutputConfig,
    Selection,
    TerminationSummary,
    TrainerConfig,
    TrainerReason,
)
from kubetune_trainer.data import Tokenize, parse_records
from kubetune_trainer.errors import EXIT_INTERRUPTED
from kubetune_trainer.packing import IGNORE_INDEX
from kubetune_trainer.recipe import MICRO_BATCH_TOKENS_ENV
from kubetune_trainer.train import TEST_HANG_ENV

EVAL_EVERY = 3


def codes(count: int, seed: int) -> list[dict[str, Any]]:
    """Prompts answered with random letters: nothing to generalise, so memorising the training answers
    makes the validation loss rise after an early fall (the letters' distribution)."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Say code {rng.randint(0, 999)}:",
            "completion": " " + " ".join(rng.choice("abcdefghij") for _ in range(12)),
        }
        for _ in range(count)
    ]


TRAIN, VALIDATION = codes(6, seed=1), codes(8, seed=2)


def overfit_config(ws: Workspace, name: str, method: str, **hp: Any) -> TrainerConfig:
    train = ws.put("data/train.jsonl", jsonl(TRAIN))
    val = ws.put("data/val.jsonl", jsonl(VALIDATION))
    settings = {
        "max_steps": 40,
        "learning_rate": 3e-3 if method == "Full" else 2e-2,
        "batch_tokens": 512,
        # A constant rate: a run cut short at step N trains exactly like the first N steps of a longer one.
        "warmup_ratio": 0.0,
        "scheduler": "Constant",
        "seed": 7,
        "eval_every_steps": EVAL_EVERY,
        **hp,
    }
    return replace(
        ws.config(train),
        method=method,
        lora=LoraConfig(r=8, alpha=16, dropout=0.0) if method == "LoRA" else None,
        dataset=DatasetConfig(train=train, validation=val, max_seq_length=64),
        hyperparameters=Hyperparameters(**settings),
        output=OutputConfig(uri=f"s3://{ws.bucket}/{name}/", select="BestEval"),
    )


def download(ws: Workspace, prefix: str, dest: Path) -> None:
    client = ws.s3.client()
    for item in client.list_objects_v2(Bucket=ws.bucket, Prefix=prefix).get("Contents", []):
        target = dest / item["Key"][len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(ws.bucket, item["Key"], str(target))


def weights(ws: Workspace, prefix: str, tmp_path: Path, file: str) -> dict[str, torch.Tensor]:
    local = tmp_path / prefix.strip("/")
    download(ws, prefix, local)
    return load_file(str(local / file))


def plain_eval(model: Any, tokenizer: Any) -> tuple[float, float]:
    """(mean loss, token accuracy) over the validation set's label tokens, one record at a time through the
    model's own logits: independent of the trainer's batching and fused loss."""
    parsed = parse_records([("val.jsonl", jsonl(VALIDATION))], "PromptCompletion")
    tokenize = Tokenize(tokenizer, 64, train_on_all=False)
    loss, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for record in parsed.records:
            example = tokenize(record)
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].float()
            for t in range(len(example.input_ids) - 1):
                target = example.labels[t + 1]
                if target != IGNORE_INDEX:
                    count += 1
                    correct += int(int(logits[t].argmax()) == target)
                    loss += float(F.cross_entropy(logits[t][None], torch.tensor([target])))
    return loss / count, correct / count


def test_full_best_eval_publishes_the_best_steps_weights(ws: Workspace, monkeypatch, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = ws.run(overfit_config(ws, "best", "Full"), monkeypatch)
    assert result.code == 0, result.summary.message
    summary = result.summary
    assert summary.metrics is not None and summary.adapter is not None
    best_step, best_loss = int(summary.metrics["bestStep"]), summary.metrics["bestEvalLoss"]
    # It overfit: the best evaluation is well before the end, and the last one is clearly worse.
    assert EVAL_EVERY <= best_step <= 40 - 2 * EVAL_EVERY
    assert summary.metrics["evalLoss"] > best_loss + 0.2
    assert summary.adapter.selected == Selection("BestEval", best_step, best_loss)
    assert ws.read_json("best/manifest.json")["selected"] == {
        "select": "BestEval",
        "step": best_step,
        "evalLoss": best_loss,
    }

    # The published model, loaded as users load it, scores the best evaluation's loss, not the last one's.
    local = tmp_path / "best"
    download(ws, "best/", local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    loss, _ = plain_eval(model, AutoTokenizer.from_pretrained(local))
    print(
        f"Full BestEval: best step {best_step} of 40, eval loss {best_loss:.4f} "
        f"(last {summary.metrics['evalLoss']:.4f}); published model re-evaluated {loss:.4f}"
    )
    assert loss == pytest.approx(best_loss, abs=1e-4)

    # Tensor for tensor, the weights of a run that trained exactly best_step steps and kept its last.
    short = replace(
        overfit_config(ws, "short", "Full", max_steps=best_step),
        output=OutputConfig(uri=f"s3://{ws.bucket}/short/", select="Last"),
    )
    short_result = ws.run(short, monkeypatch)
    assert short_result.code == 0, short_result.summary.message
    assert short_result.summary.adapter is not None
    selected = short_result.summary.adapter.selected
    assert selected is not None and (selected.select, selected.step) == ("Last", best_step)
    assert selected.eval_loss == pytest.approx(best_loss, abs=1e-6)
    published = weights(ws, "best/", tmp_path, "model.safetensors")
    reference = weights(ws, "short/", tmp_path, "model.safetensors")
    assert published.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(published[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    # The last-step run's token accuracy, against the plain loop over its published model's logits.
    short_local = tmp_path / "short-model"
    download(ws, "short/", short_local)
    short_model = AutoModelForCausalLM.from_pretrained(short_local, dtype=torch.float32).eval()
    short_loss, accuracy = plain_eval(short_model, AutoTokenizer.from_pretrained(short_local))
    assert short_result.summary.metrics is not None
    assert short_result.summary.metrics["evalTokenAccuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert 0 < accuracy < 1
    assert short_loss == pytest.approx(best_loss, abs=1e-4)


def test_lora_early_stop_keeps_the_best_adapter_across_a_restart(
    ws: Workspace, monkeypatch, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patience = 2
    config = overfit_config(ws, "reference", "LoRA", max_steps=200, early_stopping_patience=patience)
    result = ws.run(config, monkeypatch)
    assert result.code == 0, result.summary.message
    summary = result.summary
    assert summary.outcome == "Succeeded" and summary.progress is not None and summary.metrics is not None
    stopped, best_step = int(summary.progress["step"]), int(summary.metrics["bestStep"])
    # Stopped well before maxSteps, `patience` evaluations after the best one.
    assert stopped < 200 and summary.progress["totalSteps"] == 200
    assert stopped == best_step + patience * EVAL_EVERY
    assert summary.early_stop is not None and summary.early_stop.step == stopped
    assert summary.early_stop.best_step == best_step and summary.early_stop.patience == patience
    assert f"stopped early after step {stopped} of 200" in summary.message
    assert len(ws.read_json("reference/training_summary.json")["losses"]) == stopped
    assert summary.adapter is not None and summary.adapter.selected is not None
    assert summary.adapter.selected.step == best_step

    # PEFT loads the published adapter; it scores the best evaluation's loss.
    local = tmp_path / "reference"
    download(ws, "reference/", local)
    base_dir = tmp_path / "base"
    client = ws.s3.client()
    for item in client.list_objects_v2(Bucket=ws.models_bucket, Prefix="tiny/")["Contents"]:
        (base_dir / item["Key"][len("tiny/") :]).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(ws.models_bucket, item["Key"], str(base_dir / item["Key"][len("tiny/") :]))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, local).eval()
    loss, _ = plain_eval(adapted, AutoTokenizer.from_pretrained(base_dir))
    print(
        f"LoRA early stop: stopped after step {stopped} of 200, best step {best_step} "
        f"({summary.metrics['bestEvalLoss']:.4f}); PEFT-loaded adapter re-evaluated {loss:.4f}"
    )
    assert loss == pytest.approx(summary.metrics["bestEvalLoss"], abs=1e-4)

    # The same job, stopped by SIGTERM one step after its best evaluation, then restarted: the checkpoint
    # carries the best weights, so the restart publishes the same adapter, tensor for tensor.
    resumed = replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/resumed/", select="BestEval"))
    process, _ = ws.subprocess(resumed, "interrupted", **{TEST_HANG_ENV: str(best_step + 1)})
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("{") and json.loads(line)["event"] == "test_hang":
            process.send_signal(signal.SIGTERM)
            break
    out, _ = process.communicate(timeout=300)
    lines += out.splitlines()
    assert process.returncode == EXIT_INTERRUPTED, "\n".join(lines[-20:])
    checkpoint = [e for e in log_events(lines) if e["event"] == "checkpoint"][-1]
    assert checkpoint["step"] == best_step + 1

    restarted = ws.run(resumed, monkeypatch)
    assert restarted.code == 0, restarted.summary.message
    assert restarted.summary.progress is not None and restarted.summary.progress["step"] == stopped
    assert restarted.summary.adapter is not None
    assert restarted.summary.adapter.selected == summary.adapter.selected
    published = weights(ws, "resumed/", tmp_path, "adapter_model.safetensors")
    reference = load_file(str(local / "adapter_model.safetensors"))
    assert published.keys() == reference.keys() and len(reference) > 0
    for name, tensor in reference.items():
        torch.testing.assert_close(published[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_without_a_validation_set_best_eval_and_patience_are_refused(ws: Workspace, monkeypatch) -> None:
    train = ws.put("data/train.jsonl", jsonl(TRAIN))
    base = ws.config(train)
    config = replace(
        base,
        hyperparameters=replace(base.hyperparameters, early_stopping_patience=3),
        output=OutputConfig(uri=f"s3://{ws.bucket}/x/", select="BestEval"),
    )
    result = ws.run(config, monkeypatch)
    assert result.code != 0 and result.summary.reason == TrainerReason.INVALID_CONFIG
    assert "output.select BestEval" in result.summary.message
    assert "earlyStoppingPatience" in result.summary.message
    assert "set dataset.validation or dataset.validationSplit" in result.summary.message


def test_qlora_best_eval_publishes_the_adapter_of_the_best_step(ws: Workspace, monkeypatch) -> None:
    """QLoRA (a 4-bit NF4 base, on the CPU here): the early-stopped BestEval run publishes, tensor for
    tensor, the adapter of a run that simply trained up to the best step."""
    config = overfit_config(ws, "best", "QLoRA", max_steps=200, early_stopping_patience=2)
    config = replace(config, lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    result = ws.run(config, monkeypatch)
    assert result.code == 0, result.summary.message
    assert result.summary.metrics is not None and result.summary.progress is not None
    best_step = int(result.summary.metrics["bestStep"])
    assert best_step < result.summary.progress["step"] < 200
    assert result.summary.adapter is not None and result.summary.adapter.selected is not None
    assert result.summary.adapter.selected.step == best_step

    short = replace(
        config,
        hyperparameters=replace(config.hyperparameters, max_steps=best_step, early_stopping_patience=None),
        output=OutputConfig(uri=f"s3://{ws.bucket}/short/", select="Last"),
    )
    assert ws.run(short, monkeypatch).code == 0
    published = published_file(ws, "best/adapter_model.safetensors")
    reference = published_file(ws, "short/adapter_model.safetensors")
    assert published.keys() == reference.keys() and len(reference) > 0
    for name, tensor in reference.items():
        torch.testing.assert_close(published[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_fsdp_keeps_the_best_shards_through_a_restart(ws: Workspace, monkeypatch) -> None:
    """Full fine-tuning sharded over two CPU processes: each keeps its shard of the best weights, writes it
    into the checkpoint, reads it back after SIGTERM and a restart, and the gathered result is the best
    step's, as one process holding the model whole publishes it."""
    micro = {MICRO_BATCH_TOKENS_ENV: "128"}
    config = overfit_config(ws, "one", "Full", max_steps=200, early_stopping_patience=2)
    one = ws.run(config, monkeypatch, **micro)
    assert one.code == 0, one.summary.message
    assert one.summary.metrics is not None and one.summary.progress is not None
    best_step, stopped = int(one.summary.metrics["bestStep"]), int(one.summary.progress["step"])

    sharded = replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/two/", select="BestEval"))
    two_processes = {
        **micro,
        launch.CPU_PROCESSES_ENV: "2",
        parallel.FORCE_STRATEGY_ENV: parallel.FSDP,
    }
    process, _ = ws.subprocess(sharded, "two", **two_processes, **{TEST_HANG_ENV: str(best_step + 1)})
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("{") and json.loads(line)["event"] == "test_hang":
            process.send_signal(signal.SIGTERM)
            break
    out, _ = process.communicate(timeout=300)
    lines += out.splitlines()
    assert process.returncode == EXIT_INTERRUPTED, "\n".join(lines[-20:])
    checkpoint = [e for e in log_events(lines) if e["event"] == "checkpoint"][-1]["step"]
    assert checkpoint == best_step + 1
    manifest = ws.read_json(f"two/checkpoints/step-{checkpoint:08d}/manifest.json")
    assert manifest["worldSize"] == 2 and {"dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(manifest["files"])

    process, termination_log = ws.subprocess(sharded, "two-resumed", **two_processes)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:]
    summary = TerminationSummary.from_json(termination_log.read_text())
    assert summary.progress is not None and summary.progress["step"] == stopped
    assert summary.adapter is not None and summary.adapter.selected is not None
    assert summary.adapter.selected.step == best_step
    assert ws.read_json("two/training_summary.json")["provenance"]["resolved"]["strategy"] == "FSDP"
    one_weights = published_file(ws, "one/model.safetensors")
    two_weights = published_file(ws, "two/model.safetensors")
    assert one_weights.keys() == two_weights.keys() and one_weights
    difference = max(float((one_weights[k] - two_weights[k]).abs().max()) for k in one_weights)
    assert difference < 1e-5


def published_file(ws: Workspace, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(ws.s3.client().get_object(Bucket=ws.bucket, Key=key)["Body"].read())
