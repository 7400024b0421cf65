"""Multi-node jobs (spec.resources.nodes > 1): the headless Service and the Indexed trainer Job the builders
make, the checks the operator repeats from the CRD, and the reconcile rows that differ from one pod (the
result and the metrics come from completion index 0; a pod that stopped because a peer was lost is not the
cause reported)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest
from fake_cluster import FakeCluster
from operator_factories import (
    job_condition,
    make_job,
    make_pod,
    make_trainer_job,
    observed,
    owner_reference,
    parse,
    success_summary,
    terminated,
    ts,
)

from kubetune_operator import observed as seen_helpers
from kubetune_operator import termination
from kubetune_operator.builders import build_trainer_job, build_trainer_service
from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import Runtime, sync
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_operator.reconcile import reconcile
from kubetune_operator.validation import validate
from kubetune_trainer import contract

Obj = dict[str, Any]
SELECTOR = {"kubetune.io/job-name": "a", "app.kubernetes.io/component": "trainer"}


def multi_node_job(name: str = "a", nodes: int = 2, gpus: int = 8, **spec: Any) -> Obj:
    return make_job(name, resources={"nodes": nodes, "gpus": gpus}, **spec)


def by_name(items: list[Obj]) -> dict[str, Obj]:
    return {item["name"]: item for item in items}


# --- builders -----------------------------------------------------------------------------------------------


def test_the_headless_service_names_the_trainer_pods() -> None:
    assert build_trainer_service(parse(multi_node_job())) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "a-trainer",
            "namespace": "ml",
            "labels": {"kubetune.io/job-name": "a", "app.kubernetes.io/managed-by": "kubetune"},
            "ownerReferences": [owner_reference()],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": SELECTOR,
            "ports": [{"name": "rendezvous", "port": 29400, "targetPort": 29400, "protocol": "TCP"}],
        },
    }


def test_the_service_selects_the_pods_of_the_trainer_job(config: OperatorConfig) -> None:
    job = parse(multi_node_job())
    pod_labels = build_trainer_job(job, config)["spec"]["template"]["metadata"]["labels"]
    selector = build_trainer_service(job)["spec"]["selector"]
    assert selector.items() <= pod_labels.items()


def test_a_multi_node_trainer_job_is_indexed_with_the_service_as_subdomain(config: OperatorConfig) -> None:
    job = parse(multi_node_job(nodes=4, peerTimeoutSeconds=90))
    spec = build_trainer_job(job, config)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "a-trainer"
    assert "hostname" not in pod  # the Job controller names pod i <job>-<i>
    (container,) = pod["containers"]
    env = by_name(container["env"])
    assert env["KUBETUNE_NODES"] == {"name": "KUBETUNE_NODES", "value": "4"}
    assert env["KUBETUNE_RENDEZVOUS_ENDPOINT"]["value"] == "a-trainer-0.a-trainer:29400"
    assert env["KUBETUNE_PEER_TIMEOUT_SECONDS"]["value"] == "90"
    assert container["ports"] == [
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
        {"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"},
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_a_pod_that_lost_a_peer_is_ignored_by_the_failure_policy(config: OperatorConfig) -> None:
    rules = build_trainer_job(parse(multi_node_job()), config)["spec"]["podFailurePolicy"]["rules"]
    assert [(r["action"], (r.get("onExitCodes") or {}).get("values")) for r in rules] == [
        ("FailJob", [2]),
        ("Ignore", [143]),
        ("Ignore", [3]),
        ("Ignore", None),  # DisruptionTarget
    ]
    assert contract.EXIT_CODE_PEER_LOST == 3


def test_the_users_env_cannot_override_what_the_group_agrees_on(config: OperatorConfig) -> None:
    env = [
        {"name": "KUBETUNE_NODES", "value": "1"},
        {"name": "NCCL_SOCKET_IFNAME", "value": "ib0"},
    ]
    job = parse(multi_node_job(trainer={"env": env}))
    (container,) = build_trainer_job(job, config)["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in container["env"]]
    # Kubernetes uses the last entry of a repeated name.
    last = {e["name"]: e.get("value") for e in container["env"]}
    assert last["KUBETUNE_NODES"] == "2" and last["NCCL_SOCKET_IFNAME"] == "ib0"
    assert names.index("NCCL_SOCKET_IFNAME") < len(names) - 1


def test_extra_resources_are_requested_and_limited_alike(config: OperatorConfig) -> None:
    job = parse(make_job(resources={"nodes": 2, "gpus": 8, "extraResources": {"rdma/ib": 1}}))
    (container,) = build_trainer_job(job, config)["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": 8, "rdma/ib": 1},
        "limits": {"nvidia.com/gpu": 8, "rdma/ib": 1},
    }


def test_one_node_stays_a_plain_job_without_a_service_or_group_env(config: OperatorConfig) -> None:
    spec = build_trainer_job(parse(make_job(resources={"nodes": 1, "gpus": 1})), config)["spec"]
    assert not {"completionMode", "completions", "parallelism"} & set(spec)
    pod = spec["template"]["spec"]
    assert "subdomain" not in pod
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert not {"KUBETUNE_NODES", "KUBETUNE_RENDEZVOUS_ENDPOINT", "KUBETUNE_PEER_TIMEOUT_SECONDS"} & names
    assert [p["name"] for p in pod["containers"][0]["ports"]] == ["metrics"]
    assert all(
        3 not in (r.get("onExitCodes") or {}).get("values", []) for r in spec["podFailurePolicy"]["rules"]
    )
    outcome = reconcile(parse(make_job()), observed(), config)
    assert [o["kind"] for o in outcome.create] == ["ConfigMap", "Job"]


# --- checks the operator repeats from the CRD -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "resources", "spec", "problem"),
    [
        ("a", {"nodes": 2, "gpus": 0}, {}, "spec.resources.nodes greater than 1 needs spec.resources.gpus"),
        ("a", {"nodes": 65}, {}, "spec.resources.nodes: 65 is outside 1..64"),
        ("a" * 53, {"nodes": 2}, {}, "metadata.name: 53 characters, at most 52"),
        ("a", {"extraResources": {"cpu": 2}}, {}, "spec.resources.extraResources['cpu']: not an extended"),
        (
            "a",
            {"extraResources": {"rdma/ib": 0}},
            {},
            "spec.resources.extraResources['rdma/ib']: 0 is outside",
        ),
        ("a", {"nodes": 2}, {"peerTimeoutSeconds": 1}, "spec.peerTimeoutSeconds: 1 is below the minimum 5"),
    ],
)
def test_validation_names_the_multi_node_field_at_fault(
    name: str, resources: Obj, spec: Obj, problem: str
) -> None:
    problems = validate(parse(make_job(name, resources=resources, **spec)))
    assert any(problem in p for p in problems), problems


def test_a_valid_multi_node_spec_has_no_problem() -> None:
    job = make_job(
        "a" * 52, resources={"nodes": 64, "gpus": 8, "extraResources": {"vendor.example.com/hca": 2}}
    )
    assert validate(parse(job)) == []


# --- reconcile ----------------------------------------------------------------------------------------------


def service(uid: str = "uid-a", owner_name: str = "a") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "a-trainer",
            "namespace": "ml",
            "ownerReferences": [owner_reference(owner_name, uid)],
        },
    }


def config_map() -> Obj:
    return {
        "kind": "ConfigMap",
        "metadata": {"name": "a-config", "ownerReferences": [owner_reference()]},
        "data": {},
    }


def seen(**kwargs: Any) -> Any:
    """What a pass observes once the ConfigMap exists, with the multi-node ``service`` if given."""
    service = kwargs.pop("service", None)
    return replace(observed(config_map=config_map(), **kwargs), service=service)


def test_create_makes_the_service_before_the_indexed_job(config: OperatorConfig) -> None:
    outcome = reconcile(parse(multi_node_job()), observed(), config)
    assert [(o["kind"], o["metadata"]["name"]) for o in outcome.create] == [
        ("ConfigMap", "a-config"),
        ("Service", "a-trainer"),
        ("Job", "a-trainer"),
    ]
    assert outcome.create[2]["spec"]["completionMode"] == "Indexed"


def test_an_existing_service_of_ours_is_left_alone(config: OperatorConfig) -> None:
    outcome = reconcile(parse(multi_node_job()), seen(service=service()), config)
    assert [o["kind"] for o in outcome.create] == ["Job"]


def test_a_service_in_the_way_that_is_not_ours_is_a_child_conflict(config: OperatorConfig) -> None:
    foreign = service()
    foreign["metadata"]["ownerReferences"] = []
    outcome = reconcile(parse(multi_node_job()), seen(service=foreign), config)
    failed = next(c for c in outcome.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "ChildConflict")
    assert "Service ml/a-trainer already exists and is not controlled by this FineTuneJob" in failed.message
    assert outcome.create == ()


def test_a_service_deleted_under_a_running_group_is_created_again(config: OperatorConfig) -> None:
    trainer = make_trainer_job(active=2, nodes=2)
    pods = [
        make_pod(phase="Running", ip=f"10.0.0.{i}", running_since=ts(30), index=i, created=2 + i)
        for i in (0, 1)
    ]
    outcome = reconcile(parse(multi_node_job()), seen(trainer_job=trainer, pods=pods), config)
    assert [o["kind"] for o in outcome.create] == ["Service"]
    running = next(c for c in outcome.status.conditions if c.type == "Running")
    assert running.status == "True" and "2 pods, rank 0 in pod a-trainer-2" in running.message


def test_success_takes_the_result_of_completion_index_0(config: OperatorConfig) -> None:
    """Index 1 ends last and writes a summary without an adapter: the record is index 0's."""
    trainer = make_trainer_job(
        succeeded=2, nodes=2, conditions=[job_condition("Complete")], completion_time=ts(500)
    )
    other = contract.TerminationSummary(
        outcome="Succeeded", reason="Completed", message="rank 8 done"
    ).to_json()
    pods = [
        make_pod(phase="Succeeded", terminated=terminated(0, success_summary()), index=0, created=2),
        make_pod(phase="Succeeded", terminated=terminated(0, other), index=1, created=9),
    ]
    outcome = reconcile(
        parse(multi_node_job()), seen(trainer_job=trainer, pods=pods, service=service()), config
    )
    assert outcome.status.phase == "Succeeded"
    assert outcome.status.adapter is not None and outcome.status.adapter.sha256 == "ab" * 32


def test_success_without_index_0s_record_is_no_result(config: OperatorConfig) -> None:
    trainer = make_trainer_job(succeeded=2, nodes=2, conditions=[job_condition("Complete")])
    pods = [
        make_pod(phase="Succeeded", terminated=terminated(0), index=0, created=2),
        make_pod(phase="Succeeded", terminated=terminated(0, success_summary()), index=1, created=9),
    ]
    outcome = reconcile(
        parse(multi_node_job()), seen(trainer_job=trainer, pods=pods, service=service()), config
    )
    failed = next(c for c in outcome.status.conditions if c.type == "Failed")
    assert failed.reason == "NoResult" and "pod a-trainer-2 has no termination message" in failed.message


def test_a_group_restart_reports_the_pod_that_failed_not_the_peer_that_followed(
    config: OperatorConfig,
) -> None:
    """Index 1 crashed (counted once in the Job's failed); index 0 then stopped with EXIT_CODE_PEER_LOST,
    later, and is ignored by the failure policy. The restart names index 1's failure."""
    trainer = make_trainer_job(active=0, failed=1, nodes=2)
    pods = [
        make_pod(
            phase="Failed", terminated=terminated(1, "Traceback: CUDA error: device lost"), index=1, created=3
        ),
        make_pod(phase="Failed", terminated=terminated(3, "peer lost"), index=0, created=4),
    ]
    outcome = reconcile(
        parse(multi_node_job()), seen(trainer_job=trainer, pods=pods, service=service()), config
    )
    running = next(c for c in outcome.status.conditions if c.type == "Running")
    assert (running.status, running.reason) == ("False", "Restarting")
    assert "device lost" in running.message and "peer lost" not in running.message
    assert outcome.status.restarts == 1


def test_one_unschedulable_pod_holds_the_group(config: OperatorConfig) -> None:
    trainer = make_trainer_job(active=2, nodes=2)
    pods = [
        make_pod(phase="Running", ip="10.0.0.1", running_since=ts(30), index=0, created=2),
        make_pod(phase="Pending", unschedulable="0/4 nodes have 8 free nvidia.com/gpu", index=1, created=3),
    ]
    outcome = reconcile(
        parse(multi_node_job()), seen(trainer_job=trainer, pods=pods, service=service()), config
    )
    running = next(c for c in outcome.status.conditions if c.type == "Running")
    assert (running.status, running.reason) == ("False", "Unschedulable")
    assert "a-trainer-3 cannot be scheduled: 0/4 nodes have 8 free" in running.message


def test_metrics_are_scraped_from_completion_index_0() -> None:
    trainer = make_trainer_job(active=2, nodes=2)
    pods = tuple(
        make_pod(phase="Running", ip=f"10.0.0.{i + 1}", running_since=ts(30), index=i, created=2 + i)
        for i in (0, 1)
    )
    assert seen_helpers.scrape_target("a", "uid-a", trainer, pods) == ("a-trainer-2", "10.0.0.1")
    # A plain Job's newest pod, as for one node: the index is what makes the difference.
    one_pod = make_trainer_job(active=1)
    assert seen_helpers.scrape_target("a", "uid-a", one_pod, pods) == ("a-trainer-3", "10.0.0.2")
    assert seen_helpers.scrape_target("a", "uid-a", trainer, pods[1:]) is None  # no rank 0 running


def test_each_index_keeps_its_newest_ended_attempt_until_the_outcome_is_recorded() -> None:
    def held(**kwargs: Any) -> Obj:
        pod = make_pod(**kwargs)
        pod["metadata"]["finalizers"] = ["kubetune.io/result"]
        return pod

    leader_done = held(phase="Succeeded", terminated=terminated(0, success_summary()), index=0, created=5)
    follower_old = held(phase="Failed", terminated=terminated(3), index=1, created=3)
    follower_done = held(phase="Succeeded", terminated=terminated(0), index=1, created=9)
    releasable = termination.releasable_pods((leader_done, follower_old, follower_done), finished=False)
    assert [p["metadata"]["name"] for p in releasable] == ["a-trainer-3"]


# --- the handler path, on an in-memory cluster --------------------------------------------------------------


def test_sync_creates_the_service_and_the_indexed_job_once(config: OperatorConfig) -> None:
    cluster = FakeCluster()
    runtime = Runtime(config=config, metrics=OperatorMetrics(), io=cluster)
    cluster.put(multi_node_job())
    for _ in range(2):  # a second pass (an operator restart) creates nothing more
        sync(runtime, "ml", "a", scrape=False, logger=logging.getLogger("test"))
    assert cluster.calls["create:Service"] == 1 and cluster.calls["create:Job"] == 1
    svc = cluster.get("Service", "ml", "a-trainer")
    job = cluster.get("Job", "ml", "a-trainer")
    assert svc is not None and job is not None
    assert svc["spec"]["clusterIP"] == "None" and job["spec"]["parallelism"] == 2
    assert cluster.calls["get_service"] == 2
    cluster.put(make_job("b"))
    sync(runtime, "ml", "b", scrape=False, logger=logging.getLogger("test"))
    assert cluster.calls["get_service"] == 2 and cluster.get("Service", "ml", "b-trainer") is None
