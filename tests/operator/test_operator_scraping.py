"""The scrape loop: which jobs it visits, how it spreads them over the interval, and how it stops."""

from __future__ import annotations

import itertools
import threading
import time

from kubetune_operator.scraping import ScrapeLoop


def test_a_round_visits_each_running_job_once_and_skips_the_rest() -> None:
    visited: list[tuple[str, str]] = []
    loop = ScrapeLoop(0.01, lambda ns, name: visited.append((ns, name)))
    loop.track("ml", "b", True)
    loop.track("ml", "a", True)
    loop.track("ml", "c", True)
    loop.track("ml", "c", False)
    assert loop.run_round() == 2
    assert visited == [("ml", "a"), ("ml", "b")]


def test_one_failing_job_does_not_stop_the_others() -> None:
    visited: list[str] = []

    def scrape(_ns: str, name: str) -> None:
        visited.append(name)
        if name == "a":
            raise RuntimeError("boom")

    loop = ScrapeLoop(0.01, scrape)
    for name in ("a", "b"):
        loop.track("ml", name, True)
    assert loop.run_round() == 2 and visited == ["a", "b"]


def test_jobs_are_spread_over_the_interval() -> None:
    times: list[float] = []
    loop = ScrapeLoop(0.4, lambda _ns, _name: times.append(time.monotonic()))
    for name in ("a", "b", "c", "d"):
        loop.track("ml", name, True)
    started = time.monotonic()
    loop.run_round()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.08 for gap in gaps), gaps
    assert time.monotonic() - started >= 0.38


def test_the_thread_scrapes_every_interval_and_stops() -> None:
    seen = threading.Event()
    count = 0

    def scrape(_ns: str, _name: str) -> None:
        nonlocal count
        count += 1
        if count >= 3:
            seen.set()

    loop = ScrapeLoop(0.02, scrape)
    loop.track("ml", "a", True)
    loop.start()
    try:
        assert seen.wait(5)
    finally:
        loop.stop()
    after = count
    time.sleep(0.1)
    assert count == after
