"""Leases kept in memory with the API server's optimistic concurrency: a write that carries a stale
resourceVersion, or creates an existing Lease, is refused as the server would (409), so two electors race
the way they do on a cluster."""

from __future__ import annotations

import copy
import itertools

from kubetune_operator.observed import Obj


class LeaseStore:
    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], Obj] = {}
        self.unreachable = False
        """When True every call raises OSError, as when the API server cannot be reached."""
        self._versions = itertools.count(1)

    def _check(self) -> None:
        if self.unreachable:
            raise OSError("connection refused")

    def get_lease(self, namespace: str, name: str) -> Obj | None:
        self._check()
        lease = self.leases.get((namespace, name))
        return copy.deepcopy(lease) if lease is not None else None

    def create_lease(self, namespace: str, lease: Obj) -> bool:
        self._check()
        key = (namespace, lease["metadata"]["name"])
        if key in self.leases:
            return False
        self._store(key, lease)
        return True

    def update_lease(self, namespace: str, name: str, lease: Obj) -> bool:
        self._check()
        current = self.leases.get((namespace, name))
        if current is None or current["metadata"]["resourceVersion"] != lease["metadata"].get(
            "resourceVersion"
        ):
            return False
        self._store((namespace, name), lease)
        return True

    def _store(self, key: tuple[str, str], lease: Obj) -> None:
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(next(self._versions))
        self.leases[key] = stored

    def holder(self, namespace: str, name: str) -> str | None:
        lease = self.leases.get((namespace, name))
        return None if lease is None else lease["spec"].get("holderIdentity")
