"""The FineTuneJob CRD on a real API server: every case in tests/operator/crd_cases.py is accepted or rejected
with its message by the server's own OpenAPI validation and CEL, including the immutability rules on update,
and the shipped examples are accepted."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from tests.operator.crd_cases import CASES, CrdCase

from e2e.cluster.cluster import REPO_ROOT
from e2e.cluster.kube import ApiError, KubeClient
from e2e.tests.helpers import ftj_path

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def ns(crd: JSON, make_namespace: Any) -> str:
    return str(make_namespace("e2e-crd"))


def test_enough_invalid_cases() -> None:
    assert sum(1 for c in CASES if not c.valid) >= 15


def test_crd_names_and_columns(crd: JSON) -> None:
    names = crd["status"]["acceptedNames"]
    assert (names["kind"], names["plural"]) == ("FineTuneJob", "finetunejobs")
    assert "ftj" in names["shortNames"] and "kubetune" in names["categories"]
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    columns = {c["name"] for c in version.get("additionalPrinterColumns", [])}
    assert {"Phase", "Method", "Age"} <= columns


def assert_rejected_as_expected(case: CrdCase, err: ApiError, what: str) -> None:
    """The API server refused ``case`` (a create or an update) with the case's message and field."""
    assert not case.valid, f"valid {what} rejected: {err.message}"
    assert err.status == 422, err
    assert case.message in err.message
    if case.field:
        fields = [str(c.get("field", "")) for c in err.body.get("details", {}).get("causes", [])]
        assert any(f == case.field or f.startswith(case.field + "[") for f in fields), (fields, err.message)


def _case_name(case: CrdCase) -> str:
    created, _ = case.manifests()
    if created["metadata"]["name"] != "ftj-case":
        return str(created["metadata"]["name"])
    return case.name[:55].strip("-")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crd_case(kube: KubeClient, ns: str, case: CrdCase) -> None:
    created, updated = case.manifests(name=_case_name(case))
    path = ftj_path(ns)
    if updated is None:
        # A dry run goes through defaulting, schema and CEL validation exactly like a real create.
        try:
            kube.request("POST", path, created, params={"dryRun": "All", "fieldValidation": "Strict"})
        except ApiError as err:
            assert_rejected_as_expected(case, err, "case")
            return
        assert case.valid, f"the API server accepted an invalid FineTuneJob (expected: {case.message!r})"
        return

    current = kube.create(path, created)
    name = current["metadata"]["name"]
    try:
        updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            kube.replace(f"{path}/{name}", updated)
        except ApiError as err:
            assert_rejected_as_expected(case, err, "update")
            return
        assert case.valid, f"the API server accepted a forbidden update (expected: {case.message!r})"
    finally:
        kube.delete_if_exists(f"{path}/{name}")


def test_defaults_are_applied_by_the_server(kube: KubeClient, ns: str) -> None:
    created, _ = CrdCase("defaults", {"spec.hyperparameters": {"epochs": 1}, "spec.lora": {}}).manifests(
        "defaults"
    )
    obj = kube.request("POST", ftj_path(ns), created, params={"dryRun": "All"})
    spec = obj["spec"]
    assert spec["lora"]["r"] == 16 and spec["lora"]["alpha"] == 32
    assert spec["hyperparameters"]["learningRate"] == pytest.approx(2e-4)
    assert spec["hyperparameters"]["scheduler"] == "Cosine"
    assert spec["dataset"]["maxSeqLength"] == 2048
    assert spec["backoffLimit"] == 3


def test_unknown_fields_are_rejected_under_strict_validation(kube: KubeClient, ns: str) -> None:
    created, _ = CrdCase("typo", {"spec.hyperparameters.learningrate": 0.1}).manifests("typo")
    with pytest.raises(ApiError) as err:
        kube.request("POST", ftj_path(ns), created, params={"dryRun": "All", "fieldValidation": "Strict"})
    assert 'unknown field "spec.hyperparameters.learningrate"' in err.value.message


def test_examples_are_accepted(kube: KubeClient, ns: str) -> None:
    examples = sorted((REPO_ROOT / "examples").glob("*.yaml"))
    assert examples
    checked = 0
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "FineTuneJob":
                continue
            try:
                kube.request("POST", ftj_path(ns), doc, params={"dryRun": "All", "fieldValidation": "Strict"})
            except ApiError as err:
                pytest.fail(f"{path.name}: {err.message}")
            checked += 1
    assert checked >= 3
