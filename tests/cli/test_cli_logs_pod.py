"""Which pod `kubectl finetune logs` reads: the validation pod only until a trainer pod exists."""

from __future__ import annotations

from typing import Any

from kubetune_cli.logs import trainer_pod


class Pods:
    """A Kubectl stand-in that lists the given pods."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self._pods = pods

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self._pods


def pod(name: str, component: str, created: str) -> dict[str, Any]:
    labels = {"kubetune.io/job-name": "a", "app.kubernetes.io/component": component}
    return {"metadata": {"name": name, "namespace": "ml", "labels": labels, "creationTimestamp": created}}


JOB = {"metadata": {"name": "a", "namespace": "ml"}, "spec": {"resources": {"gpus": 1}}, "status": {}}


def test_the_validation_pods_log_until_a_trainer_pod_exists() -> None:
    validator = pod("a-validate-x", "validator", "2026-01-01T12:00:00Z")
    assert trainer_pod(Pods([validator]), JOB, None)["metadata"]["name"] == "a-validate-x"  # type: ignore[arg-type]
    trainer = pod("a-trainer-y", "trainer", "2026-01-01T11:59:00Z")  # even one listed as older
    assert trainer_pod(Pods([validator, trainer]), JOB, None)["metadata"]["name"] == "a-trainer-y"  # type: ignore[arg-type]
