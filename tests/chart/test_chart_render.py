"""The chart as `helm lint` and `helm template` see it, for every value set in charts/kubetune/ci/."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest
from chart_helpers import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    find,
    helm,
    one,
    operator_container,
    render,
    rules_as_grants,
)
from prometheus_client import generate_latest

from kubetune_operator.models import FineTuneJobStatus
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_trainer import contract

FULLNAME = f"{RELEASE}-kubetune"


@cache
def rendered(values_file: str | None = None, *sets: str) -> list[dict[str, Any]]:
    flags: list[str] = ["-f", values_file] if values_file else []
    for s in sets:
        flags += ["--set", s]
    return render(*flags)


def ci(name: str) -> str:
    return str(CHART / "ci" / f"{name}-values.yaml")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_ci_value_sets_exist() -> None:
    names = {p.name for p in CI_VALUES}
    assert {
        "default-values.yaml",
        "namespaced-rbac-values.yaml",
        "monitoring-on-values.yaml",
        "ha-values.yaml",
    } <= names


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict_passes(values: Any) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values), "--namespace", NAMESPACE)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_manifest_is_labelled_and_namespaced(values: Any) -> None:
    docs = rendered(str(values))
    assert docs
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "kubetune-0.1.0"
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace"), (
                f"{doc['kind']} {doc['metadata']['name']} has no namespace"
            )


def test_default_operator_deployment() -> None:
    docs = rendered(ci("default"))
    deployment = one(docs, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    container = operator_container(docs)
    assert container["image"] == "kubetune/operator:0.1.0"
    assert container["args"] == [
        "--all-namespaces",
        "--standalone",
        "--health-port=8080",
        "--metrics-port=8000",
    ]
    env = env_of(container)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "kubetune/trainer:0.1.0"
    assert env["KUBETUNE_DEFAULT_S3_ENDPOINT"] == ""
    assert env["KUBETUNE_GPU_RESOURCE_NAME"] == "nvidia.com/gpu"
    assert env["KUBETUNE_SCRAPE_INTERVAL_SECONDS"] == "10"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8000}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_operator_is_hardened() -> None:
    docs = rendered(ci("default"))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = operator_container(docs)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "automountServiceAccountToken" not in pod or pod["automountServiceAccountToken"] is True


def test_values_reach_the_operator() -> None:
    docs = rendered(ci("namespaced-rbac"))
    container = operator_container(docs)
    assert container["args"][:2] == ["--namespace=ml-team-a", "--namespace=ml-team-b"]
    assert "--all-namespaces" not in container["args"]
    env = env_of(container)
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/kubetune/trainer:0.1.0"
    assert env["KUBETUNE_DEFAULT_S3_ENDPOINT"] == "http://s3.storage.svc:9000"


def test_more_than_one_replica_elects_a_leader_through_a_lease() -> None:
    docs = rendered(ci("ha"))
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = operator_container(docs)
    assert f"--leader-election={FULLNAME}" in container["args"]
    assert container["env"][[e["name"] for e in container["env"]].index("POD_NAMESPACE")]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    assert "--standalone" not in container["args"]
    assert container["image"] == (
        "registry.example.com/kubetune/operator@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert env_of(container)["KUBETUNE_GPU_RESOURCE_NAME"] == "amd.com/gpu"
    assert env_of(container)["TZ"] == "UTC"


def test_namespaced_replicas_keep_their_lease_in_the_release_namespace() -> None:
    docs = rendered(ci("namespaced-ha"))
    assert one(docs, "Role", FULLNAME)["metadata"]["namespace"] == "ml"
    assert one(docs, "Role", f"{FULLNAME}-leader-election")["metadata"]["namespace"] == NAMESPACE


def test_single_replica_has_no_lease_grants() -> None:
    docs = rendered(ci("default"))
    assert "--standalone" in operator_container(docs)["args"]
    for role in find(docs, "ClusterRole") + find(docs, "Role"):
        assert not any(group == "coordination.k8s.io" for group, _ in rules_as_grants(role["rules"]))


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_no_role_grants_secrets_wildcards_or_escalation(values: Any) -> None:
    docs = rendered(str(values))
    for role in find(docs, "ClusterRole") + find(docs, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert "secrets" not in rule["resources"], f"{role['metadata']['name']} grants secrets"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            assert not {"nodes", "roles", "clusterroles", "rolebindings"} & set(rule["resources"])


def test_rbac_can_be_turned_off() -> None:
    docs = rendered(ci("default"), "rbac.create=false", "helmTest.enabled=false")
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")


def test_existing_service_account_needs_a_name() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr
    docs = rendered(None, "serviceAccount.create=false", "serviceAccount.name=ml-operator")
    assert not find(docs, "ServiceAccount", FULLNAME)
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ml-operator"


def test_metrics_service_selects_the_operator() -> None:
    docs = rendered(ci("default"))
    service = one(docs, "Service", FULLNAME)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_monitoring_is_off_by_default() -> None:
    docs = rendered(ci("default"))
    assert not find(docs, "ServiceMonitor") and not find(docs, "PodMonitor")
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]


def test_monitoring_on_renders_monitors_and_dashboard() -> None:
    docs = rendered(ci("monitoring-on"))
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/component": "trainer",
    }
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "10s"
    dashboard_cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard_cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    dashboard = json.loads(dashboard_cm["data"]["kubetune.json"])
    assert dashboard["title"] == "kubetune"


def served_metric_names() -> set[str]:
    """Every series name the operator and the trainer actually serve."""
    metrics = OperatorMetrics()
    old = FineTuneJobStatus()
    new = FineTuneJobStatus.model_validate(
        {
            "phase": "Running",
            "startTime": "2025-01-01T00:00:30Z",
            "progress": {"step": 3, "tokensPerSecond": 100.0},
            "metrics": {"trainLoss": 1.5},
        }
    )
    metrics.record("ml", "a", "2025-01-01T00:00:00Z", old, new)
    exposition = generate_latest(metrics.registry).decode()
    operator = {
        line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and line[0] != "#"
    }
    trainer = {v for k, v in vars(contract).items() if k.startswith("METRIC_")}
    return operator | trainer


def test_dashboard_queries_metrics_that_exist() -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"FineTuneJobs by phase", "Training loss", "Tokens per second", "Time to start"} <= titles
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [
        v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    used = {name for q in queries for name in re.findall(r"\bkubetune_[a-z_]+", q)}
    assert len(used) >= 6
    served = served_metric_names()
    missing = sorted(name for name in used if name not in served)
    assert not missing, f"the dashboard queries series nobody serves: {missing}"


def test_pod_monitor_limited_to_watched_namespaces() -> None:
    docs = rendered(ci("namespaced-rbac"), "podMonitor.enabled=true")
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}


def test_helm_test_hook_checks_health_with_its_own_narrow_account() -> None:
    docs = rendered(ci("default"))
    pod = one(docs, "Pod", f"{FULLNAME}-helm-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == f"{FULLNAME}-helm-test"
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    compile(container["command"][2], "helm-test.py", "exec")
    env = env_of(container)
    assert env["CHECK_SELECTOR"] == (
        "app.kubernetes.io/name=kubetune,app.kubernetes.io/instance=kt,app.kubernetes.io/component=operator"
    )
    assert env["CHECK_HEALTH_PORT"] == "8080"
    role = one(docs, "ClusterRole", f"{FULLNAME}-helm-test")
    assert role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "resourceNames": ["finetunejobs.kubetune.io"],
            "verbs": ["get"],
        }
    ]
    assert one(docs, "Role", f"{FULLNAME}-helm-test")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
    ]
    for doc in docs:
        if doc["metadata"]["name"] == f"{FULLNAME}-helm-test":
            assert doc["metadata"]["annotations"]["helm.sh/hook"] == "test", doc["kind"]


def test_crds_ship_with_the_chart_not_its_templates() -> None:
    docs = rendered(ci("default"))
    assert not find(docs, "CustomResourceDefinition")
    with_crds = render("--include-crds")
    crd = one(with_crds, "CustomResourceDefinition", "finetunejobs.kubetune.io")
    assert crd["spec"]["group"] == "kubetune.io"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("replica=2", "replica"),
        ("trainer.imagee=x", "imagee"),
        ("serviceMonitor.enable=true", "enable"),
        ("replicas=two", "replicas"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
    ],
)
def test_schema_rejects_typos_and_bad_values_at_install_time(flag: str, expected: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", flag, check=False)
    assert result.returncode != 0, f"--set {flag} was accepted"
    assert "schema" in result.stderr and expected in result.stderr


def test_notes_say_what_to_apply_next() -> None:
    result = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n <namespace> create secret generic s3-creds" in notes
    assert "AWS_ACCESS_KEY_ID" in notes
    assert "get finetunejobs -w" in notes
    assert f"helm test {RELEASE}" in notes
