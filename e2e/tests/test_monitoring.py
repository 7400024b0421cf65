"""The chart's Prometheus Operator objects, validated by the API server against the real ServiceMonitor and
PodMonitor CRDs (taken from the Prometheus Operator's own module source by e2e/cluster/build.sh promcrds)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from e2e.cluster.cluster import CACHE, ClusterInfo
from e2e.cluster.kube import ApiError, KubeClient
from e2e.tests.helpers import has_condition
from e2e.tests.test_helm import CHART, Release

CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
MONITORING = "/apis/monitoring.coreos.com/v1"


def prometheus_operator_crds() -> list[Path]:
    build = (Path(__file__).resolve().parents[1] / "cluster" / "build.sh").read_text()
    version = re.search(r"^PROMETHEUS_OPERATOR_VERSION=(\S+)", build, re.M)
    assert version is not None
    found = sorted((CACHE / "crds" / f"prometheus-operator-{version.group(1)}").glob("*.yaml"))
    if len(found) != 2:
        pytest.fail("the Prometheus Operator CRDs are not fetched: run `bash e2e/cluster/build.sh promcrds`")
    return found


@pytest.fixture(scope="module")
def monitoring_crds(kube: KubeClient) -> None:
    for path in prometheus_operator_crds():
        crd = yaml.safe_load(path.read_text())
        kube.server_side_apply(CRD_API, crd)
        kube.wait_for(
            f"{CRD_API}/{crd['metadata']['name']}",
            lambda c: has_condition(c, "Established"),
            timeout=60,
            what=f"CRD {crd['metadata']['name']} to be Established",
        )


def test_the_crds_validate_monitors(
    kube: KubeClient, monitoring_crds: None, make_namespace: Callable[..., str]
) -> None:
    """A control: the installed CRDs really refuse a malformed monitor, so an install that passes means
    something."""
    ns = make_namespace("mon-control")
    bad = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "bad"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "interval": "every ten seconds"}]},
    }
    with pytest.raises(ApiError) as refused:
        kube.create(f"{MONITORING}/namespaces/{ns}/servicemonitors", bad)
    assert refused.value.status == 422 and "interval" in str(refused.value)


def test_helm_install_with_monitoring_on_is_accepted_by_the_api_server(
    cluster: ClusterInfo, kube: KubeClient, monitoring_crds: None, make_namespace: Callable[..., str]
) -> None:
    rel = Release(cluster, make_namespace("kt-mon-system"), make_namespace("kt-mon"))
    try:
        rel.helm(
            "install",
            "ktmon",
            str(CHART),
            "--namespace",
            rel.system_namespace,
            "-f",
            str(CHART / "ci" / "monitoring-on-values.yaml"),
            "--set",
            f"watchNamespaces[0]={rel.namespace}",
        )
        where = f"{MONITORING}/namespaces/{rel.system_namespace}"
        service_monitors = kube.get(f"{where}/servicemonitors")["items"]
        pod_monitors = kube.get(f"{where}/podmonitors")["items"]
        assert [m["metadata"]["name"] for m in service_monitors] == ["ktmon-kubetune"]
        (pod_monitor,) = pod_monitors
        assert pod_monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "10s"
        assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": [rel.namespace]}
    finally:
        rel.helm("uninstall", "ktmon", "--namespace", rel.system_namespace, "--ignore-not-found", check=False)
