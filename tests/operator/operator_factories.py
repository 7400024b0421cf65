"""Fixture builders that read like the API: make_job(name="a", method="LoRA", suspend=True).

They return the plain dicts the API server sends (camelCase), so tests exercise the same parsing path as the
operator. ``at(seconds)`` gives deterministic timestamps.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_operator.models import FineTuneJob
from kubetune_operator.observed import Observed
from kubetune_operator.trainer_metrics import TrainerSample
from kubetune_trainer import contract

Obj = dict[str, Any]
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
NAMESPACE = "ml"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ts(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_job(
    name: str = "a",
    *,
    method: str = "LoRA",
    suspend: bool | None = None,
    queue_name: str | None = None,
    generation: int = 1,
    status: Obj | None = None,
    uid: str | None = None,
    validation_pod: bool = False,
    **spec_overrides: Any,
) -> Obj:
    """A FineTuneJob body; ``spec_overrides`` use the API's camelCase keys and replace whole blocks.
    ``validation_pod`` False sets spec.validation.skip, so tests of the trainer Job start where it is
    created; the validation pod's own tests pass True."""
    spec: Obj = {
        "baseModel": {"uri": "s3://models/llama-3.2-1b/"},
        "dataset": {"train": "s3://datasets/support/train.jsonl", "format": "Auto", "maxSeqLength": 2048},
        "method": method,
        "hyperparameters": {"epochs": 3, "learningRate": 0.0002, "batchTokens": 16384},
        "output": {"uri": "s3://adapters/support-bot/"},
        "s3": {
            "endpoint": "http://minio.storage:9000",
            "forcePathStyle": True,
            "credentialsSecretRef": {"name": "s3-creds"},
        },
        "resources": {"gpus": 1},
        "backoffLimit": 3,
    }
    if method in ("LoRA", "QLoRA"):
        spec["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05}
    if suspend is not None:
        spec["suspend"] = suspend
    if queue_name is not None:
        spec["queueName"] = queue_name
    if not validation_pod:
        spec["validation"] = {"skip": True}
    spec.update(spec_overrides)
    body: Obj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": uid or f"uid-{name}",
            "generation": generation,
            "creationTimestamp": ts(0),
        },
        "spec": spec,
    }
    if status is not None:
        body["status"] = copy.deepcopy(status)
    return body


def parse(body: Obj) -> FineTuneJob:
    return FineTuneJob.from_body(body)


def owner_reference(job: str = "a", uid: str | None = None) -> Obj:
    """The controller ownerReference the operator puts on a FineTuneJob's children (``uid``: make_job's)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": job,
        "uid": uid or f"uid-{job}",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def make_trainer_job(
    job: str = "a",
    *,
    suspend: bool = False,
    active: int = 0,
    failed: int = 0,
    succeeded: int = 0,
    conditions: list[Obj] | None = None,
    completion_time: str | None = None,
    nodes: int = 1,
) -> Obj:
    """``nodes`` > 1: the Indexed Job of a multi-node FineTuneJob."""
    status: Obj = {"active": active, "failed": failed, "succeeded": succeeded, "startTime": ts(1)}
    if conditions:
        status["conditions"] = conditions
    if completion_time:
        status["completionTime"] = completion_time
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{job}-trainer",
            "namespace": NAMESPACE,
            "uid": f"job-uid-{job}",
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "suspend": suspend,
            "backoffLimit": 3,
            **(
                {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes} if nodes > 1 else {}
            ),
        },
        "status": status,
    }


def job_condition(type_: str, reason: str = "", message: str = "", when: str | None = None) -> Obj:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": when or ts(500),
    }


def make_pod(
    job: str = "a",
    *,
    name: str | None = None,
    phase: str = "Pending",
    created: float = 2,
    ip: str | None = None,
    running_since: str | None = None,
    waiting: tuple[str, str] | None = None,
    terminated: Obj | None = None,
    unschedulable: str | None = None,
    disrupted: bool = False,
    index: int | None = None,
) -> Obj:
    """``index``: the completion index the Job controller annotates on a pod of an Indexed Job."""
    container: Obj = {"name": "trainer", "ready": phase == "Running", "restartCount": 0, "state": {}}
    if running_since:
        container["state"] = {"running": {"startedAt": running_since}}
    elif waiting:
        container["state"] = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    elif terminated is not None:
        container["state"] = {"terminated": terminated}
    conditions: list[Obj] = []
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"})
    status: Obj = {"phase": phase, "conditions": conditions}
    if not unschedulable:
        status["containerStatuses"] = [container]
    if ip:
        status["podIP"] = ip
    index_annotation = (
        {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}} if index is not None else {}
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **index_annotation,
            "name": name or f"{job}-trainer-{int(created)}",
            "namespace": NAMESPACE,
            "creationTimestamp": ts(created),
            "labels": {"kubetune.io/job-name": job},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": f"{job}-trainer",
                    "uid": f"job-uid-{job}",
                    "controller": True,
                }
            ],
        },
        "status": status,
    }


def terminated(
    exit_code: int, message: str = "", reason: str = "", started: float = 10, finished: float = 400
) -> Obj:
    state: Obj = {"exitCode": exit_code, "startedAt": ts(started), "finishedAt": ts(finished)}
    if message:
        state["message"] = message
    state["reason"] = reason or ("Completed" if exit_code == 0 else "Error")
    return state


def success_summary(uri: str = "s3://adapters/support-bot/", **overrides: Any) -> str:
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message="done",
        adapter=contract.AdapterRecord(
            uri=uri,
            files=["adapter_config.json", "adapter_model.safetensors"],
            size_bytes=45219840,
            sha256="ab" * 32,
            base_model="s3://models/llama-3.2-1b/",
        ),
        metrics={"trainLoss": 1.21, "evalLoss": 1.35, "bestEvalLoss": 1.33, "bestStep": 280},
        progress={"step": 420, "totalSteps": 420, "epoch": 3, "trainedTokens": 6881280},
        checkpoint={"uri": "s3://adapters/support-bot/checkpoints/step-420/", "step": 420},
        provenance={"datasetSha256": "cd" * 32, "rows": 1000},
        **overrides,
    )
    return summary.to_json()


def failure_summary(reason: str, message: str) -> str:
    return contract.TerminationSummary(outcome="Failed", reason=reason, message=message).to_json()


def observed(
    *,
    config_map: Obj | None = None,
    trainer_job: Obj | None = None,
    pods: list[Obj] | None = None,
    now: float = 60,
    sample: TrainerSample | None = None,
    rejected: str | None = None,
) -> Observed:
    return Observed(config_map, trainer_job, tuple(pods or ()), at(now), sample, rejected)


def metrics_text(**values: float) -> str:
    """Prometheus text as the trainer serves it, built with a real prometheus_client registry."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    for metric, value in values.items():
        Gauge(metric, metric, registry=registry).set(value)
    return generate_latest(registry).decode()


def with_status(body: Obj, status: Any) -> Obj:
    """The body as the API would hold it after the operator wrote ``status`` (a FineTuneJobStatus)."""
    updated = copy.deepcopy(body)
    updated["status"] = status.to_dict()
    return updated
