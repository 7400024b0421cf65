"""The node agent plays the kubelet: pods bound to its node run as local processes, with the env, volumes,
termination message, probes, restarts and deletion semantics a kubelet gives them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kube import ApiError, KubeClient
from e2e.cluster.procs import pid_running
from e2e.tests.helpers import ON_AGENT, container_log, has_condition, terminated

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def ns(make_namespace: Any) -> str:
    return str(make_namespace("e2e-agent"))


def pod_manifest(name: str, command: list[str], *, image: str = "busybox:1.36", **spec: Any) -> JSON:
    container: JSON = {"name": "main", "image": image, "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", **ON_AGENT, "containers": [container], **spec},
    }


def create_pod(kube: KubeClient, ns: str, manifest: JSON) -> str:
    kube.create(f"/api/v1/namespaces/{ns}/pods", manifest)
    return f"/api/v1/namespaces/{ns}/pods/{manifest['metadata']['name']}"


def phase_in(*phases: str) -> Any:
    return lambda p: p.get("status", {}).get("phase") in phases


def waiting_with(reason: str) -> Any:
    """A pod predicate: one of its containers is waiting with ``reason``."""
    return lambda p: any(
        cs.get("state", {}).get("waiting", {}).get("reason") == reason
        for cs in p.get("status", {}).get("containerStatuses", [])
    )


def start_shell_pod(kube: KubeClient, ns: str, name: str, script: str) -> tuple[str, int]:
    """A pod running ``sh -c script`` on the agent; returns its path once Running, and its process id."""
    path = create_pod(kube, ns, pod_manifest(name, ["sh", "-c", script]))
    pod = kube.wait_for(path, phase_in("Running"), timeout=30, what=f"the {name} pod to run")
    return path, int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))


def test_env_volumes_and_termination_message(cluster: ClusterInfo, kube: KubeClient, ns: str) -> None:
    kube.create(
        f"/api/v1/namespaces/{ns}/configmaps",
        {"metadata": {"name": "app"}, "data": {"settings.txt": "mode=fast", "level": "debug"}},
    )
    kube.create(
        f"/api/v1/namespaces/{ns}/secrets",
        {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret", "user": "alice"}},
    )
    script = """{
      echo "greeting=$GREETING"
      echo "expanded=$EXPANDED"
      echo "secret=$FROM_SECRET"
      echo "cm=$FROM_CM"
      echo "name=$POD_NAME"
      echo "namespace=$POD_NS"
      echo "ip=$POD_IP"
      echo "cmfile=$(cat /etc/e2e-app/settings.txt)"
      echo "secretfile=$(cat /etc/e2e-creds/password)"
      echo "token=$(test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo present)"
      echo "ca=$(head -c 27 /var/run/secrets/kubernetes.io/serviceaccount/ca.crt)"
      echo "sa_namespace=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
      echo "api=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
      echo written > /scratch/x && echo "scratch=$(cat /scratch/x)"
      echo "readonly=$(touch /etc/e2e-app/new 2>/dev/null && echo writable || echo read-only)"
    } > /dev/termination-log"""
    manifest = pod_manifest(
        "env-volumes",
        ["sh", "-c", script],
        container={
            "env": [
                {"name": "GREETING", "value": "hello"},
                {"name": "EXPANDED", "value": "$(GREETING)-world-$$(NOT_EXPANDED)"},
                {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
                {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "level"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "volumeMounts": [
                {"name": "app", "mountPath": "/etc/e2e-app"},
                {"name": "creds", "mountPath": "/etc/e2e-creds", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        volumes=[
            {"name": "app", "configMap": {"name": "app"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    path = create_pod(kube, ns, manifest)
    pod = kube.wait_for(path, phase_in("Succeeded", "Failed"), timeout=60, what="the pod to finish")
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    t = terminated(pod, "main")
    assert t is not None and t["exitCode"] == 0 and t["reason"] == "Completed"
    values = dict(line.split("=", 1) for line in t["message"].splitlines())
    pod_ip = pod["status"]["podIP"]
    ca_head = Path(cluster.dir, "pki", "ca.crt").read_text()[:27]
    assert values == {
        "greeting": "hello",
        "expanded": "hello-world-$(NOT_EXPANDED)",
        "secret": "alice",
        "cm": "debug",
        "name": "env-volumes",
        "namespace": ns,
        "ip": pod_ip,
        "cmfile": "mode=fast",
        "secretfile": "s3cret",
        "token": "present",
        "ca": ca_head,
        "sa_namespace": ns,
        "api": cluster.server.removeprefix("https://"),
        "scratch": "written",
        "readonly": "read-only",
    }
    assert pod_ip.startswith("127.0.0.") and pod_ip != "127.0.0.1"
    # The volumes were mounted in the container's own mount namespace only.
    assert not Path("/etc/e2e-app/settings.txt").exists()
    assert not Path("/etc/e2e-creds/password").exists()


def test_service_account_token_authenticates_in_cluster(kube: KubeClient, ns: str) -> None:
    code = (
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "review = client.AuthenticationV1Api().create_self_subject_review(client.V1SelfSubjectReview())\n"
        "open('/dev/termination-log', 'w').write(review.status.user_info.username)\n"
    )
    path = create_pod(kube, ns, pod_manifest("in-cluster", ["python", "-c", code], image="python:3.11-slim"))
    pod = kube.wait_for(path, phase_in("Succeeded", "Failed"), timeout=60, what="the in-cluster client pod")
    t = terminated(pod)
    assert t is not None and t["exitCode"] == 0, t
    assert t["message"] == f"system:serviceaccount:{ns}:default"


def test_failure_exit_code_and_fallback_to_logs(cluster: ClusterInfo, kube: KubeClient, ns: str) -> None:
    manifest = pod_manifest(
        "fails",
        ["sh", "-c", "echo preparing; echo 'boom: dataset missing' >&2; exit 3"],
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    path = create_pod(kube, ns, manifest)
    pod = kube.wait_for(path, phase_in("Succeeded", "Failed"), timeout=60, what="the failing pod")
    assert pod["status"]["phase"] == "Failed"
    t = terminated(pod)
    assert t is not None
    assert (t["exitCode"], t["reason"]) == (3, "Error")
    assert "boom: dataset missing" in t["message"]
    assert has_condition(pod, "Ready", "False")
    assert "preparing" in container_log(cluster, ns, "fails", "main")


def test_restart_policy_on_failure_restarts_until_success(kube: KubeClient, ns: str) -> None:
    manifest = pod_manifest(
        "flaky",
        ["sh", "-c", "if [ -f /var/lib/e2e-work/ran ]; then exit 0; fi; touch /var/lib/e2e-work/ran; exit 7"],
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "work", "mountPath": "/var/lib/e2e-work"}]},
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    path = create_pod(kube, ns, manifest)
    pod = kube.wait_for(path, phase_in("Succeeded", "Failed"), timeout=60, what="the flaky pod")
    assert pod["status"]["phase"] == "Succeeded"
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7


def test_readiness_probe_and_pod_ip_reachable(kube: KubeClient, ns: str) -> None:
    manifest = pod_manifest(
        "web",
        ["sh", "-c", "sleep 1.5; exec python3 -m http.server --bind $(POD_IP) 8080"],
        image="python:3.11-slim",
        restartPolicy="Always",
        container={
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        },
    )
    path = create_pod(kube, ns, manifest)
    running = kube.wait_for(path, phase_in("Running"), timeout=30, what="the web pod to run")
    started = time.monotonic()
    assert not has_condition(running, "Ready"), "ready before its readiness probe passed"
    pod = kube.wait_for(path, lambda p: has_condition(p, "Ready"), timeout=30, what="the web pod to be Ready")
    assert time.monotonic() - started < 15
    resp = requests.get(f"http://{pod['status']['podIP']}:8080/", timeout=5)
    assert resp.status_code == 200
    kube.delete(path, {"gracePeriodSeconds": 5})
    kube.wait_gone(path, timeout=20)


def test_deletion_sends_sigterm_and_waits_for_exit(cluster: ClusterInfo, kube: KubeClient, ns: str) -> None:
    script = 'trap "echo got TERM; exit 0" TERM; echo started; while true; do sleep 0.1; done'
    path, pid = start_shell_pod(kube, ns, "graceful", script)
    started = time.monotonic()
    kube.delete(path, {"gracePeriodSeconds": 20})
    kube.wait_gone(path, timeout=15)
    assert time.monotonic() - started < 10, "the pod waited for its grace period instead of its exit"
    assert "got TERM" in container_log(cluster, ns, "graceful", "main")
    assert not pid_running(pid)


def test_deletion_kills_after_grace_period(kube: KubeClient, ns: str) -> None:
    script = 'trap "" TERM; echo started; while true; do sleep 0.1; done'
    path, pid = start_shell_pod(kube, ns, "stubborn", script)
    started = time.monotonic()
    kube.delete(path, {"gracePeriodSeconds": 2})
    kube.wait_gone(path, timeout=20)
    elapsed = time.monotonic() - started
    assert 1.8 <= elapsed < 10, f"pod removed after {elapsed:.1f}s with a 2s grace period"
    assert not pid_running(pid)


def test_missing_secret_waits_then_runs(kube: KubeClient, ns: str) -> None:
    manifest = pod_manifest(
        "needs-secret",
        ["sh", "-c", 'printf "%s" "$TOKEN" > /dev/termination-log'],
        container={
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}]
        },
    )
    path = create_pod(kube, ns, manifest)
    pod = kube.wait_for(
        path, waiting_with("CreateContainerConfigError"), timeout=30, what="CreateContainerConfigError"
    )
    assert pod["status"]["phase"] == "Pending"
    kube.create(
        f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "late"}, "stringData": {"token": "t0k"}}
    )
    pod = kube.wait_for(
        path, phase_in("Succeeded", "Failed"), timeout=30, what="the pod to run once the secret exists"
    )
    t = terminated(pod)
    assert t is not None and t["message"] == "t0k"


def test_unknown_image_is_reported(kube: KubeClient, ns: str) -> None:
    path = create_pod(kube, ns, pod_manifest("no-image", ["true"], image="example.invalid/nothing:1"))
    pod = kube.wait_for(path, waiting_with("ErrImagePull"), timeout=30, what="ErrImagePull")
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert "images.yaml" in waiting["message"]


def test_job_on_agent_completes_and_ttl_deletes_it(kube: KubeClient, ns: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "ttlSecondsAfterFinished": 2,
            "backoffLimit": 0,
            "template": {"spec": pod_manifest("unused", ["sh", "-c", "echo hello from a job"])["spec"]},
        },
    }
    kube.create(f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    path = f"/apis/batch/v1/namespaces/{ns}/jobs/hello"
    done = kube.wait_for(path, lambda j: has_condition(j, "Complete"), timeout=60, what="the Job to complete")
    assert done["status"]["succeeded"] == 1
    kube.wait_gone(path, timeout=30)
    # The garbage collector removes the Job's pod after the Job.
    deadline = time.monotonic() + 30
    while kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="job-name=hello")["items"]:
        assert time.monotonic() < deadline, "the Job's pod outlived its Job"
        time.sleep(0.2)


def test_node_agent_node_is_registered_as_a_kubelet(cluster: ClusterInfo, kube: KubeClient) -> None:
    node = kube.get(f"/api/v1/nodes/{cluster.agent_nodes[0]}")
    assert node["metadata"]["labels"]["kubetune.io/node-agent"] == "true"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert has_condition(node, "Ready")
    lease = kube.get(
        f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{cluster.agent_nodes[0]}"
    )
    assert lease["spec"]["holderIdentity"] == cluster.agent_nodes[0]
    # NodeRestriction: the agent's identity may not modify another node.
    agent = KubeClient.from_kubeconfig(Path(cluster.dir) / f"node-{cluster.agent_nodes[0]}.kubeconfig")
    try:
        with pytest.raises(ApiError) as err:
            agent.patch(f"/api/v1/nodes/{cluster.kwok_nodes[0]}", {"metadata": {"labels": {"x": "y"}}})
        assert err.value.status == 403
    finally:
        agent.close()
