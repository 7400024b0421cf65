"""The local control plane itself: versions, admission and authorization on, KWOK GPU nodes that schedule and
finish Job pods, and a launcher that stops exactly what it started."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import procs
from e2e.cluster.cluster import CLUSTERS, REPO_ROOT, ClusterInfo
from e2e.cluster.kube import ApiError, KubeClient
from e2e.tests.helpers import ON_KWOK, has_condition, pods_of, terminated

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def ns(make_namespace: Any) -> str:
    return str(make_namespace("e2e-kwok"))


def gpu_job(name: str, gpus: int, annotations: dict[str, str] | None = None, backoff_limit: int = 0) -> JSON:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    **ON_KWOK,
                    "containers": [
                        {
                            "name": "main",
                            "image": "kubetune/trainer:0.1.0",
                            "resources": {"limits": {"nvidia.com/gpu": gpus}},
                        }
                    ],
                },
            },
        },
    }


def test_versions_and_boot_time(cluster: ClusterInfo, kube: KubeClient) -> None:
    version = kube.get("/version")
    assert version["gitVersion"].startswith("v1.36."), version
    assert cluster.etcd_version.startswith("3.6."), cluster.etcd_version
    assert cluster.boot_seconds < 30, f"boot took {cluster.boot_seconds}s"


def test_rbac_and_pod_security_are_enforced(kube: KubeClient, make_namespace: Any) -> None:
    restricted = make_namespace("e2e-psa", pod_security="restricted")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    with pytest.raises(ApiError) as err:
        kube.create(f"/api/v1/namespaces/{restricted}/pods", pod)
    assert err.value.status == 403 and 'violates PodSecurity "restricted' in err.value.message
    # A service account has no rights until RBAC grants them.
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{restricted}:default",
            "resourceAttributes": {"namespace": restricted, "verb": "list", "resource": "pods"},
        },
    }
    assert (
        kube.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)["status"]["allowed"]
        is False
    )


def test_kwok_gpu_nodes_are_ready_and_tainted(cluster: ClusterInfo, kube: KubeClient) -> None:
    for name in cluster.kwok_nodes:
        node = kube.get(f"/api/v1/nodes/{name}")
        assert has_condition(node, "Ready")
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"} in node["spec"][
            "taints"
        ]


def test_kwok_job_pod_runs_and_succeeds(kube: KubeClient, ns: str) -> None:
    kube.create(
        f"/apis/batch/v1/namespaces/{ns}/jobs", gpu_job("ok", 4, {"kubetune.io/kwok-outcome": "Succeeded"})
    )
    job = kube.wait_for(
        f"/apis/batch/v1/namespaces/{ns}/jobs/ok",
        lambda j: has_condition(j, "Complete"),
        timeout=60,
        what="Complete",
    )
    assert job["status"]["succeeded"] == 1
    pod = pods_of(kube, ns, "job-name=ok")[0]
    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
    assert pod["status"]["podIP"].startswith("10.244.")


def test_kwok_failing_pod_fails_the_job(kube: KubeClient, ns: str) -> None:
    message = json.dumps({"outcome": "Failed", "reason": "InvalidDataset"})
    annotations = {
        "kubetune.io/kwok-outcome": "Failed",
        "kubetune.io/kwok-exit-code": "3",
        "kubetune.io/kwok-message": message,
    }
    kube.create(f"/apis/batch/v1/namespaces/{ns}/jobs", gpu_job("bad", 1, annotations))
    job = kube.wait_for(
        f"/apis/batch/v1/namespaces/{ns}/jobs/bad",
        lambda j: has_condition(j, "Failed"),
        timeout=60,
        what="Failed",
    )
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    pod = pods_of(kube, ns, "job-name=bad")[0]
    t = terminated(pod)
    assert t is not None and t["exitCode"] == 3 and t["message"] == message


def test_gpu_capacity_limits_scheduling(kube: KubeClient, ns: str) -> None:
    kube.create(f"/apis/batch/v1/namespaces/{ns}/jobs", gpu_job("too-big", 9))
    pod = kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda _ns: any(
            c.get("reason") == "Unschedulable"
            for p in pods_of(kube, ns, "job-name=too-big")
            for c in p.get("status", {}).get("conditions", [])
        ),
        timeout=30,
        what="the 9-GPU pod to be Unschedulable",
    )
    assert pod is not None
    msg = next(
        c["message"]
        for p in pods_of(kube, ns, "job-name=too-big")
        for c in p["status"]["conditions"]
        if c.get("reason") == "Unschedulable"
    )
    assert "Insufficient nvidia.com/gpu" in msg


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.cluster", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_launcher_cli_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    """A second, small cluster through the CLI: up, a pod on its node agent, down; nothing may be left."""
    name = f"e2e-cli-{tmp_path.name[-6:]}"
    up = cli("up", "--name", name, "--kwok-nodes", "0")
    state = CLUSTERS / name
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "boot time:" in up.stdout
        status = json.loads(cli("status", "--name", name).stdout)
        assert status["up"] is True
        env = cli("env", "--name", name).stdout
        assert f"export KUBECONFIG={state / 'kubeconfig'}" in env
        kube = KubeClient.from_kubeconfig(state / "kubeconfig")
        kube.create(
            "/api/v1/namespaces/default/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "sleeper"},
                "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "300"]}]},
            },
        )
        pod = kube.wait_for(
            "/api/v1/namespaces/default/pods/sleeper",
            lambda p: p.get("status", {}).get("phase") == "Running",
            timeout=30,
        )
        container_pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
        kube.close()
        records = procs.PidFile(state / "pids.json").read()
        info = json.loads((state / "cluster.json").read_text())
    finally:
        down = cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert {r.name for r in records} >= {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    }
    assert [r.name for r in records if procs.is_alive(r)] == []
    assert [p for p in info["ports"].values() if procs.port_is_listening(p)] == []
    assert not Path(f"/proc/{container_pid}").exists(), "the node agent's container outlived down"
    shutil.rmtree(state)
