"""The status the operator writes, read the way GitOps tools read it: Flux and kpt by the kstatus rules
(no custom code), Argo CD through gitops/argocd/health.lua. Each stage of a job's life goes through the
operator's real reconcile(), so a change there that breaks GitOps health fails here."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from e2e.cluster.kstatus import kstatus_tool, kstatus_verdict
from test_argocd_health import argo_health

from kubetune_operator.config import OperatorConfig
from kubetune_operator.models import FineTuneJob
from kubetune_operator.observed import Observed
from kubetune_operator.reconcile import reconcile
from kubetune_trainer.contract import AdapterRecord, TerminationSummary

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
CONFIG = OperatorConfig()


def kstatus(obj: dict[str, Any]) -> str:
    """The verdict of the kstatus library itself (sigs.k8s.io/cli-utils, as Flux and kpt use it)."""
    if not kstatus_tool().exists():
        pytest.skip(f"kstatus is not built yet ({kstatus_tool()}); run `bash e2e/cluster/build.sh kstatus`")
    return kstatus_verdict(obj)["status"]


def make_ftj(name: str = "chat-lora", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/tiny/"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "method": "LoRA",
        "hyperparameters": {"maxSteps": 10},
        "output": {"uri": "s3://adapters/chat/"},
        "s3": {"endpoint": "http://s3.local:9000", "credentialsSecretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 0},
        **spec_overrides,
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": "uid-1",
            "generation": 1,
            "creationTimestamp": "2025-06-01T11:59:00Z",
        },
        "spec": spec,
    }


def make_trainer_job(
    ftj: dict[str, Any],
    *,
    suspend: bool = False,
    condition: str | None = None,
    reason: str = "",
    failed: int = 0,
) -> dict[str, Any]:
    status: dict[str, Any] = {"failed": failed}
    if condition:
        status["conditions"] = [
            {
                "type": condition,
                "status": "True",
                "reason": reason,
                "lastTransitionTime": "2025-06-01T12:00:00Z",
            }
        ]
        if condition == "Complete":
            status["completionTime"] = "2025-06-01T12:00:00Z"
    return {
        "metadata": {
            "name": f"{ftj['metadata']['name']}-trainer",
            "namespace": "ml",
            "ownerReferences": [{"kind": "FineTuneJob", "uid": ftj["metadata"]["uid"], "controller": True}],
        },
        "spec": {"suspend": suspend},
        "status": status,
    }


def owned_config_map(ftj: dict[str, Any]) -> dict[str, Any]:
    owner = {"kind": "FineTuneJob", "uid": ftj["metadata"]["uid"], "controller": True}
    return {"metadata": {"name": f"{ftj['metadata']['name']}-config", "ownerReferences": [owner]}, "data": {}}


def make_pod(phase: str, *, running: bool = False, message: str = "", exit_code: int = 0) -> dict[str, Any]:
    state: dict[str, Any]
    if running:
        state = {"running": {"startedAt": "2025-06-01T11:59:30Z"}}
    elif phase in ("Succeeded", "Failed"):
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "message": message,
                "finishedAt": "2025-06-01T12:00:00Z",
            }
        }
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    return {
        "metadata": {
            "name": "chat-lora-trainer-abcde",
            "namespace": "ml",
            "creationTimestamp": "2025-06-01T11:59:10Z",
        },
        "status": {
            "phase": phase,
            "podIP": "10.0.0.7",
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def step(
    ftj: dict[str, Any],
    *,
    config_map: bool = True,
    trainer_job: dict[str, Any] | None = None,
    pods: tuple[dict[str, Any], ...] = (),
    job_events: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """One reconcile pass; returns the FineTuneJob as the API would hold it afterwards."""
    outcome = reconcile(
        FineTuneJob.from_body(ftj),
        Observed(
            config_map=owned_config_map(ftj) if config_map else None,
            trainer_job=trainer_job,
            pods=pods,
            now=NOW,
            job_events=job_events,
        ),
        CONFIG,
    )
    updated = copy.deepcopy(ftj)
    updated["status"] = outcome.status.to_dict()
    return updated


def verdicts(obj: dict[str, Any]) -> tuple[str, str]:
    return kstatus(obj), argo_health(obj)["status"]


def test_new_job_is_in_progress() -> None:
    ftj = step(make_ftj(), config_map=False)
    assert ftj["status"]["observedGeneration"] == 1
    assert verdicts(ftj) == ("InProgress", "Progressing")


def test_running_job_is_in_progress() -> None:
    ftj = step(make_ftj(), config_map=False)
    ftj = step(ftj, trainer_job=make_trainer_job(ftj), pods=(make_pod("Running", running=True),))
    assert ftj["status"]["phase"] == "Running"
    assert verdicts(ftj) == ("InProgress", "Progressing")


def test_succeeded_job_is_current_and_healthy() -> None:
    ftj = step(make_ftj(), config_map=False)
    summary = TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message="done",
        adapter=AdapterRecord(
            uri="s3://adapters/chat/",
            files=["adapter_model.safetensors"],
            size_bytes=10,
            sha256="cd" * 32,
            base_model="s3://models/tiny/",
        ),
    )
    ftj = step(
        ftj,
        trainer_job=make_trainer_job(ftj, condition="Complete"),
        pods=(make_pod("Succeeded", message=summary.to_json()),),
    )
    assert ftj["status"]["phase"] == "Succeeded"
    assert verdicts(ftj) == ("Current", "Healthy")
    assert argo_health(ftj)["message"] == "Fine-tuned: s3://adapters/chat/"


def test_failed_job_is_failed_and_degraded() -> None:
    ftj = step(make_ftj(), config_map=False)
    ftj = step(
        ftj,
        trainer_job=make_trainer_job(ftj, condition="Failed", reason="BackoffLimitExceeded", failed=4),
        pods=(make_pod("Failed", exit_code=1, message="Traceback ..."),),
    )
    assert ftj["status"]["phase"] == "Failed"
    assert verdicts(ftj) == ("Failed", "Degraded")


def test_completed_job_without_a_result_is_failed_and_degraded() -> None:
    ftj = step(make_ftj(), config_map=False)
    ftj = step(ftj, trainer_job=make_trainer_job(ftj, condition="Complete"), pods=(make_pod("Succeeded"),))
    failed = next(c for c in ftj["status"]["conditions"] if c["type"] == "Failed")
    assert (ftj["status"]["phase"], failed["reason"]) == ("Failed", "NoResult")
    assert verdicts(ftj) == ("Failed", "Degraded")


def test_invalid_spec_is_failed_and_degraded() -> None:
    ftj = step(make_ftj(output={"uri": "not-a-uri"}), config_map=False)
    assert verdicts(ftj) == ("Failed", "Degraded")


@pytest.mark.parametrize(
    ("overrides", "reason", "kstatus_verdict"),
    [({"suspend": True}, "Suspended", "Current"), ({"queueName": "team-a"}, "Queued", "InProgress")],
)
def test_suspended_job_is_current_and_a_queued_one_in_progress(
    overrides: dict[str, Any], reason: str, kstatus_verdict: str
) -> None:
    ftj = step(make_ftj(**overrides), config_map=False)
    ftj = step(ftj, trainer_job=make_trainer_job(ftj, suspend=True))
    suspended = next(c for c in ftj["status"]["conditions"] if c["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", reason)
    assert verdicts(ftj) == (kstatus_verdict, "Suspended")


def waiting_pod(reason: str, message: str) -> dict[str, Any]:
    pod = make_pod("Pending")
    pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": reason, "message": message}}
    return pod


def unschedulable_pod(since: str) -> dict[str, Any]:
    pod = make_pod("Pending")
    del pod["status"]["containerStatuses"]
    pod["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            "lastTransitionTime": since,
        }
    ]
    return pod


FAILED_CREATE = {
    "reason": "FailedCreate",
    "type": "Warning",
    "lastTimestamp": "2025-06-01T11:59:50Z",
    "message": 'pods "chat-lora-trainer-x" is forbidden: exceeded quota: gpu, requested: pods=1, '
    "used: pods=0, limited: pods=0",
}


@pytest.mark.parametrize(
    ("pods", "events", "reason", "words"),
    [
        pytest.param(
            (waiting_pod("ImagePullBackOff", 'Back-off pulling image "kubetune/trainer:typo"'),),
            (),
            "ContainerNotStarting",
            "ImagePullBackOff",
            id="image cannot be pulled",
        ),
        pytest.param(
            (waiting_pod("CreateContainerConfigError", 'secret "s3-creds" not found'),),
            (),
            "ContainerNotStarting",
            'secret "s3-creds" not found',
            id="secret missing",
        ),
        pytest.param((), (FAILED_CREATE,), "PodCreationRefused", "exceeded quota", id="quota refuses"),
        pytest.param(
            (unschedulable_pod("2025-06-01T11:49:00Z"),),
            (),
            "Unschedulable",
            "Insufficient nvidia.com/gpu",
            id="unschedulable past the timeout",
        ),
    ],
)
def test_states_that_need_a_person_are_failed_until_the_cause_goes_away(
    pods: tuple[dict[str, Any], ...], events: tuple[dict[str, Any], ...], reason: str, words: str
) -> None:
    ftj = step(make_ftj(), config_map=False)
    stuck = step(ftj, trainer_job=make_trainer_job(ftj), pods=pods, job_events=events)
    stalled = next(c for c in stuck["status"]["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", reason)
    assert words in stalled["message"]
    assert stuck["status"]["phase"] == "Pending"
    assert verdicts(stuck) == ("Failed", "Degraded")

    fixed = step(stuck, trainer_job=make_trainer_job(ftj), pods=(make_pod("Running", running=True),))
    assert verdicts(fixed) == ("InProgress", "Progressing")


def test_unschedulable_within_the_timeout_is_still_in_progress() -> None:
    ftj = step(make_ftj(), config_map=False)
    pending = step(ftj, trainer_job=make_trainer_job(ftj), pods=(unschedulable_pod("2025-06-01T11:59:00Z"),))
    assert verdicts(pending) == ("InProgress", "Progressing")


def test_spec_change_not_yet_observed_is_in_progress() -> None:
    ftj = step(make_ftj(suspend=True), config_map=False)
    ftj["metadata"]["generation"] = 2
    assert verdicts(ftj) == ("InProgress", "Progressing")


def validate_job(ftj: dict[str, Any], condition: str | None = None) -> dict[str, Any]:
    job = make_trainer_job(ftj, condition=condition)
    job["metadata"]["name"] = f"{ftj['metadata']['name']}-validate"
    job["metadata"]["uid"] = "validate-uid"
    return job


def validate_pod(phase: str, message: str, exit_code: int = 0) -> dict[str, Any]:
    pod = make_pod(phase, message=message, exit_code=exit_code)
    pod["metadata"]["name"] = "chat-lora-validate-abcde"
    pod["metadata"]["ownerReferences"] = [{"kind": "Job", "uid": "validate-uid", "controller": True}]
    return pod


def validation_step(ftj: dict[str, Any], job: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    outcome = reconcile(
        FineTuneJob.from_body(ftj),
        Observed(owned_config_map(ftj), None, (), NOW, validate_job=job, validate_pods=(pod,)),
        CONFIG,
    )
    updated = copy.deepcopy(ftj)
    updated["status"] = outcome.status.to_dict()
    return updated


PLAN = {"strategy": "Single", "worldSize": 1, "steps": 10, "examples": {"train": 48, "validation": 0}}


def test_a_job_in_validation_is_in_progress() -> None:
    ftj = step(make_ftj(), config_map=False)
    validated = next(c for c in ftj["status"]["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("Unknown", "Validating")
    assert verdicts(ftj) == ("InProgress", "Progressing")


def test_a_dry_run_ends_current_and_healthy_saying_it_was_a_dry_run() -> None:
    ftj = step(make_ftj(dryRun=True), config_map=False)
    report = TerminationSummary(outcome="Succeeded", reason="Validated", message="48 examples", plan=PLAN)
    ftj = validation_step(ftj, validate_job(ftj, "Complete"), validate_pod("Succeeded", report.to_json()))
    assert ftj["status"]["phase"] == "Succeeded"
    assert verdicts(ftj) == ("Current", "Healthy")
    assert argo_health(ftj)["message"].startswith("dry run:")


def test_a_job_whose_data_failed_validation_is_failed_and_degraded() -> None:
    ftj = step(make_ftj(), config_map=False)
    report = TerminationSummary(outcome="Failed", reason="InvalidDataset", message="train.jsonl:3: not JSON")
    ftj = validation_step(ftj, validate_job(ftj, "Failed"), validate_pod("Failed", report.to_json(), 2))
    assert verdicts(ftj) == ("Failed", "Degraded")
    assert "train.jsonl:3" in argo_health(ftj)["message"]
