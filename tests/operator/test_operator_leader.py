"""Leader election among operator replicas: one holds the Lease, the others wait, and a standby takes over
only once the holder stopped renewing for the Lease's duration, judged by the standby's own clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from lease_store import LeaseStore

from kubetune_operator.leader import LeaderElector, parse_lease
from kubetune_operator.observed import Obj

NS, NAME = "kubetune-system", "kubetune"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(store: LeaseStore, identity: str, clock: Clock, **kwargs: float) -> LeaderElector:
    # A wall clock far off the monotonic one: expiry must not depend on the record's timestamps.
    skewed = lambda: datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=clock.now)  # noqa: E731
    return LeaderElector(store, NS, NAME, identity, clock=clock, wall_clock=skewed, **kwargs)  # type: ignore[arg-type]


def test_the_first_replica_leads_and_the_second_waits_while_it_renews() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert a.try_acquire_or_renew() and a.is_leader()
    for _ in range(20):  # 40 s of renewals every 2 s: b never takes it
        assert b.try_acquire_or_renew() is False and not b.is_leader()
        clock.now += 2
        assert a.try_acquire_or_renew()
    lease = parse_lease(store.leases[(NS, NAME)])
    assert (lease.holder, lease.duration_seconds, lease.transitions) == ("a", 15, 0)


def test_a_standby_takes_over_once_the_leader_stopped_renewing_for_the_lease_duration() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert a.try_acquire_or_renew()
    assert b.try_acquire_or_renew() is False  # b first sees the record now
    clock.now += 14
    assert b.try_acquire_or_renew() is False
    clock.now += 1
    assert b.try_acquire_or_renew() and store.holder(NS, NAME) == "b"
    assert parse_lease(store.leases[(NS, NAME)]).transitions == 1
    assert a.try_acquire_or_renew() is False and not a.is_leader()  # the old leader sees it lost


class ReadThenInterleave(LeaseStore):
    """A view of ``store`` whose reads are followed by ``between()``: another replica writing in between."""

    def __init__(self, store: LeaseStore, between: Callable[[], object]) -> None:
        self.store, self.between, self.unreachable = store, between, False

    def get_lease(self, namespace: str, name: str) -> Obj | None:
        lease = self.store.get_lease(namespace, name)
        self.between()
        return lease

    def update_lease(self, namespace: str, name: str, lease: Obj) -> bool:
        return self.store.update_lease(namespace, name, lease)


def test_of_two_standbys_racing_for_an_expired_lease_one_wins() -> None:
    store, clock = LeaseStore(), Clock()
    assert elector(store, "a", clock).try_acquire_or_renew()
    b = elector(store, "b", clock)
    c = elector(ReadThenInterleave(store, b.try_acquire_or_renew), "c", clock)
    assert not c.try_acquire_or_renew()  # b sees the record for the first time here as well
    clock.now += 15
    assert c.try_acquire_or_renew() is False  # b took it between c's read and c's write
    assert store.holder(NS, NAME) == "b" and b.is_leader() and not c.is_leader()


def test_a_released_lease_is_taken_at_once() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    a.release()
    assert store.holder(NS, NAME) is None and not a.is_leader()
    assert b.try_acquire_or_renew() and store.holder(NS, NAME) == "b"


def test_a_leader_that_cannot_renew_gives_up_before_the_lease_expires() -> None:
    store = LeaseStore()
    a = LeaderElector(
        store, NS, NAME, "a", lease_duration_seconds=2, renew_deadline_seconds=0.5, retry_seconds=0.05
    )
    assert a.acquire()
    lost: list[str] = []
    done = threading.Event()
    a.keep(lambda why: (lost.append(why), done.set()))
    assert not done.wait(0.3)  # renewing fine
    store.unreachable = True
    assert done.wait(3)
    assert not a.is_leader() and "renewing it failed: connection refused" in lost[0]
    a.stop()


def test_timings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(LeaseStore(), NS, NAME, "a", lease_duration_seconds=10, renew_deadline_seconds=10)
