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


def test_scrapes_run_in_parallel_up_to_the_bound() -> None:
    """Eight jobs whose scrape each takes 0.3 s, three at a time: no more than three ever run together,
    and the round ends in about three scrape times, not eight."""
    guard = threading.Lock()
    in_flight = 0
    most = 0

    def scrape(_ns: str, _name: str) -> None:
        nonlocal in_flight, most
        with guard:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.3)
        with guard:
            in_flight -= 1

    loop = ScrapeLoop(0.01, scrape, concurrency=3)
    for index in range(8):
        loop.track("ml", f"job-{index}", True)
    started = time.monotonic()
    try:
        assert loop.run_round() == 8
    finally:
        loop.stop()
    assert most == 3
    assert time.monotonic() - started < 8 * 0.3 / 2


def test_a_hung_scrape_does_not_hold_up_the_others() -> None:
    release = threading.Event()
    visited: list[str] = []

    def scrape(_ns: str, name: str) -> None:
        if name == "a":
            release.wait(5)  # a pod that answers slowly
        visited.append(name)

    loop = ScrapeLoop(0.01, scrape, concurrency=2)
    for name in ("a", "b", "c"):
        loop.track("ml", name, True)
    round_done = threading.Thread(target=loop.run_round)
    round_done.start()
    try:
        deadline = time.monotonic() + 3
        while visited != ["b", "c"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert visited == ["b", "c"]
    finally:
        release.set()
        round_done.join(5)
        loop.stop()
    assert visited == ["b", "c", "a"]


def test_each_round_reports_its_duration() -> None:
    durations: list[float] = []
    loop = ScrapeLoop(0.2, lambda _ns, _name: time.sleep(0.05), on_round=durations.append)
    assert loop.run_round() == 0 and durations == []  # nothing running: no round to report
    loop.track("ml", "a", True)
    loop.track("ml", "b", True)
    try:
        loop.run_round()
    finally:
        loop.stop()
    assert len(durations) == 1 and 0.2 <= durations[0] < 1.0
