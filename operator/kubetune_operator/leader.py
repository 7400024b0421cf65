"""Leader election over a coordination.k8s.io Lease: with several operator replicas, exactly one works.

kopf's peering cannot do this on its own: every replica of a Deployment starts with the same priority, and
kopf pauses all operators of equal priority, so nothing reconciles; and the scrape loop and the work queue
run outside what kopf pauses. So the operator elects its active replica the way kube-controller-manager does,
before kopf starts: a replica that does not hold the Lease waits on standby (answering /healthz, watching
nothing, writing nothing); the one that holds it runs kopf, the work queue and the scrape loop.

- A standby reads the Lease every ``retry_seconds``. It takes the Lease once the record has not changed for
  the Lease's ``leaseDurationSeconds`` by its own clock (the replicas' clocks need not agree), or at once
  when the holder released it. The take is an update carrying the resourceVersion it read, so of two
  standbys racing for it one wins and the other gets 409.
- The leader renews every ``retry_seconds``. When it has not renewed for ``renew_deadline_seconds`` (less
  than the Lease duration, so it gives up before anyone may take over), it has lost the Lease: ``on_lost``
  stops its work and the process exits, to start again as a standby.
- On a clean shutdown the leader releases the Lease, so a rolling update hands over at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from kubernetes.client.exceptions import ApiException

from kubetune_operator.observed import Obj

DEFAULT_LEASE_DURATION_SECONDS = 15
DEFAULT_RENEW_DEADLINE_SECONDS = 10.0
DEFAULT_RETRY_SECONDS = 2.0
LOGGER = logging.getLogger("kubetune_operator.leader")


class LeaseIO(Protocol):
    def get_lease(self, namespace: str, name: str) -> Obj | None: ...
    def create_lease(self, namespace: str, lease: Obj) -> bool:
        """Create the Lease; False when one exists already (409)."""
        ...

    def update_lease(self, namespace: str, name: str, lease: Obj) -> bool:
        """Replace the Lease at the resourceVersion it carries; False when it changed meanwhile (409)."""
        ...


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    """holderIdentity; empty when nobody holds the Lease (never taken, or released)."""
    duration_seconds: int
    renew_time: str
    transitions: int
    resource_version: str


def parse_lease(lease: Obj, default_duration: int = DEFAULT_LEASE_DURATION_SECONDS) -> LeaseRecord:
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    transitions = spec.get("leaseTransitions")
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_seconds=duration if isinstance(duration, int) and duration > 0 else default_duration,
        renew_time=str(spec.get("renewTime") or ""),
        transitions=transitions if isinstance(transitions, int) and transitions >= 0 else 0,
        resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
    )


def default_identity() -> str:
    """This replica's name in the Lease: the pod name (or host name) and a per-process suffix, so a
    restarted process never mistakes its predecessor's record for its own."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        io: LeaseIO,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_seconds: int = DEFAULT_LEASE_DURATION_SECONDS,
        renew_deadline_seconds: float = DEFAULT_RENEW_DEADLINE_SECONDS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not retry_seconds < renew_deadline_seconds < lease_duration_seconds:
            raise ValueError(
                f"leader election needs retry ({retry_seconds}s) < renew deadline "
                f"({renew_deadline_seconds}s) < lease duration ({lease_duration_seconds}s)"
            )
        self.io, self.namespace, self.name, self.identity = io, namespace, name, identity
        self.lease_duration_seconds = lease_duration_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self.retry_seconds = retry_seconds
        self._clock, self._wall_clock = clock, wall_clock
        self._seen: tuple[str, str, str] | None = None
        """(holder, renewTime, resourceVersion) of the record last read, and when it was first seen."""
        self._seen_at = 0.0
        self._leading = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        return self._leading.is_set()

    # --- one step ---------------------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Read the Lease and take or renew it if this replica may; True while this replica holds it."""
        now = self._clock()
        lease = self.io.get_lease(self.namespace, self.name)
        if lease is None:
            taken = self.io.create_lease(self.namespace, self._lease_body(None, None))
            return self._note(taken)
        record = parse_lease(lease, self.lease_duration_seconds)
        key = (record.holder, record.renew_time, record.resource_version)
        if key != self._seen:
            self._seen, self._seen_at = key, now
        mine = record.holder == self.identity
        if not mine and record.holder and now - self._seen_at < record.duration_seconds:
            return self._note(False)
        return self._note(self.io.update_lease(self.namespace, self.name, self._lease_body(lease, record)))

    def _note(self, holding: bool) -> bool:
        if holding:
            self._leading.set()
        else:
            self._leading.clear()
        return holding

    def _lease_body(self, lease: Obj | None, record: LeaseRecord | None) -> Obj:
        now = _micro_time(self._wall_clock())
        metadata: Obj = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            metadata = {**(lease.get("metadata") or {}), **metadata}
        spec: Obj = dict((lease or {}).get("spec") or {})
        taking = record is None or record.holder != self.identity
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self.lease_duration_seconds,
            renewTime=now,
        )
        if taking:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = record.transitions + 1 if record is not None else 0
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    # --- the loops --------------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Wait on standby until this replica holds the Lease (True) or ``stop()`` was called (False)."""
        logged_holder = None
        while not self._stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    LOGGER.info("took the leader Lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return True
                holder = self._seen[0] if self._seen else None
                if holder != logged_holder:
                    LOGGER.info(
                        "on standby: the leader Lease %s/%s is held by %s", self.namespace, self.name, holder
                    )
                    logged_holder = holder
            except (ApiException, OSError) as exc:
                LOGGER.warning("reading the leader Lease %s/%s failed: %s", self.namespace, self.name, exc)
            self._stop.wait(self.retry_seconds)
        return False

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew the Lease from a background thread; call ``on_lost(why)`` once it is lost."""

        def renew() -> None:
            renewed = self._clock()
            while not self._stop.wait(self.retry_seconds):
                why = ""
                try:
                    if self.try_acquire_or_renew():
                        renewed = self._clock()
                        continue
                    why = f"the Lease is held by {self._seen[0] if self._seen else 'another replica'}"
                except (ApiException, OSError) as exc:
                    why = f"renewing it failed: {exc}"
                taken_over = self._seen is not None and self._seen[0] not in ("", self.identity)
                if taken_over or self._clock() - renewed >= self.renew_deadline_seconds:
                    self._leading.clear()
                    on_lost(f"lost the leader Lease {self.namespace}/{self.name}: {why}")
                    return

        self._thread = threading.Thread(target=renew, name="kubetune-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.retry_seconds + 5)

    def release(self) -> None:
        """Stop renewing and, if this replica holds the Lease, hand it back so a standby takes it at once."""
        self.stop()
        if not self._leading.is_set():
            return
        self._leading.clear()
        try:
            lease = self.io.get_lease(self.namespace, self.name)
            if lease is None or parse_lease(lease).holder != self.identity:
                return
            spec = {**(lease.get("spec") or {}), "holderIdentity": None, "leaseDurationSeconds": 1}
            self.io.update_lease(self.namespace, self.name, {**lease, "spec": spec})
        except (ApiException, OSError) as exc:  # the Lease expires on its own
            LOGGER.warning("releasing the leader Lease %s/%s failed: %s", self.namespace, self.name, exc)
