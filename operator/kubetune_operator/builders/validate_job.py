"""The batch/v1 Job ``<name>-validate``: the CPU pod that runs before any GPU is reserved (DESIGN section 9).

Same image and config as the trainer, ``python -m kubetune_trainer validate``: it reads the dataset and only
the base model's config and tokenizer, validates every record, tokenizes, plans, writes the token cache and
reports the plan in its termination message. No GPU is requested; its CPU and memory come from
``spec.validation.resources``, else the chart's defaults.

Kueue: the validation Job carries a queue label only when ``spec.validation.queueName`` (or the chart's
``validation.queueName``) names one. Kueue leaves a Job without that label alone, so by default the
validation pod runs at once while the GPU Job waits in the GPU queue: it holds nothing scarce, and queueing it
behind GPU quota would delay the one answer a user waits for (is my data valid, what will it cost) by the
whole GPU wait. Clusters that queue CPU work too set a CPU queue there.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator import labels
from kubetune_operator.builders.common import child_metadata, spec_of
from kubetune_operator.builders.trainer_job import (
    _env,
    container_security_context,
    pod_security_context,
    pvc_claim,
    trainer_image,
)
from kubetune_operator.config import OperatorConfig
from kubetune_operator.models import FineTuneJob
from kubetune_trainer import contract

VALIDATE_ARGS = ["validate"]
"""Appended to the trainer image's entrypoint (python -m kubetune_trainer)."""
VALIDATE_BACKOFF_LIMIT = 1
"""One retry for a crash; a documented failure (bad data, no access) fails at once (podFailurePolicy)."""


def validation_queue(job: FineTuneJob, config: OperatorConfig) -> str | None:
    return spec_of(job).validation.queue_name or config.validation_queue_name


def build_validate_job(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    spec = spec_of(job)
    wanted = spec.validation.resources
    cpu = wanted.cpu or config.validation_cpu
    memory = wanted.memory or config.validation_memory
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": labels.config_map_name(job.name)}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": contract.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": contract.DEFAULT_WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    claim = pvc_claim(spec.base_model.uri)
    if claim is not None:
        volumes.append(
            {"name": "base-model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append(
            {"name": "base-model", "mountPath": f"{contract.DEFAULT_PVC_ROOT}/{claim}", "readOnly": True}
        )
    container: dict[str, Any] = {
        "name": labels.TRAINER_CONTAINER,
        "image": trainer_image(job, config),
        "args": list(VALIDATE_ARGS),
        "env": _env(job),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "volumeMounts": mounts,
        "terminationMessagePath": contract.DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    defaults = config.trainer_pod_defaults
    account = spec.trainer.service_account_name or defaults.service_account_name
    if account:
        pod_spec["serviceAccountName"] = account  # workload identity reads S3 as the trainer does
    pull_secrets = [dict(s) for s in spec.trainer.image_pull_secrets or defaults.image_pull_secrets]
    if pull_secrets:
        pod_spec["imagePullSecrets"] = pull_secrets
    queue = validation_queue(job, config)
    job_spec: dict[str, Any] = {
        "suspend": bool(queue),  # Kueue admits a queued Job by unsuspending it
        "backoffLimit": VALIDATE_BACKOFF_LIMIT,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": labels.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [contract.EXIT_CODE_PERMANENT_FAILURE],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {"labels": labels.validator_pod_labels(job.name)},
            "spec": pod_spec,
        },
    }
    job_labels = {labels.LABEL_KUEUE_QUEUE: queue} if queue else None
    metadata = child_metadata(job, labels.validate_job_name(job.name), job_labels)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
