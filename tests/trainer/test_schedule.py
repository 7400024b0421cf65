"""Pure helpers: the learning-rate schedule, the batch plan, and config validation."""

from __future__ import annotations

import json
import math

import pytest

from kubetune_trainer.config import validate
from kubetune_trainer.contract import DatasetConfig, Hyperparameters, LoraConfig, OutputConfig, TrainerConfig
from kubetune_trainer.schedule import Batching, Plan, build_plan, lr_at, warmup_steps


def test_warmup_rises_linearly_to_the_peak() -> None:
    assert [lr_at(s, 100, 1.0, 4, "Cosine") for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, 100, 1.0, 4, "Cosine") == pytest.approx(1.0)


def test_cosine_linear_and_constant_decay() -> None:
    total, warm = 110, 10
    assert lr_at(warm + 50, total, 2.0, warm, "Cosine") == pytest.approx(1.0)  # half-way: half the peak
    assert lr_at(total - 1, total, 2.0, warm, "Cosine") == pytest.approx(
        2.0 * 0.5 * (1 + math.cos(math.pi * 0.99))
    )
    assert lr_at(warm + 25, total, 2.0, warm, "Linear") == pytest.approx(1.5)
    assert lr_at(total - 1, total, 2.0, warm, "Constant") == 2.0
    with pytest.raises(ValueError):
        lr_at(50, total, 1.0, warm, "Exponential")


def test_warmup_steps_round_up() -> None:
    assert warmup_steps(20, 0.03) == 1
    assert warmup_steps(200, 0.05) == 10
    assert warmup_steps(10, 0.0) == 0


def test_plan_covers_every_example_once_per_epoch_and_counts_steps_up_front() -> None:
    lengths = [30, 10, 50, 20, 40, 25, 35, 5]
    plan = build_plan(
        lengths, Batching(token_budget=60, examples_per_micro=None, accumulation=2), seed=1, epochs=2
    )
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for step, epoch in zip(plan.steps, plan.epoch_of_step, strict=True):
        assert 1 <= len(step) <= 2
        for micro in step:
            assert sum(lengths[i] for i in micro) <= 60
            per_epoch[epoch].extend(micro)
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) == list(range(8))
    assert plan.total_steps == len(plan.steps) and plan.steps_per_epoch >= 2
    assert plan == build_plan(lengths, Batching(60, None, 2), seed=1, epochs=2)  # a pure function of the seed
    assert plan != build_plan(lengths, Batching(60, None, 2), seed=2, epochs=2)


def test_plan_with_max_steps_cycles_epochs_and_fractional_epochs_truncate() -> None:
    batching = Batching(token_budget=None, examples_per_micro=2, accumulation=1)
    plan = build_plan([5] * 6, batching, seed=0, max_steps=7)
    assert plan.total_steps == 7 and plan.epoch_of_step == [0, 0, 0, 1, 1, 1, 2]
    half = build_plan([5] * 6, batching, seed=0, epochs=1.5)
    assert half.total_steps == 5


def config(**hp: object) -> TrainerConfig:
    return TrainerConfig(
        base_model="s3://models/m/",
        method="LoRA",
        lora=LoraConfig(),
        dataset=DatasetConfig(train="s3://d/train.jsonl"),
        hyperparameters=Hyperparameters(**{"max_steps": 10, **hp}),  # type: ignore[arg-type]
        output=OutputConfig(uri="s3://out/job/"),
    )


def test_a_good_config_has_no_problems() -> None:
    assert validate(config()) == []


def test_validation_reports_every_problem_at_once() -> None:
    problems = validate(
        config(epochs=1, batch_tokens=100, micro_batch_size=2, warmup_ratio=2.0, scheduler="Step")
    )
    text = "; ".join(problems)
    assert len(problems) == 4
    assert "exactly one of epochs and maxSteps" in text
    assert "batchTokens and microBatchSize/gradientAccumulation are exclusive" in text
    assert "warmupRatio" in text and "scheduler 'Step'" in text


def test_a_step_plan_survives_json_and_a_plan_for_another_dataset_is_refused() -> None:
    lengths = [30, 50, 70, 90, 110, 20, 40]
    plan = build_plan(lengths, Batching(128, None, 2), seed=3, epochs=2)
    again = Plan.from_dict(json.loads(json.dumps(plan.as_dict())), examples=len(lengths))
    assert again == plan
    with pytest.raises(ValueError, match="beyond the 5 of this dataset"):
        Plan.from_dict(plan.as_dict(), examples=5)
    broken = {**plan.as_dict(), "steps": [[["0"]]]}
    with pytest.raises(ValueError, match="not a whole number"):
        Plan.from_dict(broken, examples=len(lengths))
