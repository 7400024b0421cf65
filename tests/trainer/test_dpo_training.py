"""Preference tuning for real: the tiny model learns a preference rule from pairs in S3 (held-out accuracy
from about one half to at least 0.8, reward margin rising), and SFT then DPO from the SFT adapter."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e.demo import preference_dataset

from conftest import Workspace, chat_records, jsonl, log_events
from kubetune_trainer.contract import (
    DatasetConfig,
    DpoConfig,
    Hyperparameters,
    LoraConfig,
    StartAdapter,
    TrainerReason,
)
from kubetune_trainer.data import Tokenize, parse_records, tokenize_pairs
from kubetune_trainer.packing import IGNORE_INDEX


def preference_pairs() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) pairs: 178 and 64 of the rule's 242 (e2e.demo.preference_dataset); none in both."""
    records = preference_dataset()
    return records[:178], records[178:]


def sequence_logp(model: Any, input_ids: list[int], labels: list[int]) -> float:
    """The answer's summed log-probability: one plain forward pass of one sequence."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([input_ids])).logits[0].float().log_softmax(-1)
    return sum(
        float(logprobs[t - 1, input_ids[t]]) for t in range(1, len(input_ids)) if labels[t] != IGNORE_INDEX
    )


def preference_accuracy(
    model: Any, reference: Any | None, tokenizer: Any, records: list[dict[str, str]]
) -> float:
    """Share of pairs the model prefers the chosen side of: by its own log-probabilities, or (with a
    reference) by the implicit reward log(model / reference)."""
    parsed = parse_records([("held-out.jsonl", jsonl(records))])
    pairs, _ = tokenize_pairs(parsed.pairs, Tokenize(tokenizer, 64, train_on_all=False), "held-out.jsonl")
    preferred = 0
    for pair in pairs:
        scores = []
        for side in (pair.chosen, pair.rejected):
            score = sequence_logp(model, side.input_ids, side.labels)
            if reference is not None:
                score -= sequence_logp(reference, side.input_ids, side.labels)
            scores.append(score)
        preferred += scores[0] > scores[1]
    return preferred / len(pairs)


def download(ws: Workspace, prefix: str, dest: Path) -> None:
    client = ws.s3.client()
    for item in client.list_objects_v2(Bucket=ws.bucket, Prefix=prefix).get("Contents", []):
        target = dest / item["Key"][len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(ws.bucket, item["Key"], str(target))


def load_base(ws: Workspace, dest: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = ws.s3.client()
    for item in client.list_objects_v2(Bucket=ws.models_bucket, Prefix="tiny/").get("Contents", []):
        target = dest / item["Key"][len("tiny/") :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(ws.models_bucket, item["Key"], str(target))
    return AutoModelForCausalLM.from_pretrained(
        dest, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(dest)


def dpo_config(ws: Workspace, train: str, val: str, **hp: Any) -> Any:
    config = ws.config(train)
    return replace(
        config,
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),  # DPO trains without dropout: step 1 is still a tie
        method="DPO",
        dpo=DpoConfig(beta=0.1),
        dataset=DatasetConfig(train=train, validation=val, max_seq_length=64),
        hyperparameters=Hyperparameters(
            max_steps=40,
            learning_rate=1e-2,
            batch_tokens=512,
            warmup_ratio=0.05,
            seed=7,
            eval_every_steps=10,
            **hp,
        ),
    )


def test_dpo_learns_a_preference_rule_that_holds_on_held_out_pairs(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from peft import PeftModel

    train_records, held_out = preference_pairs()
    train = ws.put("prefs/train.jsonl", jsonl(train_records))
    val = ws.put("prefs/val.jsonl", jsonl(held_out))
    capsys.readouterr()
    result = ws.run(dpo_config(ws, train, val), monkeypatch)
    events = log_events(capsys.readouterr().out.splitlines())
    assert result.code == 0, result.summary.message
    metrics = result.summary.metrics
    assert metrics is not None

    # The trainer's own view: every pair starts as a tie with its reference (accuracy 1/2, margin 0); the
    # held-out accuracy ends at >= 0.8 and the margins rise.
    (reference,) = [e for e in events if e["event"] == "reference"]
    assert reference["pairs"] == 178 and reference["eval_pairs"] == 64 and reference["computed"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[0]["step"] == 1 and progress[0]["preference_accuracy"] == pytest.approx(0.5)
    assert progress[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    assert evals[-1]["eval_preference_accuracy"] >= 0.8, evals
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] > 0, evals
    assert metrics["evalPreferenceAccuracy"] == pytest.approx(evals[-1]["eval_preference_accuracy"], abs=1e-6)
    assert metrics["rewardMargin"] > 0 and metrics["preferenceAccuracy"] >= 0.8
    assert metrics["chosenLogps"] > metrics["rejectedLogps"]
    assert metrics["trainLoss"] < 0.69  # below log 2, the loss of a tie

    # Independently, from the published adapter loaded with PEFT: the held-out pairs, scored with plain
    # forward passes. Before training the base prefers chosen answers about half the time; after, the
    # policy prefers them by its implicit reward, log(policy / reference).
    base, tokenizer = load_base(ws, tmp_path / "base")
    before = preference_accuracy(base, None, tokenizer, held_out)
    assert 0.25 <= before <= 0.75, before
    out = tmp_path / "adapter"
    download(ws, "out/", out)
    reference_model, _ = load_base(ws, tmp_path / "reference")
    policy = PeftModel.from_pretrained(base, out).eval()
    by_reward = preference_accuracy(policy, reference_model, tokenizer, held_out)
    print(
        f"DPO on the tiny model: held-out preference accuracy of the base {before:.3f}, of the policy "
        f"{by_reward:.3f} by implicit reward (trainer: {metrics['evalPreferenceAccuracy']:.3f}); eval reward "
        f"margin by evaluation {[round(e['eval_reward_margin'], 4) for e in evals]}; train loss "
        f"{metrics['trainLoss']:.4f}"
    )
    assert by_reward >= 0.8
    assert by_reward == pytest.approx(metrics["evalPreferenceAccuracy"], abs=1 / 64 + 1e-9)


def test_sft_continues_from_an_adapter_and_dpo_starts_from_it(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    sft_train = ws.put("sft/train.jsonl", jsonl(chat_records(24)))
    sft = replace(
        ws.config(sft_train),
        hyperparameters=replace(ws.config(sft_train).hyperparameters, max_steps=6, learning_rate=1e-2),
    )
    first = ws.run(sft, monkeypatch)
    assert first.code == 0, first.summary.message
    assert first.summary.adapter is not None
    sft_uri, sft_sha = first.summary.adapter.uri, first.summary.adapter.sha256

    # A wrong digest is refused before training.
    train_records, held_out = preference_pairs()
    train = ws.put("prefs/train.jsonl", jsonl(train_records[:48]))
    val = ws.put("prefs/val.jsonl", jsonl(held_out[:16]))
    dpo = replace(
        dpo_config(ws, train, val),
        adapter=StartAdapter(uri=sft_uri, sha256="0" * 64),
        output=replace(ws.config(train).output, uri=f"s3://{ws.bucket}/dpo/"),
        hyperparameters=replace(dpo_config(ws, train, val).hyperparameters, max_steps=4, eval_every_steps=2),
    )
    refused = ws.run(dpo, monkeypatch)
    assert refused.summary.reason == TrainerReason.INVALID_MODEL
    assert sft_sha in refused.summary.message and "baseModel.adapter.sha256" in refused.summary.message

    # With the right digest: the policy starts from the SFT adapter and the reference is that adapter. A
    # learning rate too small to move it leaves the published adapter equal to the SFT one (fresh adapters
    # would start at B = 0), and the reference log-probabilities are the SFT adapter's, computed here.
    capsys.readouterr()
    still = replace(dpo.hyperparameters, learning_rate=1e-9)
    second = ws.run(
        replace(dpo, adapter=StartAdapter(uri=sft_uri, sha256=sft_sha), hyperparameters=still), monkeypatch
    )
    events = log_events(capsys.readouterr().out.splitlines())
    assert second.code == 0, second.summary.message
    (start,) = [e for e in events if e["event"] == "start_adapter"]
    assert start == {**start, "uri": sft_uri, "sha256": sft_sha}
    assert second.summary.provenance is not None
    assert second.summary.provenance["startAdapter"] == {"uri": sft_uri, "sha256": sft_sha}

    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    download(ws, "out/", sft_dir)
    download(ws, "dpo/", dpo_dir)
    sft_weights = load_file(sft_dir / "adapter_model.safetensors")
    dpo_weights = load_file(dpo_dir / "adapter_model.safetensors")
    assert sft_weights.keys() == dpo_weights.keys()
    assert max(float(sft_weights[k].abs().max()) for k in sft_weights if "lora_B" in k) > 1e-3
    for key, value in sft_weights.items():
        torch.testing.assert_close(dpo_weights[key], value, atol=1e-6, rtol=0)
    assert hashlib.sha256((dpo_dir / "adapter_model.safetensors").read_bytes()).hexdigest() == (
        second.summary.adapter.sha256 if second.summary.adapter else ""
    )

    base, tokenizer = load_base(ws, tmp_path / "base")
    parsed = parse_records([("train.jsonl", jsonl(train_records[:48]))])
    pairs, _ = tokenize_pairs(parsed.pairs, Tokenize(tokenizer, 64, train_on_all=False), "train.jsonl")
    base_chosen = sum(sequence_logp(base, p.chosen.input_ids, p.chosen.labels) for p in pairs) / len(pairs)
    sft_model = PeftModel.from_pretrained(base, sft_dir).eval()
    sft_chosen = sum(sequence_logp(sft_model, p.chosen.input_ids, p.chosen.labels) for p in pairs) / len(
        pairs
    )
    (reference,) = [e for e in events if e["event"] == "reference"]
    assert reference["chosen_logps"] == pytest.approx(sft_chosen, abs=1e-4)
    assert abs(sft_chosen - base_chosen) > 1e-2
    base = sft_model.unload()

    # SFT continues an adapter too: its first step's loss is the SFT adapter's loss, not the base's.
    resumed = ws.run(
        replace(
            sft,
            adapter=StartAdapter(uri=sft_uri),
            output=replace(sft.output, uri=f"s3://{ws.bucket}/sft2/"),
        ),
        monkeypatch,
    )
    assert resumed.code == 0, resumed.summary.message
    sft2 = tmp_path / "sft2"
    download(ws, "sft2/", sft2)
    summary_first = json.loads((sft_dir / "training_summary.json").read_text())["losses"]
    summary_second = json.loads((sft2 / "training_summary.json").read_text())["losses"]
    assert summary_second[0] < summary_first[0] - 0.1, (summary_first, summary_second)
    assert PeftModel.from_pretrained(base, sft2) is not None


def test_a_resumed_dpo_run_keeps_its_reference_and_matches_an_uninterrupted_one(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from kubetune_trainer.contract import CheckpointConfig, OutputConfig
    from kubetune_trainer.errors import EXIT_INTERRUPTED
    from kubetune_trainer.train import TEST_HANG_ENV

    train_records, held_out = preference_pairs()
    train = ws.put("prefs/train.jsonl", jsonl(train_records[:64]))
    val = ws.put("prefs/val.jsonl", jsonl(held_out[:16]))
    base = dpo_config(ws, train, val)
    config = replace(
        base,
        hyperparameters=replace(base.hyperparameters, max_steps=8, eval_every_steps=4),
        checkpointing=CheckpointConfig(every_steps=2, every_minutes=None, keep=2),
    )
    whole = ws.run(replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/whole/")), monkeypatch)
    assert whole.code == 0, whole.summary.message
    whole_losses = ws.read_json("whole/training_summary.json")["losses"]

    # Stopped after step 5 (it stalls there until SIGTERM), then restarted from the step-5 checkpoint: by
    # then the adapters have trained, so a reference recomputed at the restart would change every loss.
    resumed = replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/resumed/"))
    process, _ = ws.subprocess(resumed, "interrupted", **{TEST_HANG_ENV: "5"})
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if '"event": "test_hang"' in line:
            process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=240)
    assert process.returncode == EXIT_INTERRUPTED, "".join(lines) + rest
    restarted, _ = ws.subprocess(resumed, "restarted")
    out, _ = restarted.communicate(timeout=240)
    assert restarted.returncode == 0, out
    events = log_events(out.splitlines())
    (reference,) = [e for e in events if e["event"] == "reference"]
    assert reference["computed"] is False
    assert next(e for e in events if e["event"] == "plan")["resumed_step"] == 5
    resumed_losses = ws.read_json("resumed/training_summary.json")["losses"]
    assert len(resumed_losses) == 8
    assert max(abs(a - b) for a, b in zip(whole_losses, resumed_losses, strict=True)) < 1e-6
    assert whole_losses[-1] < whole_losses[0]


@pytest.mark.parametrize("strategy", ["DDP", "FSDP"])
def test_two_cpu_processes_run_dpo_exactly_like_one(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    from kubetune_trainer import launch, parallel
    from kubetune_trainer.contract import OutputConfig
    from kubetune_trainer.recipe import MICRO_BATCH_TOKENS_ENV

    train_records, held_out = preference_pairs()
    train = ws.put("prefs/train.jsonl", jsonl(train_records[:64]))
    val = ws.put("prefs/val.jsonl", jsonl(held_out[:20]))
    base = dpo_config(ws, train, val)
    config = replace(base, hyperparameters=replace(base.hyperparameters, max_steps=4, eval_every_steps=2))
    micro = {MICRO_BATCH_TOKENS_ENV: "128"}  # several micro-batches a step, so both ranks work

    two, _ = ws.subprocess(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/two/")),
        "two",
        **micro,
        **{launch.CPU_PROCESSES_ENV: "2", parallel.FORCE_STRATEGY_ENV: strategy},
    )
    one = ws.run(replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/one/")), monkeypatch, **micro)
    assert one.code == 0, one.summary.message
    output, _ = two.communicate(timeout=300)
    assert two.returncode == 0, output[-3000:]

    one_summary, two_summary = (
        ws.read_json("one/training_summary.json"),
        ws.read_json("two/training_summary.json"),
    )
    assert two_summary["provenance"]["resolved"]["worldSize"] == 2
    assert two_summary["provenance"]["resolved"]["strategy"] == strategy
    # Each rank scored its share of the pairs for the reference; together they equal one process's.
    (reference,) = [e for e in log_events(output.splitlines()) if e["event"] == "reference"]
    assert reference["pairs"] == 64 and reference["eval_pairs"] == 20
    pairs = zip(one_summary["losses"], two_summary["losses"], strict=True)
    assert max(abs(a - b) for a, b in pairs) < 1e-5
    for key in (
        "trainLoss",
        "evalLoss",
        "rewardMargin",
        "preferenceAccuracy",
        "evalRewardMargin",
        "chosenLogps",
    ):
        assert two_summary["metrics"][key] == pytest.approx(one_summary["metrics"][key], abs=1e-5), key
    assert one_summary["progress"]["trainedTokens"] == two_summary["progress"]["trainedTokens"]


def test_dpo_on_full_weights_publishes_a_model_that_prefers_the_chosen_answers(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    train_records, held_out = preference_pairs()
    train = ws.put("prefs/train.jsonl", jsonl(train_records))
    val = ws.put("prefs/val.jsonl", jsonl(held_out))
    base = dpo_config(ws, train, val)
    config = replace(
        base,
        lora=None,
        dpo=DpoConfig(beta=0.1, parameters="Full"),
        hyperparameters=replace(base.hyperparameters, max_steps=30, learning_rate=1e-3, eval_every_steps=30),
    )
    result = ws.run(config, monkeypatch)
    assert result.code == 0, result.summary.message
    assert result.summary.adapter is not None and "model.safetensors" in result.summary.adapter.files
    assert result.summary.metrics is not None and result.summary.metrics["evalRewardMargin"] > 0

    # The published model, against the base as reference, by plain forward passes.
    out = tmp_path / "model"
    download(ws, "out/", out)
    policy = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference, tokenizer = load_base(ws, tmp_path / "base")
    accuracy = preference_accuracy(policy, reference, tokenizer, held_out)
    assert accuracy == pytest.approx(result.summary.metrics["evalPreferenceAccuracy"], abs=1 / 64 + 1e-9)
    assert accuracy > 0.6
