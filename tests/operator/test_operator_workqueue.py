"""The queue of passes requested by child events: one pass per waiting job, finished pods carried along,
API failures tried again."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune_operator.models import JobKey
from kubetune_operator.observed import Obj
from kubetune_operator.workqueue import WorkQueue


def pod(uid: str) -> Obj:
    return {"metadata": {"uid": uid, "name": f"p-{uid}"}, "status": {"phase": "Failed"}}


def test_requests_for_a_waiting_job_share_one_pass_and_its_pods() -> None:
    gate = threading.Event()
    passes: list[tuple[JobKey, list[str]]] = []

    def work(key: JobKey, pods: list[Obj]) -> None:
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


def test_an_api_failure_is_tried_again_with_its_pods(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[Obj]] = []
    done = threading.Event()

    def work(_key: JobKey, pods: list[Obj]) -> None:
        calls.append(pods)
        if len(calls) == 1:
            raise ApiException(status=500, reason="etcdserver: request timed out")
        done.set()

    queue = WorkQueue(work, threads=1, retry_delay_seconds=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="kubetune_operator.workqueue"):
            queue.add(("ml", "a"), pod("1"))
            assert done.wait(5)
        assert [p["metadata"]["uid"] for p in calls[1]] == ["1"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "etcdserver: request timed out" in warnings[0], warnings
    finally:
        queue.close()


def test_a_bug_is_reported_and_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[JobKey] = []

    def work(key: JobKey, _pods: list[Obj]) -> None:
        calls.append(key)
        raise KeyError("status")

    queue = WorkQueue(work, threads=1, retry_delay_seconds=0.01)
    try:
        with caplog.at_level(logging.ERROR, logger="kubetune_operator.workqueue"):
            queue.add(("ml", "a"))
            assert queue.drain()
            threading.Event().wait(0.1)
        assert calls == [("ml", "a")]
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.exc_info is not None and record.exc_info[0] is KeyError
    finally:
        queue.close()


def test_passes_that_may_end_a_job_go_before_the_backlog() -> None:
    gate = threading.Event()
    order: list[str] = []

    def work(key: JobKey, _pods: list[Obj]) -> None:
        if key == ("ml", "blocker"):
            gate.wait(5)
        order.append(key[1])

    queue = WorkQueue(work, threads=1, retry_delay_seconds=60)
    try:
        queue.add(("ml", "blocker"))  # occupies the only thread
        for name in ("a", "b", "c"):
            queue.add(("ml", name))  # e.g. "trainer pod is running"
        queue.add(("ml", "c"), urgent=True)  # its trainer Job completed: jumps the queue, one pass only
        queue.add(("ml", "d"), pod("9"))  # a finished pod is urgent too
        gate.set()
        assert queue.drain()
        assert order == ["blocker", "c", "d", "a", "b"]
    finally:
        queue.close()


def test_depth_counts_the_jobs_waiting_for_a_pass() -> None:
    gate = threading.Event()
    queue = WorkQueue(lambda _key, _pods: gate.wait(5), threads=1, retry_delay_seconds=60)
    try:
        assert queue.depth() == 0
        queue.add(("ml", "running"))  # taken by the one thread, which then blocks
        deadline = time.monotonic() + 5
        while queue.depth() and time.monotonic() < deadline:  # until the thread has taken it
            time.sleep(0.01)
        for name in ("a", "b", "a"):
            queue.add(("ml", name))
        assert queue.depth() == 2
        gate.set()
        assert queue.drain()
        assert queue.depth() == 0
    finally:
        queue.close()


def test_a_pass_asked_for_later_comes_once_at_its_time() -> None:
    passes: list[tuple[JobKey, float]] = []
    start = time.monotonic()
    queue = WorkQueue(lambda key, _pods: passes.append((key, time.monotonic() - start)), threads=1,
                      retry_delay_seconds=60)  # fmt: skip
    try:
        for _ in range(50):  # every pass of a waiting job asks again: one recheck, not fifty
            queue.add_after(("ml", "a"), 0.3)
        queue.add_after(("ml", "b"), 0.1)
        assert queue.delayed() == 2
        deadline = time.monotonic() + 5
        while len(passes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert [key for key, _ in passes] == [("ml", "b"), ("ml", "a")]
        assert passes[1][1] >= 0.3
        assert queue.delayed() == 0
    finally:
        queue.close()


def test_failing_keys_back_off_exponentially_on_one_timer_thread(caplog: pytest.LogCaptureFixture) -> None:
    attempts: dict[JobKey, list[float]] = {}
    start = time.monotonic()

    def work(key: JobKey, _pods: list[Obj]) -> None:
        attempts.setdefault(key, []).append(time.monotonic() - start)
        raise ApiException(status=503, reason="unavailable")

    queue = WorkQueue(work, threads=2, retry_delay_seconds=0.05)
    threads_before = threading.active_count()
    try:
        with caplog.at_level(logging.WARNING, logger="kubetune_operator.workqueue"):
            for i in range(40):
                queue.add(("ml", f"j{i}"))
            time.sleep(0.2)
            # 40 keys wait for a retry; one timer thread holds them all (plus the executor's 2 workers).
            assert threading.active_count() <= threads_before + 3
            time.sleep(1.0)
        times = attempts[("ml", "j0")]
        # 0.05 s, 0.1 s, 0.2 s, 0.4 s ...: at most 6 attempts in 1.2 s; a fixed delay would make about 24.
        assert 3 <= len(times) <= 6, times
        delays = [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if "ml/j0 " in r.getMessage()]
        assert delays[:3] == ["0.05s", "0.1s", "0.2s"], delays
    finally:
        queue.close()
