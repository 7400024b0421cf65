"""The validation pod in the operator: the builder of <name>-validate and the reconcile rows around it (no GPU
Job before the data is valid; the plan in status; dry run; Kueue queues only the GPU Job)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from operator_factories import (
    job_condition,
    make_job,
    make_pod,
    observed,
    owner_reference,
    parse,
    terminated,
    with_status,
)

from kubetune_operator import labels
from kubetune_operator.builders.validate_job import build_validate_job
from kubetune_operator.config import OperatorConfig
from kubetune_operator.observed import Observed
from kubetune_operator.reconcile import is_finished, reconcile
from kubetune_trainer import contract

Obj = dict[str, Any]

PLAN: Obj = {
    "strategy": "Single",
    "worldSize": 1,
    "activationCheckpointing": False,
    "microStepTokens": 2048,
    "gpuGiB": 80.0,
    "perGpuGiB": {"weights": 2.3, "gradients": 0.04, "optimizer": 0.08, "activations": 1.1, "total": 3.6},
    "steps": 420,
    "examples": {"train": 9000, "validation": 1000},
    "tokens": {"train": 3150000, "validation": 350000},
    "estimate": {
        "seconds": 51.8,
        "gpuHours": 0.0144,
        "tokensPerSecond": 60800.0,
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
        "modelSize": "1.2B",
        "basis": "estimated",
        "source": "30% MFU of 989 bf16 TFLOPS, 4N FLOPs per token",
    },
    "cache": {"uri": "s3://adapters/support-bot/cache/" + "ab" * 32 + "/", "digest": "ab" * 32},
}


@pytest.fixture
def config() -> OperatorConfig:
    return OperatorConfig(trainer_image="registry.example/kubetune/trainer:test")


def validating_job(**spec: Any) -> Obj:
    return make_job(validation_pod=True, **spec)


def validate_job(config: OperatorConfig, body: Obj, *conditions: Obj, suspend: bool = False) -> Obj:
    """The validation Job as the API server returns it: what the builder made, with a uid and a status."""
    built = copy.deepcopy(build_validate_job(parse(body), config))
    built["metadata"]["uid"] = "validate-uid-a"
    built["spec"]["suspend"] = suspend
    built["status"] = {"conditions": list(conditions)} if conditions else {}
    return built


def validate_pod(phase: str, *, message: str = "", exit_code: int = 0) -> Obj:
    pod = make_pod(name="a-validate-x", phase=phase)
    pod["metadata"]["ownerReferences"][0].update(name="a-validate", uid="validate-uid-a")
    if phase in ("Succeeded", "Failed"):
        container = pod["status"]["containerStatuses"][0]
        container["state"] = {"terminated": terminated(exit_code, message)}
    return pod


def seen_with(validate: Obj | None, pods: tuple[Obj, ...] = ()) -> Observed:
    config_map = {
        "kind": "ConfigMap",
        "metadata": {"name": "a-config", "ownerReferences": [owner_reference()]},
    }
    base = observed(config_map=config_map)
    return Observed(base.config_map, None, (), base.now, validate_job=validate, validate_pods=pods)


def conds(status: Any) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def kinds(created: tuple[Obj, ...]) -> list[str]:
    return [str(obj["metadata"]["name"]) for obj in created]


def validated_summary(plan: Obj | None = None) -> str:
    return contract.TerminationSummary(
        outcome="Succeeded", reason="Validated", message="9000 train examples; 420 steps", plan=plan or PLAN
    ).to_json()


# --- the builder ------------------------------------------------------------------------------------------


def test_the_validation_job_asks_for_no_gpu_and_runs_the_validate_command(config: OperatorConfig) -> None:
    job = build_validate_job(parse(validating_job(resources={"gpus": 4})), config)
    assert job["metadata"]["name"] == "a-validate"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == config.trainer_image and container["args"] == ["validate"]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert not any("gpu" in name for part in container["resources"].values() for name in part)
    assert pod["automountServiceAccountToken"] is False and "nodeSelector" not in pod
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {contract.CONFIG_MOUNT_DIR, "/tmp"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [contract.EXIT_CODE_PERMANENT_FAILURE]
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert (
        template_labels[labels.LABEL_JOB_NAME] == "a"
        and template_labels[labels.LABEL_COMPONENT] == "validator"
    )


def test_the_validation_job_takes_its_resources_from_the_spec(config: OperatorConfig) -> None:
    body = validating_job(validation={"resources": {"cpu": 3, "memory": "12Gi"}})
    container = build_validate_job(parse(body), config)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "3", "memory": "12Gi"},
        "limits": {"memory": "12Gi"},
    }


def test_under_kueue_only_the_gpu_job_is_queued_unless_a_validation_queue_is_named(
    config: OperatorConfig,
) -> None:
    gpu_queued = build_validate_job(parse(validating_job(queue_name="gpus")), config)
    assert labels.LABEL_KUEUE_QUEUE not in gpu_queued["metadata"]["labels"]
    assert gpu_queued["spec"]["suspend"] is False  # runs at once: Kueue leaves an unlabelled Job alone
    cpu_queued = build_validate_job(
        parse(validating_job(queue_name="gpus", validation={"queueName": "cpu"})), config
    )
    assert cpu_queued["metadata"]["labels"][labels.LABEL_KUEUE_QUEUE] == "cpu"
    assert cpu_queued["spec"]["suspend"] is True
    chart_default = OperatorConfig(validation_queue_name="cpu-default")
    by_chart = build_validate_job(parse(validating_job()), chart_default)
    assert by_chart["metadata"]["labels"][labels.LABEL_KUEUE_QUEUE] == "cpu-default"


# --- reconcile --------------------------------------------------------------------------------------------


def test_a_new_job_gets_the_validation_job_and_no_gpu_job(config: OperatorConfig) -> None:
    outcome = reconcile(parse(validating_job()), observed(), config)
    assert kinds(outcome.create) == ["a-config", "a-validate"]
    got = conds(outcome.status)
    assert got["Validated"] == ("Unknown", "Validating")
    assert got["Reconciling"] == ("True", "Validating") and got["Stalled"][0] == "False"
    assert outcome.status.trainer_job is None and outcome.status.phase == "Pending"


def test_while_the_validation_pod_runs_no_gpu_job_is_created(config: OperatorConfig) -> None:
    body = validating_job()
    pod = validate_pod("Running")
    pod["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": "2026-01-01T12:00:05Z"}}
    outcome = reconcile(parse(body), seen_with(validate_job(config, body), (pod,)), config)
    assert outcome.create == ()
    assert conds(outcome.status)["Validated"] == ("Unknown", "Validating")
    assert "a-validate-x is checking the data" in (outcome.status.message or "")


def test_a_valid_dataset_puts_the_plan_in_status_and_then_creates_the_gpu_job(config: OperatorConfig) -> None:
    body = validating_job()
    done = validate_job(config, body, job_condition("Complete"))
    pod = validate_pod("Succeeded", message=validated_summary())
    outcome = reconcile(parse(body), seen_with(done, (pod,)), config)
    assert kinds(outcome.create) == ["a-trainer"]
    assert conds(outcome.status)["Validated"] == ("True", "DataValid")
    plan = outcome.status.to_dict()["plan"]
    assert plan == PLAN  # every field the validation pod reported survived the typed model
    # Later passes, with the trainer Job there, keep DataValid and the plan.
    after = with_status(body, outcome.status)
    again = reconcile(parse(after), seen_with(None), config)
    assert conds(again.status)["Validated"] == ("True", "DataValid")
    assert again.status.to_dict()["plan"] == PLAN


def test_the_trainers_memory_plan_refines_the_validation_plan_and_keeps_its_estimate(
    config: OperatorConfig,
) -> None:
    from kubetune_operator.reconcile import _memory_plan

    before = _memory_plan(PLAN)
    assert before is not None
    trainer_plan = {
        "strategy": "Single",
        "worldSize": 1,
        "microStepTokens": 16384,
        "perGpuGiB": {"total": 9.5},
    }
    merged = _memory_plan(
        {**before.model_dump(by_alias=True, exclude_none=True, mode="json"), **trainer_plan}
    )
    assert merged is not None and merged.micro_step_tokens == 16384 and merged.estimate == before.estimate


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        (
            "InvalidDataset",
            "s3://datasets/support/train.jsonl: 2 malformed records: train.jsonl:3, train.jsonl:9",
        ),
        ("EmptyDataset", "s3://datasets/support/train.jsonl holds no records"),
        ("AccessDenied", "S3 refused to read s3://datasets/support/train.jsonl (AccessDenied)"),
        ("InsufficientGPUMemory", "the model does not fit on 1 GPU(s) of 80.0 GiB"),
    ],
)
def test_a_failed_validation_ends_the_job_with_its_reason_and_never_a_gpu_job(
    config: OperatorConfig, reason: str, message: str
) -> None:
    body = validating_job()
    failed = validate_job(config, body, job_condition("Failed", "PodFailurePolicy"))
    summary = contract.TerminationSummary(outcome="Failed", reason=reason, message=message).to_json()
    pod = validate_pod("Failed", message=summary, exit_code=2)
    outcome = reconcile(parse(body), seen_with(failed, (pod,)), config)
    assert outcome.create == ()
    got = conds(outcome.status)
    assert got["Failed"] == ("True", reason) and got["Validated"] == ("False", reason)
    assert got["Stalled"] == ("True", reason) and got["Reconciling"][0] == "False"
    assert message in (outcome.status.message or "") and "no GPU Job was created" in (
        outcome.status.message or ""
    )
    assert is_finished(outcome.status) and outcome.status.trainer_job is None


def test_a_crashed_validation_pod_fails_validation_failed_with_its_log_tail(config: OperatorConfig) -> None:
    body = validating_job()
    failed = validate_job(config, body, job_condition("Failed", "BackoffLimitExceeded"))
    pod = validate_pod("Failed", message="Traceback ...\nMemoryError: tokenizer", exit_code=1)
    outcome = reconcile(parse(body), seen_with(failed, (pod,)), config)
    assert conds(outcome.status)["Failed"] == ("True", "ValidationFailed")
    assert "MemoryError: tokenizer" in (outcome.status.message or "") and outcome.create == ()


def test_a_report_without_a_plan_is_not_taken_for_a_validation(config: OperatorConfig) -> None:
    body = validating_job()
    done = validate_job(config, body, job_condition("Complete"))
    bad_plan = {**PLAN, "estimate": {**PLAN["estimate"], "basis": "guessed"}}
    pod = validate_pod("Succeeded", message=validated_summary(bad_plan))
    outcome = reconcile(parse(body), seen_with(done, (pod,)), config)
    assert conds(outcome.status)["Failed"] == ("True", "ValidationFailed") and outcome.create == ()


def test_a_dry_run_ends_after_the_plan_as_current_for_kstatus(config: OperatorConfig) -> None:
    body = validating_job(dryRun=True)
    done = validate_job(config, body, job_condition("Complete"))
    pod = validate_pod("Succeeded", message=validated_summary())
    outcome = reconcile(parse(body), seen_with(done, (pod,)), config)
    assert outcome.create == ()  # no GPU Job
    got = conds(outcome.status)
    assert got["Succeeded"] == ("True", "DryRun")
    # kstatus: Current needs Reconciling and Stalled not True (and observedGeneration current).
    assert got["Reconciling"][0] == "False" and got["Stalled"][0] == "False"
    assert outcome.status.observed_generation == 1
    assert (outcome.status.message or "").startswith("dry run:") and "GPU-hours" in (
        outcome.status.message or ""
    )
    assert is_finished(outcome.status) and outcome.status.adapter is None
    assert outcome.status.to_dict()["plan"]["estimate"]["gpuHours"] == 0.0144


def test_skipping_validation_creates_the_gpu_job_at_once(config: OperatorConfig) -> None:
    outcome = reconcile(parse(make_job()), observed(), config)
    assert kinds(outcome.create) == ["a-config", "a-trainer"]
    assert conds(outcome.status)["Validated"] == ("True", "SpecValid")


def test_a_foreign_object_named_like_the_validation_job_is_never_used(config: OperatorConfig) -> None:
    body = validating_job()
    foreign = validate_job(config, body, job_condition("Complete"))
    foreign["metadata"]["ownerReferences"] = []
    outcome = reconcile(parse(body), seen_with(foreign), config)
    assert conds(outcome.status)["Failed"] == ("True", "ChildConflict") and outcome.create == ()


def test_the_gpu_product_the_plan_is_made_for_comes_from_the_node_selector(config: OperatorConfig) -> None:
    from kubetune_operator.builders import build_config_map

    def product(**spec: Any) -> Any:
        data = build_config_map(parse(validating_job(**spec)), config)["data"][contract.CONFIG_FILE_NAME]
        return json.loads(data).get("gpuProduct")

    assert product() == config.default_gpu_product
    assert product(resources={"gpus": 2, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L40S"}}) == (
        "NVIDIA-L40S"
    )
    assert product(resources={"gpus": 0}) is None


def test_a_validation_pod_that_ended_before_its_job_is_not_called_starting(config: OperatorConfig) -> None:
    body = validating_job()
    pod = validate_pod("Succeeded", message=validated_summary())
    outcome = reconcile(parse(body), seen_with(validate_job(config, body), (pod,)), config)
    assert outcome.create == () and "a-validate-x ended; reading its report" in (outcome.status.message or "")


def test_a_trainer_image_that_trained_instead_of_validating_is_not_taken_for_a_validation(
    config: OperatorConfig,
) -> None:
    """An image older than the validate command ignores it and trains on the CPU: its success summary, plan
    included, is not a validation."""
    body = validating_job()
    done = validate_job(config, body, job_condition("Complete"))
    trained = contract.TerminationSummary(outcome="Succeeded", reason="Completed", plan=PLAN).to_json()
    outcome = reconcile(parse(body), seen_with(done, (validate_pod("Succeeded", message=trained),)), config)
    assert conds(outcome.status)["Failed"] == ("True", "ValidationFailed") and outcome.create == ()
    assert "older than the validate command" in (outcome.status.message or "")
