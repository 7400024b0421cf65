"""Multi-node FineTuneJobs (spec.resources.nodes > 1) on a real API server.

- The operator's children: a headless Service <name>-trainer and an Indexed Job whose pods' subdomain is
  that Service; the Job controller names pod i <name>-trainer-<i>; the Service goes with the FineTuneJob.
- The node agent's stand-in for cluster DNS: inside a pod of an Indexed Job, <job>-<i>.<service> resolves to
  the pod IP of index i, and the pod's own hostname is its Job-given name; names follow a replaced pod.
- Real training, 2 pods x 2 CPU processes (gloo) = world size 4 on the node agent, against one process on the
  same examples: the same per-step losses and the same adapter; and a group that loses a pod mid-run resumes
  from its checkpoint, counts one restart and ends with the uninterrupted run's final loss, leaving no
  process behind. These two need the trainer's multi-node launcher (KUBETUNE_NODES and friends, see
  operator/kubetune_operator/builders/trainer_job.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kube import ApiError, KubeClient
from e2e.cluster.procs import pid_running
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.demo import instruction_dataset, to_jsonl
from e2e.tests.helpers import (
    ON_AGENT,
    ON_KWOK,
    condition,
    container_log,
    ftj_path,
    make_ftj,
    pods_of,
    s3_secret,
    wait_pod,
)

JSON = dict[str, Any]
INDEX = "batch.kubernetes.io/job-completion-index"
LOSS_TOLERANCE = 1e-5
"""Relative: 4 processes against 1 add the same numbers in another order (fp32)."""


def job_pods(kube: KubeClient, ns: str, name: str) -> list[JSON]:
    return sorted(
        pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer"),
        key=lambda p: (
            p["metadata"].get("annotations", {}).get(INDEX, ""),
            p["metadata"]["creationTimestamp"],
        ),
    )


def test_nodes_gives_a_headless_service_and_an_indexed_job(kube: KubeClient, operator: Any) -> None:
    """On KWOK nodes (no process runs): the children's shape as the API server stored them, the hostnames
    the Job controller gave the pods, and the Service's removal with its FineTuneJob."""
    ns, name = operator.namespace, "mn-shape"
    manifest = make_ftj(name, gpus=2, placement=ON_KWOK, extra_spec={"peerTimeoutSeconds": 45})
    manifest["spec"]["resources"]["nodes"] = 3
    ftj = kube.create(ftj_path(ns), manifest)
    svc_path = f"/api/v1/namespaces/{ns}/services/{name}-trainer"
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-trainer"
    job = kube.wait_for(job_path, lambda _: True, timeout=60, what="the Indexed trainer Job")
    svc = kube.get(svc_path)
    owner = svc["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "FineTuneJob",
        name,
        ftj["metadata"]["uid"],
        True,
    )
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetune.io/job-name": name, "app.kubernetes.io/component": "trainer"}
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("rendezvous", 29400)]

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    template = spec["template"]["spec"]
    assert template["subdomain"] == f"{name}-trainer"
    env = {e["name"]: e.get("value") for e in template["containers"][0]["env"]}
    assert env["KUBETUNE_NODES"] == "3"
    assert env["KUBETUNE_RENDEZVOUS_ENDPOINT"] == f"{name}-trainer-0.{name}-trainer:29400"
    assert env["KUBETUNE_PEER_TIMEOUT_SECONDS"] == "45"
    ignored = [r["onExitCodes"]["values"] for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert [3] in ignored

    kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda _: len(job_pods(kube, ns, name)) == 3,
        timeout=60,
        what="three trainer pods",
    )
    pods = job_pods(kube, ns, name)
    assert [p["metadata"]["annotations"][INDEX] for p in pods] == ["0", "1", "2"]
    assert [p["spec"]["hostname"] for p in pods] == [f"{name}-trainer-{i}" for i in range(3)]
    assert {p["spec"]["subdomain"] for p in pods} == {f"{name}-trainer"}
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2" for p in pods)

    kube.delete(ftj_path(ns, name))
    kube.wait_gone(svc_path, timeout=120)


def test_one_node_job_has_no_service(kube: KubeClient, operator: Any) -> None:
    ns, name = operator.namespace, "mn-single"
    kube.create(ftj_path(ns), make_ftj(name, placement=ON_KWOK, suspend=True))
    job = kube.wait_for(
        f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-trainer", lambda _: True, timeout=60, what="trainer Job"
    )
    assert job["spec"].get("completionMode", "NonIndexed") == "NonIndexed"
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert kube.get_or_none(f"/api/v1/namespaces/{ns}/services/{name}-trainer") is None
    kube.delete(ftj_path(ns, name))


def test_multi_node_without_gpus_is_refused_by_the_crd(kube: KubeClient, operator: Any) -> None:
    manifest = make_ftj("mn-cpu", gpus=0, placement=ON_KWOK)
    manifest["spec"]["resources"]["nodes"] = 2
    with pytest.raises(ApiError) as err:
        kube.create(ftj_path(operator.namespace), manifest)
    assert err.value.status == 422
    assert "spec.resources.nodes greater than 1 needs spec.resources.gpus of at least 1" in err.value.message


# --- the node agent's names -----------------------------------------------------------------------------

RESOLVER = r"""
import json, os, socket, sys, time
peers = sys.argv[1:]
while True:
    seen = {}
    for peer in peers:
        try:
            seen[peer] = socket.gethostbyname(peer)
        except OSError:
            seen[peer] = None
    me = socket.gethostname()
    print(json.dumps({"hostname": me, "self": socket.gethostbyname(me), "peers": seen}), flush=True)
    time.sleep(0.5)
"""


def _last_report(cluster: ClusterInfo, ns: str, pod: str) -> JSON | None:
    lines = [line for line in container_log(cluster, ns, pod, "main").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def test_pods_of_an_indexed_job_resolve_each_other_by_name(
    cluster: ClusterInfo, kube: KubeClient, make_namespace: Any
) -> None:
    """An Indexed Job with a headless Service, as the operator builds them, running `python` on the node
    agent: each pod resolves <job>-<i>.<service> to the pod IP of index i and its own hostname to its own IP,
    and when a pod is replaced its name follows the new pod."""
    ns = make_namespace("e2e-mn-dns")
    job, svc = "dns-check", "dns-check-peers"
    peers = [f"{job}-0.{svc}", f"{job}-1.{svc}", f"{job}-0.{svc}.{ns}.svc.cluster.local"]
    kube.create(
        f"/api/v1/namespaces/{ns}/services",
        {
            "metadata": {"name": svc},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"app": job},
                "ports": [{"name": "rendezvous", "port": 29400}],
            },
        },
    )
    kube.create(
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        {
            "metadata": {"name": job},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 4,
                "template": {
                    "metadata": {"labels": {"app": job}},
                    "spec": {
                        **ON_AGENT,
                        "subdomain": svc,
                        "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {
                                "name": "main",
                                "image": "python:3.11-slim",
                                "command": ["python", "-c", RESOLVER, *peers],
                            }
                        ],
                    },
                },
            },
        },
    )

    def reports_agree(_: JSON) -> bool:
        pods = [p for p in pods_of(kube, ns, f"app={job}") if p["status"].get("phase") == "Running"]
        ips = {p["metadata"]["annotations"][INDEX]: p["status"].get("podIP") for p in pods}
        if len(pods) != 2 or None in ips.values():
            return False
        for pod in pods:
            report = _last_report(cluster, ns, pod["metadata"]["name"])
            index = pod["metadata"]["annotations"][INDEX]
            expected = {peers[0]: ips["0"], peers[1]: ips["1"], peers[2]: ips["0"]}
            if report is None or report["peers"] != expected:
                return False
            assert report["hostname"] == f"{job}-{index}" and report["self"] == ips[index], report
        return True

    kube.wait_for(
        f"/api/v1/namespaces/{ns}", reports_agree, timeout=120, what="both pods to resolve each other"
    )
    first = {p["metadata"]["annotations"][INDEX]: p for p in pods_of(kube, ns, f"app={job}")}
    assert first["0"]["status"]["podIP"] != first["1"]["status"]["podIP"]

    # Replace index 1 (the Job controller makes a new pod under the same hostname): the name follows it.
    old = first["1"]["metadata"]
    kube.delete(f"/api/v1/namespaces/{ns}/pods/{old['name']}", {"gracePeriodSeconds": 0})
    kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda o: (
            any(
                p["metadata"]["uid"] != old["uid"]
                for p in pods_of(kube, ns, f"app={job},batch.kubernetes.io/job-completion-index=1")
            )
            and reports_agree(o)
        ),
        timeout=120,
        what="the replacement of index 1 to be named",
    )
    kube.delete(f"/apis/batch/v1/namespaces/{ns}/jobs/{job}", {"propagationPolicy": "Foreground"})


# --- real training (needs the trainer's multi-node launcher) -----------------------------------------------

STEPS = 24
TRAIN_ENV = [{"name": "KUBETUNE_MICRO_BATCH_TOKENS", "value": "128"}]
HYPERPARAMETERS = {
    "maxSteps": STEPS,
    "learningRate": 0.003,
    "batchTokens": 1024,
    "warmupRatio": 0.1,
    "seed": 11,
}


@pytest.fixture(scope="module")
def mn_buckets(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    from kubetune_devtools.tiny import save_tiny_model

    client = s3.client()
    for bucket in ("mn-models", "mn-datasets", "mn-adapters"):
        client.create_bucket(Bucket=bucket)
    upload_directory(client, save_tiny_model(tmp_path_factory.mktemp("tiny-model")), "mn-models", "tiny/")
    client.put_object(Bucket="mn-datasets", Key="chat/train.jsonl", Body=to_jsonl(instruction_dataset(96)))
    return s3


def training_job(name: str, buckets: S3Server, *, nodes: int, extra_env: list[JSON], **spec: Any) -> JSON:
    manifest = make_ftj(
        name,
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        base_model="s3://mn-models/tiny/",
        train="s3://mn-datasets/chat/train.jsonl",
        output=f"s3://mn-adapters/{name}/",
        hyperparameters=dict(HYPERPARAMETERS),
        extra_spec={
            "dataset": {"train": "s3://mn-datasets/chat/train.jsonl", "maxSeqLength": 128},
            "trainer": {"env": [*TRAIN_ENV, *extra_env]},
            "backoffLimit": 3,
            **spec,
        },
    )
    manifest["spec"]["resources"]["nodes"] = nodes
    # Dropout draws differ between one process and four: the comparison needs a deterministic network.
    manifest["spec"]["lora"]["dropout"] = 0
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-mn"
    return manifest


def run_to_the_end(
    cluster: ClusterInfo, kube: KubeClient, ns: str, manifest: JSON, timeout: float = 900
) -> JSON:
    name = manifest["metadata"]["name"]
    kube.create(ftj_path(ns), manifest)
    try:
        return kube.wait_for(
            ftj_path(ns, name),
            lambda o: o.get("status", {}).get("phase") in ("Succeeded", "Failed"),
            timeout=timeout,
            what=f"{name} to finish",
        )
    finally:
        for path in sorted((Path(cluster.dir) / "pods" / ns).glob(f"{name}-trainer-*/logs/trainer.log")):
            print(
                f"--- trainer log {path.parent.parent.name} ---\n{path.read_text(errors='replace')[-3000:]}"
            )


def adapter_of(buckets: S3Server, name: str) -> tuple[JSON, dict[str, Any]]:
    from safetensors.torch import load

    client = buckets.client()
    summary = json.loads(
        client.get_object(Bucket="mn-adapters", Key=f"{name}/training_summary.json")["Body"].read()
    )
    weights = load(
        client.get_object(Bucket="mn-adapters", Key=f"{name}/adapter_model.safetensors")["Body"].read()
    )
    return summary, weights


@pytest.fixture(scope="module")
def reference(cluster: ClusterInfo, kube: KubeClient, operator: Any, mn_buckets: S3Server) -> JSON:
    """One process on one pod, the same examples and steps: what the groups must reproduce."""
    kube.apply_yaml(
        f"/api/v1/namespaces/{operator.namespace}/secrets",
        s3_secret(mn_buckets.access_key, mn_buckets.secret_key, "s3-mn"),
    )
    done = run_to_the_end(
        cluster, kube, operator.namespace, training_job("mn-ref", mn_buckets, nodes=1, extra_env=[])
    )
    assert done["status"]["phase"] == "Succeeded", condition(done, "Failed")
    summary, weights = adapter_of(mn_buckets, "mn-ref")
    assert summary["provenance"]["resolved"]["worldSize"] == 1
    return {"summary": summary, "weights": weights, "status": done["status"]}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_two_pods_of_two_processes_train_like_one_process(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, mn_buckets: S3Server, reference: JSON
) -> None:
    ns, name = operator.namespace, "mn-train"
    manifest = training_job(
        name, mn_buckets, nodes=2, extra_env=[{"name": "KUBETUNE_CPU_PROCESSES", "value": "2"}]
    )
    done = run_to_the_end(cluster, kube, ns, manifest)
    status = done["status"]
    assert status["phase"] == "Succeeded", (condition(done, "Failed"), status.get("message"))
    assert status["restarts"] == 0

    summary, weights = adapter_of(mn_buckets, name)
    assert summary["provenance"]["resolved"]["worldSize"] == 4
    ref = reference["summary"]
    assert len(summary["losses"]) == len(ref["losses"]) == STEPS
    worst = max(_relative(a, b) for a, b in zip(summary["losses"], ref["losses"], strict=True))
    print(
        f"4 ranks vs 1: worst relative loss difference {worst:.3g}; "
        f"losses {summary['losses']} vs {ref['losses']}"
    )
    assert worst < LOSS_TOLERANCE
    assert weights.keys() == reference["weights"].keys() and weights
    weight_diff = max(float((weights[k] - reference["weights"][k]).abs().max()) for k in weights)
    assert weight_diff < LOSS_TOLERANCE, weight_diff
    # The record is rank 0's, and it matches the object in S3.
    assert status["adapter"]["uri"] == f"s3://mn-adapters/{name}/"
    pods = job_pods(kube, ns, name)
    assert sorted(p["metadata"]["annotations"][INDEX] for p in pods) == ["0", "1"]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)


def _processes_of(cluster: ClusterInfo, hostname_prefix: str) -> list[int]:
    """Processes started for this cluster's pods of one job: their HOSTNAME (set by the node agent) starts
    with the job's pod hostname and they talk to this cluster's API server port."""
    port = str(cluster.ports["apiserver"])
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if b"=" in item)
        ours = (
            env.get("HOSTNAME", "").startswith(hostname_prefix) and env.get("KUBERNETES_SERVICE_PORT") == port
        )
        if ours and pid_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def _listening(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


def process_tree(root: int) -> set[int]:
    """``root`` and every process under it."""
    from kubetune_trainer.group import child_processes

    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(child_processes(pid))
    return found


def checkpointed_at(buckets: S3Server, name: str, step: int, timeout: float) -> None:
    """Wait until the group has committed a checkpoint of ``step`` or later: its manifest, written last, is in
    S3 (what the trainer's resume reads, and sooner than a log line relayed through the elastic agent)."""
    client = buckets.client()
    pattern = re.compile(rf"^{re.escape(name)}/checkpoints/step-(\d+)/manifest\.json$")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = client.list_objects_v2(Bucket="mn-adapters", Prefix=f"{name}/checkpoints/")
        for item in listed.get("Contents", []):
            found = pattern.match(item["Key"])
            if found and int(found.group(1)) >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} from {name} in {timeout} s")


def test_a_group_that_loses_a_pod_resumes_from_its_checkpoint(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, mn_buckets: S3Server, reference: JSON
) -> None:
    """Pod 1's processes are killed (SIGKILL, as a lost node) after a checkpoint: its failure is counted
    once, rank 0 stops as having lost a peer (not counted), the Job starts both again, the group resumes from
    the newest checkpoint and ends with the uninterrupted run's final loss; nothing of the group is left
    running."""
    ns, name = operator.namespace, "mn-killed"
    manifest = training_job(
        name,
        mn_buckets,
        nodes=2,
        extra_env=[{"name": "KUBETUNE_CPU_PROCESSES", "value": "2"}],
        checkpointing={"everySteps": 1},
        peerTimeoutSeconds=20,
    )
    kube.create(ftj_path(ns), manifest)
    victim = wait_pod(
        kube,
        ns,
        f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer",
        lambda p: (
            p["metadata"].get("annotations", {}).get(INDEX) == "1"
            and p["status"].get("phase") == "Running"
            and bool(p["status"].get("containerStatuses"))
        ),
        timeout=300,
        what="the pod with completion index 1 running",
    )
    pid = int(victim["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
    # Killed mid-run: the moment the group's checkpoint of step 3 is committed, with most of the 24 steps
    # to go (the tiny model runs a step in well under a second, faster than the status is scraped).
    checkpointed_at(mn_buckets, name, step=3, timeout=600)
    # The whole container, as the kernel kills a cgroup: the launcher and its workers (the elastic agent
    # starts each worker in a session of its own, so the launcher's process group alone is not all of it).
    for victim_pid in sorted(process_tree(pid), reverse=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim_pid, signal.SIGKILL)
    pod_ips = {p["status"]["podIP"] for p in job_pods(kube, ns, name) if p["status"].get("podIP")}

    done = kube.wait_for(
        ftj_path(ns, name),
        lambda o: o.get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=900,
        what=f"{name} to finish after losing a pod",
    )
    logs = {
        path.parent.parent.name: path.read_text(errors="replace")
        for path in (Path(cluster.dir) / "pods" / ns).glob(f"{name}-trainer-*/logs/trainer.log")
    }
    for pod, text in sorted(logs.items()):
        print(f"--- trainer log {pod} ---\n{text[-3000:]}")
    status = done["status"]
    assert status["phase"] == "Succeeded", (condition(done, "Failed"), status.get("message"))
    assert status["restarts"] == 1  # the killed pod; its peer's PEER_LOST exit is ignored
    resumed = [
        event["resumed_step"]
        for text in logs.values()
        for line in text.splitlines()
        if line.startswith('{"') and '"plan"' in line
        for event in [json.loads(line)]
        if event.get("event") == "plan"
    ]
    # The second attempt started from a checkpoint taken after the one the kill waited for.
    assert max(resumed, default=0) >= 3, resumed
    summary, _ = adapter_of(mn_buckets, name)
    print(
        f"resumed from step {max(resumed)} after restarts={status['restarts']}: final loss "
        f"{summary['losses'][-1]!r}, uninterrupted {reference['summary']['losses'][-1]!r}"
    )
    assert _relative(summary["losses"][-1], reference["summary"]["losses"][-1]) < LOSS_TOLERANCE
    assert _relative(status["metrics"]["trainLoss"], reference["status"]["metrics"]["trainLoss"]) < 1e-4

    exits: dict[str, list[int]] = {"0": [], "1": []}
    for pod in job_pods(kube, ns, name):
        state = pod["status"]["containerStatuses"][0]["state"].get("terminated") or {}
        exits[pod["metadata"]["annotations"][INDEX]].append(state.get("exitCode"))
    # Index 1 was killed (137) and ran again; index 0 stopped for its lost peer (3) and ran again.
    assert (sorted(exits["0"]), sorted(exits["1"])) == ([0, 3], [0, 137]), exits

    deadline = time.monotonic() + 60
    while _processes_of(cluster, f"{name}-trainer-") and time.monotonic() < deadline:
        time.sleep(1)
    assert _processes_of(cluster, f"{name}-trainer-") == []
    assert not [ip for ip in pod_ips if _listening(ip, 29400)]
