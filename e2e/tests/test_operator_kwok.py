"""The operator against a real API server, with its trainer pods on KWOK GPU nodes: children and pod spec as
the builders promise, results and failures from the termination message, suspend/resume, and cascading
deletion by the garbage collector. KWOK plays the trainer: a test ends a pod by annotating it."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from e2e.cluster.kube import KubeClient
from e2e.tests.helpers import (
    ON_KWOK,
    condition,
    ftj_path,
    has_condition,
    kopf_child_requests,
    label_selector_of,
    make_ftj,
    pods_of,
    s3_secret,
    wait_pod,
)
from kubetune_trainer import contract

JSON = dict[str, Any]
SUCCESS_SHA = "4f" * 32


@pytest.fixture(scope="module")
def ns(operator: Any, kube: KubeClient) -> str:
    namespace = str(operator.namespace)
    kube.apply_yaml(f"/api/v1/namespaces/{namespace}/secrets", s3_secret("AKIAEXAMPLE", "example-secret"))
    return namespace


def trainer_selector(name: str) -> str:
    return f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer"


def wait_trainer_pod(kube: KubeClient, ns: str, name: str, phase: str = "Running") -> JSON:
    return wait_pod(
        kube,
        ns,
        trainer_selector(name),
        lambda p: p.get("status", {}).get("phase") == phase,
        what=f"a {phase} trainer pod of {name}",
    )


def wait_phase(kube: KubeClient, ns: str, name: str, phase: str, timeout: float = 60) -> JSON:
    return kube.wait_for(
        ftj_path(ns, name),
        lambda o: o.get("status", {}).get("phase") == phase,
        timeout=timeout,
        what=f"FineTuneJob {name} to reach phase {phase}",
    )


def end_pod(
    kube: KubeClient, ns: str, pod: JSON, outcome: str, message: str = "", exit_code: int = 1
) -> None:
    annotations = {
        "kubetune.io/kwok-outcome": outcome,
        "kubetune.io/kwok-message": message,
        "kubetune.io/kwok-exit-code": str(exit_code),
    }
    kube.patch(
        f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}", {"metadata": {"annotations": annotations}}
    )


def owned_by(obj: JSON, ftj: JSON) -> bool:
    return any(
        ref.get("controller") and ref["uid"] == ftj["metadata"]["uid"] and ref["kind"] == "FineTuneJob"
        for ref in obj["metadata"].get("ownerReferences", [])
    )


def test_the_operator_asks_the_api_server_for_its_children_only(cluster: Any, ns: str) -> None:
    """Measured at the API server (its audit log): every list and watch of pods and Jobs the operator made
    carries the children's label selector, so other workloads' pods never reach it."""
    deadline = time.monotonic() + 30
    while {r["objectRef"]["resource"] for r in kopf_child_requests(cluster, ns)} != {"pods", "jobs"}:
        assert time.monotonic() < deadline, "no watch of pods and Jobs by the operator in the audit log"
        time.sleep(0.5)
    requests = kopf_child_requests(cluster, ns)
    assert {r["verb"] for r in requests} >= {"watch"}
    unfiltered = [r["requestURI"] for r in requests if label_selector_of(r) != "kubetune.io/job-name"]
    assert not unfiltered, f"streams of every pod or Job in {ns}: {unfiltered}"


def test_children_and_trainer_pod_follow_the_contract(kube: KubeClient, ns: str) -> None:
    ftj = kube.create(ftj_path(ns), make_ftj("contract", gpus=2, placement=ON_KWOK))
    pod = wait_trainer_pod(kube, ns, "contract")
    job = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/contract-trainer")
    cm = kube.get(f"/api/v1/namespaces/{ns}/configmaps/contract-config")
    for child in (job, cm):
        assert owned_by(child, ftj)
        assert child["metadata"]["labels"]["kubetune.io/job-name"] == "contract"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    config = contract.TrainerConfig.from_json(cm["data"][contract.CONFIG_FILE_NAME])
    assert (config.method, config.base_model, config.gpus) == ("LoRA", "s3://models/tiny/", 2)
    assert config.job.uid == ftj["metadata"]["uid"]

    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "kubetune-trainer"
    assert labels["job-name"] == "contract-trainer"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = spec["containers"]
    assert c["name"] == "trainer" and c["image"] == "kubetune/trainer:0.1.0"
    assert "command" not in c and "args" not in c
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBETUNE_CONFIG"]["value"] == "/etc/kubetune/config.json"
    assert env["KUBETUNE_WORK_DIR"]["value"] == "/scratch"
    assert env["HF_HOME"]["value"] == "/scratch/hf"
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/kubetune"]]["configMap"]["name"] == "contract-config"
    assert "emptyDir" in volumes[mounts["/scratch"]] and "emptyDir" in volumes[mounts["/tmp"]]

    running = wait_phase(kube, ns, "contract", "Running")
    assert running["status"]["trainerJob"] == "contract-trainer"
    assert has_condition(running, "Running")


def test_success_is_reported_from_the_termination_message(kube: KubeClient, ns: str) -> None:
    kube.create(ftj_path(ns), make_ftj("succeeds", placement=ON_KWOK))
    pod = wait_trainer_pod(kube, ns, "succeeds")
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message="adapter written to s3://adapters/succeeds/",
        adapter=contract.AdapterRecord(
            uri="s3://adapters/succeeds/",
            files=["adapter_config.json", "adapter_model.safetensors"],
            size_bytes=12345,
            sha256=SUCCESS_SHA,
            base_model="s3://models/tiny/",
        ),
        metrics={"trainLoss": 1.25},
        progress={"step": 10, "totalSteps": 10},
    )
    end_pod(kube, ns, pod, "Succeeded", summary.to_json(), exit_code=0)
    done = wait_phase(kube, ns, "succeeds", "Succeeded")
    status = done["status"]
    assert status["adapter"]["sha256"] == SUCCESS_SHA
    assert status["adapter"]["uri"] == "s3://adapters/succeeds/"
    succeeded = condition(done, "Succeeded")
    assert succeeded is not None and succeeded["status"] == "True" and succeeded["reason"] == "Completed"
    assert status.get("completionTime")


@pytest.mark.parametrize(
    ("name", "exit_code", "message", "reason"),
    [
        (
            "bad-data",
            contract.EXIT_CODE_PERMANENT_FAILURE,
            contract.TerminationSummary(
                outcome="Failed", reason="InvalidDataset", message="lines 3, 9: not valid JSON"
            ).to_json(),
            "InvalidDataset",
        ),
        ("crashes", 1, "", "BackoffLimitExceeded"),
    ],
)
def test_failing_trainer_ends_failed_with_a_reason(
    kube: KubeClient, ns: str, name: str, exit_code: int, message: str, reason: str
) -> None:
    kube.create(ftj_path(ns), make_ftj(name, placement=ON_KWOK, backoff_limit=0))
    pod = wait_trainer_pod(kube, ns, name)
    end_pod(kube, ns, pod, "Failed", message, exit_code=exit_code)
    failed = wait_phase(kube, ns, name, "Failed")
    cond = condition(failed, "Failed")
    assert cond is not None and cond["status"] == "True"
    assert cond["reason"] == reason, cond
    if message:
        assert "lines 3, 9" in cond["message"]


def test_suspend_and_resume(kube: KubeClient, ns: str) -> None:
    kube.create(ftj_path(ns), make_ftj("pausable", placement=ON_KWOK, suspend=True))
    suspended = wait_phase(kube, ns, "pausable", "Suspended")
    assert has_condition(suspended, "Suspended")
    job = kube.wait_for(f"/apis/batch/v1/namespaces/{ns}/jobs/pausable-trainer", bool, timeout=30)
    assert job["spec"]["suspend"] is True
    assert pods_of(kube, ns, trainer_selector("pausable")) == []

    kube.patch(ftj_path(ns, "pausable"), {"spec": {"suspend": False}})
    wait_trainer_pod(kube, ns, "pausable")
    wait_phase(kube, ns, "pausable", "Running")

    kube.patch(ftj_path(ns, "pausable"), {"spec": {"suspend": True}})
    wait_phase(kube, ns, "pausable", "Suspended")
    kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda _: pods_of(kube, ns, trainer_selector("pausable")) == [],
        timeout=60,
        what="the suspended job's pods to be gone",
    )


def events_of(kube: KubeClient, ns: str, name: str, reason: str) -> list[JSON]:
    listed = kube.get(
        f"/api/v1/namespaces/{ns}/events",
        fieldSelector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob,reason={reason}",
    )
    items: list[JSON] = listed.get("items") or []
    return items


def test_spec_edits_on_a_running_job_reach_its_trainer_job_or_warn(kube: KubeClient, ns: str) -> None:
    kube.create(ftj_path(ns), make_ftj("edited", placement=ON_KWOK))
    wait_trainer_pod(kube, ns, "edited")
    wait_phase(kube, ns, "edited", "Running")
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/edited-trainer"
    assert kube.get(job_path)["spec"]["backoffLimit"] == 3

    kube.patch(ftj_path(ns, "edited"), {"spec": {"backoffLimit": 7, "activeDeadlineSeconds": 86400}})
    job = kube.wait_for(
        job_path,
        lambda j: (j["spec"].get("backoffLimit"), j["spec"].get("activeDeadlineSeconds")) == (7, 86400),
        timeout=30,
        what="the trainer Job to take the edited backoffLimit and activeDeadlineSeconds",
    )
    assert job["spec"]["suspend"] is False
    kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda _: bool(events_of(kube, ns, "edited", "TrainerJobUpdated")),
        timeout=30,
        what="a TrainerJobUpdated Event",
    )

    template = job["spec"]["template"]
    kube.patch(ftj_path(ns, "edited"), {"spec": {"trainer": {"image": "registry.example/trainer:edited"}}})
    kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda _: bool(events_of(kube, ns, "edited", "SpecChangeNotApplied")),
        timeout=30,
        what="a SpecChangeNotApplied Event",
    )
    (event,) = events_of(kube, ns, "edited", "SpecChangeNotApplied")
    assert event["type"] == "Warning" and event["message"].startswith("spec.trainer.image changed")
    assert kube.get(job_path)["spec"]["template"] == template


def test_delete_cascades_to_children(kube: KubeClient, ns: str) -> None:
    kube.create(ftj_path(ns), make_ftj("doomed", placement=ON_KWOK))
    wait_trainer_pod(kube, ns, "doomed")
    kube.delete(ftj_path(ns, "doomed"))
    kube.wait_gone(ftj_path(ns, "doomed"), timeout=60)
    kube.wait_gone(f"/apis/batch/v1/namespaces/{ns}/jobs/doomed-trainer", timeout=60)
    kube.wait_gone(f"/api/v1/namespaces/{ns}/configmaps/doomed-config", timeout=60)
    kube.wait_for(
        f"/api/v1/namespaces/{ns}",
        lambda _: pods_of(kube, ns, trainer_selector("doomed")) == [],
        timeout=60,
        what="the deleted job's pods to be gone",
    )


def test_reapplying_under_the_same_name_never_inherits_the_orphaned_run(kube: KubeClient, ns: str) -> None:
    """Delete with --cascade=orphan, then apply the same name again: the old Job finished Succeeded, but its
    result is not the new run's. The new FineTuneJob fails with ChildConflict naming the Job, never touches
    it, and starts its own run once the old Job is deleted."""
    kube.create(ftj_path(ns), make_ftj("reborn", placement=ON_KWOK))
    pod = wait_trainer_pod(kube, ns, "reborn")
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        adapter=contract.AdapterRecord(
            uri="s3://adapters/reborn/",
            files=["adapter_model.safetensors"],
            size_bytes=10,
            sha256=SUCCESS_SHA,
        ),
    )
    end_pod(kube, ns, pod, "Succeeded", summary.to_json(), exit_code=0)
    wait_phase(kube, ns, "reborn", "Succeeded")
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/reborn-trainer"
    kube.delete(ftj_path(ns, "reborn"), {"propagationPolicy": "Orphan"})
    kube.wait_gone(ftj_path(ns, "reborn"), timeout=60)
    old_job = kube.get(job_path)

    kube.create(ftj_path(ns), make_ftj("reborn", placement=ON_KWOK))
    failed = wait_phase(kube, ns, "reborn", "Failed")
    reason = condition(failed, "Failed")
    assert reason is not None and reason["reason"] == "ChildConflict", reason
    assert "reborn-trainer" in reason["message"] or "reborn-config" in reason["message"]
    assert "adapter" not in failed["status"]
    job = kube.get(job_path)
    assert job["metadata"]["uid"] == old_job["metadata"]["uid"]
    assert job["metadata"].get("ownerReferences") == old_job["metadata"].get("ownerReferences")

    kube.delete_if_exists(f"/api/v1/namespaces/{ns}/configmaps/reborn-config")
    kube.delete(job_path, {"propagationPolicy": "Background"})
    new = kube.wait_for(
        ftj_path(ns, "reborn"),
        lambda o: (condition(o, "Running") or {}).get("status") == "True",
        timeout=90,
        what="the re-applied job to run its own trainer",
    )
    assert condition(new, "Failed") is None
    assert owned_by(kube.get(job_path), new)
    kube.delete(ftj_path(ns, "reborn"))


def test_a_result_survives_its_job_being_deleted_while_the_operator_is_down(
    cluster: Any, kube: KubeClient, crd: JSON, make_namespace: Any
) -> None:
    """ttlSecondsAfterFinished: 0 and the operator stopped as the trainer finishes: the TTL controller deletes
    the completed Job before anyone read its pod's summary. The result finalizer holds the Job and the pod;
    the operator, started again, records Succeeded with the adapter record and then lets them go."""
    from e2e.conftest import launch_operator

    ns = make_namespace("e2e-held")
    op = launch_operator(cluster, ns)
    try:
        manifest = make_ftj("held", placement=ON_KWOK, extra_spec={"ttlSecondsAfterFinished": 0})
        kube.create(ftj_path(ns), manifest)
        pod = wait_trainer_pod(kube, ns, "held")
        op.stop()
        summary = contract.TerminationSummary(
            outcome="Succeeded",
            reason="Completed",
            adapter=contract.AdapterRecord(
                uri="s3://adapters/held/",
                files=["adapter_model.safetensors"],
                size_bytes=10,
                sha256=SUCCESS_SHA,
            ),
        )
        end_pod(kube, ns, pod, "Succeeded", summary.to_json(), exit_code=0)
        job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/held-trainer"
        job = kube.wait_for(
            job_path,
            lambda j: bool(j["metadata"].get("deletionTimestamp")),
            timeout=60,
            what="the TTL controller to delete the completed Job",
        )
        assert any(c["type"] == "Complete" for c in job["status"].get("conditions", []))
        assert "kubetune.io/result" in job["metadata"]["finalizers"]
        held = kube.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
        assert "kubetune.io/result" in held["metadata"]["finalizers"]
        assert kube.get(ftj_path(ns, "held"))["status"]["phase"] != "Succeeded"  # nobody has read it yet

        op = launch_operator(cluster, ns)
        done = wait_phase(kube, ns, "held", "Succeeded", timeout=60)
        assert done["status"]["adapter"]["sha256"] == SUCCESS_SHA
        kube.wait_gone(job_path, timeout=60)
        kube.wait_gone(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}", timeout=60)
        assert kube.get(ftj_path(ns, "held"))["status"]["phase"] == "Succeeded"
    finally:
        op.stop()


def test_a_forbidden_child_ends_the_job_child_forbidden_without_retrying(
    cluster: Any, kube: KubeClient, crd: JSON, make_namespace: Any
) -> None:
    """An object-count quota of zero Jobs: the API server answers the trainer Job's create with 403. The job
    ends Failed/ChildForbidden with the server's words, and the operator does not try again."""
    from e2e.conftest import launch_operator

    ns = make_namespace("e2e-forbid")
    kube.create(
        f"/api/v1/namespaces/{ns}/resourcequotas",
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-jobs"},
            "spec": {"hard": {"count/jobs.batch": "0"}},
        },
    )
    kube.wait_for(
        f"/api/v1/namespaces/{ns}/resourcequotas/no-jobs",
        lambda q: "count/jobs.batch" in (q.get("status") or {}).get("hard", {}),
        timeout=30,
        what="the quota controller to take up the quota",
    )
    op = launch_operator(cluster, ns)
    try:
        kube.create(ftj_path(ns), make_ftj("forbidden", placement=ON_KWOK))
        failed = wait_phase(kube, ns, "forbidden", "Failed")
        reason = condition(failed, "Failed")
        assert reason is not None and reason["reason"] == "ChildForbidden"
        assert "exceeded quota: no-jobs" in reason["message"] and "forbidden" in reason["message"]
        assert kube.get_or_none(f"/apis/batch/v1/namespaces/{ns}/jobs/forbidden-trainer") is None
        time.sleep(3)  # the operator's scrape interval is 1 s: time enough to try again, which it must not
        assert kube.get(ftj_path(ns, "forbidden"))["status"]["conditions"] == failed["status"]["conditions"]
        page = requests.get(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).text
        errors = [
            line for line in page.splitlines() if line.startswith("kubetune_operator_reconcile_errors_total")
        ]
        assert not errors, f"passes failed and were retried: {errors}"
    finally:
        op.stop()
