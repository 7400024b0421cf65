"""The chart installed cluster-wide (no watchNamespaces: a ClusterRole), tested on the real API server the way
test_helm.py tests the namespaced install: the operator runs from the chart under its own service account,
SubjectAccessReviews show what it may and may not do, and a FineTuneJob in a namespace created after the
install runs to Succeeded. The API server enforces OwnerReferencesPermissionEnforcement, so the children's
blockOwnerDeletion works only through the chart's finetunejobs/finalizers grant.

The cluster-wide operator would also act on the suite's other namespaces, so this module installs it only
for its own tests and uninstalls it at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kube import KubeClient
from e2e.tests.helpers import (
    ON_KWOK,
    condition,
    container_log,
    ftj_path,
    kopf_child_requests,
    label_selector_of,
    make_ftj,
    pods_of,
    s3_secret,
)
from e2e.tests.test_helm import CHART, OPERATOR_SELECTOR, Release, access
from e2e.tests.test_operator_kwok import SUCCESS_SHA, end_pod, wait_phase, wait_trainer_pod
from kubetune_trainer import contract

JSON = dict[str, Any]
RELEASE = "ktc"
FULLNAME = f"{RELEASE}-kubetune"
SELECTOR = OPERATOR_SELECTOR.replace("instance=kt,", f"instance={RELEASE},")


def operator_debug(kube: KubeClient, rel: Release) -> str:
    logs = [
        container_log(rel.cluster, rel.system_namespace, p["metadata"]["name"], "operator")[-4000:]
        for p in pods_of(kube, rel.system_namespace, SELECTOR)
    ]
    return "\n".join(logs) or "no operator pod"


@pytest.fixture(scope="module")
def release(cluster: ClusterInfo, kube: KubeClient, make_namespace: Callable[..., str]) -> Iterator[Release]:
    rel = Release(cluster, make_namespace("kubetune-cw"), "")
    rel.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", rel.system_namespace)
    deployment = f"/apis/apps/v1/namespaces/{rel.system_namespace}/deployments/{FULLNAME}"
    try:
        kube.wait_for(
            deployment,
            lambda d: (d.get("status") or {}).get("readyReplicas", 0) >= 1,
            timeout=120,
            what="the cluster-wide operator Deployment to be Ready",
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator_debug(kube, rel)}") from error
    # A namespace that did not exist at install time: the ClusterRole covers it without a new grant.
    rel.namespace = make_namespace("cw-tenant", pod_security="restricted")
    yield rel
    rel.helm("uninstall", RELEASE, "--namespace", rel.system_namespace, "--wait", check=False)


def may(
    kube: KubeClient, rel: Release, verb: str, resource: str, group: str, ns: str | None, sub: str
) -> bool:
    return access(kube, rel, verb, resource, group=group, namespace=ns, subresource=sub, account=FULLNAME)


def test_the_chart_runs_cluster_wide_under_its_own_service_account(
    kube: KubeClient, release: Release
) -> None:
    pods = [
        p
        for p in kube.get(f"/api/v1/namespaces/{release.system_namespace}/pods", labelSelector=SELECTOR)[
            "items"
        ]
        if p["status"].get("phase") == "Running"
    ]
    assert len(pods) == 1, operator_debug(kube, release)
    (container,) = pods[0]["spec"]["containers"]
    assert pods[0]["spec"]["serviceAccountName"] == FULLNAME
    assert "--all-namespaces" in container["args"] and not any(
        a.startswith("--namespace") for a in container["args"]
    )


def test_cluster_wide_rbac_allows_what_the_operator_does_and_nothing_more(
    kube: KubeClient, release: Release
) -> None:
    ns = release.namespace
    allowed = [
        ("watch", "finetunejobs", "kubetune.io", None, ""),
        ("watch", "pods", "", None, ""),
        ("watch", "jobs", "batch", None, ""),
        ("patch", "finetunejobs", "kubetune.io", ns, "status"),
        ("update", "finetunejobs", "kubetune.io", ns, "finalizers"),
        ("create", "jobs", "batch", ns, ""),
        ("create", "configmaps", "", ns, ""),
        ("create", "events", "", ns, ""),
        ("list", "workloads", "kueue.x-k8s.io", None, ""),  # Kueue's reason for a queued job, read-only
    ]
    denied = [
        ("get", "secrets", "", ns, ""),
        ("list", "secrets", "", None, ""),
        ("create", "pods", "", ns, ""),
        ("delete", "jobs", "batch", ns, ""),
        ("delete", "finetunejobs", "kubetune.io", ns, ""),
        ("update", "finetunejobs", "kubetune.io", ns, ""),
        ("create", "leases", "coordination.k8s.io", ns, ""),  # one replica: no leader election
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io", None, ""),
        ("update", "workloads", "kueue.x-k8s.io", ns, ""),
    ]
    for verb, resource, group, namespace, sub in allowed:
        assert may(kube, release, verb, resource, group, namespace, sub), f"may not {verb} {resource}/{sub}"
    for verb, resource, group, namespace, sub in denied:
        assert not may(kube, release, verb, resource, group, namespace, sub), f"may {verb} {resource}/{sub}"


def test_a_job_in_a_namespace_made_after_the_install_succeeds(kube: KubeClient, release: Release) -> None:
    ns = release.namespace
    kube.apply_yaml(f"/api/v1/namespaces/{ns}/secrets", s3_secret("AKIAEXAMPLE", "example-secret"))
    kube.create(ftj_path(ns), make_ftj("everywhere", placement=ON_KWOK))
    try:
        pod = wait_trainer_pod(kube, ns, "everywhere")
    except TimeoutError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator_debug(kube, release)}") from error
    job = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/everywhere-trainer")
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner["blockOwnerDeletion"] is True  # admitted: the finalizers grant is in place
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        adapter=contract.AdapterRecord(
            uri="s3://adapters/everywhere/",
            files=["adapter_model.safetensors"],
            size_bytes=10,
            sha256=SUCCESS_SHA,
        ),
    )
    end_pod(kube, ns, pod, "Succeeded", summary.to_json(), exit_code=0)
    done = wait_phase(kube, ns, "everywhere", "Succeeded", timeout=60)
    assert done["status"]["adapter"]["sha256"] == SUCCESS_SHA
    assert condition(done, "Succeeded")["reason"] == "Completed"


def test_cluster_wide_watches_of_children_are_filtered_by_the_api_server(
    cluster: ClusterInfo, release: Release
) -> None:
    deadline = time.monotonic() + 30
    while {r["objectRef"]["resource"] for r in kopf_child_requests(cluster)} != {"pods", "jobs"}:
        assert time.monotonic() < deadline, "no cluster-wide watch of pods and Jobs in the audit log"
        time.sleep(0.5)
    unfiltered = [
        r["requestURI"]
        for r in kopf_child_requests(cluster)
        if label_selector_of(r) != "kubetune.io/job-name"
    ]
    assert not unfiltered, f"cluster-wide streams of every pod or Job: {unfiltered}"


def test_two_chart_replicas_elect_one_leader_under_the_charts_lease_grants(
    kube: KubeClient, release: Release
) -> None:
    release.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "--namespace",
        release.system_namespace,
        "--reuse-values",
        "--set",
        "replicas=2",
    )
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{release.system_namespace}/leases/{FULLNAME}"
    try:
        lease = kube.wait_for(
            lease_path, lambda lease: bool(lease["spec"].get("holderIdentity")), timeout=120, what="a leader"
        )
        kube.wait_for(
            f"/apis/apps/v1/namespaces/{release.system_namespace}/deployments/{FULLNAME}",
            lambda d: (
                (d.get("status") or {}).get("readyReplicas", 0) == 2
                and (d.get("status") or {}).get("updatedReplicas", 0) == 2
                and (d.get("status") or {}).get("replicas", 0) == 2
            ),
            timeout=120,
            what="two Ready operator replicas (the standby answers /healthz)",
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator_debug(kube, release)}") from error
    lease = kube.get(lease_path)
    running = [
        p["metadata"]["name"]
        for p in pods_of(kube, release.system_namespace, SELECTOR)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    assert len(running) == 2
    assert [name for name in running if lease["spec"]["holderIdentity"].startswith(f"{name}_")], lease["spec"]
    ns = release.namespace
    kube.create(ftj_path(ns), make_ftj("after-upgrade", placement=ON_KWOK))
    pod = wait_trainer_pod(kube, ns, "after-upgrade")
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        adapter=contract.AdapterRecord(
            uri="s3://adapters/after-upgrade/",
            files=["adapter_model.safetensors"],
            size_bytes=10,
            sha256=SUCCESS_SHA,
        ),
    )
    end_pod(kube, ns, pod, "Succeeded", summary.to_json(), exit_code=0)
    assert (
        wait_phase(kube, ns, "after-upgrade", "Succeeded", timeout=60)["status"]["adapter"]["sha256"]
        == SUCCESS_SHA
    )
