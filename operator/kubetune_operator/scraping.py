"""One background loop that reads every running trainer's metrics into its FineTuneJob's status.

Why not a kopf timer per FineTuneJob: a timer makes kopf put a finalizer on every running FineTuneJob (two
extra writes per job, and a FineTuneJob cannot be deleted while the operator is down), keeps a task per job,
and runs its handler on the same thread pool as the event handlers, so a thousand running jobs scraped every
ten seconds starve the creation of new ones. This loop keeps a set of running jobs (fed by every reconcile
pass) and walks it from one thread, spreading the jobs over the interval, and hands each scrape to a small
pool of its own: at most ``concurrency`` run at once, so one pod that answers slowly (each read has a
deadline, see scrape_http) delays no one else, and a thousand pods never mean a thousand open connections.
When there are more jobs than the pool can scrape in an interval, a round simply takes longer; ``on_round``
reports each round's duration, so that shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from kubetune_operator.config import DEFAULT_SCRAPE_CONCURRENCY
from kubetune_operator.models import JobKey


class ScrapeLoop:
    def __init__(
        self,
        interval_seconds: float,
        scrape: Callable[[str, str], None],
        *,
        concurrency: int = DEFAULT_SCRAPE_CONCURRENCY,
        on_round: Callable[[float], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"scrape concurrency must be at least 1, not {concurrency}")
        self.interval_seconds = interval_seconds
        self._scrape = scrape
        self._on_round = on_round
        self._logger = logger or logging.getLogger("kubetune_operator.scraping")
        self._lock = threading.Lock()
        self._running: set[JobKey] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None

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
        """Scrape each running job once, starting them spread over the interval, and wait for the round's
        scrapes to end; returns how many were scraped."""
        keys = self.running()
        if not keys:
            return 0
        started = time.monotonic()
        spacing = self.interval_seconds / len(keys)
        scrapes: list[Future[bool]] = []
        pool = self._executor()
        for key in keys:
            if self._stop.is_set():
                break
            slot_started = time.monotonic()
            try:
                scrapes.append(pool.submit(self._scrape_one, key))
            except RuntimeError:  # stop() shut the pool down under this round
                break
            self._stop.wait(max(0.0, spacing - (time.monotonic() - slot_started)))
        wait(scrapes)
        if self._on_round is not None:
            self._on_round(time.monotonic() - started)
        return sum(1 for scrape in scrapes if not scrape.cancelled() and scrape.result())

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="kubetune-scrape")
            return self._pool

    def _scrape_one(self, key: JobKey) -> bool:
        namespace, name = key
        with self._lock:
            if key not in self._running:  # finished or deleted since the round began
                return False
        try:
            self._scrape(namespace, name)
        except Exception:  # one job's failure must not stop the others' progress
            self._logger.exception("scraping FineTuneJob %s/%s failed", namespace, name)
        return True

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
        """Stop starting scrapes; the ones under way end within their deadline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
