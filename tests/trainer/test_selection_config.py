"""The trainer's side of the new settings without training: its config check, and the result record that
carries which step's weights were published, through the termination message and the output manifest."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer.config import validate
from kubetune_trainer.contract import (
    AdapterRecord,
    DatasetConfig,
    EarlyStop,
    Hyperparameters,
    LoraConfig,
    OutputConfig,
    Selection,
    TerminationSummary,
    TrainerConfig,
)
from kubetune_trainer.publish import record_from_manifest


def config(validation: str | None = None, split: float | None = None, **settings: object) -> TrainerConfig:
    return TrainerConfig(
        base_model="s3://models/m/",
        method="LoRA",
        lora=LoraConfig(),
        dataset=DatasetConfig(
            train="s3://d/train.jsonl",
            validation=validation,
            validation_split=split,
            text_mode=str(settings.get("text_mode", "Chunk")),
        ),
        hyperparameters=Hyperparameters(
            max_steps=10,
            early_stopping_patience=settings.get("patience"),  # type: ignore[arg-type]
        ),
        output=OutputConfig(uri="s3://out/job/", select=str(settings.get("select", "Last"))),
    )


@pytest.mark.parametrize(("validation", "split"), [("s3://d/val.jsonl", None), (None, 0.1)])
def test_best_eval_and_patience_are_fine_with_a_validation_set(
    validation: str | None, split: float | None
) -> None:
    assert validate(config(validation, split, select="BestEval", patience=3)) == []


def test_best_eval_and_patience_without_a_validation_set_say_what_to_add() -> None:
    problems = validate(config(select="BestEval", patience=3))
    assert len(problems) == 2
    assert all("set dataset.validation or dataset.validationSplit" in p for p in problems)
    assert problems[0].startswith("output.select BestEval") and "or output.select Last" in problems[0]
    assert problems[1].startswith("hyperparameters.earlyStoppingPatience")


def test_unknown_values_are_named() -> None:
    problems = validate(config("s3://d/val.jsonl", select="Best", patience=0, text_mode="Split"))
    text = "; ".join(problems)
    assert len(problems) == 3
    assert "output.select 'Best' must be one of Last, BestEval" in text
    assert "earlyStoppingPatience must be >= 1, got 0" in text
    assert "dataset.textMode 'Split' must be one of Chunk, Truncate" in text


def test_the_selection_and_an_early_stop_cross_the_termination_message() -> None:
    summary = TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        adapter=AdapterRecord(
            uri="s3://out/job/",
            files=["adapter_model.safetensors"],
            size_bytes=10,
            sha256="ab" * 32,
            selected=Selection("BestEval", 28, 1.25),
        ),
        early_stop=EarlyStop(step=40, total_steps=200, patience=3, best_step=28, best_eval_loss=1.25),
    )
    data = json.loads(summary.to_json())
    assert data["adapter"]["selected"] == {"select": "BestEval", "step": 28, "evalLoss": 1.25}
    assert data["earlyStop"] == {
        "step": 40,
        "totalSteps": 200,
        "patience": 3,
        "bestStep": 28,
        "bestEvalLoss": 1.25,
    }
    assert TerminationSummary.from_json(summary.to_json()) == summary


def test_the_output_manifest_records_the_selection_for_a_restart_after_success() -> None:
    manifest = {
        "method": "LoRA",
        "files": {"adapter_model.safetensors": {"sha256": "ab" * 32, "bytes": 10}},
        "selected": {"select": "BestEval", "step": 28, "evalLoss": 1.25},
    }
    assert record_from_manifest(manifest, "s3://out/job/").selected == Selection("BestEval", 28, 1.25)
    manifest["selected"] = {"select": "BestEval", "step": "28"}  # not a step: left out, not guessed
    assert record_from_manifest(manifest, "s3://out/job/").selected is None
    del manifest["selected"]  # published before selections were recorded
    assert record_from_manifest(manifest, "s3://out/job/").selected is None


def test_the_memory_plan_counts_the_kept_best_shard_under_fsdp_only() -> None:
    from kubetune_trainer.memory_plan import GIB, Request, estimate, model_shape
    from kubetune_trainer.parallel import FSDP, SINGLE

    shape = model_shape(
        {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": True,
        }
    )

    def plan(strategy: str, processes: int, keep_best: bool) -> int:
        request = Request("Full", processes, 2048, "cuda", 80 * GIB, keep_best=keep_best)
        return estimate(shape, request, strategy, checkpointing=False).optimizer

    # Full trains float32 weights: 4 bytes a parameter, split over the processes.
    assert plan(FSDP, 4, True) - plan(FSDP, 4, False) == shape.parameters * 4 // 4
    assert plan(SINGLE, 1, True) == plan(SINGLE, 1, False)  # one process keeps the copy in host memory
