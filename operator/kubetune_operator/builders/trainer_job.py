"""The batch/v1 Job that runs the trainer pod (the trainer-pod contract in DESIGN §2)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubetune_operator import labels
from kubetune_operator.builders.common import child_metadata, spec_of
from kubetune_operator.config import OperatorConfig
from kubetune_operator.models import FineTuneJob
from kubetune_trainer import contract

TRAINER_UID = 1000


def container_security_context() -> dict[str, Any]:
    """The hardened container every pod the operator creates runs (restricted Pod Security level)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def pod_security_context() -> dict[str, Any]:
    """The pod-level half of the same: the trainer image's non-root user, the runtime's seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
HF_HOME = contract.DEFAULT_WORK_DIR + "/hf"
AWS_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AWS_OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)
HF_TOKEN_KEY = "HF_TOKEN"
PVC_SCHEME = "pvc://"
BASE_MODEL_VOLUME = "base-model"
# With spec.resources.nodes > 1 the trainer reads these (its node rank is JOB_COMPLETION_INDEX, which
# Kubernetes sets in the pods of an Indexed Job).
NODES_ENV = "KUBETUNE_NODES"
RENDEZVOUS_ENDPOINT_ENV = "KUBETUNE_RENDEZVOUS_ENDPOINT"
PEER_TIMEOUT_ENV = "KUBETUNE_PEER_TIMEOUT_SECONDS"


def desired_suspend(job: FineTuneJob) -> bool:
    """A Job with a Kueue queue starts suspended: Kueue admits it by setting suspend to false."""
    spec = spec_of(job)
    return spec.suspend or bool(spec.queue_name)


def trainer_image(job: FineTuneJob, config: OperatorConfig) -> str:
    return spec_of(job).trainer.image or config.trainer_image


def updatable_job_fields(job: FineTuneJob) -> dict[str, int | None]:
    """The trainer Job's spec fields that follow the FineTuneJob after the Job exists, by their shared name;
    None: unset. Kubernetes' Job update validation accepts new values for these (it checks only that they
    are non-negative, which the CRD already enforces) while the rest of the Job spec stays as created."""
    spec = spec_of(job)
    return {
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }


def built_from(job: FineTuneJob) -> dict[str, str]:
    """A short hash of each FineTuneJob spec field that shapes the trainer Job's pod template, its labels or
    the trainer config, and that the CRD lets a user edit: an existing Job cannot take a new value of any of
    them (its template is immutable; Kueue keeps the queue it admitted the Job from; the config is rendered
    once, before the Job exists, so a running trainer never sees a config it did not start with)."""
    spec = spec_of(job)
    parts: dict[str, Any] = {
        "spec.s3": spec.s3.model_dump(by_alias=True, mode="json"),
        "spec.checkpointing": spec.checkpointing.model_dump(by_alias=True, mode="json"),
        "spec.resources": _resources_as_built(job),
        "spec.trainer.image": spec.trainer.image,
        "spec.trainer.env": [dict(item) for item in spec.trainer.env],
        "spec.queueName": spec.queue_name,
        "spec.peerTimeoutSeconds": spec.peer_timeout_seconds,
    }
    return {field: _short_hash(value) for field, value in parts.items()}


def _resources_as_built(job: FineTuneJob) -> dict[str, Any]:
    """spec.resources as hashed: the multi-node fields are left out at their defaults, so a one-node Job
    records the hash it recorded before they existed (an upgrade reports no edit that never happened)."""
    resources = spec_of(job).resources
    dumped = resources.model_dump(by_alias=True, mode="json")
    if resources.nodes == 1:
        dumped.pop("nodes")
    if resources.extra_resources is None:
        dumped.pop("extraResources")
    return dumped


def built_from_annotation(job: FineTuneJob) -> str:
    return json.dumps(built_from(job), sort_keys=True, separators=(",", ":"))


def _short_hash(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _secret_env(name: str, secret: str, *, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": name}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _env(job: FineTuneJob) -> list[dict[str, Any]]:
    spec = spec_of(job)
    env: list[dict[str, Any]] = [
        {
            "name": contract.CONFIG_PATH_ENV,
            "value": f"{contract.CONFIG_MOUNT_DIR}/{contract.CONFIG_FILE_NAME}",
        },
        {"name": contract.WORK_DIR_ENV, "value": contract.DEFAULT_WORK_DIR},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    s3_secret = spec.s3.credentials_secret_ref
    if s3_secret is not None:
        env += [_secret_env(key, s3_secret.name, optional=False) for key in AWS_SECRET_KEYS]
        env += [_secret_env(key, s3_secret.name, optional=True) for key in AWS_OPTIONAL_SECRET_KEYS]
    model_secret = spec.base_model.credentials_secret_ref
    if model_secret is not None:
        # hf:// models read HF_TOKEN; the key is optional so one Secret can serve every scheme.
        env.append(_secret_env(HF_TOKEN_KEY, model_secret.name, optional=True))
    # The user's env comes next: for a repeated name, Kubernetes uses the last entry.
    env += [dict(item) for item in spec.trainer.env]
    if spec.resources.nodes > 1:
        # After the user's env, so no entry can break the group: every pod must agree on these.
        env += [
            {"name": NODES_ENV, "value": str(spec.resources.nodes)},
            {"name": RENDEZVOUS_ENDPOINT_ENV, "value": labels.rendezvous_endpoint(job.name)},
            {"name": PEER_TIMEOUT_ENV, "value": str(spec.peer_timeout_seconds)},
        ]
    # Last, so no entry can unset it: which variables hold Secret values the trainer must keep out of its
    # log and termination message.
    secret_names = sorted({e["name"] for e in env if "secretKeyRef" in (e.get("valueFrom") or {})})
    if secret_names:
        env.append({"name": contract.SECRET_ENV_NAMES_ENV, "value": ",".join(secret_names)})
    return env


def _pod_metadata(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """Labels and annotations of the trainer pod: the chart's defaults, the job's own, and the operator's
    labels over both (the CRD refuses the operator's keys in spec.trainer.podLabels)."""
    spec, defaults = spec_of(job), config.trainer_pod_defaults
    metadata: dict[str, Any] = {
        "labels": {
            **defaults.pod_labels,
            **(spec.trainer.pod_labels or {}),
            **labels.trainer_pod_labels(job.name),
        },
        "finalizers": [labels.RESULT_FINALIZER],
    }
    annotations = {**defaults.pod_annotations, **(spec.trainer.pod_annotations or {})}
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def _pod_settings(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """The pod spec fields a platform team sets for every trainer (chart) or one job (spec) overrides."""
    spec, defaults = spec_of(job), config.trainer_pod_defaults
    chosen: dict[str, Any] = {
        "serviceAccountName": spec.trainer.service_account_name or defaults.service_account_name,
        "imagePullSecrets": [dict(s) for s in spec.trainer.image_pull_secrets or defaults.image_pull_secrets],
        "runtimeClassName": spec.resources.runtime_class_name or defaults.runtime_class_name,
        "affinity": spec.resources.affinity or defaults.affinity,
        "topologySpreadConstraints": [
            dict(c)
            for c in spec.resources.topology_spread_constraints or defaults.topology_spread_constraints
        ],
        "terminationGracePeriodSeconds": spec.trainer.termination_grace_period_seconds
        or defaults.termination_grace_period_seconds,
    }
    return {key: value for key, value in chosen.items() if value}


def _resources(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    res = spec_of(job).resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    ephemeral = res.ephemeral_storage or config.trainer_pod_defaults.ephemeral_storage
    if ephemeral:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = ephemeral
    if res.cpu:
        requests["cpu"] = res.cpu  # no CPU limit: throttling a data loader starves the GPU
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus > 0:
        gpu_name = res.gpu_resource_name or config.gpu_resource_name
        requests[gpu_name] = limits[gpu_name] = res.gpus
    for name, count in sorted((res.extra_resources or {}).items()):
        # Extended resources cannot be overcommitted: Kubernetes needs the request equal to the limit.
        requests[name] = limits[name] = count
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_failure_policy(multi_node: bool) -> dict[str, Any]:
    peer_lost: list[dict[str, Any]] = []
    if multi_node:
        peer_lost.append(
            {
                # A pod whose training stopped only because another pod of the group was lost: that pod's
                # failure is the one counted (once per group restart), so this one is not.
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": labels.TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [contract.EXIT_CODE_PEER_LOST],
                },
            }
        )
    return {
        "rules": [
            {
                # The trainer exits with this code when a restart would fail the same way (bad data, no
                # access, no model): fail at once instead of burning the backoff budget on GPUs.
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": labels.TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [contract.EXIT_CODE_PERMANENT_FAILURE],
                },
            },
            {
                # SIGTERM from outside (the pod was deleted, its node drained): the trainer wrote a checkpoint
                # and exited with this code. Stopping a run is not a failure of the run: retry uncounted.
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": labels.TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [contract.EXIT_CODE_INTERRUPTED],
                },
            },
            *peer_lost,
            {
                # Preemption and eviction are not the trainer's fault: retry without counting the attempt.
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def pvc_claim(base_model_uri: str) -> str | None:
    """The PersistentVolumeClaim named by a ``pvc://claim/path`` base model, else None."""
    if not base_model_uri.startswith(PVC_SCHEME):
        return None
    return base_model_uri[len(PVC_SCHEME) :].split("/", 1)[0] or None


def build_trainer_job(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """One pod (a plain Job), or with spec.resources.nodes > 1 an Indexed Job of that many pods whose
    subdomain is the headless Service (builders.service), so pod i answers at
    <name>-trainer-<i>.<name>-trainer."""
    spec = spec_of(job)
    nodes = spec.resources.nodes
    job_labels = {labels.LABEL_KUEUE_QUEUE: spec.queue_name} if spec.queue_name else None
    defaults = config.trainer_pod_defaults
    ephemeral = spec.resources.ephemeral_storage or defaults.ephemeral_storage
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": labels.config_map_name(job.name)}},
        {"name": "scratch", "emptyDir": {"sizeLimit": ephemeral} if ephemeral else {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": contract.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": contract.DEFAULT_WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    claim = pvc_claim(spec.base_model.uri)
    if claim is not None:
        # The trainer reads pvc://claim/path at <DEFAULT_PVC_ROOT>/claim/path. Read-only, so one claim can
        # feed many jobs at once (ReadOnlyMany) and no run can damage the model.
        volumes.append(
            {"name": BASE_MODEL_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append(
            {"name": BASE_MODEL_VOLUME, "mountPath": f"{contract.DEFAULT_PVC_ROOT}/{claim}", "readOnly": True}
        )
    if spec.resources.gpus > 1:
        # NCCL between local GPUs needs more shared memory than the runtime's 64 MiB default.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    ports = [{"name": labels.METRICS_PORT_NAME, "containerPort": contract.METRICS_PORT, "protocol": "TCP"}]
    if nodes > 1:
        ports.append(
            {"name": labels.RENDEZVOUS_PORT_NAME, "containerPort": labels.RENDEZVOUS_PORT, "protocol": "TCP"}
        )
    container: dict[str, Any] = {
        "name": labels.TRAINER_CONTAINER,
        "image": trainer_image(job, config),
        "env": _env(job),
        "ports": ports,
        "resources": _resources(job, config),
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
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.resources.tolerations]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    pod_spec.update(_pod_settings(job, config))
    job_spec: dict[str, Any] = {
        "suspend": desired_suspend(job),
        "podFailurePolicy": _pod_failure_policy(nodes > 1),
        "template": {
            "metadata": _pod_metadata(job, config),
            "spec": pod_spec,
        },
    }
    job_spec.update({name: value for name, value in updatable_job_fields(job).items() if value is not None})
    if nodes > 1:
        pod_spec["subdomain"] = labels.trainer_service_name(job.name)
        job_spec.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes})
    metadata = child_metadata(job, labels.trainer_job_name(job.name), job_labels)
    metadata["annotations"] = {labels.ANNOTATION_BUILT_FROM: built_from_annotation(job)}
    metadata["finalizers"] = [labels.RESULT_FINALIZER]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
