"""Render the chart with the real helm binary and index the result."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.cluster.cluster import bin_dir

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "kt"
NAMESPACE = "kubetune-system"


def helm_path() -> Path:
    helm = bin_dir() / "helm"
    if not helm.exists():
        pytest.skip(f"helm is not built yet ({helm}); run `bash e2e/cluster/build.sh helm`")
    return helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def render(*extra: str) -> list[dict[str, Any]]:
    """`helm template` the chart with extra flags (-f file, --set k=v) into a list of manifests."""
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "operator"
    ]
    return container


def rules_as_grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs} from RBAC rules, so tests compare permissions, not rule layout."""
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule or rule["resourceNames"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants
