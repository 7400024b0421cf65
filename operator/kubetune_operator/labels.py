"""Names, labels and annotation keys shared by the builders, the reconciler and the handlers."""

from __future__ import annotations

from typing import Final

GROUP: Final = "kubetune.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"

# Longest FineTuneJob name: "<name>-validate", the longest child Job name, is copied into the pods' job-name
# label, which caps at 63.
MAX_NAME_LENGTH: Final = 54
CONFIG_MAP_SUFFIX: Final = "-config"
TRAINER_JOB_SUFFIX: Final = "-trainer"
VALIDATE_JOB_SUFFIX: Final = "-validate"

LABEL_JOB_NAME: Final = f"{GROUP}/job-name"
"""On every child and on the trainer pods: the name of the owning FineTuneJob."""
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "kubetune"
LABEL_APP_NAME: Final = "app.kubernetes.io/name"
TRAINER_APP_NAME: Final = "kubetune-trainer"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
TRAINER_COMPONENT: Final = "trainer"
VALIDATOR_COMPONENT: Final = "validator"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"
"""Set on the trainer Job when spec.queueName is set; Kueue admits the Job by unsuspending it."""

ANNOTATION_PREFIX: Final = GROUP
"""kopf keeps its progress and diff-base annotations under this prefix."""
FINALIZER: Final = f"{GROUP}/finalizer"
RESULT_FINALIZER: Final = f"{GROUP}/result"
"""On the trainer Job and on every trainer pod (through the pod template): holds them, and with the pod its
termination message (the trainer's result record), until the operator has written the outcome into the
FineTuneJob's status. A Job removed before that (ttlSecondsAfterFinished: 0, a kubectl delete, the FineTuneJob
deleted) therefore cannot turn a success into TrainerJobMissing. The operator removes it once the outcome is
recorded, or once the FineTuneJob is gone."""
ANNOTATION_RESULT_RECORDED: Final = f"{GROUP}/result-recorded"
"""On a finished FineTuneJob: its children no longer carry RESULT_FINALIZER, so later passes read nothing."""
ANNOTATION_BUILT_FROM: Final = f"{GROUP}/built-from"
"""On the trainer Job: a hash of each FineTuneJob spec field its pod template and labels were built from, so
a later pass can name the fields edited since (they cannot reach an existing Job)."""

TRAINER_CONTAINER: Final = "trainer"
METRICS_PORT_NAME: Final = "metrics"
RENDEZVOUS_PORT_NAME: Final = "rendezvous"
RENDEZVOUS_PORT: Final = 29400
"""With spec.resources.nodes > 1: the port the trainer pods gather on, at the pod with completion index 0."""
ANNOTATION_COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
"""Set by the Job controller on the pods of an Indexed Job: the pod's index, its node rank."""
MAX_MULTI_NODE_NAME_LENGTH: Final = 52
"""Longest FineTuneJob name with spec.resources.nodes > 1: pod i's hostname is <name>-trainer-<i>, a DNS
label of at most 63 characters, and i has up to two digits."""


def config_map_name(job_name: str) -> str:
    return job_name + CONFIG_MAP_SUFFIX


def trainer_job_name(job_name: str) -> str:
    return job_name + TRAINER_JOB_SUFFIX


def trainer_service_name(job_name: str) -> str:
    """The headless Service of a multi-node job: its name is the trainer pods' subdomain."""
    return job_name + TRAINER_JOB_SUFFIX


def trainer_pod_hostname(job_name: str, index: int) -> str:
    """The hostname the Job controller gives pod ``index`` of a multi-node trainer Job."""
    return f"{trainer_job_name(job_name)}-{index}"


def rendezvous_endpoint(job_name: str) -> str:
    """host:port of the pod with completion index 0, as the other trainer pods reach it."""
    return f"{trainer_pod_hostname(job_name, 0)}.{trainer_service_name(job_name)}:{RENDEZVOUS_PORT}"


def trainer_selector(job_name: str) -> dict[str, str]:
    """The labels that select a FineTuneJob's trainer pods (the multi-node Service's selector)."""
    return {LABEL_JOB_NAME: job_name, LABEL_COMPONENT: TRAINER_COMPONENT}


def validate_job_name(job_name: str) -> str:
    return job_name + VALIDATE_JOB_SUFFIX


def validator_pod_labels(job_name: str) -> dict[str, str]:
    return {
        **child_labels(job_name),
        LABEL_APP_NAME: TRAINER_APP_NAME,
        LABEL_COMPONENT: VALIDATOR_COMPONENT,
    }


def child_labels(job_name: str) -> dict[str, str]:
    """Labels on the ConfigMap and the Job; the handlers select children by LABEL_JOB_NAME."""
    return {LABEL_JOB_NAME: job_name, LABEL_MANAGED_BY: MANAGED_BY}


def trainer_pod_labels(job_name: str) -> dict[str, str]:
    return {
        **child_labels(job_name),
        LABEL_APP_NAME: TRAINER_APP_NAME,
        LABEL_COMPONENT: TRAINER_COMPONENT,
    }
