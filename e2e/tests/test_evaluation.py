"""Evaluation users can act on, through a real API server: a Full fine-tune of the tiny model on the node
agent that overfits (random answers to memorise) stops early, publishes the best evaluation's weights, and the
status the operator writes (token accuracy, the selected step, the early stop in the message) passes the
CRD's schema and reaches the object."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from e2e.cluster.cluster import ClusterInfo
from e2e.cluster.kube import KubeClient
from e2e.cluster.s3 import S3Server, upload_directory
from e2e.tests.helpers import ON_AGENT, condition, container_log, ftj_path, make_ftj, pods_of, s3_secret

JSON = dict[str, Any]
EVAL_EVERY, PATIENCE, MAX_STEPS = 3, 2, 150


def codes(count: int, seed: int) -> bytes:
    rng = random.Random(seed)
    records = [
        {
            "prompt": f"Say code {rng.randint(0, 999)}:",
            "completion": " " + " ".join(rng.choice("abcdefghij") for _ in range(12)),
        }
        for _ in range(count)
    ]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def buckets(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    from kubetune_devtools.tiny import save_tiny_model

    client = s3.client()
    for bucket in ("evalmodels", "evaldata", "evalout"):
        client.create_bucket(Bucket=bucket)
    upload_directory(client, save_tiny_model(tmp_path_factory.mktemp("tiny-model")), "evalmodels", "tiny/")
    client.put_object(Bucket="evaldata", Key="codes/train.jsonl", Body=codes(6, seed=1))
    client.put_object(Bucket="evaldata", Key="codes/val.jsonl", Body=codes(8, seed=2))
    return s3


def test_an_overfitting_job_stops_early_and_publishes_its_best_step(
    cluster: ClusterInfo, kube: KubeClient, operator: Any, buckets: S3Server
) -> None:
    ns, name = operator.namespace, "tiny-best"
    kube.apply_yaml(
        f"/api/v1/namespaces/{ns}/secrets", s3_secret(buckets.access_key, buckets.secret_key, "s3-eval")
    )
    manifest = make_ftj(
        name,
        method="Full",
        placement=ON_AGENT,
        s3_endpoint=buckets.endpoint,
        base_model="s3://evalmodels/tiny/",
        output=f"s3://evalout/{name}/",
        hyperparameters={
            "maxSteps": MAX_STEPS,
            "learningRate": 0.003,
            "batchTokens": 512,
            "warmupRatio": 0,
            "scheduler": "Constant",
            "evalEverySteps": EVAL_EVERY,
            "earlyStoppingPatience": PATIENCE,
        },
        extra_spec={
            "dataset": {
                "train": "s3://evaldata/codes/train.jsonl",
                "validation": "s3://evaldata/codes/val.jsonl",
                "maxSeqLength": 64,
            }
        },
    )
    manifest["spec"]["output"]["select"] = "BestEval"
    manifest["spec"]["s3"]["credentialsSecretRef"]["name"] = "s3-eval"
    kube.create(ftj_path(ns), manifest)

    def finished(obj: JSON) -> bool:
        return obj.get("status", {}).get("phase") in ("Succeeded", "Failed")

    try:
        done = kube.wait_for(ftj_path(ns, name), finished, timeout=600, what="the training job to finish")
    finally:
        for pod in pods_of(kube, ns, f"kubetune.io/job-name={name}"):
            print(f"--- trainer log {pod['metadata']['name']} ---")
            print(container_log(cluster, ns, pod["metadata"]["name"], "trainer")[-4000:])
    status = done["status"]
    assert status["phase"] == "Succeeded", (condition(done, "Failed"), status.get("message"))

    metrics, progress, model = status["metrics"], status["progress"], status["model"]
    best_step, stopped = metrics["bestStep"], progress["step"]
    assert stopped == best_step + PATIENCE * EVAL_EVERY < MAX_STEPS
    assert progress["totalSteps"] == MAX_STEPS
    assert 0 < metrics["evalTokenAccuracy"] < 1
    assert metrics["evalLoss"] > metrics["bestEvalLoss"]
    assert model["selected"]["select"] == "BestEval" and model["selected"]["step"] == best_step
    assert model["selected"]["evalLoss"] == pytest.approx(metrics["bestEvalLoss"], rel=1e-4)
    succeeded = condition(done, "Succeeded")
    assert succeeded is not None
    message = succeeded["message"]
    assert f"stopped early after step {stopped} of {MAX_STEPS}" in message
    assert f"holds the weights of step {best_step} (output.select BestEval" in message
    manifest_json = json.loads(
        buckets.client().get_object(Bucket="evalout", Key=f"{name}/manifest.json")["Body"].read()
    )
    assert manifest_json["selected"]["step"] == best_step
