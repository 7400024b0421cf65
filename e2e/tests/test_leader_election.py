"""Two operator replicas on the real API server: exactly one (the Lease holder) works, and when it is killed
the other takes the Lease over and carries a running job to Succeeded."""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import requests

from e2e.cluster.kube import KubeClient
from e2e.tests.helpers import ON_KWOK, condition, ftj_path, make_ftj, s3_secret
from e2e.tests.test_operator_kwok import SUCCESS_SHA, end_pod, wait_phase, wait_trainer_pod
from kubetune_trainer import contract

LEASE = "kubetune"
TAKEOVER_SECONDS = 30


def metric(op: Any, name: str) -> float:
    """A value on the replica's /metrics; 0 when the series is absent."""
    page = requests.get(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", page, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def lease_holder(kube: KubeClient, ns: str) -> str:
    lease = kube.get_or_none(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{LEASE}") or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def wait_holder(kube: KubeClient, ns: str, replica: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not lease_holder(kube, ns).startswith(f"{replica}_"):
        assert time.monotonic() < deadline, f"{replica} did not take the Lease within {timeout}s"
        time.sleep(0.2)


def reporting_instances(kube: KubeClient, ns: str, name: str) -> list[str]:
    listed = kube.get(
        f"/api/v1/namespaces/{ns}/events",
        fieldSelector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
    )
    return [str(e.get("reportingInstance")) for e in listed.get("items") or []]


def test_one_replica_works_and_the_other_takes_over_when_it_is_killed(
    cluster: Any, kube: KubeClient, crd: Any, make_namespace: Any
) -> None:
    from e2e.conftest import launch_operator

    ns = make_namespace("e2e-ha")
    kube.apply_yaml(f"/api/v1/namespaces/{ns}/secrets", s3_secret("AKIAEXAMPLE", "example-secret"))
    first = launch_operator(cluster, ns, leader_lease=LEASE, replica="op-a")
    second = None
    try:
        wait_holder(kube, ns, "op-a", timeout=30)
        second = launch_operator(cluster, ns, leader_lease=LEASE, replica="op-b")
        kube.create(ftj_path(ns), make_ftj("ha", placement=ON_KWOK))
        pod = wait_trainer_pod(kube, ns, "ha")
        kube.wait_for(
            ftj_path(ns, "ha"),
            lambda o: (condition(o, "Running") or {}).get("status") == "True",
            timeout=60,
            what="the job to run",
        )
        assert (
            metric(first, "kubetune_operator_leader") == 1 and metric(second, "kubetune_operator_leader") == 0
        )
        assert metric(first, "kubetune_operator_status_writes_total") > 0
        assert metric(second, "kubetune_operator_status_writes_total") == 0
        assert set(reporting_instances(kube, ns, "ha")) == {"op-a"}

        os.kill(first.proc.pid, signal.SIGKILL)  # no chance to release the Lease
        first.proc.wait(timeout=10)
        killed = time.monotonic()
        wait_holder(kube, ns, "op-b", timeout=TAKEOVER_SECONDS)
        assert time.monotonic() - killed <= TAKEOVER_SECONDS
        assert metric(second, "kubetune_operator_leader") == 1

        summary = contract.TerminationSummary(
            outcome="Succeeded",
            reason="Completed",
            adapter=contract.AdapterRecord(
                uri="s3://adapters/ha/",
                files=["adapter_model.safetensors"],
                size_bytes=10,
                sha256=SUCCESS_SHA,
            ),
        )
        end_pod(kube, ns, pod, "Succeeded", summary.to_json(), exit_code=0)
        done = wait_phase(kube, ns, "ha", "Succeeded", timeout=60)
        assert done["status"]["adapter"]["sha256"] == SUCCESS_SHA and "model" not in done["status"]
        assert metric(second, "kubetune_operator_status_writes_total") > 0
        completed_path = f"/api/v1/namespaces/{ns}/events"
        completed_selector = "involvedObject.name=ha,involvedObject.kind=FineTuneJob,reason=Completed"
        deadline = time.monotonic() + 15  # the Event follows the status write
        while not kube.get(completed_path, fieldSelector=completed_selector)["items"]:
            assert time.monotonic() < deadline, "no Completed Event"
            time.sleep(0.2)
        time.sleep(2)  # a second writer would post its own within a scrape interval or two
        completed = kube.get(completed_path, fieldSelector=completed_selector)["items"]
        assert len(completed) == 1 and completed[0].get("count", 1) == 1  # one result, recorded once
        assert completed[0]["reportingInstance"] == "op-b"
        assert set(reporting_instances(kube, ns, "ha")) == {"op-a", "op-b"}
    finally:
        first.stop()
        if second is not None:
            second.stop()
