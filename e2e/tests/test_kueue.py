"""Kueue's own controller manager (built from sigs.k8s.io/kueue) admitting trainer Jobs by quota, with the
operator running against the same API server and its trainer pods on KWOK GPU nodes.

Each test gets its own ClusterQueue (with exactly the quota it needs) and a LocalQueue in the operator's
namespace. What a test asserts about Kueue's decisions it reads from Kueue's own objects (the Workload made
for each trainer Job); what it asserts about the FineTuneJob is that the operator carried Kueue's words into
the Queued condition, and that the kstatus library (what Flux judges health with) does not call a job Current
while Kueue holds it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from e2e.cluster import kueue as kueue_harness
from e2e.cluster.kstatus import kstatus_verdict
from e2e.cluster.kube import KubeClient
from e2e.cluster.kueue import KueueProcess
from e2e.tests.helpers import ON_KWOK, condition, ftj_path, make_ftj, pods_of, s3_secret
from kubetune_trainer import contract

JSON = dict[str, Any]
GPU = "nvidia.com/gpu"
CPU_PER_POD, MEMORY_PER_POD = "1", "2Gi"
ROOMY = {"cpu": "32", "memory": "128Gi"}
"""cpu and memory enough for every pod here: the GPUs are what each test runs short of."""


@pytest.fixture(scope="module")
def ns(operator: Any, kube: KubeClient, kueue: KueueProcess) -> str:
    namespace = str(operator.namespace)
    kube.apply_yaml(f"/api/v1/namespaces/{namespace}/secrets", s3_secret("AKIAEXAMPLE", "example-secret"))
    return namespace


def queued_job(name: str, queue: str, gpus: int = 1, **resources: Any) -> JSON:
    """A FineTuneJob for KWOK GPU nodes in ``queue``, each trainer pod asking for cpu, memory and GPUs."""
    manifest = make_ftj(name, gpus=gpus, placement=ON_KWOK, extra_spec={"queueName": queue})
    manifest["spec"]["resources"].update({"cpu": CPU_PER_POD, "memory": MEMORY_PER_POD, **resources})
    return manifest


def trainer_job(kube: KubeClient, ns: str, name: str, timeout: float = 60) -> JSON:
    return kube.wait_for(
        f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-trainer",
        bool,
        timeout=timeout,
        what=f"trainer Job of {name}",
    )


def workload_of(kube: KubeClient, ns: str, name: str, predicate: Any, what: str, timeout: float = 90) -> JSON:
    """Kueue's Workload for the trainer Job of FineTuneJob ``name``, once ``predicate`` holds for it."""
    job = trainer_job(kube, ns, name)
    found: list[JSON] = []

    def check(_: JSON) -> bool:
        found[:] = [w for w in kueue_harness.workloads_of_job(kube, ns, job) if predicate(w)]
        return bool(found)

    kube.wait_for(f"/api/v1/namespaces/{ns}", check, timeout=timeout, what=what)
    return found[0]


def quota_reserved(workload: JSON) -> JSON:
    return kueue_harness.workload_condition(workload, "QuotaReserved") or {}


def is_admitted(workload: JSON) -> bool:
    return (kueue_harness.workload_condition(workload, "Admitted") or {}).get("status") == "True"


def waiting_with_message(workload: JSON) -> bool:
    reserved = quota_reserved(workload)
    return reserved.get("status") == "False" and bool(reserved.get("message"))


def trainer_pods(kube: KubeClient, ns: str, name: str) -> list[JSON]:
    return pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer")


def running_pods(kube: KubeClient, ns: str, name: str, count: int, timeout: float = 90) -> list[JSON]:
    found: list[JSON] = []

    def check(_: JSON) -> bool:
        found[:] = [p for p in trainer_pods(kube, ns, name) if p.get("status", {}).get("phase") == "Running"]
        return len(found) >= count

    kube.wait_for(f"/api/v1/namespaces/{ns}", check, timeout=timeout, what=f"{count} running pods of {name}")
    return found


def queued_with(kube: KubeClient, ns: str, name: str, kueue_message: str, timeout: float = 60) -> JSON:
    """The FineTuneJob once its Queued condition carries ``kueue_message`` (the operator reads the Workload
    about every 10 s while the job waits)."""
    return kube.wait_for(
        ftj_path(ns, name),
        lambda o: (
            (condition(o, "Suspended") or {}).get("reason") == "Queued"
            and kueue_message in str((condition(o, "Suspended") or {}).get("message"))
        ),
        timeout=timeout,
        what=f"{name}: Suspended=True/Queued carrying Kueue's message {kueue_message!r}",
    )


def finish(kube: KubeClient, ns: str, pod: JSON, name: str) -> None:
    """KWOK ends the trainer container with exit 0 and a result record, as a trainer that finished would."""
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message=f"adapter written to s3://adapters/{name}/",
        adapter=contract.AdapterRecord(
            uri=f"s3://adapters/{name}/",
            files=["adapter_config.json", "adapter_model.safetensors"],
            size_bytes=1,
            sha256="5a" * 32,
            base_model="s3://models/tiny/",
        ),
    )
    annotations = {
        "kubetune.io/kwok-outcome": "Succeeded",
        "kubetune.io/kwok-message": summary.to_json(),
        "kubetune.io/kwok-exit-code": "0",
    }
    kube.patch(
        f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}", {"metadata": {"annotations": annotations}}
    )


def stays_without_pods(kube: KubeClient, ns: str, name: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not trainer_pods(kube, ns, name), f"{name} got a pod while Kueue holds its Job"
        assert trainer_job(kube, ns, name)["spec"]["suspend"] is True
        time.sleep(0.5)


def test_a_second_job_waits_for_quota_in_kueues_words_and_starts_when_the_first_finishes(
    kube: KubeClient, ns: str
) -> None:
    queue = kueue_harness.make_queue(kube, ns, {**ROOMY, GPU: "1"}, prefix="one-gpu")
    kube.create(ftj_path(ns), queued_job("first", queue))
    (first_pod,) = running_pods(kube, ns, "first", 1)
    first = workload_of(kube, ns, "first", is_admitted, "Kueue to admit first")
    assert first["status"]["admission"]["podSetAssignments"][0]["resourceUsage"][GPU] == "1"

    kube.create(ftj_path(ns), queued_job("second", queue))
    second = workload_of(kube, ns, "second", waiting_with_message, "Kueue to explain why second waits")
    kueue_says = quota_reserved(second)["message"]
    assert f"insufficient unused quota for {GPU} in flavor default, 1 more needed" in kueue_says
    waiting = queued_with(kube, ns, "second", kueue_says)
    suspended = condition(waiting, "Suspended")
    assert suspended is not None and suspended["status"] == "True"
    print(f"second, Suspended={suspended['status']}/{suspended['reason']}: {suspended['message']}")
    assert suspended["message"].startswith(f"waiting for Kueue to admit the trainer Job (queue {queue})")
    assert waiting["status"]["phase"] == "Suspended" and waiting["status"]["message"] == suspended["message"]
    stays_without_pods(kube, ns, "second", 3)

    finish(kube, ns, first_pod, "first")
    done = kube.wait_for(
        ftj_path(ns, "first"),
        lambda o: (o.get("status") or {}).get("phase") == "Succeeded",
        timeout=60,
        what="first to succeed",
    )
    assert done["status"]["adapter"]["sha256"] == "5a" * 32
    running_pods(kube, ns, "second", 1)
    workload_of(kube, ns, "second", is_admitted, "Kueue to admit second once first finished")
    admitted = kube.wait_for(
        ftj_path(ns, "second"),
        lambda o: (condition(o, "Suspended") or {}).get("reason") == "Admitted",
        timeout=60,
        what="second: Suspended=False/Admitted",
    )
    assert condition(admitted, "Suspended")["message"].endswith(f"into ClusterQueue {queue}")


def test_a_job_larger_than_the_cluster_queue_stays_queued_and_kstatus_never_calls_it_current(
    kube: KubeClient, ns: str
) -> None:
    queue = kueue_harness.make_queue(kube, ns, {**ROOMY, GPU: "3"}, prefix="three-gpus")
    kube.create(ftj_path(ns), queued_job("too-big", queue, gpus=4))
    workload = workload_of(kube, ns, "too-big", waiting_with_message, "Kueue to explain why too-big waits")
    kueue_says = quota_reserved(workload)["message"]
    assert GPU in kueue_says and "maximum capacity" in kueue_says, kueue_says
    held = queued_with(kube, ns, "too-big", kueue_says)
    verdict = kstatus_verdict(held)
    print(f"too-big: {condition(held, 'Suspended')['message']}\nkstatus: {verdict}")
    assert verdict["status"] == "InProgress", verdict
    stays_without_pods(kube, ns, "too-big", 3)
    again = kstatus_verdict(kube.get(ftj_path(ns, "too-big")))
    assert again["status"] != "Current", again


def test_a_two_node_job_is_admitted_all_or_nothing(kube: KubeClient, ns: str) -> None:
    """3 GPUs of quota. Two 1-GPU jobs hold two; a 2-node x 1-GPU job needs two at once and gets no pod at
    all (not one of its two) until one of them finishes; then both its pods start while the other 1-GPU job
    still holds its GPU."""
    queue = kueue_harness.make_queue(kube, ns, {**ROOMY, GPU: "3"}, prefix="multi")
    for holder in ("holder-a", "holder-b"):
        kube.create(ftj_path(ns), queued_job(holder, queue))
    (holder_a,) = running_pods(kube, ns, "holder-a", 1)
    running_pods(kube, ns, "holder-b", 1)

    kube.create(ftj_path(ns), queued_job("two-nodes", queue, nodes=2))
    job = trainer_job(kube, ns, "two-nodes")
    assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (2, 2)
    workload = workload_of(kube, ns, "two-nodes", waiting_with_message, "Kueue to hold two-nodes")
    assert [p["count"] for p in workload["spec"]["podSets"]] == [2]
    kueue_says = quota_reserved(workload)["message"]
    assert f"insufficient unused quota for {GPU} in flavor default, 1 more needed" in kueue_says, kueue_says
    queued_with(kube, ns, "two-nodes", kueue_says)
    stays_without_pods(kube, ns, "two-nodes", 3)

    finish(kube, ns, holder_a, "holder-a")
    pods = running_pods(kube, ns, "two-nodes", 2)
    assert len(pods) == 2 and all(p["spec"]["nodeName"].startswith("kwok-gpu-") for p in pods)
    admitted = workload_of(kube, ns, "two-nodes", is_admitted, "Kueue to admit two-nodes")
    assert admitted["status"]["admission"]["podSetAssignments"][0]["resourceUsage"][GPU] == "2"
    assert [p for p in trainer_pods(kube, ns, "holder-b") if p["status"]["phase"] == "Running"]
