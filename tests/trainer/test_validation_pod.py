"""The validation pod (``python -m kubetune_trainer validate``) against a real S3 server and the tiny model:
it validates and tokenizes without the weights, plans, writes the token cache; the trainer trains from that
cache, and re-validates a dataset that changed since (never training on records nobody checked)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tests.trainer.conftest import Workspace, chat_records, jsonl, log_events

from kubetune_trainer import dataset_cache
from kubetune_trainer.contract import TERMINATION_LOG_ENV, Hyperparameters, TerminationSummary
from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT


def validate(ws: Workspace, config: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[int, TerminationSummary]:
    from kubetune_trainer.validate import main

    env = ws.env(config, "validate")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main()
    return code, TerminationSummary.from_json(Path(env[TERMINATION_LOG_ENV]).read_text())


def weightless_model(ws: Workspace) -> str:
    """The tiny model's directory in this workspace's bucket without its weights: only config.json and the
    tokenizer files. Training from it would fail; validating must not need more."""
    client = ws.s3.client()
    listed = client.list_objects_v2(Bucket=ws.models_bucket, Prefix="tiny/")["Contents"]
    for item in listed:
        name = item["Key"][len("tiny/") :]
        if name.endswith((".safetensors", ".bin")):
            continue
        body = client.get_object(Bucket=ws.models_bucket, Key=item["Key"])["Body"].read()
        ws.put(f"weightless/{name}", body)
    return f"s3://{ws.bucket}/weightless/"


def test_validation_reads_no_weights_counts_plans_and_writes_a_cache_the_trainer_trains_from(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tokenizer: Any
) -> None:
    records = chat_records(40)
    train = ws.put("data/train.jsonl", jsonl(records))
    config = ws.config(train, gpu_product="NVIDIA-A10G")
    code, summary = validate(ws, replace(config, base_model=weightless_model(ws)), monkeypatch)
    assert code == EXIT_OK, summary
    assert (summary.outcome, summary.reason) == ("Succeeded", "Validated")
    plan = summary.plan or {}
    # Counted against the records uploaded and the tokenizer applied here, independently of the trainer.
    assert plan["examples"] == {"train": 40, "validation": 0}
    assert plan["tokens"]["train"] > 40 * 10
    assert plan["steps"] == 6  # maxSteps
    assert plan["strategy"] == "Single" and plan["gpuGiB"] == 24.0
    assert plan["estimate"]["gpuProduct"] == "NVIDIA-A10G" and plan["estimate"]["basis"] == "estimated"
    assert plan["estimate"]["seconds"] > 0 and plan["estimate"]["modelSize"].endswith("M")
    digest = plan["cache"]["digest"]
    assert plan["cache"]["uri"] == f"s3://{ws.bucket}/out/cache/{digest}/"
    manifest = ws.read_json(f"out/cache/{digest}/manifest.json")
    assert manifest["splits"]["train"]["examples"] == 40
    assert manifest["key"]["train"][0]["uri"] == train
    capsys.readouterr()

    # The trainer (with the weights) finds the cache under the same key and trains from it.
    result = ws.run(replace(config, base_model=f"s3://{ws.models_bucket}/tiny/"), monkeypatch)
    events = log_events(capsys.readouterr().out.splitlines())
    assert result.code == EXIT_OK, result.summary
    used = [e for e in events if e["event"] == "dataset_cache"]
    # The tokenizer (config.json too) of the weightless copy is byte for byte the original's: same key.
    assert used and used[0]["used"] is True, used
    assert result.summary.progress and result.summary.progress["step"] == 6
    provenance = ws.read_json("out/training_summary.json")["provenance"]["dataset"]
    assert provenance["tokenizedCache"] == plan["cache"]["uri"]
    assert provenance["train_examples"] == 40


def test_a_dataset_changed_after_validation_is_validated_again_and_never_trained_unchecked(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(20)))
    config = ws.config(train)
    code, summary = validate(ws, config, monkeypatch)
    assert code == EXIT_OK, summary
    # Replaced (new ETag) with a file whose line 3 is not JSON.
    lines = jsonl(chat_records(20)).decode().splitlines()
    lines[2] = "{not json"
    ws.put("data/train.jsonl", ("\n".join(lines) + "\n").encode())
    capsys.readouterr()
    result = ws.run(config, monkeypatch)
    events = log_events(capsys.readouterr().out.splitlines())
    miss = [e for e in events if e["event"] == "dataset_cache"]
    assert miss and miss[0]["used"] is False and "no cache there" in miss[0]["reason"]
    assert result.code == EXIT_PERMANENT
    assert result.summary.reason == "InvalidDataset" and "train.jsonl:3" in result.summary.message


def test_an_invalid_dataset_fails_validation_with_the_line_numbers(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = jsonl(chat_records(5)) + b'{"messages": "not a list"}\n'
    train = ws.put("data/bad.jsonl", body)
    code, summary = validate(ws, ws.config(train), monkeypatch)
    assert code == EXIT_PERMANENT
    assert summary.reason == "InvalidDataset" and "bad.jsonl:6" in summary.message
    assert not ws.s3.client().list_objects_v2(Bucket=ws.bucket, Prefix="out/cache/").get("Contents")


def test_a_model_too_large_for_the_requested_gpus_fails_before_any_gpu(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full fine-tuning of an 8B-shaped model (only its config.json exists) on one 24 GiB GPU."""
    prefix = weightless_model(ws).split(f"{ws.bucket}/", 1)[1]
    config_json = ws.read_json(f"{prefix}config.json")
    config_json.update(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    ws.put(f"{prefix}config.json", json.dumps(config_json).encode())
    train = ws.put("data/train.jsonl", jsonl(chat_records(4)))
    config = ws.config(
        train,
        base_model=f"s3://{ws.bucket}/{prefix}",
        method="Full",
        lora=None,
        gpus=1,
        gpu_product="NVIDIA-L4",
    )
    code, summary = validate(ws, config, monkeypatch)
    assert code == EXIT_PERMANENT
    assert summary.reason == "InsufficientGPUMemory" and "24.0 GiB" in summary.message, summary.message


def _tamper(ws: Workspace, digest: str, change: Any) -> None:
    key = f"out/cache/{digest}/manifest.json"
    manifest = ws.read_json(key)
    change(manifest)
    ws.put(key, json.dumps(manifest).encode())


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda m: m["key"].update(trainerVersion="0.0.9"), "written by trainer '0.0.9'"),
        (lambda m: m["files"]["tokens.safetensors"].update(sha256="0" * 64), "does not match the sha256"),
        (lambda m: m["splits"]["train"].update(examples=41), "counts differ"),
        (lambda m: m.update(version=99), "format version 99"),
    ],
    ids=["other-trainer-version", "tokens-tampered", "counts", "format-version"],
)
def test_a_cache_that_is_not_exactly_this_jobs_is_ignored(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tokenizer: Any, change: Any, why: str
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(8)))
    config = ws.config(train, hyperparameters=Hyperparameters(epochs=1, batch_tokens=512))
    code, summary = validate(ws, config, monkeypatch)
    assert code == EXIT_OK, summary
    digest = (summary.plan or {})["cache"]["digest"]
    key = _key(ws, config)
    assert key.digest == digest
    found, _ = dataset_cache.read(ws_storage(ws), key, config.output.uri, len(tokenizer), 128)
    assert found is not None and len(found.train) == 8
    _tamper(ws, digest, change)
    found, reason = dataset_cache.read(ws_storage(ws), key, config.output.uri, len(tokenizer), 128)
    assert found is None and why in reason


def test_token_ids_outside_the_vocabulary_are_refused_even_with_a_matching_digest(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(8)))
    config = ws.config(train, hyperparameters=Hyperparameters(epochs=1, batch_tokens=512))
    assert validate(ws, config, monkeypatch)[0] == EXIT_OK
    found, reason = dataset_cache.read(ws_storage(ws), _key(ws, config), config.output.uri, 5, 128)
    assert found is None and "outside the vocabulary of 5" in reason


def ws_storage(ws: Workspace) -> Any:
    """A Storage on the workspace's server (the credentials: what validate() put in the environment)."""
    from kubetune_trainer.storage import Storage, make_client

    return Storage(make_client(ws.config("s3://x/y").s3))


def _key(ws: Workspace, config: Any) -> Any:
    """The key the trainer computes for ``config`` now (the dataset's ETags, listed)."""
    from kubetune_trainer import model, prepared_data

    storage = ws_storage(ws)
    tokenizer_dir = model.fetch_tokenizer_files(config.base_model, storage, ws.tmp / "tok")
    return prepared_data.current_key(config, storage, tokenizer_dir)


def test_preference_pairs_are_validated_counted_and_planned_but_not_cached(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    """Method DPO: the validation pod reads pairs (refusing SFT records and bad pairs with their line), counts
    a pair's tokens as both sides, and plans; the token cache holds SFT examples only, so none is written."""
    from e2e.demo import preference_dataset

    from kubetune_trainer.contract import DpoConfig

    pairs = preference_dataset()[:24]
    train = ws.put("data/pairs.jsonl", jsonl(pairs))
    config = ws.config(train, method="DPO", dpo=DpoConfig())
    code, summary = validate(ws, replace(config, base_model=weightless_model(ws)), monkeypatch)
    assert code == EXIT_OK, summary
    plan = summary.plan or {}
    assert plan["examples"] == {"train": 24, "validation": 0}
    # Both sides of every pair, tokenized here with the same tokenizer, independently of the validation pod.
    sides = sum(
        len(tokenizer(p["prompt"] + p[side]).input_ids) for p in pairs for side in ("chosen", "rejected")
    )
    assert abs(plan["tokens"]["train"] - sides) <= 4 * len(pairs), (plan["tokens"], sides)
    assert "cache" not in plan
    assert not ws.s3.client().list_objects_v2(Bucket=ws.bucket, Prefix="out/cache/").get("Contents")

    def with_train(uri: str) -> Any:
        return replace(config, dataset=replace(config.dataset, train=uri))

    bad = [*pairs[:3], {**pairs[3], "rejected": pairs[3]["chosen"]}]
    code, summary = validate(ws, with_train(ws.put("data/bad-pairs.jsonl", jsonl(bad))), monkeypatch)
    assert code == EXIT_PERMANENT
    assert summary.reason == "InvalidDataset" and "bad-pairs.jsonl:4" in summary.message, summary.message

    sft_records = ws.put("data/chat.jsonl", jsonl(chat_records(5)))
    code, summary = validate(ws, with_train(sft_records), monkeypatch)
    assert code == EXIT_PERMANENT and summary.reason == "InvalidDataset", summary
    assert "method DPO trains on preference pairs" in summary.message
