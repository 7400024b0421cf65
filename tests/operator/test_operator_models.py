"""Parsing the FineTuneJob once into typed models; operator-side spec checks; settings from env."""

from __future__ import annotations

import pytest
from operator_factories import make_job, parse

from kubetune_operator.config import ConfigError, OperatorConfig
from kubetune_operator.models import FineTuneJob, FineTuneJobStatus
from kubetune_operator.validation import validate


def test_spec_parses_with_api_names_and_defaults() -> None:
    job = parse(make_job("support-bot", resources={"gpus": 2, "memory": "64Gi"}))
    assert job.spec is not None
    assert (job.name, job.namespace, job.metadata.generation) == ("support-bot", "ml", 1)
    assert job.spec.base_model.uri == "s3://models/llama-3.2-1b/"
    assert (
        job.spec.s3.credentials_secret_ref is not None
        and job.spec.s3.credentials_secret_ref.name == "s3-creds"
    )
    assert job.spec.hyperparameters.batch_tokens == 16384
    assert job.spec.hyperparameters.scheduler == "Cosine"  # default
    assert (job.spec.resources.gpus, job.spec.resources.memory) == (2, "64Gi")
    assert job.spec.backoff_limit == 3 and job.spec.suspend is False


def test_models_are_frozen() -> None:
    job = parse(make_job())
    with pytest.raises(ValueError, match="frozen"):
        job.metadata.name = "b"  # type: ignore[misc]


def test_bad_spec_is_kept_as_errors_naming_the_api_path() -> None:
    body = make_job(hyperparameters={"epochs": "many"})
    del body["spec"]["output"]
    job = FineTuneJob.from_body(body)
    assert job.spec is None
    assert any(e.startswith("spec.output:") for e in job.spec_errors)
    assert any(e.startswith("spec.hyperparameters.epochs:") for e in job.spec_errors)


def test_status_round_trips_in_camel_case_without_nulls() -> None:
    raw = {
        "phase": "Running",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "Training",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "progress": {"step": 5, "totalSteps": 10, "tokensPerSecond": 12.5},
        "trainerJob": "a-trainer",
        "provenance": {"anything": {"nested": [1, 2]}},
    }
    status = FineTuneJobStatus.model_validate(raw)
    assert status.progress is not None and status.progress.total_steps == 10
    assert status.to_dict() == raw


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"method": "Full"}, "spec.lora: only allowed with the adapter methods (LoRA, QLoRA, DPO on LoRA)"),
        ({"hyperparameters": {"epochs": 1, "maxSteps": 5}}, "set exactly one of epochs or maxSteps"),
        ({"hyperparameters": {}}, "set exactly one of epochs or maxSteps"),
        ({"hyperparameters": {"epochs": 1, "batchTokens": 4096, "microBatchSize": 4}}, "use one style"),
        (
            {"dataset": {"train": "s3://d/t.jsonl", "validation": "s3://d/v.jsonl", "validationSplit": 0.1}},
            "set validation or validationSplit, not both",
        ),
        ({"dataset": {"train": "https://example.com/t.jsonl"}}, "spec.dataset.train"),
        ({"baseModel": {"uri": "gs://m/"}}, "spec.baseModel.uri"),
        ({"baseModel": {"uri": "pvc:///llama"}}, "must name a PersistentVolumeClaim"),
        ({"baseModel": {"uri": "pvc://Model_Store/llama"}}, "must name a PersistentVolumeClaim"),
        ({"output": {"uri": "s3://out/no-slash"}}, "spec.output.uri"),
        ({"checkpointing": {"everySteps": 10, "everyMinutes": 5}}, "set everySteps or everyMinutes"),
        ({"dpo": {"beta": 0.1}}, "spec.dpo: only allowed with method DPO"),
        (
            {"method": "DPO", "dpo": {"parameters": "QLoRA"}},
            "spec.dpo.parameters: 'QLoRA' is not one of LoRA, Full",
        ),
        (
            {"method": "DPO", "dataset": {"train": "s3://d/t.jsonl", "format": "Messages"}},
            "spec.dataset.format: Messages does not go with method DPO",
        ),
        (
            {"dataset": {"train": "s3://d/t.jsonl", "format": "Preference"}},
            "spec.dataset.format: Preference does not go with method LoRA",
        ),
        (
            {"method": "Full", "baseModel": {"uri": "s3://m/x/", "adapter": {"uri": "s3://a/sft/"}}},
            "spec.baseModel.adapter: method Full trains Full weights, not adapters",
        ),
        (
            {"method": "DPO", "baseModel": {"uri": "s3://m/x/", "adapter": {"uri": "hf://a/sft"}}},
            "spec.baseModel.adapter.uri: 'hf://a/sft' must be an s3:// prefix",
        ),
    ],
)
def test_validation_names_field_and_fix(overrides: dict[str, object], problem: str) -> None:
    body = make_job(**overrides)  # type: ignore[arg-type]
    if overrides.get("method") == "Full":
        body["spec"]["lora"] = {"r": 8}
    problems = validate(parse(body))
    assert any(problem in p for p in problems), problems


def test_valid_spec_has_no_problems_and_long_names_are_rejected() -> None:
    assert validate(parse(make_job())) == []
    start = {"uri": "s3://adapters/sft/", "sha256": "ab" * 32}
    base = {"uri": "s3://models/llama-3.2-1b/", "adapter": start}
    assert validate(parse(make_job(method="DPO", dpo={"beta": 0.2}, baseModel=base))) == []
    assert validate(parse(make_job(method="DPO", dpo={"parameters": "Full"}))) == []
    long_name = "n" * 55
    assert any("at most 54" in p for p in validate(parse(make_job(long_name))))
    assert validate(parse(make_job("n" * 54))) == []


def test_config_defaults_and_env_overrides() -> None:
    assert OperatorConfig.from_env({}) == OperatorConfig()
    config = OperatorConfig.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "reg/trainer:1",
            "KUBETUNE_DEFAULT_S3_ENDPOINT": "http://minio:9000",
            "KUBETUNE_GPU_RESOURCE_NAME": "amd.com/gpu",
            "KUBETUNE_SCRAPE_INTERVAL_SECONDS": "2.5",
        }
    )
    assert (config.trainer_image, config.default_s3_endpoint, config.gpu_resource_name) == (
        "reg/trainer:1",
        "http://minio:9000",
        "amd.com/gpu",
    )
    assert config.scrape_interval_seconds == 2.5
    assert OperatorConfig().trainer_image == "kubetune/trainer:0.1.0"


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_bad_scrape_interval_says_what_to_set(value: str) -> None:
    with pytest.raises(ConfigError, match="KUBETUNE_SCRAPE_INTERVAL_SECONDS"):
        OperatorConfig.from_env({"KUBETUNE_SCRAPE_INTERVAL_SECONDS": value})


def test_scrape_limits_and_series_retention_come_from_the_environment() -> None:
    config = OperatorConfig.from_env(
        {
            "KUBETUNE_SCRAPE_TIMEOUT_SECONDS": "0.5",
            "KUBETUNE_SCRAPE_CONCURRENCY": "4",
            "KUBETUNE_FINISHED_SERIES_RETENTION_SECONDS": "60",
        }
    )
    assert (config.scrape_timeout_seconds, config.scrape_concurrency) == (0.5, 4)
    assert config.finished_series_retention_seconds == 60


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("KUBETUNE_SCRAPE_TIMEOUT_SECONDS", "0"),
        ("KUBETUNE_SCRAPE_TIMEOUT_SECONDS", "inf"),
        ("KUBETUNE_SCRAPE_CONCURRENCY", "2.5"),
        ("KUBETUNE_SCRAPE_CONCURRENCY", "many"),
        ("KUBETUNE_FINISHED_SERIES_RETENTION_SECONDS", "-1"),
    ],
)
def test_bad_scrape_limits_say_what_to_set(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}='{value}'.*e\\.g\\. "):
        OperatorConfig.from_env({key: value})
