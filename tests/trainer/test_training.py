"""Real training runs of the tiny model against the real S3 server: LoRA and Full, the published files, the
adapter reproducing the trained model, and padded batches matching packed ones."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import Workspace, chat_records, jsonl
from kubetune_trainer.contract import (
    TERMINATION_MESSAGE_LIMIT,
    CheckpointConfig,
    DatasetConfig,
    Hyperparameters,
    OutputConfig,
)
from kubetune_trainer.data import Tokenize, parse_records
from kubetune_trainer.fastpath import loss_sum, prepare_model
from kubetune_trainer.packing import collate_packed


def download(ws: Workspace, prefix: str, dest: Path, bucket: str | None = None) -> list[str]:
    """Every object under ``prefix`` (of the workspace's bucket by default) into ``dest``; their names."""
    client = ws.s3.client()
    bucket = bucket or ws.bucket
    names = []
    for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        name = item["Key"][len(prefix) :]
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(dest / name))
        names.append(name)
    return sorted(names)


def eval_loss(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> float:
    """Mean loss over every label token of ``records``, computed here from the published files."""
    parsed = parse_records([("val.jsonl", jsonl(records))])
    tokenize = Tokenize(tokenizer, 128, train_on_all=False)
    batch = collate_packed([tokenize(r) for r in parsed.records])
    with torch.no_grad():
        summed, count = loss_sum(model, batch)
    return float(summed) / count


def base_model(ws: Workspace, tmp_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "base"
    download(ws, "tiny/", local, bucket=ws.models_bucket)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    prepare_model(model, "cpu")
    return model.eval(), AutoTokenizer.from_pretrained(local)


VALIDATION = chat_records(8, seed=99)


def lora_config(ws: Workspace, train: str, val: str, **hp: Any) -> Any:
    config = ws.config(train)
    return replace(
        config,
        dataset=DatasetConfig(train=train, validation=val, max_seq_length=128),
        hyperparameters=replace(
            config.hyperparameters, max_steps=16, learning_rate=1e-2, eval_every_steps=8, **hp
        ),
        output=OutputConfig(uri=f"s3://{ws.bucket}/adapter/", merge_adapter=True),
    )


def test_lora_run_learns_and_publishes_an_adapter_peft_loads(
    ws: Workspace, monkeypatch, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = ws.put("data/train.jsonl", jsonl(chat_records(48)))
    val = ws.put("data/val.jsonl", jsonl(VALIDATION))
    result = ws.run(lora_config(ws, train, val), monkeypatch)
    summary = result.summary
    assert result.code == 0, summary.message
    assert summary.outcome == "Succeeded" and summary.reason == "Completed"
    # The termination message fits Kubernetes' limit and still carries what the data was.
    assert len(summary.to_json().encode()) <= TERMINATION_MESSAGE_LIMIT
    assert summary.provenance is not None
    read = summary.provenance["dataset"]["train"][0]
    assert read["sha256"] == hashlib.sha256(jsonl(chat_records(48))).hexdigest()
    assert read["etag"] == hashlib.md5(jsonl(chat_records(48))).hexdigest()
    assert summary.provenance["baseModel"]["uri"] == f"s3://{ws.models_bucket}/tiny/"

    # Published: PEFT adapter, tokenizer, summary; the manifest names every file with its digest.
    out = tmp_path / "out"
    names = download(ws, "adapter/", out)
    for required in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_summary.json",
        "manifest.json",
        "merged/model.safetensors",
        "merged/config.json",
    ):
        assert required in names
    assert not any(name.startswith("checkpoints/") for name in names)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name
    adapter_sha = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert summary.adapter is not None
    assert summary.adapter.sha256 == adapter_sha
    assert summary.adapter.uri == f"s3://{ws.bucket}/adapter/"
    assert summary.adapter.base_model == f"s3://{ws.models_bucket}/tiny/"
    assert "adapter_model.safetensors" in summary.adapter.files
    assert summary.adapter.size_bytes == sum(e["bytes"] for e in manifest["files"].values())
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    targeted = {name.rpartition(".")[2] for name in adapter_config["target_modules"]}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    # It learned: the loss falls, and evaluation ran on the validation set.
    losses = json.loads((out / "training_summary.json").read_text())["losses"]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert summary.metrics is not None and summary.progress is not None
    assert summary.progress["step"] == summary.progress["totalSteps"] == 16
    assert summary.progress["tokensPerSecond"] > 0
    assert summary.progress["trainedTokens"] > 0
    # Evaluations at steps 8 and 16: the best is the lower of the two, and the last is the one reported.
    assert summary.metrics["bestStep"] in (8, 16)
    assert summary.metrics["bestEvalLoss"] <= summary.metrics["evalLoss"]
    assert (summary.metrics["bestEvalLoss"] == summary.metrics["evalLoss"]) == (
        summary.metrics["bestStep"] == 16
    )

    # The adapter reproduces the trained model: the eval loss the trainer reported, and the merged weights.
    base, tokenizer = base_model(ws, tmp_path)
    base_loss = eval_loss(base, tokenizer, VALIDATION)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    adapted_loss = eval_loss(peft_model, tokenizer, VALIDATION)
    assert adapted_loss == pytest.approx(summary.metrics["evalLoss"], abs=1e-5)
    assert adapted_loss < base_loss - 0.5
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("What is 3 + 4?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_full_fine_tuning_learns_and_publishes_safetensors(
    ws: Workspace, monkeypatch, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = ws.put("data/train.jsonl", jsonl(chat_records(48)))
    val = ws.put("data/val.jsonl", jsonl(VALIDATION))
    config = ws.config(train)
    config = replace(
        config,
        method="Full",
        lora=None,
        dataset=DatasetConfig(train=train, validation=val, max_seq_length=128),
        hyperparameters=replace(config.hyperparameters, max_steps=12, learning_rate=3e-3),
        output=OutputConfig(uri=f"s3://{ws.bucket}/full/"),
    )
    result = ws.run(config, monkeypatch)
    assert result.code == 0, result.summary.message
    out = tmp_path / "full"
    names = download(ws, "full/", out)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_summary.json",
        "manifest.json",
    } <= set(names)
    assert not any(name.startswith("adapter") for name in names)
    assert result.summary.adapter is not None
    assert (
        result.summary.adapter.sha256 == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    )
    losses = json.loads((out / "training_summary.json").read_text())["losses"]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prepare_model(model, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert eval_loss(model, tokenizer, VALIDATION) == pytest.approx(
        result.summary.metrics["evalLoss"], abs=1e-5
    )


def test_padded_batches_train_exactly_like_packed_ones(ws: Workspace, monkeypatch, tmp_path: Path) -> None:
    """Same examples, same micro-batches, same seed: only the layout differs, so every step's loss agrees."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(24, seed=5)))
    losses = {}
    for packing in (True, False):
        config = ws.config(train)
        config = replace(
            config,
            hyperparameters=Hyperparameters(
                max_steps=5,
                learning_rate=1e-2,
                micro_batch_size=3,
                gradient_accumulation=2,
                packing=packing,
                seed=11,
            ),
            output=OutputConfig(uri=f"s3://{ws.bucket}/packing-{packing}/"),
        )
        result = ws.run(config, monkeypatch)
        assert result.code == 0, result.summary.message
        summary_file = ws.read_json(f"packing-{packing}/training_summary.json")
        assert summary_file["provenance"]["resolved"]["gradientAccumulation"] == 2
        losses[packing] = summary_file["losses"]
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] < losses[True][0]


def test_validation_split_holds_out_records_and_checkpoints_rotate(ws: Workspace, monkeypatch) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(30)))
    config = ws.config(train)
    config = replace(
        config,
        dataset=DatasetConfig(train=train, validation_split=0.2, max_seq_length=128),
        checkpointing=CheckpointConfig(every_steps=2, every_minutes=None, keep=1),
    )
    seen: list[list[str]] = []

    import kubetune_trainer.checkpoint as checkpoint_module

    original_prune = checkpoint_module.Checkpointer.prune

    def observe(self: Any) -> None:
        original_prune(self)
        seen.append([f"step-{s:08d}" for s in self.complete_steps()])

    monkeypatch.setattr(checkpoint_module.Checkpointer, "prune", observe)
    result = ws.run(config, monkeypatch)
    assert result.code == 0, result.summary.message
    provenance = result.summary.provenance or {}
    assert provenance["dataset"]["rows"] == 24 and provenance["dataset"]["validationRows"] == 6
    assert "evalLoss" in (result.summary.metrics or {})
    # Checkpoints at steps 2 and 4 (not 6, the last): never more than `keep` complete ones in S3.
    assert seen == [["step-00000002"], ["step-00000004"]]


@pytest.mark.parametrize(
    ("config_json", "expected"),
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),
        ({"torch_dtype": "torch.bfloat16"}, "bfloat16"),
        ({"torch_dtype": "auto"}, None),
        ({}, None),
    ],
)
def test_base_dtype_is_read_from_config_json(config_json: dict, expected: str | None) -> None:
    from kubetune_trainer.publish import base_dtype

    assert base_dtype(config_json) == expected


def test_full_fine_tuning_of_a_bf16_base_publishes_bf16_weights(
    ws: Workspace, monkeypatch, tmp_path: Path
) -> None:
    """The base is stored in bf16; training runs over float32 master weights (CPU), and the published
    model is written back in bf16, as its config.json says."""
    from e2e.cluster.s3 import upload_directory
    from safetensors import safe_open

    from kubetune_devtools.tiny import build_tiny_model

    base, tokenizer = build_tiny_model(seed=0)
    local = tmp_path / "bf16-base"
    base.to(torch.bfloat16).save_pretrained(local, safe_serialization=True)
    tokenizer.save_pretrained(local)
    upload_directory(ws.s3.client(), local, ws.bucket, "bf16-base/")
    train = ws.put("data/train.jsonl", jsonl(chat_records(16)))
    config = ws.config(
        train,
        base_model=f"s3://{ws.bucket}/bf16-base/",
        method="Full",
        lora=None,
        output=OutputConfig(uri=f"s3://{ws.bucket}/full-bf16/"),
    )
    config = replace(config, hyperparameters=replace(config.hyperparameters, max_steps=2))
    result = ws.run(config, monkeypatch)
    assert result.code == 0, result.summary.message
    out = tmp_path / "full-bf16"
    download(ws, "full-bf16/", out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}  # noqa: SIM118
        trained = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert dtypes == {torch.bfloat16}
    assert not torch.equal(trained, base.model.layers[0].self_attn.q_proj.weight)  # it did train
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"
