"""What Kueue says about a queued trainer Job, read from the Workload it made for that Job.

Kueue's batch/job integration creates one Workload per Job (controller ownerReference to the Job, label
``kueue.x-k8s.io/job-uid``) and explains there why the Job is still suspended: the ``QuotaReserved``
condition while no ClusterQueue has room for it (``Pending``, ``Inadmissible``: "insufficient unused quota
for nvidia.com/gpu in flavor default, 1 more needed", "LocalQueue team-a doesn't exist"), then ``Admitted``
while admission checks run. The operator copies that explanation into the FineTuneJob's Queued condition, so
``kubectl get ftj`` says what the job waits for without a second tool.

A Workload is written by another controller (or by anyone allowed to create one in the namespace), so it is
read as untrusted input: only a Workload controlled by this Job counts, every field is type-checked, reasons
must look like reasons, and messages are stripped of control characters and cut to ``MESSAGE_LIMIT``.
Pure: ``k8s_io`` lists the Workloads, this module reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

Obj = dict[str, Any]

GROUP: Final = "kueue.x-k8s.io"
VERSIONS: Final = ("v1beta2", "v1beta1")
"""Workload API versions read, newest first: v1beta2 is Kueue's storage version since v0.15; an older Kueue
serves only v1beta1, with the same condition types."""
PLURAL: Final = "workloads"
LABEL_JOB_UID: Final = f"{GROUP}/job-uid"
"""Kueue labels the Workload with the uid of the Job it stands for (the API server filters on it)."""
LIST_LIMIT: Final = 5
"""Workloads read per list: Kueue makes one per Job; a few more tolerate a stale one being replaced."""

MESSAGE_LIMIT: Final = 512
"""Longest Kueue message kept; the condition carrying it adds the queue's name around it."""
NAME_LIMIT: Final = 253
CONDITIONS_LIMIT: Final = 32
"""Conditions examined per Workload (Kueue writes fewer than ten)."""
_REASON = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")

QUOTA_RESERVED: Final = "QuotaReserved"
ADMITTED: Final = "Admitted"
EVICTED: Final = "Evicted"


class KueueUnavailable(Exception):
    """The Workload API could not be read: not served (no Kueue in the cluster: 404) or not permitted (403).
    The text says which, for the Queued condition."""


@dataclass(frozen=True)
class WorkloadCondition:
    status: str
    """"True", "False" or "Unknown" (anything else reads as "Unknown")."""
    reason: str | None
    message: str | None


@dataclass(frozen=True)
class WorkloadState:
    """The parts of a Workload that explain a wait, checked and bounded."""

    name: str
    quota_reserved: WorkloadCondition | None
    admitted: WorkloadCondition | None
    evicted: WorkloadCondition | None
    cluster_queue: str | None
    """status.admission.clusterQueue: where quota was reserved, once it was."""


def workload_for_job(workloads: Iterable[Any], job_uid: str) -> WorkloadState | None:
    """The Workload Kueue made for the Job with ``job_uid``: the one whose controller ownerReference is that
    Job. A Workload that only carries the label (anyone may copy a label) is ignored."""
    if not job_uid:
        return None
    for workload in workloads:
        if isinstance(workload, dict) and _controlled_by_job(workload, job_uid):
            return parse_workload(workload)
    return None


def _controlled_by_job(workload: Obj, job_uid: str) -> bool:
    meta = workload.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else None
    if not isinstance(refs, list):
        return False
    return any(
        isinstance(ref, dict)
        and ref.get("controller") is True
        and ref.get("kind") == "Job"
        and ref.get("apiVersion") == "batch/v1"
        and ref.get("uid") == job_uid
        for ref in refs
    )


def parse_workload(workload: Obj) -> WorkloadState:
    meta = workload.get("metadata")
    name = _text(meta.get("name") if isinstance(meta, dict) else None, NAME_LIMIT) or "?"
    status = workload.get("status")
    status = status if isinstance(status, dict) else {}
    found: dict[str, WorkloadCondition] = {}
    conditions = status.get("conditions")
    for raw in conditions[:CONDITIONS_LIMIT] if isinstance(conditions, list) else []:
        if not isinstance(raw, dict) or raw.get("type") not in (QUOTA_RESERVED, ADMITTED, EVICTED):
            continue
        state = raw.get("status")
        found.setdefault(
            str(raw["type"]),
            WorkloadCondition(
                status=state if state in ("True", "False") else "Unknown",
                reason=_reason(raw.get("reason")),
                message=_text(raw.get("message"), MESSAGE_LIMIT),
            ),
        )
    admission = status.get("admission")
    cluster_queue = _text(admission.get("clusterQueue"), NAME_LIMIT) if isinstance(admission, dict) else None
    return WorkloadState(
        name=name,
        quota_reserved=found.get(QUOTA_RESERVED),
        admitted=found.get(ADMITTED),
        evicted=found.get(EVICTED),
        cluster_queue=cluster_queue,
    )


def queued_message(queue: str, workload: WorkloadState | None, unavailable: str | None) -> str:
    """The Queued condition's message: what the job waits for, in Kueue's words when Kueue gave any."""
    waiting = f"waiting for Kueue to admit the trainer Job (queue {queue})"
    if unavailable:
        return f"{waiting}; {unavailable}"
    if workload is None:
        return f"{waiting}; Kueue has not created a Workload for it yet"
    why = _why_waiting(workload)
    return f"{waiting}: {why}" if why else f"{waiting} (Workload {workload.name})"


def admitted_message(queue: str, workload: WorkloadState | None) -> str:
    """The Admitted condition's message, naming the ClusterQueue that gave the quota when it is known."""
    where = f" into ClusterQueue {workload.cluster_queue}" if workload and workload.cluster_queue else ""
    return f"Kueue admitted the trainer Job from queue {queue}{where}"


def _why_waiting(workload: WorkloadState) -> str | None:
    reserved, admitted, evicted = workload.quota_reserved, workload.admitted, workload.evicted
    if evicted is not None and evicted.status == "True" and (reserved is None or reserved.status != "True"):
        return _said("evicted", evicted)
    if reserved is None or reserved.status != "True":
        return _said("no quota reserved", reserved) if reserved is not None else None
    if admitted is None or admitted.status != "True":
        where = f" in ClusterQueue {workload.cluster_queue}" if workload.cluster_queue else ""
        return _said(f"quota reserved{where}, not admitted yet", admitted)
    return None


def _said(what: str, condition: WorkloadCondition | None) -> str:
    if condition is None or not (condition.reason or condition.message):
        return what
    reason = f" ({condition.reason})" if condition.reason else ""
    return f"{what}{reason}: {condition.message}" if condition.message else f"{what}{reason}"


def _reason(value: Any) -> str | None:
    return value if isinstance(value, str) and _REASON.match(value) else None


def _text(value: Any, limit: int) -> str | None:
    """A string from another controller, with control characters collapsed to spaces and cut to ``limit``
    (the cut is marked); anything that is not a non-empty string is None."""
    if not isinstance(value, str):
        return None
    text = _CONTROL.sub(" ", value[: limit * 4]).strip()
    if not text:
        return None
    return text if len(text) <= limit else text[: limit - 3] + "..."
