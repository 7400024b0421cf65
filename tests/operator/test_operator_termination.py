"""Which trainer pods may let go of their result (the result finalizer), pass by pass."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import failure_summary, make_pod, success_summary, terminated

from kubetune_operator.termination import redact, releasable_pods
from kubetune_trainer import contract

Obj = dict[str, Any]
HELD = "kubetune.io/result"


def held(pod: Obj, *, deleted: bool = False) -> Obj:
    pod["metadata"]["finalizers"] = [HELD, "batch.kubernetes.io/job-tracking"]
    if deleted:
        pod["metadata"]["deletionTimestamp"] = "2025-06-01T12:00:00Z"
    return pod


def pod1(phase: str, **kwargs: Any) -> Obj:
    return make_pod(name="p1", phase=phase, **kwargs)


def names(pods: list[Obj]) -> list[str]:
    return sorted(p["metadata"]["name"] for p in pods)


CRASHED = terminated(1, "Traceback ...")
INVALID = terminated(2, failure_summary("InvalidDataset", "line 3: not JSON"))
STOPPED = terminated(143, failure_summary(contract.TrainerReason.INTERRUPTED, "checkpoint at step 40"))
DONE = terminated(0, success_summary())


@pytest.mark.parametrize(
    ("pods", "finished", "released"),
    [
        pytest.param([held(pod1("Succeeded", terminated=DONE))], False, [], id="kept"),
        pytest.param([held(pod1("Succeeded", terminated=DONE))], True, ["p1"], id="done"),
        pytest.param([held(pod1("Failed", terminated=INVALID))], False, [], id="decides"),
        pytest.param(
            [
                held(pod1("Failed", terminated=CRASHED, created=1)),
                held(make_pod(name="p2", phase="Running", running_since="2025-06-01T11:00:00Z", created=5)),
            ],
            False,
            ["p1"],
            id="superseded",
        ),
        pytest.param(
            [held(pod1("Failed", terminated=STOPPED), deleted=True)],
            False,
            ["p1"],
            id="stopped",
        ),
        pytest.param([held(pod1("Failed", disrupted=True))], False, ["p1"], id="evicted"),
        pytest.param([held(pod1("Pending"), deleted=True)], False, ["p1"], id="unstarted"),
        pytest.param(
            [held(pod1("Running", running_since="2025-06-01T11:00:00Z"), deleted=True)],
            False,
            [],
            id="still stopping",
        ),
        pytest.param([pod1("Succeeded", terminated=DONE)], True, [], id="not held"),
    ],
)
def test_releasable_pods(pods: list[Obj], finished: bool, released: list[str]) -> None:
    assert names(releasable_pods(tuple(pods), finished=finished)) == released


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("AWS_SECRET_ACCESS_KEY=abc123def", "abc123def"),
        ('{"password": "hunter2"}', "hunter2"),
        ("api_key: sk-live-123456", "sk-live-123456"),
        ("using AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9"),
        ("endpoint https://user:pa55@s3.example.com/b", "pa55"),
    ],
)
def test_credentials_are_redacted(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "<redacted>" in redact(text)


def test_ordinary_log_lines_are_left_alone() -> None:
    line = "step 40 loss=1.234 lr=0.0002 tokens_per_second=5123 key_count=3"
    assert redact(line) == line
