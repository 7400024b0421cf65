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
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubernetes.client.exceptions import ApiException

from kubetune_operator.models import JobKey
from kubetune_operator.observed import Obj

Work = Callable[[JobKey, list[Obj]], None]
"""Reconcile one FineTuneJob, given the finished pods that arrived with its events."""


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
        except (ApiException, OSError) as exc:
            self._logger.warning(
                "reconciling %s/%s failed: %s; again in %ss", key[0], key[1], exc, self._retry_delay
            )
            self._retry(key, pods)
        except Exception:  # a bug: retrying would fail the same way
            self._logger.exception("reconciling %s/%s failed", key[0], key[1])
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _retry(self, key: JobKey, pods: list[Obj]) -> None:
        def again() -> None:
            self.add(key)
            for pod in pods:
                self.add(key, pod)

        timer = threading.Timer(self._retry_delay, again)
        timer.daemon = True
        timer.start()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no pass is waiting or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def close(self) -> None:
        with self._idle:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
