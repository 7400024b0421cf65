"""Kueue's explanation of a queued trainer Job: the Workload read as untrusted input (kueue.py), how the
API answers become Workloads or "no Kueue" (KubeIO.list_workloads), and the Queued condition a sync writes
from them (handlers + reconcile against the in-memory cluster)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from fake_cluster import FakeCluster
from operator_factories import NAMESPACE, make_job

from kubetune_operator import handlers
from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import Runtime, on_finetunejob, start_queue
from kubetune_operator.k8s_io import KubeIO
from kubetune_operator.kueue import (
    LABEL_JOB_UID,
    MESSAGE_LIMIT,
    KueueUnavailable,
    parse_workload,
    queued_message,
    workload_for_job,
)
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_operator.reconcile import MESSAGE_LIMIT as CONDITION_MESSAGE_LIMIT

Obj = dict[str, Any]
LOG = logging.getLogger("test")
JOB_UID = "0b5c1a7e-0000-4000-8000-000000000001"
# Kueue v0.17's own words for a ClusterQueue without room (scheduler.go / flavorassigner.go).
NO_ROOM = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
    "default, 1 more needed"
)
NEVER_FITS = (
    "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor default, "
    "previously considered podsets requests (0) + current podset request (16) > maximum capacity (3)"
)


def make_workload(
    *,
    job_uid: str = JOB_UID,
    owner_kind: str = "Job",
    controller: bool = True,
    conditions: Any = None,
    admission: Any = None,
    name: str = "job-a-trainer-3c1f2",
) -> Obj:
    """A Workload as Kueue's batch/job integration writes it."""
    workload: Obj = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {LABEL_JOB_UID: job_uid, "kueue.x-k8s.io/queue-name": "team-a"},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": owner_kind,
                    "name": "a-trainer",
                    "uid": job_uid,
                    "controller": controller,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"queueName": "team-a", "podSets": [{"name": "main", "count": 1}]},
        "status": {},
    }
    if conditions is not None:
        workload["status"]["conditions"] = conditions
    if admission is not None:
        workload["status"]["admission"] = admission
    return workload


def kueue_condition(type_: str, status: str, reason: str, message: str) -> Obj:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T12:00:00Z",
        "observedGeneration": 1,
    }


PENDING = [kueue_condition("QuotaReserved", "False", "Pending", NO_ROOM)]


# --- reading a Workload -----------------------------------------------------------------------------------


def test_kueues_pending_reason_and_message_reach_the_queued_message_verbatim() -> None:
    workload = workload_for_job([make_workload(conditions=PENDING)], JOB_UID)
    message = queued_message("team-a", workload, None)
    assert message == (
        f"waiting for Kueue to admit the trainer Job (queue team-a): no quota reserved (Pending): {NO_ROOM}"
    )


def test_a_workload_that_never_fits_is_explained_in_kueues_words() -> None:
    conditions = [kueue_condition("QuotaReserved", "False", "Pending", NEVER_FITS)]
    message = queued_message(
        "team-a", workload_for_job([make_workload(conditions=conditions)], JOB_UID), None
    )
    assert "maximum capacity (3)" in message and message.endswith(NEVER_FITS)


FORGED = [kueue_condition("QuotaReserved", "False", "Pending", "forged")]


@pytest.mark.parametrize(
    "workload",
    [
        make_workload(job_uid="someone-elses-job", conditions=FORGED),  # controlled by another Job
        make_workload(controller=False, conditions=FORGED),  # an owner, not the controller
        make_workload(owner_kind="Pod", conditions=FORGED),  # same uid, another kind
        {
            "metadata": {"name": "copied", "labels": {LABEL_JOB_UID: JOB_UID}},
            "status": {"conditions": FORGED},
        },
        {"metadata": "not an object"},
        "not a workload",
        None,
    ],
)
def test_only_the_workload_controlled_by_the_trainer_job_counts(workload: Any) -> None:
    assert workload_for_job([workload], JOB_UID) is None
    chosen = workload_for_job([workload, make_workload(conditions=PENDING)], JOB_UID)
    assert queued_message("team-a", chosen, None).endswith(NO_ROOM)


def test_no_job_uid_matches_nothing() -> None:
    assert workload_for_job([make_workload(job_uid="")], "") is None


@pytest.mark.parametrize(
    "status",
    [
        None,
        "pending",
        {"conditions": "QuotaReserved"},
        {"conditions": [None, 3, "x", {"type": 5}, {"status": "False"}]},
        {"conditions": [{"type": "QuotaReserved"}]},
        {"conditions": [{"type": "QuotaReserved", "status": ["False"], "reason": {}, "message": 12}]},
        {"admission": "cq", "conditions": []},
        {"admission": {"clusterQueue": ["cq"]}},
    ],
)
def test_missing_or_mistyped_fields_never_raise_and_never_invent_a_reason(status: Any) -> None:
    workload = make_workload()
    workload["status"] = status
    state = parse_workload(workload)
    assert state.cluster_queue is None
    message = queued_message("team-a", state, None)
    assert message.startswith("waiting for Kueue to admit the trainer Job (queue team-a)")
    assert "None" not in message and "12" not in message


def test_a_workload_without_name_or_status_still_reads() -> None:
    state = parse_workload({})
    assert state.name == "?" and state.quota_reserved is None and state.admitted is None


def test_a_huge_message_with_control_characters_is_cut_and_cleaned() -> None:
    hostile = "quota\x1b[31m exceeded\r\nfake: line\x00" + "A" * 200_000
    conditions = [kueue_condition("QuotaReserved", "False", "Pending", hostile)]
    state = workload_for_job([make_workload(conditions=conditions)], JOB_UID)
    assert state is not None and state.quota_reserved is not None
    kept = state.quota_reserved.message
    assert kept is not None and len(kept) == MESSAGE_LIMIT and kept.endswith("...")
    assert kept.startswith("quota [31m exceeded fake: line A")
    assert not any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in kept)
    message = queued_message("team-a", state, None)
    assert len(message) < CONDITION_MESSAGE_LIMIT  # the condition keeps all of it, the queue name included


@pytest.mark.parametrize("reason", ["Not A Reason", "x" * 65, "1Pending", "Pend\ning", ""])
def test_a_reason_that_is_not_camel_case_is_dropped(reason: str) -> None:
    conditions = [kueue_condition("QuotaReserved", "False", reason, "no room")]
    state = workload_for_job([make_workload(conditions=conditions)], JOB_UID)
    assert state is not None and state.quota_reserved is not None
    assert state.quota_reserved.reason is None
    assert queued_message("team-a", state, None).endswith(": no quota reserved: no room")


def test_quota_reserved_but_admission_checks_pending_names_the_cluster_queue() -> None:
    conditions = [
        kueue_condition("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
        kueue_condition("Admitted", "False", "NoChecks", "The workload has pending admission checks"),
    ]
    state = workload_for_job(
        [make_workload(conditions=conditions, admission={"clusterQueue": "gpu"})], JOB_UID
    )
    assert queued_message("team-a", state, None).endswith(
        ": quota reserved in ClusterQueue gpu, not admitted yet (NoChecks): "
        "The workload has pending admission checks"
    )


def test_an_evicted_workload_says_why_it_waits_again() -> None:
    conditions = [
        kueue_condition(
            "QuotaReserved", "False", "Pending", "Preempted to accommodate a higher priority job"
        ),
        kueue_condition("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority job"),
    ]
    state = workload_for_job([make_workload(conditions=conditions)], JOB_UID)
    assert queued_message("team-a", state, None).endswith(
        ": evicted (Preempted): Preempted to accommodate a higher priority job"
    )


def test_the_first_of_duplicated_condition_types_wins() -> None:
    conditions = [
        kueue_condition("QuotaReserved", "False", "Pending", "first"),
        kueue_condition("QuotaReserved", "True", "QuotaReserved", "second"),
    ]
    state = workload_for_job([make_workload(conditions=conditions)], JOB_UID)
    assert queued_message("team-a", state, None).endswith("(Pending): first")


def test_kueue_unavailable_is_said_instead_of_a_workload() -> None:
    message = queued_message("team-a", None, "Kueue is not installed")
    assert message == "waiting for Kueue to admit the trainer Job (queue team-a); Kueue is not installed"


# --- KubeIO.list_workloads --------------------------------------------------------------------------------


class _Response:
    def __init__(self, status: int, body: Obj) -> None:
        self.status = status
        self.reason = "scripted"
        self.headers: dict[str, str] = {}
        self.data = json.dumps(body).encode()

    def read(self) -> bytes:
        return self.data


class PathScriptedApiClient:
    """Answers by the request path's API version (v1beta2 / v1beta1); records path and query."""

    def __init__(self, answers: dict[str, tuple[int, Obj]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []

    def param_serialize(
        self, *, method: str, resource_path: str, query_params: list[tuple[str, str]], **_: Any
    ) -> tuple[Any, ...]:
        self.requests.append((resource_path, query_params))
        return method, resource_path, {}, None, None

    def call_api(self, method: str, url: str, **_: Any) -> _Response:
        version = url.split("/")[3]
        return _Response(*self.answers[version])


def not_found() -> tuple[int, Obj]:
    return 404, {"kind": "Status", "code": 404, "message": "the server could not find the requested resource"}


def io_with(answers: dict[str, tuple[int, Obj]]) -> tuple[KubeIO, PathScriptedApiClient]:
    api = PathScriptedApiClient(answers)
    return KubeIO(api, OperatorConfig()), api  # type: ignore[arg-type]


def test_workloads_are_listed_by_the_job_uid_label_with_a_limit() -> None:
    io, api = io_with({"v1beta2": (200, {"items": [make_workload(), "junk"]})})
    assert io.list_workloads(NAMESPACE, JOB_UID) == [make_workload()]
    ((path, query),) = api.requests
    assert path == f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NAMESPACE}/workloads"
    assert ("labelSelector", f"{LABEL_JOB_UID}={JOB_UID}") in query and ("limit", "5") in query


def test_an_older_kueue_serving_only_v1beta1_is_read() -> None:
    io, api = io_with({"v1beta2": not_found(), "v1beta1": (200, {"items": [make_workload()]})})
    assert len(io.list_workloads(NAMESPACE, JOB_UID)) == 1
    assert [p.split("/")[3] for p, _ in api.requests] == ["v1beta2", "v1beta1"]


def test_no_workload_api_means_no_kueue() -> None:
    io, _ = io_with({"v1beta2": not_found(), "v1beta1": not_found()})
    with pytest.raises(KueueUnavailable, match="Kueue is not installed in this cluster"):
        io.list_workloads(NAMESPACE, JOB_UID)


def test_a_forbidden_workload_list_names_the_missing_grant() -> None:
    forbidden = (
        403,
        {"kind": "Status", "code": 403, "message": 'workloads.kueue.x-k8s.io is forbidden: User "op"'},
    )
    io, _ = io_with({"v1beta2": forbidden})
    with pytest.raises(KueueUnavailable, match=r"may not list Kueue Workloads in namespace ml .*forbidden"):
        io.list_workloads(NAMESPACE, JOB_UID)


def test_an_items_field_of_the_wrong_type_reads_as_none() -> None:
    io, _ = io_with({"v1beta2": (200, {"items": {"a": 1}})})
    assert io.list_workloads(NAMESPACE, JOB_UID) == []


# --- the Queued condition a sync writes -------------------------------------------------------------------


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def memo(cluster: FakeCluster, config: OperatorConfig) -> Iterator[kopf.Memo]:
    rt = Runtime(config=config, metrics=OperatorMetrics(), io=cluster)
    queue = start_queue(rt, threads=1)
    yield kopf.Memo(runtime=rt)
    queue.close()


def fire(memo: kopf.Memo) -> None:
    on_finetunejob(name="a", namespace=NAMESPACE, memo=memo, logger=LOG, body={}, spec={})


def suspended(cluster: FakeCluster) -> Obj:
    ftj = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert ftj is not None
    return next(c for c in ftj["status"]["conditions"] if c["type"] == "Suspended")


def trainer_job(cluster: FakeCluster) -> Obj:
    job = cluster.get("Job", NAMESPACE, "a-trainer")
    assert job is not None
    return job


def kueue_makes_workload(cluster: FakeCluster, conditions: list[Obj], admission: Obj | None = None) -> None:
    uid = trainer_job(cluster)["metadata"]["uid"]
    cluster.put(make_workload(job_uid=uid, conditions=conditions, admission=admission))


def test_a_queued_job_carries_kueues_message_until_admitted(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job(queue_name="team-a"))
    fire(memo)  # creates the suspended trainer Job; Kueue has no Workload for it yet
    assert suspended(cluster)["reason"] == "Queued"
    assert suspended(cluster)["message"].endswith("Kueue has not created a Workload for it yet")
    kueue_makes_workload(cluster, PENDING)
    fire(memo)
    assert suspended(cluster)["message"].endswith(f"(Pending): {NO_ROOM}")
    ftj = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert ftj is not None and ftj["status"]["message"] == suspended(cluster)["message"]
    # Kueue reserves quota in ClusterQueue gpu and admits the Job by unsuspending it.
    cluster.delete("Workload", NAMESPACE, "job-a-trainer-3c1f2")
    admitted = [
        kueue_condition("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
        kueue_condition("Admitted", "True", "Admitted", "The workload is admitted"),
    ]
    kueue_makes_workload(cluster, admitted, admission={"clusterQueue": "gpu"})
    trainer_job(cluster)["spec"]["suspend"] = False
    fire(memo)
    assert suspended(cluster)["status"] == "False" and suspended(cluster)["reason"] == "Admitted"
    assert (
        suspended(cluster)["message"]
        == "Kueue admitted the trainer Job from queue team-a into ClusterQueue gpu"
    )
    assert trainer_job(cluster)["spec"]["suspend"] is False
    reads = cluster.calls["list_workloads"]
    fire(memo)
    assert cluster.calls["list_workloads"] == reads, "a running job's Workload is not read again"


def test_a_queued_job_is_looked_at_again_while_it_waits(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job(queue_name="team-a"))
    fire(memo)
    assert handlers.queue_of(handlers.runtime_of(memo)).delayed() == 1


def test_without_kueue_the_job_stays_queued_and_says_so(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.kueue_unavailable = (
        "Kueue is not installed in this cluster; install Kueue or remove spec.queueName"
    )
    cluster.put(make_job(queue_name="team-a"))
    fire(memo)
    fire(memo)
    condition = suspended(cluster)
    assert (condition["status"], condition["reason"]) == ("True", "Queued")
    assert condition["message"].endswith(
        "; Kueue is not installed in this cluster; install Kueue or remove spec.queueName"
    )
    assert trainer_job(cluster)["spec"]["suspend"] is True


def test_removing_the_queue_name_starts_a_job_that_no_kueue_admits(
    cluster: FakeCluster, memo: kopf.Memo
) -> None:
    """What the "Kueue is not installed" message tells a user to do works: without spec.queueName the
    operator unsuspends the trainer Job itself."""
    cluster.kueue_unavailable = "Kueue is not installed in this cluster"
    cluster.put(make_job(queue_name="team-a"))
    fire(memo)
    assert trainer_job(cluster)["spec"]["suspend"] is True
    ftj = cluster.get("FineTuneJob", NAMESPACE, "a")
    assert ftj is not None and suspended(cluster)["reason"] == "Queued"
    del ftj["spec"]["queueName"]
    ftj["metadata"]["generation"] = 2
    fire(memo)
    assert trainer_job(cluster)["spec"]["suspend"] is False
    assert suspended(cluster)["status"] == "False"


def test_jobs_without_a_queue_never_list_workloads(cluster: FakeCluster, memo: kopf.Memo) -> None:
    cluster.put(make_job())
    fire(memo)
    cluster.put(make_job(name="b", suspend=True))
    on_finetunejob(name="b", namespace=NAMESPACE, memo=memo, logger=LOG, body={}, spec={})
    cluster.put(make_job(name="c", suspend=True, queue_name="team-a"))
    on_finetunejob(name="c", namespace=NAMESPACE, memo=memo, logger=LOG, body={}, spec={})
    assert cluster.calls["list_workloads"] == 0
