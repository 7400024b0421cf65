"""The one module that talks to the outside: the Kubernetes API server and (through ``scrape_http``, which
holds the limits) the trainer pods' /metrics.

Everything else in the operator is pure. Handlers receive an object with the ``ClusterIO`` shape, so unit
tests swap in an in-memory fake and the operator uses ``KubeIO`` (a thin JSON-over-HTTP layer on the
kubernetes client's authenticated ``ApiClient``: objects go in and come out as the plain dicts the builders
produce and the reconciler reads).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import kopf
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from kubetune_operator import kueue, labels
from kubetune_operator.conditions import now_rfc3339
from kubetune_operator.config import OperatorConfig
from kubetune_operator.observed import Obj
from kubetune_operator.scrape_http import fetch_metrics

REPORTING_COMPONENT = "kubetune-operator"


class Rejected(Exception):
    """The API server refused an object as invalid (HTTP 422); the text is the server's explanation."""


class Forbidden(Exception):
    """The API server refused to create an object for the operator (HTTP 403: RBAC, an admission policy,
    an object-count quota); the text is the server's explanation. Retrying would be refused the same way."""


class ClusterIO(Protocol):
    def get_finetunejob(self, namespace: str, name: str) -> Obj | None: ...
    def get_config_map(self, namespace: str, name: str) -> Obj | None: ...
    def get_job(self, namespace: str, name: str) -> Obj | None: ...
    def get_service(self, namespace: str, name: str) -> Obj | None: ...
    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[Obj]: ...
    def list_failed_create_events(self, namespace: str, job_uid: str) -> list[Obj]:
        """The FailedCreate Events the Job controller recorded on the Job with this uid."""
        ...

    def list_workloads(self, namespace: str, job_uid: str) -> list[Obj]:
        """The Kueue Workloads labelled with this Job uid (kueue.LABEL_JOB_UID). Raises KueueUnavailable
        when the Workload API is not served (no Kueue) or not permitted."""
        ...

    def create(self, obj: Obj) -> None:
        """Create a child; one that exists already (409) is left as it is. Raises Rejected on 422 and
        Forbidden on 403."""
        ...

    def replace(self, obj: Obj) -> None: ...
    def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None: ...
    def patch_job_spec(self, namespace: str, name: str, spec_patch: Obj) -> None:
        """Apply a JSON merge patch to a Job's spec (null removes a field)."""
        ...

    def patch_status(self, namespace: str, name: str, status_patch: Obj) -> None: ...
    def remove_finalizer(self, kind: str, obj: Obj, finalizer: str) -> None:
        """Remove ``finalizer`` from a Pod or Job (``kind``) as it was last read; a gone one is fine."""
        ...

    def annotate_finetunejob(self, namespace: str, name: str, annotations: dict[str, str]) -> None: ...
    def delete_pod(self, pod: Obj) -> None:
        """Delete this pod (by uid: a newer pod of the same name is left alone); one already gone is fine."""
        ...

    def post_event(self, involved: Obj, type_: str, reason: str, message: str) -> None: ...
    def scrape(self, pod_ip: str, port: int) -> str:
        """GET http://<pod_ip>:<port>/metrics within the scrape limits; raises OSError (ScrapeError) when the
        page cannot be read within them."""
        ...


def _path(obj_or_kind: Obj | str, namespace: str, name: str | None = None) -> str:
    kind = obj_or_kind if isinstance(obj_or_kind, str) else str(obj_or_kind["kind"])
    base = {
        "ConfigMap": f"/api/v1/namespaces/{namespace}/configmaps",
        "Pod": f"/api/v1/namespaces/{namespace}/pods",
        "Service": f"/api/v1/namespaces/{namespace}/services",
        "Event": f"/api/v1/namespaces/{namespace}/events",
        "Job": f"/apis/batch/v1/namespaces/{namespace}/jobs",
        "Lease": f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
        labels.KIND: f"/apis/{labels.API_VERSION}/namespaces/{namespace}/{labels.PLURAL}",
    }[kind]
    return base if name is None else f"{base}/{quote(name, safe='')}"


CONNECTION_POOL_SIZE = 32
"""Kept-alive connections to the API server: more than the threads that call it (reconcile passes, kopf's
handler threads, the scrape loop), so no call pays for a new TLS handshake."""


def load_api_client() -> k8s_client.ApiClient:
    """$KUBECONFIG or ~/.kube/config when present, the pod's service account otherwise."""
    configuration = k8s_client.Configuration()
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if any(Path(p).is_file() for p in kubeconfig.split(os.pathsep) if p):
        api: k8s_client.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig.split(os.pathsep)[0], client_configuration=configuration
        )
        return api
    k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return k8s_client.ApiClient(configuration)


def connection_info(api: k8s_client.ApiClient, *, trust_env: bool) -> kopf.ConnectionInfo:
    """kopf's credentials, taken from the same client configuration the operator's own calls use."""
    cfg = api.configuration
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        trust_env=trust_env,
    )


class KubeIO:
    """ClusterIO over a real API server."""

    def __init__(self, api: k8s_client.ApiClient, config: OperatorConfig) -> None:
        self._api = api
        self._timeout = config.request_timeout_seconds
        self._scrape_timeout = config.scrape_timeout_seconds
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        method_, url, headers, payload, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(
            method_, url, header_params=headers, body=payload, _request_timeout=self._timeout
        )
        response.read()  # type: ignore[no-untyped-call]
        text = response.data.decode("utf-8") if response.data else ""
        if not 200 <= response.status <= 299:
            ApiException.from_response(http_resp=response, body=text, data=None)
        result: Obj = json.loads(text) if text else {}
        return result

    def _get_or_none(self, path: str) -> Obj | None:
        try:
            return self._request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(_path(labels.KIND, namespace, name))

    def get_config_map(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(_path("ConfigMap", namespace, name))

    def get_job(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(_path("Job", namespace, name))

    def get_service(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(_path("Service", namespace, name))

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[Obj]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(selector.items())))]
        items = self._request("GET", _path("Pod", namespace), query=query).get("items") or []
        return [dict(item) for item in items]

    def list_failed_create_events(self, namespace: str, job_uid: str) -> list[Obj]:
        selector = f"involvedObject.kind=Job,involvedObject.uid={job_uid},reason=FailedCreate"
        query = [("fieldSelector", selector), ("limit", "20")]
        items = self._request("GET", _path("Event", namespace), query=query).get("items") or []
        return [dict(item) for item in items]

    def list_workloads(self, namespace: str, job_uid: str) -> list[Obj]:
        query = [("labelSelector", f"{kueue.LABEL_JOB_UID}={job_uid}"), ("limit", str(kueue.LIST_LIMIT))]
        for version in kueue.VERSIONS:
            path = f"/apis/{kueue.GROUP}/{version}/namespaces/{quote(namespace, safe='')}/{kueue.PLURAL}"
            try:
                items = self._request("GET", path, query=query).get("items")
            except ApiException as exc:
                if exc.status == 404:
                    continue  # this version is not served; an older Kueue may serve the next one
                if exc.status == 403:
                    raise kueue.KueueUnavailable(
                        f"the operator may not list Kueue Workloads in namespace {namespace} "
                        f"({_api_message(exc)}); grant it list on {kueue.PLURAL}.{kueue.GROUP} "
                        "(the chart does)"
                    ) from exc
                raise
            return [dict(item) for item in items if isinstance(item, dict)] if isinstance(items, list) else []
        raise kueue.KueueUnavailable(
            f"the API server serves no {kueue.PLURAL}.{kueue.GROUP}: Kueue is not installed in this cluster, "
            "so nothing will admit the trainer Job; install Kueue, or remove spec.queueName to start it "
            "unqueued"
        )

    def create(self, obj: Obj) -> None:
        namespace = str(obj["metadata"]["namespace"])
        try:
            self._request("POST", _path(obj, namespace), body=obj)
        except ApiException as exc:
            if exc.status == 422:
                raise Rejected(_api_message(exc)) from exc
            if exc.status == 403:
                raise Forbidden(_api_message(exc)) from exc
            if exc.status != 409:  # 409: an earlier pass created it; the next pass reads and compares it
                raise

    def replace(self, obj: Obj) -> None:
        namespace, name = str(obj["metadata"]["namespace"]), str(obj["metadata"]["name"])
        self._request(
            "PATCH", _path(obj, namespace, name), body=obj, content_type="application/merge-patch+json"
        )

    def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.patch_job_spec(namespace, name, {"suspend": suspend})

    def patch_job_spec(self, namespace: str, name: str, spec_patch: Obj) -> None:
        self._request(
            "PATCH",
            _path("Job", namespace, name),
            body={"spec": spec_patch},
            content_type="application/merge-patch+json",
        )

    def patch_status(self, namespace: str, name: str, status_patch: Obj) -> None:
        self._request(
            "PATCH",
            _path(labels.KIND, namespace, name) + "/status",
            body={"status": status_patch},
            content_type="application/merge-patch+json",
        )

    def remove_finalizer(self, kind: str, obj: Obj, finalizer: str) -> None:
        meta = obj.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or [])
        if finalizer not in finalizers:
            return
        index = finalizers.index(finalizer)
        # Test, then remove by index: a list changed meanwhile fails the test (422) instead of losing
        # another controller's entry; the next pass reads it again.
        patch = [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        try:
            self._request(
                "PATCH",
                _path(kind, str(meta["namespace"]), str(meta["name"])),
                body=patch,
                content_type="application/json-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_pod(self, pod: Obj) -> None:
        meta = pod.get("metadata") or {}
        body = {"preconditions": {"uid": str(meta.get("uid") or "")}}
        try:
            self._request("DELETE", _path("Pod", str(meta["namespace"]), str(meta["name"])), body=body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def annotate_finetunejob(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self._request(
            "PATCH",
            _path(labels.KIND, namespace, name),
            body={"metadata": {"annotations": annotations}},
            content_type="application/merge-patch+json",
        )

    def post_event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        now = now_rfc3339()
        namespace = str(involved["namespace"])
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": f"{labels.GROUP}/operator",
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._request("POST", _path("Event", namespace), body=event)

    # --- the leader Lease (leader.LeaseIO) ---------------------------------------------------------------

    def get_lease(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(_path("Lease", namespace, name))

    def create_lease(self, namespace: str, lease: Obj) -> bool:
        return self._conflict_is_false("POST", _path("Lease", namespace), lease)

    def update_lease(self, namespace: str, name: str, lease: Obj) -> bool:
        return self._conflict_is_false("PUT", _path("Lease", namespace, name), lease)

    def _conflict_is_false(self, method: str, path: str, body: Obj) -> bool:
        try:
            self._request(method, path, body=body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def scrape(self, pod_ip: str, port: int) -> str:
        return fetch_metrics(pod_ip, port, deadline_seconds=self._scrape_timeout)


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.body or exc.reason)


__all__ = ["ClusterIO", "Forbidden", "KubeIO", "Rejected", "connection_info", "load_api_client"]
