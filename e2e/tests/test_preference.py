"""SFT, then DPO from its adapter, as two FineTuneJobs on the node agent: the second names the first's
status.adapter.uri (and sha256) as baseModel.adapter, trains on preference pairs from a real S3 server, and
reports its preference metrics in status.metrics."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kube import KubeClient
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.demo import instruction_dataset, preference_dataset, to_jsonl
from e2e.tests.helpers import ON_AGENT, condition, container_log, ftj_path, make_ftj, pods_of, s3_secret

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
    pairs = preference_dataset()
    client.put_object(Bucket="datasets", Key="prefs/train.jsonl", Body=to_jsonl(pairs[:96]))
    client.put_object(Bucket="datasets", Key="prefs/val.jsonl", Body=to_jsonl(pairs[200:232]))
    return s3


def run_to_the_end(cluster: ClusterInfo, kube: KubeClient, ns: str, manifest: JSON) -> tuple[JSON, list[str]]:
    """Create the FineTuneJob, wait until it has finished; the finished object and its trainer logs."""
    name = manifest["metadata"]["name"]
    kube.create(ftj_path(ns), manifest)

    def finished(obj: JSON) -> bool:
        return obj.get("status", {}).get("phase") in ("Succeeded", "Failed")

    try:
        done = kube.wait_for(ftj_path(ns, name), finished, timeout=420, what=f"{name} to finish")
    finally:
        # The trainer pods' logs, oldest first (the validation pod's is not one of them).
        pods = pods_of(kube, ns, f"kubetune.io/job-name={name},app.kubernetes.io/component=trainer")
        pods.sort(key=lambda pod: pod["metadata"]["creationTimestamp"])
        logs = [container_log(cluster, ns, pod["metadata"]["name"], "trainer") for pod in pods]
        for pod, log in zip(pods, logs, strict=True):
            print(f"--- trainer log {pod['metadata']['name']} ---")
            print(log[-4000:])
    assert done["status"]["phase"] == "Succeeded", (condition(done, "Failed"), done["status"].get("message"))
    return done, logs


def events(log: str) -> list[JSON]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_sft_then_dpo_from_the_sft_adapter(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, buckets: S3Server
) -> None:
    ns = operator.namespace
    kube.apply_yaml(
        f"/api/v1/namespaces/{ns}/secrets", s3_secret(buckets.access_key, buckets.secret_key, "s3-prefs")
    )
    steps = {"maxSteps": 4, "learningRate": 0.005, "batchTokens": 512}

    sft = make_ftj(
        "tiny-sft",
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        hyperparameters=steps,
        extra_spec={"dataset": {"train": "s3://datasets/chat/train.jsonl", "maxSeqLength": 128}},
    )
    sft["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-prefs"
    sft_done, _ = run_to_the_end(cluster, kube, ns, sft)
    sft_adapter = sft_done["status"]["adapter"]

    dpo = make_ftj(
        "tiny-dpo",
        method="DPO",
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        hyperparameters={**steps, "evalEverySteps": 2},
        extra_spec={
            "baseModel": {
                "uri": "s3://models/tiny/",
                "adapter": {"uri": sft_adapter["uri"], "sha256": sft_adapter["sha256"]},
            },
            "dataset": {
                "train": "s3://datasets/prefs/train.jsonl",
                "validation": "s3://datasets/prefs/val.jsonl",
                "maxSeqLength": 64,
            },
            "dpo": {"beta": 0.1},
        },
    )
    dpo["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-prefs"
    done, logs = run_to_the_end(cluster, kube, ns, dpo)
    status = done["status"]

    # The trainer started from the SFT job's adapter, checked by the digest the SFT job reported.
    trainer_events = events(logs[-1])
    (start,) = [e for e in trainer_events if e["event"] == "start_adapter"]
    assert (start["uri"], start["sha256"]) == (sft_adapter["uri"], sft_adapter["sha256"])
    (reference,) = [e for e in trainer_events if e["event"] == "reference"]
    assert (reference["pairs"], reference["eval_pairs"]) == (96, 32)
    # The reference is the SFT adapter itself: the first step's pairs are all ties with it (dropout off).
    first = next(e for e in trainer_events if e["event"] == "progress")
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["preference_accuracy"] == pytest.approx(0.5)

    # The result is an adapter of the SFT adapter's shape (r 4, not the default 16), with its digest.
    adapter = status["adapter"]
    assert adapter["uri"] == "s3://adapters/tiny-dpo/" and "model" not in status
    client = buckets.client()
    weights = client.get_object(Bucket="adapters", Key="tiny-dpo/adapter_model.safetensors")["Body"].read()
    assert adapter["sha256"] == hashlib.sha256(weights).hexdigest() != sft_adapter["sha256"]
    config = client.get_object(Bucket="adapters", Key="tiny-dpo/adapter_config.json")["Body"].read()
    assert json.loads(config)["r"] == 4

    # The preference metrics reached status.metrics through the API server's schema.
    metrics = status["metrics"]
    for key in ("rewardMargin", "preferenceAccuracy", "chosenLogps", "rejectedLogps", "evalRewardMargin"):
        assert isinstance(metrics[key], int | float), (key, metrics)
    assert 0 <= metrics["preferenceAccuracy"] <= 1 and 0 <= metrics["evalPreferenceAccuracy"] <= 1
    assert metrics["chosenLogps"] < 0 and metrics["rejectedLogps"] < 0
    assert status["progress"]["step"] == 4
