"""Health as GitOps tools read it, on statuses the operator really wrote on the real API server: each object
is judged by the kstatus library itself (sigs.k8s.io/cli-utils, what Flux and kpt use). States that need a
person read as Failed (Stalled=True) while they last, and clear when the cause goes away."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kstatus import kstatus_verdict
from e2e.cluster.kube import KubeClient
from e2e.tests.helpers import ON_AGENT, ON_KWOK, condition, ftj_path, make_ftj, s3_secret

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def ns(operator: Any, kube: KubeClient) -> str:
    namespace = str(operator.namespace)
    kube.apply_yaml(f"/api/v1/namespaces/{namespace}/secrets", s3_secret("AKIAEXAMPLE", "example-secret"))
    return namespace


@pytest.fixture
def cleanup(kube: KubeClient) -> Iterator[list[str]]:
    """API paths to delete after the test (FineTuneJobs take their children with them)."""
    paths: list[str] = []
    yield paths
    for path in reversed(paths):
        kube.delete_if_exists(path)


def wait_verdict(kube: KubeClient, ns: str, name: str, verdict: str, timeout: float = 90) -> JSON:
    """Poll the FineTuneJob until kstatus gives ``verdict``; return the object it judged."""
    judged: list[JSON] = []

    def check(obj: JSON) -> bool:
        judged[:] = [obj]
        return bool(obj.get("status")) and kstatus_verdict(obj)["status"] == verdict

    try:
        kube.wait_for(ftj_path(ns, name), check, timeout=timeout, what=f"kstatus {verdict} for {name}")
    except Exception:
        last = judged[0] if judged else {}
        print("last status:", last.get("status"))
        raise
    return judged[0]


def stalled(obj: JSON) -> tuple[str, str, str]:
    c = condition(obj, "Stalled") or {}
    return str(c.get("status")), str(c.get("reason")), str(c.get("message"))


def test_running_and_queued_jobs_are_in_progress(kube: KubeClient, ns: str, cleanup: list[str]) -> None:
    running = make_ftj("health-running", placement=ON_KWOK)
    queued = make_ftj("health-queued", placement=ON_KWOK, extra_spec={"queueName": "team-a"})
    for manifest in (running, queued):
        kube.create(ftj_path(ns), manifest)
        cleanup.append(ftj_path(ns, manifest["metadata"]["name"]))
    obj = kube.wait_for(
        ftj_path(ns, "health-running"),
        lambda o: (condition(o, "Running") or {}).get("status") == "True",
        timeout=60,
        what="health-running to run",
    )
    assert kstatus_verdict(obj)["status"] == "InProgress"
    obj = kube.wait_for(
        ftj_path(ns, "health-queued"),
        lambda o: (condition(o, "Suspended") or {}).get("reason") == "Queued",
        timeout=60,
        what="health-queued to be queued",
    )
    assert kstatus_verdict(obj)["status"] == "InProgress"


def test_an_image_that_cannot_be_pulled_reads_failed(kube: KubeClient, ns: str, cleanup: list[str]) -> None:
    manifest = make_ftj(
        "health-image", placement=ON_AGENT, extra_spec={"trainer": {"image": "registry.invalid/nothing:1"}}
    )
    kube.create(ftj_path(ns), manifest)
    cleanup.append(ftj_path(ns, "health-image"))
    obj = wait_verdict(kube, ns, "health-image", "Failed")
    status, reason, message = stalled(obj)
    assert (status, reason) == ("True", "ContainerNotStarting") and "registry.invalid/nothing:1" in message
    assert obj["status"]["phase"] == "Pending"  # not failed: the operator keeps watching


def test_a_missing_secret_reads_failed(kube: KubeClient, ns: str, cleanup: list[str]) -> None:
    manifest = make_ftj("health-secret", placement=ON_AGENT)
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = "no-such-secret"
    kube.create(ftj_path(ns), manifest)
    cleanup.append(ftj_path(ns, "health-secret"))
    obj = wait_verdict(kube, ns, "health-secret", "Failed")
    status, reason, message = stalled(obj)
    assert (status, reason) == ("True", "ContainerNotStarting") and "no-such-secret" in message


def test_a_pod_refused_by_a_quota_reads_failed_until_the_quota_goes(
    kube: KubeClient, ns: str, cleanup: list[str]
) -> None:
    """The quota applies to one PriorityClass only, so nothing else in the namespace is touched."""
    priority = f"kt-quota-{ns}"
    kube.apply_yaml(
        "/apis/scheduling.k8s.io/v1/priorityclasses",
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": priority},
            "value": 10,
        },
    )
    cleanup.append(f"/apis/scheduling.k8s.io/v1/priorityclasses/{priority}")
    quota_path = f"/api/v1/namespaces/{ns}/resourcequotas"
    scope = {"scopeName": "PriorityClass", "operator": "In", "values": [priority]}
    kube.create(
        quota_path,
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-trainer-pods"},
            "spec": {
                "hard": {"pods": "0"},
                "scopeSelector": {"matchExpressions": [scope]},
            },
        },
    )
    cleanup.append(f"{quota_path}/no-trainer-pods")
    manifest = make_ftj("health-quota", placement={**ON_KWOK, "priorityClassName": priority})
    kube.create(ftj_path(ns), manifest)
    cleanup.insert(0, ftj_path(ns, "health-quota"))
    obj = wait_verdict(kube, ns, "health-quota", "Failed", timeout=90)
    status, reason, message = stalled(obj)
    assert (status, reason) == ("True", "PodCreationRefused") and "exceeded quota" in message

    kube.delete(f"{quota_path}/no-trainer-pods")
    obj = wait_verdict(kube, ns, "health-quota", "InProgress", timeout=120)
    assert stalled(obj)[0] == "False"


def test_unschedulable_past_the_timeout_reads_failed_until_a_node_fits(
    cluster: ClusterInfo, kube: KubeClient, ns: str, cleanup: list[str]
) -> None:
    label = "kubetune.io/e2e-health"
    placement = {**ON_KWOK, "nodeSelector": {**ON_KWOK["nodeSelector"], label: "yes"}}
    manifest = make_ftj(
        "health-unschedulable", placement=placement, extra_spec={"schedulingTimeoutSeconds": 3}
    )
    kube.create(ftj_path(ns), manifest)
    cleanup.append(ftj_path(ns, "health-unschedulable"))
    obj = wait_verdict(kube, ns, "health-unschedulable", "Failed", timeout=60)
    status, reason, message = stalled(obj)
    assert (status, reason) == ("True", "Unschedulable") and "node" in message

    node = cluster.kwok_nodes[0]
    kube.patch(f"/api/v1/nodes/{node}", {"metadata": {"labels": {label: "yes"}}})
    try:
        obj = wait_verdict(kube, ns, "health-unschedulable", "InProgress", timeout=90)
        assert stalled(obj)[0] == "False"
    finally:
        kube.patch(f"/api/v1/nodes/{node}", {"metadata": {"labels": {label: None}}})
