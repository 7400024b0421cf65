"""The chart grants the operator exactly what it uses: every request its API module (k8s_io.KubeIO) makes,
plus what kopf needs for the handlers the operator registers — derived here from the operator's code, not
written down twice, so a new API call without its RBAC rule (or a rule nothing uses) fails this test."""

from __future__ import annotations

import re
from typing import Any

import kopf
import pytest
from chart_helpers import CHART, find, one, render, rules_as_grants

from kubetune_operator import labels
from kubetune_operator.builders import build_config_map, build_trainer_job, build_trainer_service
from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import register_handlers
from kubetune_operator.k8s_io import KubeIO
from kubetune_operator.models import FineTuneJob

Grants = dict[tuple[str, str], set[str]]
FULLNAME = "kt-kubetune"
NAMESPACE = "ml"
VERB_OF = {
    ("GET", True): "get",
    ("GET", False): "list",
    ("POST", False): "create",
    ("PATCH", True): "patch",
    ("PUT", True): "update",
    ("DELETE", True): "delete",
}
PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/(?P<resource>[^/?]+)"
    r"(?:/(?P<name>[^/?]+)(?:/(?P<sub>[^/?]+))?)?"
)


class _Response:
    status = 200
    data = b"{}"

    def read(self) -> bytes:
        return self.data


class RecordingApiClient:
    """Stands in for kubernetes.client.ApiClient under KubeIO: records each request, answers 200 {}."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def param_serialize(self, *, method: str, resource_path: str, **_: Any) -> tuple[Any, ...]:
        return method, resource_path, {}, None, None

    def call_api(self, method: str, url: str, **_: Any) -> _Response:
        self.requests.append((method, url))
        return _Response()


def grants_of_requests(requests: list[tuple[str, str]]) -> Grants:
    grants: Grants = {}
    for method, url in requests:
        match = PATH.match(url)
        assert match, f"unexpected API path {url}"
        resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
        verb = VERB_OF[(method, match["name"] is not None)]
        grants.setdefault((match["group"] or "", resource), set()).add(verb)
    return grants


def operator_api_grants() -> Grants:
    """Drive every KubeIO method with the children the operator's builders produce."""
    config = OperatorConfig()
    job = FineTuneJob.from_body(
        {
            "apiVersion": labels.API_VERSION,
            "kind": labels.KIND,
            "metadata": {"name": "a", "namespace": NAMESPACE, "uid": "u1", "generation": 1},
            "spec": {
                "baseModel": {"uri": "s3://m/"},
                "dataset": {"train": "s3://d/t.jsonl"},
                "method": "LoRA",
                "hyperparameters": {"maxSteps": 1},
                "output": {"uri": "s3://o/"},
            },
        }
    )
    api = RecordingApiClient()
    io = KubeIO(api, config)  # type: ignore[arg-type]
    config_map, trainer_job = build_config_map(job, config), build_trainer_job(job, config)
    service = build_trainer_service(job)  # a multi-node job's headless Service
    io.get_finetunejob(NAMESPACE, "a")
    io.get_config_map(NAMESPACE, "a-config")
    io.get_service(NAMESPACE, "a-trainer")
    io.get_job(NAMESPACE, "a-trainer")
    io.list_pods(NAMESPACE, {labels.LABEL_JOB_NAME: "a"})
    io.list_failed_create_events(NAMESPACE, "job-uid")
    io.list_workloads(NAMESPACE, "job-uid")
    io.create(config_map)
    io.create(service)
    io.create(trainer_job)
    io.replace(config_map)
    io.patch_job_suspend(NAMESPACE, "a-trainer", False)
    io.patch_status(NAMESPACE, "a", {"phase": "Running"})
    held = {"metadata": {"name": "p", "namespace": NAMESPACE, "finalizers": [labels.RESULT_FINALIZER]}}
    io.remove_finalizer("Pod", held, labels.RESULT_FINALIZER)
    io.remove_finalizer("Job", held, labels.RESULT_FINALIZER)
    io.delete_pod({"metadata": {"name": "p", "namespace": NAMESPACE, "uid": "pod-uid"}})
    io.annotate_finetunejob(NAMESPACE, "a", {labels.ANNOTATION_RESULT_RECORDED: "true"})
    io.post_event(
        {
            "apiVersion": labels.API_VERSION,
            "kind": labels.KIND,
            "name": "a",
            "namespace": NAMESPACE,
            "uid": "u1",
        },
        "Normal",
        "Created",
        "created",
    )
    assert len(api.requests) == 18
    return grants_of_requests(api.requests) | owner_deletion_grants([config_map, service, trainer_job])


def owner_deletion_grants(children: list[dict[str, Any]]) -> Grants:
    """An ownerReference with blockOwnerDeletion: true may be set only by a client that can update the
    owner's finalizers subresource, where the OwnerReferencesPermissionEnforcement admission plugin is on
    (it is on OpenShift and many hardened clusters): without the grant every child create is forbidden."""
    grants: Grants = {}
    for child in children:
        for ref in child["metadata"].get("ownerReferences") or []:
            if ref.get("blockOwnerDeletion"):
                group = ref["apiVersion"].rpartition("/")[0]
                assert ref["kind"] == labels.KIND, ref
                grants.setdefault((group, f"{labels.PLURAL}/finalizers"), set()).add("update")
    return grants


def kopf_grants() -> Grants:
    """kopf lists and watches every resource a handler is registered for, patches its bookkeeping
    (annotations) onto the resources with change handlers, and posts warnings as core Events."""
    registry = kopf.OperatorRegistry()
    register_handlers(registry)
    grants: Grants = {("", "events"): {"create"}}
    for resource_registry, verbs in (
        (registry._watching, {"list", "watch"}),
        (registry._changing, {"list", "watch", "patch"}),
        (registry._spawning, {"list", "watch", "patch"}),
    ):
        for handler in resource_registry.get_all_handlers():
            selector = handler.selector
            assert selector is not None and selector.any_name, handler
            grants.setdefault((selector.group or "", selector.any_name), set()).update(verbs)
    return grants


def expected_namespaced_grants() -> Grants:
    expected: Grants = {}
    for source in (operator_api_grants(), kopf_grants()):
        for key, verbs in source.items():
            expected.setdefault(key, set()).update(verbs)
    return expected


CRD_OBSERVATION = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_OBSERVATION = {("", "namespaces"): {"list", "watch"}}


def operator_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in find(docs, "ClusterRole") + find(docs, "Role")
        if not r["metadata"]["name"].endswith("-helm-test")
    ]


def test_the_derivation_sees_the_operator_at_work() -> None:
    api = operator_api_grants()
    assert api[("kubetune.io", "finetunejobs/status")] == {"patch"}
    assert api[("batch", "jobs")] >= {"create", "patch"}
    assert api[("kubetune.io", "finetunejobs/finalizers")] == {"update"}
    assert api[("kueue.x-k8s.io", "workloads")] == {"list"}
    assert ("", "secrets") not in api and ("", "secrets") not in kopf_grants()
    assert {("kubetune.io", "finetunejobs"), ("batch", "jobs"), ("", "pods")} <= set(kopf_grants())


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses() -> None:
    docs = render()
    (role,) = operator_roles(docs)
    assert role["kind"] == "ClusterRole" and role["metadata"]["name"] == f"{FULLNAME}-cluster"
    assert rules_as_grants(role["rules"]) == expected_namespaced_grants() | CRD_OBSERVATION
    binding = one(docs, "ClusterRoleBinding", f"{FULLNAME}-cluster")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": f"{FULLNAME}-cluster",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": "kubetune-system"}
    ]


def test_namespaced_rbac_is_exactly_what_the_operator_uses_in_each_watched_namespace() -> None:
    docs = render("-f", str(CHART / "ci" / "namespaced-rbac-values.yaml"))
    roles = [r for r in operator_roles(docs) if r["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-team-a", "ml-team-b"]
    for role in roles:
        assert rules_as_grants(role["rules"]) == expected_namespaced_grants()
    bindings = [b for b in find(docs, "RoleBinding") if b["metadata"]["name"] == FULLNAME]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-team-a", "ml-team-b"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": "kubetune-system"}
        ]
    cluster_role = one(docs, "ClusterRole", f"{FULLNAME}-cluster")
    assert rules_as_grants(cluster_role["rules"]) == CRD_OBSERVATION | NAMESPACE_OBSERVATION


def lease_grants() -> Grants:
    """What leader.LeaderElector asks of the API server through KubeIO, for one Lease."""
    api = RecordingApiClient()
    io = KubeIO(api, OperatorConfig())  # type: ignore[arg-type]
    io.get_lease("kubetune-system", FULLNAME)
    io.create_lease("kubetune-system", {"metadata": {"name": FULLNAME}})
    io.update_lease("kubetune-system", FULLNAME, {"metadata": {"name": FULLNAME}})
    return grants_of_requests(api.requests)


@pytest.mark.parametrize("values", ["ha", "namespaced-ha"])
def test_replicas_get_exactly_the_lease_grants_in_the_release_namespace_only(values: str) -> None:
    docs = render("-f", str(CHART / "ci" / f"{values}-values.yaml"))
    role = one(docs, "Role", f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == "kubetune-system"
    assert rules_as_grants(role["rules"]) == lease_grants()
    named = [rule for rule in role["rules"] if "resourceNames" in rule]
    assert named and all(rule["resourceNames"] == [FULLNAME] for rule in named)
    assert {verb for rule in role["rules"] if "resourceNames" not in rule for verb in rule["verbs"]} == {
        "create"
    }
    binding = one(docs, "RoleBinding", f"{FULLNAME}-leader-election")
    assert binding["roleRef"]["name"] == f"{FULLNAME}-leader-election"
    for other in operator_roles(docs):
        if other is not role:
            assert not any(group == "coordination.k8s.io" for group, _ in rules_as_grants(other["rules"]))
