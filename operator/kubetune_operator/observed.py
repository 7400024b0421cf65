"""What the operator saw of a FineTuneJob's children, and pure helpers to read it.

Children arrive as the plain dicts the API server returns (camelCase keys), so these helpers read exactly
the field names of batch/v1 Job and core/v1 Pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_operator import labels
from kubetune_operator.kueue import WorkloadState
from kubetune_operator.trainer_metrics import TrainerSample
from kubetune_trainer import contract

Obj = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    config_map: Obj | None
    trainer_job: Obj | None
    pods: tuple[Obj, ...]
    now: datetime
    sample: TrainerSample | None = None
    """The trainer's metrics scraped in this pass; None when not scraped or unreachable."""
    rejected: str | None = None
    """Set when the API server refused to create a child built from this spec (HTTP 422): its message."""
    forbidden: str | None = None
    """Set when the API server forbade the operator to create a child (HTTP 403): its message."""
    validate_job: Obj | None = None
    """The validation Job <name>-validate; read only while no trainer Job exists."""
    validate_pods: tuple[Obj, ...] = ()
    """The validation Job's pods."""
    job_events: tuple[Obj, ...] = ()
    """The trainer Job's FailedCreate Events (pod creation refused by a quota, Pod Security admission, a
    webhook); read only while the Job runs and has no pod."""
    workload: WorkloadState | None = None
    """The Workload Kueue made for the trainer Job; read only while a queued Job waits (or was just
    admitted), None when there is none yet or it could not be read."""
    kueue_unavailable: str | None = None
    """Why Workloads could not be read (Kueue not installed, or not permitted); None when they could."""
    service: Obj | None = None
    """The headless Service of a multi-node job (spec.resources.nodes > 1); None for one node, or missing."""


def _get(obj: Obj | None, *path: str) -> Any:
    node: Any = obj
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def job_condition(job: Obj, type_: str) -> Obj | None:
    """A batch/v1 Job condition of this type whose status is True."""
    for cond in _get(job, "status", "conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def job_suspended(job: Obj) -> bool:
    return bool(_get(job, "spec", "suspend"))


def job_failed_count(job: Obj) -> int:
    return int(_get(job, "status", "failed") or 0)


def _created(pod: Obj) -> str:
    return str(_get(pod, "metadata", "creationTimestamp") or "")


def trainer_container_status(pod: Obj) -> Obj | None:
    for status in _get(pod, "status", "containerStatuses") or []:
        if status.get("name") == labels.TRAINER_CONTAINER:
            return dict(status)
    return None


def current_pod(pods: tuple[Obj, ...]) -> Obj | None:
    """The newest pod that is still on its way (Pending or Running, not being deleted)."""
    live = [
        p
        for p in pods
        if _get(p, "status", "phase") in ("Pending", "Running", None)
        and not _get(p, "metadata", "deletionTimestamp")
    ]
    return max(live, key=_created) if live else None


def is_indexed(trainer_job: Obj | None) -> bool:
    """The trainer Job runs several pods that train together (a multi-node job: completionMode Indexed)."""
    return bool(_get(trainer_job, "spec", "completionMode") == "Indexed")


def completion_index(pod: Obj) -> str | None:
    """The pod's completion index in an Indexed Job (its node rank), as the Job controller annotated it."""
    value = (_get(pod, "metadata", "annotations") or {}).get(labels.ANNOTATION_COMPLETION_INDEX)
    return str(value) if value is not None else None


def leader_pods(pods: tuple[Obj, ...]) -> tuple[Obj, ...]:
    """The pods with completion index 0 (global rank 0): only they publish the result and serve the
    group's metrics."""
    return tuple(p for p in pods if completion_index(p) == "0")


def group_pod(pods: tuple[Obj, ...]) -> Obj | None:
    """The pod that speaks for a multi-node group still on its way: one that cannot start (unschedulable,
    or its container waits on something), since the group cannot train without it; else the current pod
    of index 0; else the newest live pod."""
    live = tuple(
        p
        for p in pods
        if _get(p, "status", "phase") in ("Pending", "Running", None)
        and not _get(p, "metadata", "deletionTimestamp")
    )
    blocked = [p for p in live if unschedulable_message(p) is not None or stuck_waiting(p) is not None]
    if blocked:
        return min(blocked, key=lambda p: (completion_index(p) or "", _created(p)))
    return current_pod(leader_pods(live)) or current_pod(live)


def last_failed_pod(pods: tuple[Obj, ...], *, indexed: bool) -> Obj | None:
    """The newest Failed pod; of a multi-node group, the newest one whose failure was its own (not a pod
    that stopped because a peer was lost), so the reported cause is the one that started the restart."""
    if indexed:
        own = tuple(
            p for p in pods if (terminated_state(p) or {}).get("exitCode") != contract.EXIT_CODE_PEER_LOST
        )
        found = last_finished_pod(own, "Failed")
        if found is not None:
            return found
    return last_finished_pod(pods, "Failed")


def newest_pod(pods: tuple[Obj, ...]) -> Obj | None:
    """The most recently created pod, whatever its phase."""
    return max(pods, key=_created) if pods else None


def last_finished_pod(pods: tuple[Obj, ...], phase: str) -> Obj | None:
    """The newest pod in ``phase`` (Failed or Succeeded)."""
    done = [p for p in pods if _get(p, "status", "phase") == phase]
    return max(done, key=_created) if done else None


JOB_CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
"""Labels the Job controller puts on its pods; when present they must name the trainer Job too."""


def controller_uid(obj: Obj | None) -> str | None:
    """The uid in the object's controller ownerReference (the one with ``controller: true``), if any."""
    for ref in _get(obj, "metadata", "ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") is True:
            return str(ref.get("uid") or "") or None
    return None


def is_trainer_pod_of(pod: Obj, job_name: str, trainer_job: Obj) -> bool:
    """The pod is controlled by this trainer Job (controller ownerReference of kind Job with the Job's uid)
    and carries this FineTuneJob's label. A pod that merely names the Job, or copies its labels, is not."""
    job_uid = str(_get(trainer_job, "metadata", "uid") or "")
    if not job_uid or controller_uid(pod) != job_uid:
        return False
    if not any(
        isinstance(ref, dict) and ref.get("controller") is True and ref.get("kind") == "Job"
        for ref in _get(pod, "metadata", "ownerReferences") or []
    ):
        return False
    pod_labels = _get(pod, "metadata", "labels") or {}
    if pod_labels.get(labels.LABEL_JOB_NAME) != job_name:
        return False
    return all(pod_labels.get(key, job_uid) == job_uid for key in JOB_CONTROLLER_UID_LABELS)


def scrape_target(
    job_name: str, job_uid: str | None, trainer_job: Obj | None, pods: tuple[Obj, ...]
) -> tuple[str, str] | None:
    """(pod name, pod IP) of the trainer pod to scrape, if any: the current pod of this FineTuneJob's own
    trainer Job (the Job's controller is the FineTuneJob ``job_uid``, the pod's controller is the Job), with
    its trainer container running; of a multi-node Job, the pod with completion index 0 (rank 0 reports
    the group's metrics). The operator connects to whatever IP this returns, so nothing that a
    foreign pod or Job could claim is enough."""
    if trainer_job is None or not job_uid or controller_uid(trainer_job) != job_uid:
        return None
    own = tuple(p for p in pods if is_trainer_pod_of(p, job_name, trainer_job))
    pod = current_pod(leader_pods(own) if is_indexed(trainer_job) else own)
    if pod is None or _get(pod, "status", "phase") != "Running":
        return None
    container = trainer_container_status(pod)
    ip = _get(pod, "status", "podIP")
    if not ip or container is None or "running" not in (container.get("state") or {}):
        return None
    return pod_name(pod), str(ip)


def pod_name(pod: Obj) -> str:
    return str(_get(pod, "metadata", "name") or "")


def running_since(pod: Obj) -> str | None:
    """When the trainer container started, if it is running."""
    container = trainer_container_status(pod)
    running = _get(container, "state", "running")
    if running is None:
        return None
    return str(running.get("startedAt") or "") or None


def unschedulable_since(pod: Obj) -> str | None:
    """When the scheduler first found no node for the pod (its PodScheduled=False transition time)."""
    for cond in _get(pod, "status", "conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("lastTransitionTime") or "") or None
    return None


def pod_creation_refused(events: tuple[Obj, ...]) -> str | None:
    """The newest FailedCreate message the Job controller recorded on the trainer Job, if any."""
    refused = [e for e in events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None
    newest = max(refused, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return str(newest.get("message") or "the Job controller could not create the trainer pod")


def unschedulable_message(pod: Obj) -> str | None:
    for cond in _get(pod, "status", "conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return str(cond.get("message") or "no node fits the pod")
    return None


BENIGN_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
NEEDS_A_PERSON_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
"""Waiting reasons that retrying alone will not fix: a wrong image or registry credentials, a missing Secret
or ConfigMap key. The job reports Stalled until the cause goes away."""


def stuck_waiting(pod: Obj) -> tuple[str, str] | None:
    """(reason, message) when the trainer container waits for something that needs a person."""
    waiting = _get(trainer_container_status(pod), "state", "waiting")
    if not waiting or waiting.get("reason") in BENIGN_WAITING or not waiting.get("reason"):
        return None
    return str(waiting["reason"]), str(waiting.get("message") or "")


def was_disrupted(pod: Obj) -> bool:
    """Preempted or evicted: the pod carries condition DisruptionTarget=True."""
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in _get(pod, "status", "conditions") or []
    )


def terminated_state(pod: Obj) -> Obj | None:
    """The trainer container's terminated state (exitCode, reason, message, finishedAt)."""
    state = _get(trainer_container_status(pod), "state", "terminated")
    return dict(state) if state else None


def may_have_refused_pods(trainer_job: Obj, pods: tuple[Obj, ...]) -> bool:
    """A running, unsuspended trainer Job with no pod that has not ended: the one moment a FailedCreate
    Event (quota, Pod Security) explains the wait, so the only moment Events are read."""
    if is_finished_job(trainer_job) or job_suspended(trainer_job):
        return False
    return bool((trainer_job.get("metadata") or {}).get("uid")) and all(is_finished_pod(p) for p in pods)


def with_finished_event_pods(listed: list[Obj], event_pods: list[Obj] | None) -> list[Obj]:
    """The listed pods, plus the ended pods from watch events that are no longer listed.

    A stopped trainer pod (suspension, deletion, drain) is removed soon after it reports its exit; its last
    state, with the termination summary and checkpoint, may survive only in the watch event that woke us."""
    listed_uids = {(pod.get("metadata") or {}).get("uid") for pod in listed}
    extra = [
        pod
        for pod in event_pods or []
        if is_finished_pod(pod) and (pod.get("metadata") or {}).get("uid") not in listed_uids
    ]
    return [*listed, *extra]


def is_finished_pod(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")


def is_finished_job(job: Obj) -> bool:
    """The Job has reached (or is about to reach) its outcome."""
    return any(
        job_condition(job, type_) is not None
        for type_ in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")
    )


def owned_by(pod: Obj, uid: str | None) -> bool:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return not uid or any(ref.get("uid") == uid for ref in refs)
