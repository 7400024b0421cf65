"""One background loop that reads every running trainer's metrics into its FineTuneJob's status.

Why not a kopf timer per FineTuneJob: a timer makes kopf put a finalizer on every running FineTuneJob (two
extra writes per job, and a FineTuneJob cannot be deleted while the operator is down), keeps a task per job,
and runs its handler on the same thread pool as the event handlers, so a thousand running jobs scraped every
ten seconds starve the creation of new ones. This loop keeps a set of running jobs (fed by every reconcile
pass) and walks it from one thread, spreading the jobs over the interval; when there are more jobs than one
thread can scrape in an interval, a round simply takes longer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kubetune_operator.models import JobKey


class ScrapeLoop:
    def __init__(
        self,
        interval_seconds: float,
        scrape: Callable[[str, str], None],
        logger: logging.Logger | None = None,
    ) -> None:
        self.interval_seconds = interval_seconds
        self._scrape = scrape
        self._logger = logger or logging.getLogger("kubetune_operator.scraping")
        self._lock = threading.Lock()
        self._running: set[JobKey] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, namespace: str, name: str, running: bool) -> None:
        """Take in the phase a reconcile pass just computed: scrape this job while it is Running."""
        with self._lock:
            if running:
                self._running.add((namespace, name))
            else:
                self._running.discard((namespace, name))

    def running(self) -> list[JobKey]:
        with self._lock:
            return sorted(self._running)

    def run_round(self) -> int:
        """Scrape each running job once, spread over the interval; returns how many were scraped."""
        keys = self.running()
        if not keys:
            return 0
        spacing = self.interval_seconds / len(keys)
        done = 0
        for namespace, name in keys:
            if self._stop.is_set():
                break
            started = time.monotonic()
            with self._lock:
                still_running = (namespace, name) in self._running
            if still_running:
                try:
                    self._scrape(namespace, name)
                except Exception:  # one job's failure must not stop the others' progress
                    self._logger.exception("scraping FineTuneJob %s/%s failed", namespace, name)
                done += 1
            self._stop.wait(max(0.0, spacing - (time.monotonic() - started)))
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.run_round()
            # An empty or quick round waits out the rest of the interval; a slow one starts the next at once.
            self._stop.wait(max(0.0, self.interval_seconds - (time.monotonic() - started)))

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="kubetune-scrape", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
