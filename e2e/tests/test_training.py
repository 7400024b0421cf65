"""A FineTuneJob that really trains: the trainer pod runs on the node agent as a local process, reads a tiny
model and a chat dataset from a real S3 server, trains LoRA (or QLoRA, on the model quantized to 4-bit NF4) on
the CPU and uploads the adapter; the operator reports Succeeded with the adapter's sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kstatus import kstatus_verdict
from e2e.cluster.kube import KubeClient
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.demo import instruction_dataset, to_jsonl
from e2e.tests.helpers import (
    ON_AGENT,
    condition,
    container_log,
    ftj_path,
    make_ftj,
    pods_of,
    s3_secret,
    terminated,
)

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def buckets(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    from kubetune_devtools.tiny import save_tiny_model

    client = s3.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in ("models", "datasets", "adapters"):  # shared by the modules that train on the node agent
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
    upload_directory(client, save_tiny_model(tmp_path_factory.mktemp("tiny-model")), "models", "tiny/")
    client.put_object(Bucket="datasets", Key="chat/train.jsonl", Body=to_jsonl(instruction_dataset(48)))
    return s3


@pytest.mark.parametrize(
    ("method", "name"), [("LoRA", "tiny-lora"), ("QLoRA", "tiny-qlora")], ids=["lora", "qlora"]
)
def test_adapter_job_trains_on_the_node_agent_and_uploads_the_adapter(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, buckets: S3Server, method: str, name: str
) -> None:
    ns = operator.namespace
    kube.apply_yaml(
        f"/api/v1/namespaces/{ns}/secrets", s3_secret(buckets.access_key, buckets.secret_key, "s3-train")
    )
    manifest = make_ftj(
        name,
        method=method,
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        hyperparameters={
            "maxSteps": 4,
            "learningRate": 0.001,
            "microBatchSize": 4,
            "gradientAccumulation": 1,
        },
        extra_spec={"dataset": {"train": "s3://datasets/chat/train.jsonl", "maxSeqLength": 128}},
    )
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-train"
    kube.create(ftj_path(ns), manifest)

    def finished(obj: JSON) -> bool:
        return obj.get("status", {}).get("phase") in ("Succeeded", "Failed")

    try:
        done = kube.wait_for(ftj_path(ns, name), finished, timeout=300, what="the training job to finish")
    finally:
        pods = pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer")
        validators = pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=validator")
        logs = [container_log(cluster, ns, pod["metadata"]["name"], "trainer") for pod in pods]
        for pod in [*validators, *pods]:
            print(f"--- log {pod['metadata']['name']} ---")
            print(container_log(cluster, ns, pod["metadata"]["name"], "trainer")[-4000:])
    status = done["status"]
    assert status["phase"] == "Succeeded", (condition(done, "Failed"), status.get("message"))
    assert f'"method": "{method}"' in logs[0]  # the trainer ran the method asked for
    # The validation pod ran first, on the CPU, and the trainer trained from the tokens it cached.
    (validator,) = validators
    validated_at = terminated(validator, "trainer")
    assert validated_at is not None and validated_at["exitCode"] == 0
    assert validated_at["finishedAt"] <= pods[0]["metadata"]["creationTimestamp"]
    assert not any("gpu" in k for k in validator["spec"]["containers"][0]["resources"].get("requests", {}))
    assert '"event": "dataset_cache", "used": true' in logs[0]
    assert (condition(done, "Validated") or {}).get("reason") == "DataValid"
    pod = pods[0]
    assert pod["spec"]["nodeName"] == cluster.agent_nodes[0]
    assert pod["status"]["podIP"].startswith("127.0.0.")

    adapter = status["adapter"]
    assert adapter["uri"] == f"s3://adapters/{name}/"
    obj = buckets.client().get_object(Bucket="adapters", Key=f"{name}/adapter_model.safetensors")
    assert adapter["sha256"] == hashlib.sha256(obj["Body"].read()).hexdigest()
    keys = {
        o["Key"] for o in buckets.client().list_objects_v2(Bucket="adapters", Prefix=f"{name}/")["Contents"]
    }
    assert {f"{name}/adapter_config.json", f"{name}/adapter_model.safetensors"} <= keys
    assert status["progress"]["step"] == 4
    # The trainer's memory plan, planned before it fetched weights, passed the API server's schema.
    plan = status["plan"]
    assert (plan["strategy"], plan["worldSize"]) == ("Single", 1) and plan["perGpuGiB"]["total"] > 0
    # ... and the validation pod's counts: the 48 records uploaded, 4 steps, an estimate labelled as such.
    assert plan["examples"] == {"train": 48, "validation": 0} and plan["steps"] == 4
    assert plan["tokens"]["train"] >= 48 and plan["estimate"]["basis"] in ("measured", "estimated")


def test_a_trainer_that_exits_0_without_a_result_ends_failed_no_result(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, buckets: S3Server
) -> None:
    """A trainer image whose process exits 0 and writes nothing: the Job completes, but success is never
    assumed. The FineTuneJob ends Failed/NoResult with no adapter record, and Flux's kstatus reads Failed."""
    ns = operator.namespace
    # Its own copy of the Secret the manifest names, so the test does not depend on another module's.
    kube.apply_yaml(f"/api/v1/namespaces/{ns}/secrets", s3_secret(buckets.access_key, buckets.secret_key))
    manifest = make_ftj(
        "silent-exit",
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        extra_spec={"trainer": {"image": "kubetune/silent-trainer:test"}},
        validation_pod=False,  # the same silent image would fail validation first (ValidationFailed)
    )
    kube.create(ftj_path(ns), manifest)
    done = kube.wait_for(
        ftj_path(ns, "silent-exit"),
        lambda obj: obj.get("status", {}).get("phase") in ("Succeeded", "Failed"),
        timeout=120,
        what="the job with a silent trainer to finish",
    )
    status = done["status"]
    failed = condition(done, "Failed")
    assert status["phase"] == "Failed" and failed is not None, status
    assert failed["reason"] == "NoResult", failed
    for words in ("without a result record", "has no termination message", f"kubectl logs -n {ns} "):
        assert words in failed["message"], failed["message"]
    assert "adapter" not in status and "model" not in status
    assert condition(done, "Succeeded") is None
    trainer_job = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/silent-exit-trainer")
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in trainer_job["status"]["conditions"])
    assert kstatus_verdict(done)["status"] == "Failed"


def test_a_trainer_that_stops_making_steps_is_restarted_from_its_checkpoint(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, buckets: S3Server
) -> None:
    """The trainer hangs after step 3 (an environment variable only tests set; it still serves metrics and
    answers SIGTERM): after progressDeadlineSeconds the operator deletes the pod, the next attempt resumes
    from the step-3 checkpoint and finishes, and the restart is counted."""
    ns = operator.namespace
    kube.apply_yaml(
        f"/api/v1/namespaces/{ns}/secrets", s3_secret(buckets.access_key, buckets.secret_key, "s3-hang")
    )
    manifest = make_ftj(
        "hangs-once",
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        hyperparameters={"maxSteps": 6, "learningRate": 0.001, "microBatchSize": 4},
        extra_spec={
            "dataset": {"train": "s3://datasets/chat/train.jsonl", "maxSeqLength": 128},
            "checkpointing": {"everySteps": 1},
            "progressDeadlineSeconds": 10,
            "trainer": {"env": [{"name": "KUBETUNE_TEST_HANG_AT_STEP", "value": "3"}]},
        },
    )
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-hang"
    kube.create(ftj_path(ns), manifest)
    try:
        done = kube.wait_for(
            ftj_path(ns, "hangs-once"),
            lambda obj: obj.get("status", {}).get("phase") in ("Succeeded", "Failed"),
            timeout=300,
            what="the job that hangs once to finish",
        )
    finally:
        # Every attempt's log, including the deleted pod's: the node agent keeps them on disk.
        logs = {
            path.parent.parent.name: path.read_text(errors="replace")
            for path in (Path(cluster.dir) / "pods" / ns).glob("hangs-once-trainer-*/logs/trainer.log")
        }
        for name, text in logs.items():
            print(f"--- trainer log {name} ---\n{text[-2000:]}")
    status = done["status"]
    assert status["phase"] == "Succeeded", (condition(done, "Failed"), status.get("message"))
    assert (status["restarts"], status["noProgressRestarts"]) == (1, 1)
    assert status["progress"]["step"] == 6
    events = kube.get(f"/api/v1/namespaces/{ns}/events", fieldSelector="involvedObject.name=hangs-once")
    no_progress = [e for e in events["items"] if e["reason"] == "NoProgress"]
    assert len(no_progress) == 1 and no_progress[0]["type"] == "Warning"
    message = no_progress[0]["message"]
    assert "made no training step for" in message and "after step 3" in message, message
    assert any('"event": "test_hang"' in text for text in logs.values())
    assert any('"resumed_step": 3' in text for text in logs.values())
