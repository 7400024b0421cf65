"""The chart's static files: the CRD copy, the values schema and the documentation of every value."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_helpers import CHART, CI_VALUES, ROOT

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
# Values whose contents are Kubernetes objects (documented by the API) or free-form maps: their own keys are
# not chart values, so they carry no per-key comment.
KUBERNETES_SHAPED = {
    "resources",
    "podSecurityContext",
    "securityContext",
    "affinity",
    "tolerations",
    "extraEnv",
    "nodeSelector",
    "podAnnotations",
    "podLabels",
    "annotations",
    "labels",
    "imagePullSecrets",
}


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(SCHEMA)


def test_chart_crds_are_identical_to_the_repository_crds() -> None:
    repo = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert repo, "crds/ at the repository root holds no CRD"
    assert sorted(chart) == sorted(repo), "run charts/kubetune/hack/sync-crds.sh"
    for name, content in repo.items():
        assert chart[name] == content, (
            f"charts/kubetune/crds/{name} differs from crds/{name}: run hack/sync-crds.sh"
        )


def test_chart_versions() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["name"] == "kubetune"


def _object_nodes(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append((path, node))
        for key, child in node.items():
            found += _object_nodes(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += _object_nodes(child, f"{path}/{i}")
    return found


def test_schema_is_closed_everywhere() -> None:
    """Every object either lists its properties and forbids others, or is a typed map (additionalProperties
    is a schema); the only open objects are Kubernetes sub-structures the API server itself checks."""
    open_allowed = re.compile(
        r"/affinity/properties/\w+/properties/requiredDuringSchedulingIgnoredDuringExecution$"
        r"|/affinity/properties/\w+/properties/\w+/items$"
    )
    objects = _object_nodes(SCHEMA, "")
    assert len(objects) > 20
    for path, node in objects:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
        elif open_allowed.search(path):
            assert "checked by the API server" in node.get("description", "") or path.endswith("/items")
        else:
            assert isinstance(node.get("additionalProperties"), dict), f"{path} is an untyped open object"


def test_every_top_level_value_is_in_the_schema_and_vice_versa() -> None:
    assert set(SCHEMA["properties"]) == set(VALUES)


def test_default_values_and_ci_values_validate() -> None:
    validator().validate(VALUES)
    for path in CI_VALUES:
        merged = {**VALUES, **(yaml.safe_load(path.read_text()) or {})}
        errors = list(validator().iter_errors(merged))
        assert not errors, f"{path.name}: {[e.message for e in errors]}"


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"replica": 2}, "$"),
        ({"trainer": {"image": "x", "gpuResourceName": "nvidia.com/gpu", "imagee": "y"}}, "$.trainer"),
        ({"serviceMonitor": {"enable": True}}, "$.serviceMonitor"),
        ({"securityContext": {"readOnlyRootFS": True}}, "$.securityContext"),
        ({"resources": {"request": {"cpu": "1"}}}, "$.resources"),
        ({"tolerations": [{"key": "a", "efect": "NoSchedule"}]}, "$.tolerations[0]"),
        ({"extraEnv": [{"name": "A", "valu": "b"}]}, "$.extraEnv[0]"),
        ({"podLabels": {"a": 1}}, "$.podLabels.a"),
        ({"resources": {"limits": {"memory": "lots"}}}, "$.resources.limits.memory"),
        (
            {
                "trainer": {
                    "image": "x",
                    "gpuResourceName": "nvidia.com/gpu",
                    "defaultS3Endpoint": "minio:9000",
                }
            },
            "$.trainer.defaultS3Endpoint",
        ),
    ],
)
def test_schema_rejects_typos_with_their_path(patch: dict[str, Any], where: str) -> None:
    errors = list(validator().iter_errors({**VALUES, **patch}))
    assert errors, f"{patch} was accepted"
    assert any(e.json_path == where or e.json_path.startswith(where) for e in errors), [
        (e.json_path, e.message) for e in errors
    ]


def _documented_keys() -> list[tuple[int, str, bool]]:
    """(line number, key, whether the comment block right above the key starts with the key's name)."""
    lines = VALUES_TEXT.splitlines()
    results = []
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        stack.append((indent, key))
        if any(p in KUBERNETES_SHAPED for p in parents):
            continue
        above, first_comment_line = number - 1, ""
        while above >= 0 and lines[above].strip().startswith("#"):
            first_comment_line, above = lines[above].strip(), above - 1
        results.append((number + 1, key, first_comment_line.startswith(f"# {key} ")))
    return results


def test_every_value_is_documented_key_name_first() -> None:
    keys = _documented_keys()
    assert len(keys) > 40
    undocumented = [f"values.yaml:{n} {k}" for n, k, ok in keys if not ok]
    assert not undocumented, f"values without a '# <key> ...' comment above them: {undocumented}"


def test_helmignore_keeps_hack_out_of_the_package() -> None:
    assert "hack/" in (CHART / ".helmignore").read_text().split()
    assert Path(CHART / "hack" / "sync-crds.sh").exists()
