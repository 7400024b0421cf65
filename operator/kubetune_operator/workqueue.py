"""Reconcile requests from child events: one entry per FineTuneJob, deduplicated while it waits.

A trainer Job and its pod produce half a dozen watch events on the way to Running (created, scheduled,
started, ready, ...), and every one of them means the same thing: reconcile the FineTuneJob that owns
them. The child-event handlers only add the owner's key here and return, so kopf's per-object queues drain
at once instead of holding every event body until a thread is free; a few threads reconcile each waiting
key once, reading the cluster after the latest event that asked for it. A pass that fails on the API is
tried again after a delay.

Passes that may end a job (a trainer pod or Job that finished) go first: when a thousand trainer pods start
at once, the backlog of "pod is running" passes would otherwise hold a completed job's Succeeded for
seconds. Every submitted task takes the most urgent waiting key, not the key it was submitted for, so the
executor's FIFO order does not decide it.

Delayed passes (a failed pass's retry, with exponential backoff per key; a pass the reconcile asked for at a
later time) wait in one heap served by one timer thread, however many are pending.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubernetes.client.exceptions import ApiException

from kubetune_operator.models import JobKey
from kubetune_operator.observed import Obj

Work = Callable[[JobKey, list[Obj]], None]
"""Reconcile one FineTuneJob, given the finished pods that arrived with its events."""

MAX_RETRY_DELAY_SECONDS = 300.0
"""The longest wait between retries of a key whose passes keep failing."""


def backoff_seconds(base: float, failures: int) -> float:
    """The wait before retrying after ``failures`` failures in a row: base, 2x, 4x ... up to the cap."""
    return float(min(MAX_RETRY_DELAY_SECONDS, base * 2 ** max(0, failures - 1)))


class _Timers:
    """Calls ``fire(key, pods)`` for each entry once its time has come: one thread for all of them."""

    def __init__(self, fire: Callable[[JobKey, list[Obj]], None]) -> None:
        self._fire = fire
        self._heap: list[tuple[float, int, JobKey, list[Obj]]] = []
        self._due: dict[JobKey, float] = {}
        """The earliest pending plain pass (no pods) per key: a later one for the same key adds nothing."""
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def pending(self) -> int:
        with self._wake:
            return len(self._heap)

    def after(self, delay: float, key: JobKey, pods: list[Obj]) -> None:
        due = time.monotonic() + max(0.0, delay)
        with self._wake:
            if self._closed:
                return
            if not pods:
                if self._due.get(key, float("inf")) <= due:
                    return
                self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key, pods))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kubetune-requeue", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                due, _, key, pods = heapq.heappop(self._heap)
                if not pods and self._due.get(key) == due:
                    del self._due[key]
            self._fire(key, pods)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._heap.clear()
            self._due.clear()
            self._wake.notify()


class WorkQueue:
    def __init__(
        self,
        work: Work,
        *,
        threads: int,
        retry_delay_seconds: float,
        logger: logging.Logger | None = None,
    ) -> None:
        self._work = work
        self._retry_delay = retry_delay_seconds
        self._logger = logger or logging.getLogger("kubetune_operator.workqueue")
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kubetune-reconcile")
        self._idle = threading.Condition()
        self._waiting: dict[JobKey, dict[str, Obj]] = {}
        # Waiting keys in the order they are taken: urgent first. A key may also sit, stale, in the other
        # deque or further back; an entry whose key is no longer waiting is skipped.
        self._urgent: deque[JobKey] = deque()
        self._normal: deque[JobKey] = deque()
        self._busy = 0
        self._closed = False
        self._failures: dict[JobKey, int] = {}
        self._timers = _Timers(self._add_with_pods)

    def add(self, key: JobKey, finished_pod: Obj | None = None, *, urgent: bool = False) -> None:
        """Ask for a pass over ``key``; ``finished_pod`` is an ended pod the pass must see even if it is gone
        from the API by then (its last state arrived only in the watch event). ``urgent`` passes (and any
        pass with a finished pod) are taken before the others."""
        urgent = urgent or finished_pod is not None
        with self._idle:
            if self._closed:
                return
            queued = key in self._waiting
            pods = self._waiting.setdefault(key, {})
            if finished_pod is not None:
                uid = str((finished_pod.get("metadata") or {}).get("uid") or "")
                pods[uid] = finished_pod
            if urgent:
                self._urgent.append(key)
            elif not queued:
                self._normal.append(key)
            if queued:
                return
            self._busy += 1
        self._executor.submit(self._run)

    def add_after(self, key: JobKey, delay_seconds: float) -> None:
        """Ask for a pass over ``key`` once ``delay_seconds`` have passed."""
        self._timers.after(delay_seconds, key, [])

    def delayed(self) -> int:
        """Passes waiting for their time (retries and requested rechecks)."""
        return self._timers.pending()

    def _add_with_pods(self, key: JobKey, pods: list[Obj]) -> None:
        self.add(key)
        for pod in pods:
            self.add(key, pod)

    def depth(self) -> int:
        """FineTuneJobs waiting for a pass (not counting the passes running now)."""
        with self._idle:
            return len(self._waiting)

    def _take(self) -> tuple[JobKey, list[Obj]]:
        """The most urgent waiting key and its pods; there is one waiting key per submitted task."""
        with self._idle:
            for lane in (self._urgent, self._normal):
                while lane:
                    key = lane.popleft()
                    if key in self._waiting:
                        return key, list(self._waiting.pop(key).values())
        raise RuntimeError("work queue: a task found no waiting key")

    def _run(self) -> None:
        try:
            key, pods = self._take()
        except RuntimeError:
            self._logger.exception("work queue out of step")
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()
            return
        try:
            self._work(key, pods)
            with self._idle:
                self._failures.pop(key, None)
        except (ApiException, OSError) as exc:
            with self._idle:
                failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = backoff_seconds(self._retry_delay, failures)
            self._logger.warning("reconciling %s/%s failed: %s; again in %ss", key[0], key[1], exc, delay)
            self._timers.after(delay, key, pods)
        except Exception:  # a bug: retrying would fail the same way
            self._logger.exception("reconciling %s/%s failed", key[0], key[1])
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no pass is waiting or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def close(self) -> None:
        with self._idle:
            self._closed = True
        self._timers.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
