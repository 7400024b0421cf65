"""The validation pod on a real API server: ``<name>-validate`` runs on the node agent before any GPU Job,
reads a real S3 server, and its verdict decides whether a GPU Job is ever created (the API server's audit log
is the witness). Also: the dry run, the estimate against a measured run, and the GPU pod's start with and
without the token cache on a 20,000-example dataset (figures printed, not asserted)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kstatus import kstatus_tool, kstatus_verdict
from e2e.cluster.kube import KubeClient
from e2e.cluster.procs import bin_dir
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.demo import instruction_dataset, to_jsonl
from e2e.tests.helpers import (
    ON_AGENT,
    condition,
    container_log,
    created_objects,
    ftj_path,
    make_ftj,
    pods_of,
    s3_secret,
)

JSON = dict[str, Any]
SECRET = "s3-validate"
BIG = 20_000


@pytest.fixture(scope="module")
def buckets(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    from kubetune_devtools.tiny import save_tiny_model

    client = s3.client()
    for bucket in ("vmodels", "vdatasets", "vout"):
        client.create_bucket(Bucket=bucket)
    upload_directory(client, save_tiny_model(tmp_path_factory.mktemp("tiny")), "vmodels", "tiny/")
    client.put_object(Bucket="vdatasets", Key="chat/train.jsonl", Body=to_jsonl(instruction_dataset(48)))
    bad = to_jsonl(instruction_dataset(10)).decode().splitlines()
    bad[3] = '{"messages": [{"role": "user"}]}'
    bad[7] = "not json at all"
    client.put_object(Bucket="vdatasets", Key="bad/train.jsonl", Body=("\n".join(bad) + "\n").encode())
    client.put_object(Bucket="vdatasets", Key="big/train.jsonl", Body=to_jsonl(instruction_dataset(BIG)))
    return s3


@pytest.fixture(scope="module")
def ns(kube: KubeClient, operator: Any, buckets: S3Server) -> str:
    namespace = str(operator.namespace)
    kube.apply_yaml(
        f"/api/v1/namespaces/{namespace}/secrets", s3_secret(buckets.access_key, buckets.secret_key, SECRET)
    )
    return namespace


def job(name: str, s3: S3Server, train: str, **kwargs: Any) -> JSON:
    extra = kwargs.pop("extra_spec", {})
    manifest = make_ftj(
        name,
        placement=ON_AGENT,
        s3_endpoint=s3.endpoint,
        base_model="s3://vmodels/tiny/",
        output=f"s3://vout/{name}/",
        hyperparameters=kwargs.pop("hyperparameters", {"maxSteps": 2, "learningRate": 0.001}),
        extra_spec={"dataset": {"train": train, "maxSeqLength": 128}, **extra},
        **kwargs,
    )
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = SECRET
    return manifest


def wait_finished(kube: KubeClient, cluster: ClusterInfo, ns: str, name: str, timeout: float = 600) -> JSON:
    try:
        return kube.wait_for(
            ftj_path(ns, name),
            lambda obj: (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
            timeout=timeout,
            what=f"{name} to finish",
        )
    finally:
        for pod in pods_of(kube, ns, f"kubetune.io/job-name={name}"):
            print(f"--- log {pod['metadata']['name']} ---")
            print(container_log(cluster, ns, pod["metadata"]["name"], "trainer")[-3000:])


def never_created_a_gpu_job(cluster: ClusterInfo, ns: str, name: str) -> None:
    jobs = created_objects(cluster, ns, "jobs")
    pods = created_objects(cluster, ns, "pods")
    assert f"{name}-validate" in jobs, jobs  # the witness saw the validation Job: it is listening
    assert any(p.startswith(f"{name}-validate-") for p in pods), pods
    assert f"{name}-trainer" not in jobs, jobs
    assert not [p for p in pods if p.startswith(f"{name}-trainer")], pods


def test_an_invalid_dataset_fails_in_the_validation_pod_and_no_gpu_job_is_ever_created(
    cluster: ClusterInfo, kube: KubeClient, ns: str, buckets: S3Server
) -> None:
    name = "v-bad-data"
    kube.create(ftj_path(ns), job(name, buckets, "s3://vdatasets/bad/train.jsonl"))
    done = wait_finished(kube, cluster, ns, name, timeout=300)
    failed = condition(done, "Failed") or {}
    assert done["status"]["phase"] == "Failed" and failed.get("reason") == "InvalidDataset", done["status"]
    # The trainer's message, line numbers included, and that no GPU Job was made.
    assert "train.jsonl:4" in failed["message"] and "train.jsonl:8" in failed["message"], failed["message"]
    assert "no GPU Job was created" in failed["message"]
    assert (condition(done, "Validated") or {}).get("reason") == "InvalidDataset"
    assert kube.get_or_none(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-trainer") is None
    never_created_a_gpu_job(cluster, ns, name)
    if kstatus_tool().exists():
        assert kstatus_verdict(done)["status"] == "Failed"


def test_a_dry_run_stops_after_the_plan_and_kubectl_shows_the_estimate(
    cluster: ClusterInfo, kube: KubeClient, ns: str, buckets: S3Server
) -> None:
    name = "v-dry-run"
    kube.create(
        ftj_path(ns), job(name, buckets, "s3://vdatasets/chat/train.jsonl", extra_spec={"dryRun": True})
    )
    done = wait_finished(kube, cluster, ns, name, timeout=300)
    status = done["status"]
    succeeded = condition(done, "Succeeded") or {}
    assert succeeded.get("reason") == "DryRun", status
    assert succeeded["message"].startswith("dry run:") and "no GPU was reserved" in succeeded["message"]
    plan = status["plan"]
    assert plan["examples"]["train"] == 48 and plan["steps"] == 2 and plan["estimate"]["gpuHours"] >= 0
    assert plan["cache"]["uri"].startswith(f"s3://vout/{name}/cache/")
    manifest_key = plan["cache"]["uri"].removeprefix("s3://vout/") + "manifest.json"
    manifest = json.loads(buckets.client().get_object(Bucket="vout", Key=manifest_key)["Body"].read())
    assert manifest["splits"]["train"]["examples"] == 48
    assert "adapter" not in status
    never_created_a_gpu_job(cluster, ns, name)
    if kstatus_tool().exists():
        assert kstatus_verdict(done)["status"] == "Current"
    # `kubectl get ftj`: the server's table (what kubectl prints) carries the estimate column.
    table = kube.session.get(
        kube.server + ftj_path(ns, name),
        headers={"Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"},
        timeout=30,
    ).json()
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert row["Est-GPU-h"] == plan["estimate"]["gpuHours"] and row["Phase"] == "Succeeded"
    kubectl = bin_dir() / "kubectl"
    if kubectl.exists():
        shown = subprocess.run(
            [str(kubectl), "--kubeconfig", cluster.kubeconfig, "get", "ftj", name, "-n", ns],
            capture_output=True,
            text=True,
            timeout=60,
        )
        print(shown.stdout)
        assert "EST-GPU-H" in shown.stdout, shown


def test_the_estimate_against_the_measured_time_of_a_cpu_run(
    cluster: ClusterInfo, kube: KubeClient, ns: str, buckets: S3Server
) -> None:
    """A CPU job (gpus: 0) is estimated from the table's measured CPU row; the run's own training time is the
    reference. The error is printed; nothing is asserted on it (an estimate)."""
    name = "v-estimate"
    manifest = job(
        name,
        buckets,
        "s3://vdatasets/chat/train.jsonl",
        gpus=0,
        hyperparameters={"epochs": 2, "learningRate": 0.001, "batchTokens": 1024},
    )
    kube.create(ftj_path(ns), manifest)
    done = wait_finished(kube, cluster, ns, name)
    assert done["status"]["phase"] == "Succeeded", done["status"].get("message")
    estimate = done["status"]["plan"]["estimate"]
    assert estimate["gpuProduct"] == "cpu" and estimate["basis"] == "measured"
    summary = json.loads(
        buckets.client().get_object(Bucket="vout", Key=f"{name}/training_summary.json")["Body"].read()
    )
    measured = float(summary["trainSeconds"])
    error = (estimate["seconds"] - measured) / measured
    print(
        f"ESTIMATE vs MEASURED (tiny model, CPU, {done['status']['plan']['tokens']['train']} tokens x 2 "
        f"epochs): estimated {estimate['seconds']} s, measured {measured:.2f} s, error {error:+.0%}"
    )
    assert estimate["seconds"] > 0 and measured > 0


def _start_to_first_step(kube: KubeClient, cluster: ClusterInfo, ns: str, name: str) -> float:
    """Seconds from the trainer container's start (its pod status) to its first optimizer step (its log)."""
    from datetime import datetime

    (pod,) = pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer")
    state = pod["status"]["containerStatuses"][0]["state"]
    started = (state.get("terminated") or state.get("running") or {})["startedAt"]
    start = datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp()
    log = container_log(cluster, ns, pod["metadata"]["name"], "trainer")
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    first = next(e for e in events if e.get("event") == "progress" and e.get("step", 0) >= 1)
    return float(first["ts"]) - start


def test_gpu_pod_start_to_first_step_with_and_without_the_cache(
    cluster: ClusterInfo, kube: KubeClient, ns: str, buckets: S3Server
) -> None:
    """20,000 examples: the same job with the validation pod's cache, and with validation skipped (the trainer
    tokenizes). Both figures are printed for the report; timings are not asserted."""
    figures = {}
    for name, with_cache in (("v-big-cached", True), ("v-big-uncached", False)):
        manifest = job(
            name,
            buckets,
            "s3://vdatasets/big/train.jsonl",
            hyperparameters={"maxSteps": 1, "learningRate": 0.001},
            validation_pod=with_cache,
        )
        kube.create(ftj_path(ns), manifest)
        done = wait_finished(kube, cluster, ns, name, timeout=900)
        assert done["status"]["phase"] == "Succeeded", done["status"].get("message")
        figures[name] = _start_to_first_step(kube, cluster, ns, name)
        trainer_log = "".join(
            container_log(cluster, ns, p["metadata"]["name"], "trainer")
            for p in pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer")
        )
        assert ('"event": "dataset_cache", "used": true' in trainer_log) == with_cache
        if with_cache:
            assert done["status"]["plan"]["examples"]["train"] == BIG
    print(
        f"GPU POD START -> FIRST STEP ({BIG} examples, node agent, CPU): with the cache "
        f"{figures['v-big-cached']:.1f} s, without {figures['v-big-uncached']:.1f} s"
    )
