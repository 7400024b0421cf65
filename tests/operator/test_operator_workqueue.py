"""The queue of passes requested by child events: one pass per waiting job, finished pods carried along,
API failures tried again."""

from __future__ import annotations

import threading
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune_operator.workqueue import Key, WorkQueue

Obj = dict[str, Any]


def pod(uid: str) -> Obj:
    return {"metadata": {"uid": uid, "name": f"p-{uid}"}, "status": {"phase": "Failed"}}


def test_requests_for_a_waiting_job_share_one_pass_and_its_pods() -> None:
    gate = threading.Event()
    passes: list[tuple[Key, list[str]]] = []

    def work(key: Key, pods: list[Obj]) -> None:
        if key == ("ml", "blocker"):
            gate.wait(5)
        passes.append((key, sorted(p["metadata"]["uid"] for p in pods)))

    queue = WorkQueue(work, threads=1, retry_delay_seconds=60)
    try:
        queue.add(("ml", "blocker"))  # occupies the only thread
        queue.add(("ml", "a"))
        queue.add(("ml", "a"), pod("1"))
        queue.add(("ml", "a"), pod("2"))
        queue.add(("ml", "b"))
        gate.set()
        assert queue.drain()
        assert passes == [(("ml", "blocker"), []), (("ml", "a"), ["1", "2"]), (("ml", "b"), [])]
        queue.add(("ml", "a"))  # nothing waits for "a" any more: a new pass
        assert queue.drain()
        assert passes[-1] == (("ml", "a"), [])
    finally:
        queue.close()


def test_an_api_failure_is_tried_again_with_its_pods() -> None:
    calls: list[list[Obj]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def work(_key: Key, pods: list[Obj]) -> None:
        calls.append(pods)
        if len(calls) == 1:
            raise ApiException(status=500, reason="etcdserver: request timed out")
        done.set()

    queue = WorkQueue(work, threads=1, retry_delay_seconds=0.05, on_error=errors.append)
    try:
        queue.add(("ml", "a"), pod("1"))
        assert done.wait(5)
        assert [p["metadata"]["uid"] for p in calls[1]] == ["1"]
        assert [type(e).__name__ for e in errors] == ["ApiException"]
    finally:
        queue.close()


def test_a_bug_is_reported_and_not_retried() -> None:
    calls: list[Key] = []
    errors: list[BaseException] = []

    def work(key: Key, _pods: list[Obj]) -> None:
        calls.append(key)
        raise KeyError("status")

    queue = WorkQueue(work, threads=1, retry_delay_seconds=0.01, on_error=errors.append)
    try:
        queue.add(("ml", "a"))
        assert queue.drain()
        threading.Event().wait(0.1)
        assert calls == [("ml", "a")] and isinstance(errors[0], KeyError)
    finally:
        queue.close()
