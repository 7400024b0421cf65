"""An in-memory ClusterIO for handler tests: behaves like the API server where the handlers rely on it
(409 on a duplicate create, 422 for objects it is told to reject, merge-patch for status)."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune_operator.k8s_io import Forbidden, Rejected
from kubetune_operator.kueue import LABEL_JOB_UID, KueueUnavailable

Obj = dict[str, Any]
_uids = itertools.count(1)


def _merge(target: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeCluster:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.events: list[tuple[str, str, str]] = []
        self.calls: Counter[str] = Counter()
        self.reject_kinds: dict[str, str] = {}
        self.forbid_kinds: dict[str, str] = {}
        """Kinds whose creation the API server forbids (HTTP 403), with its message."""
        self.fail_with: ApiException | None = None
        self.metrics_pages: dict[str, str] = {}
        self.kueue_unavailable: str | None = None
        """Set: list_workloads raises KueueUnavailable with this text (no Kueue, or no RBAC for it)."""

    # --- test setup ---------------------------------------------------------------------------------------
    def put(self, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("uid", f"uid-{next(_uids)}")
        self.objects[(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        return obj

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get((kind, namespace, name))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, namespace, name), None)

    def _check(self, call: str) -> None:
        self.calls[call] += 1
        if self.fail_with is not None:
            raise self.fail_with

    # --- ClusterIO ----------------------------------------------------------------------------------------
    def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        self._check("get_finetunejob")
        return copy.deepcopy(self.get("FineTuneJob", namespace, name))

    def get_config_map(self, namespace: str, name: str) -> Obj | None:
        self._check("get_config_map")
        return copy.deepcopy(self.get("ConfigMap", namespace, name))

    def get_job(self, namespace: str, name: str) -> Obj | None:
        self._check("get_job")
        return copy.deepcopy(self.get("Job", namespace, name))

    def get_service(self, namespace: str, name: str) -> Obj | None:
        self._check("get_service")
        return copy.deepcopy(self.get("Service", namespace, name))

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[Obj]:
        self._check("list_pods")
        return [
            copy.deepcopy(obj)
            for (kind, ns, _), obj in self.objects.items()
            if kind == "Pod"
            and ns == namespace
            and all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
        ]

    def list_failed_create_events(self, namespace: str, job_uid: str) -> list[Obj]:
        self._check("list_failed_create_events")
        return [
            copy.deepcopy(obj)
            for (kind, ns, _), obj in self.objects.items()
            if kind == "Event"
            and ns == namespace
            and obj.get("reason") == "FailedCreate"
            and (obj.get("involvedObject") or {}).get("uid") == job_uid
        ]

    def list_workloads(self, namespace: str, job_uid: str) -> list[Obj]:
        self._check("list_workloads")
        if self.kueue_unavailable is not None:
            raise KueueUnavailable(self.kueue_unavailable)
        return [
            copy.deepcopy(obj)
            for (kind, ns, _), obj in self.objects.items()
            if kind == "Workload"
            and ns == namespace
            and (obj["metadata"].get("labels") or {}).get(LABEL_JOB_UID) == job_uid
        ]

    def create(self, obj: Obj) -> None:
        self._check(f"create:{obj['kind']}")
        if obj["kind"] in self.reject_kinds:
            raise Rejected(self.reject_kinds[obj["kind"]])
        if obj["kind"] in self.forbid_kinds:
            raise Forbidden(self.forbid_kinds[obj["kind"]])
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key not in self.objects:
            self.put(obj)

    def replace(self, obj: Obj) -> None:
        self._check(f"replace:{obj['kind']}")
        self.put(obj)

    def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self._check("patch_job_suspend")
        job = self.get("Job", namespace, name)
        assert job is not None, "patching a Job that does not exist"
        job["spec"]["suspend"] = suspend

    def patch_job_spec(self, namespace: str, name: str, spec_patch: Obj) -> None:
        self._check("patch_job_spec")
        job = self.get("Job", namespace, name)
        assert job is not None, "patching a Job that does not exist"
        _merge(job["spec"], spec_patch)

    def patch_status(self, namespace: str, name: str, status_patch: Obj) -> None:
        self._check("patch_status")
        job = self.get("FineTuneJob", namespace, name)
        assert job is not None
        status = job.setdefault("status", {})
        _merge(status, status_patch)

    def remove_finalizer(self, kind: str, obj: Obj, finalizer: str) -> None:
        self._check(f"remove_finalizer:{kind}")
        stored = self.get(kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if stored is not None and finalizer in (stored["metadata"].get("finalizers") or []):
            stored["metadata"]["finalizers"].remove(finalizer)

    def delete_pod(self, pod: Obj) -> None:
        self._check("delete_pod")
        self.delete("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])

    def annotate_finetunejob(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self._check("annotate_finetunejob")
        job = self.get("FineTuneJob", namespace, name)
        assert job is not None
        job["metadata"].setdefault("annotations", {}).update(annotations)

    def post_event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        self._check("post_event")
        self.events.append((type_, reason, involved["name"]))

    def scrape(self, pod_ip: str, port: int) -> str:
        self.calls["scrape"] += 1
        if pod_ip not in self.metrics_pages:
            raise ConnectionRefusedError(f"nothing listens on {pod_ip}:{port}")
        return self.metrics_pages[pod_ip]
