"""Builders and waits the e2e tests share; they read like the API they drive."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from e2e.cluster.cluster import (
    AGENT_NODE_LABEL,
    AUDIT_LOG_FILE,
    KWOK_NODE_LABEL,
    KWOK_TAINT,
    REPO_ROOT,
    ClusterInfo,
)
from e2e.cluster.kube import KubeClient

JSON = dict[str, Any]
FTJ_API = "/apis/kubetune.io/v1alpha1"
CRD_PATH = REPO_ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
CRD_NAME = "finetunejobs.kubetune.io"

ON_KWOK = {"nodeSelector": {KWOK_NODE_LABEL: "true"}, "tolerations": [dict(KWOK_TAINT)]}
ON_AGENT = {"nodeSelector": {AGENT_NODE_LABEL: "true"}}


def install_crd(kube: KubeClient) -> JSON:
    """Apply the FineTuneJob CRD from crds/ and return it once it is Established.

    Server-side apply, as the chart's NOTES tell users to upgrade CRDs: a later ``helm install`` applying the
    same CRD then shares its fields instead of conflicting with them.
    """
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    kube.server_side_apply(crds, yaml.safe_load(CRD_PATH.read_text()))
    return kube.wait_for(
        f"{crds}/{CRD_NAME}",
        lambda crd: has_condition(crd, "Established"),
        timeout=30,
        what="the FineTuneJob CRD to be Established",
    )


def ftj_path(namespace: str, name: str = "") -> str:
    base = f"{FTJ_API}/namespaces/{namespace}/finetunejobs"
    return f"{base}/{name}" if name else base


def make_ftj(
    name: str,
    *,
    method: str = "LoRA",
    gpus: int = 1,
    placement: JSON | None = None,
    suspend: bool | None = None,
    backoff_limit: int | None = None,
    s3_endpoint: str = "http://127.0.0.1:9",
    base_model: str = "s3://models/tiny/",
    train: str = "s3://datasets/chat/train.jsonl",
    output: str | None = None,
    hyperparameters: JSON | None = None,
    extra_spec: JSON | None = None,
    validation_pod: bool | None = None,
) -> JSON:
    """A FineTuneJob manifest; ``placement`` is merged into spec.resources (ON_KWOK / ON_AGENT).

    ``validation_pod`` None: the validation pod runs, except for a job placed on KWOK nodes, where no process
    runs (those tests drive the trainer pods by hand), which sets spec.validation.skip."""
    spec: JSON = {
        "baseModel": {"uri": base_model},
        "dataset": {"train": train, "format": "Auto"},
        "method": method,
        "hyperparameters": hyperparameters or {"maxSteps": 10, "learningRate": 0.001},
        "output": {"uri": output or f"s3://adapters/{name}/"},
        "s3": {"endpoint": s3_endpoint, "forcePathStyle": True, "credentialsSecretRef": {"name": "s3-creds"}},
        "resources": {"gpus": gpus, **copy.deepcopy(placement or {})},
    }
    if method in ("LoRA", "QLoRA"):
        spec["lora"] = {"r": 4, "alpha": 8}
    if suspend is not None:
        spec["suspend"] = suspend
    if backoff_limit is not None:
        spec["backoffLimit"] = backoff_limit
    if validation_pod is None:
        validation_pod = KWOK_NODE_LABEL not in ((placement or {}).get("nodeSelector") or {})
    if not validation_pod:
        spec["validation"] = {"skip": True}
    spec.update(extra_spec or {})
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def s3_secret(access_key: str, secret_key: str, name: str = "s3-creds") -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
    }


def condition(obj: JSON, ctype: str) -> JSON | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == ctype), None)


def has_condition(obj: JSON, ctype: str, status: str = "True") -> bool:
    c = condition(obj, ctype)
    return c is not None and c.get("status") == status


def pods_of(kube: KubeClient, namespace: str, selector: str) -> list[JSON]:
    return list(kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector).get("items", []))


def wait_pod(
    kube: KubeClient, namespace: str, selector: str, predicate: Any, timeout: float = 60, what: str = ""
) -> JSON:
    """Poll until a pod matching ``selector`` satisfies ``predicate``; return it."""
    found: list[JSON] = []

    def check(_: JSON) -> bool:
        found[:] = [p for p in pods_of(kube, namespace, selector) if predicate(p)]
        return bool(found)

    kube.wait_for(f"/api/v1/namespaces/{namespace}", check, timeout=timeout, what=what or f"pod {selector}")
    return found[0]


def container_log(cluster: ClusterInfo, namespace: str, pod: str, container: str) -> str:
    """A node-agent container's log (all its runs), as the agent writes it."""
    path = Path(cluster.dir) / "pods" / namespace / pod / "logs" / f"{container}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def terminated(pod: JSON, container: str | None = None) -> JSON | None:
    for cs in pod.get("status", {}).get("containerStatuses", []):
        if container is None or cs["name"] == container:
            t = cs.get("state", {}).get("terminated")
            if t:
                return dict(t)
    return None


def kopf_child_requests(cluster: ClusterInfo, namespace: str | None = None) -> list[JSON]:
    """The lists and watches of pods and Jobs that kopf (an operator) made, from the API server's audit log
    (e2e/cluster/cluster.py AUDIT_POLICY); ``namespace`` None: the cluster-wide ones only."""
    log = Path(cluster.dir) / "logs" / AUDIT_LOG_FILE
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if not str(entry.get("userAgent", "")).startswith("kopf/") or ref.get("resource") not in (
            "pods",
            "jobs",
        ):
            continue
        if entry.get("verb") not in ("list", "watch"):
            continue
        if ref.get("namespace") == namespace:
            found.append(entry)
    return found


def label_selector_of(request: JSON) -> str | None:
    selectors = parse_qs(urlsplit(str(request["requestURI"])).query).get("labelSelector")
    return selectors[0] if selectors else None


def created_objects(cluster: ClusterInfo, namespace: str, resource: str) -> list[str]:
    """Names of the ``resource`` (pods, jobs) objects anyone created in ``namespace``, from the API server's
    audit log (a generated name as its prefix, e.g. ``a-trainer-``): proof that an object was never created,
    even briefly."""
    log = Path(cluster.dir) / "logs" / AUDIT_LOG_FILE
    names = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if entry.get("verb") != "create" or (ref.get("resource"), ref.get("namespace")) != (
            resource,
            namespace,
        ):
            continue
        sent = (entry.get("requestObject") or {}).get("metadata") or {}
        names.append(str(ref.get("name") or sent.get("name") or sent.get("generateName") or ""))
    return names
