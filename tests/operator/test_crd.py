"""The FineTuneJob CRD: names, printer columns, a structural and documented schema, the examples, and the
CEL rules accepting and rejecting what they should (crd_cases.py, replayed against a real API server by
the e2e suite)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from tests.operator import crd_cases, crd_helpers
from tests.operator.crd_cases import CASES, CrdCase
from tests.operator.crd_helpers import check, load_crd, version_schema, walk_schema

SPEC_IMMUTABLE = ("baseModel", "dataset", "method", "hyperparameters", "output")
SPEC_MUTABLE = (
    "s3",
    "resources",
    "checkpointing",
    "suspend",
    "activeDeadlineSeconds",
    "backoffLimit",
    "ttlSecondsAfterFinished",
    "queueName",
    "trainer",
)


def _version() -> dict[str, Any]:
    (version,) = load_crd()["spec"]["versions"]
    return version


# --- names --------------------------------------------------------------------------------------------------


def test_crd_names_scope_and_version() -> None:
    crd = load_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    spec = crd["spec"]
    assert spec["group"] == "kubetune.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["kubetune"],
    }
    version = _version()
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in _version()["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Phase", "string", ".status.phase", 0),
        ("Method", "string", ".spec.method", 0),
        ("Model", "string", ".spec.baseModel.uri", 0),
        ("Progress", "number", ".status.progress.percent", 0),
        ("Loss", "number", ".status.metrics.trainLoss", 0),
        ("Est-GPU-h", "number", ".status.plan.estimate.gpuHours", 0),
        ("Age", "date", ".metadata.creationTimestamp", 0),
        ("Message", "string", ".status.message", 1),
        ("Adapter", "string", ".status.adapter.uri", 1),
        ("Trained-Model", "string", ".status.model.uri", 1),
        ("Nodes", "integer", ".spec.resources.nodes", 1),
        ("GPUs", "integer", ".spec.resources.gpus", 1),
    ]


@pytest.mark.parametrize("column", _version()["additionalPrinterColumns"], ids=lambda c: c["name"])
def test_printer_columns_point_at_schema_fields(column: dict[str, Any]) -> None:
    if column["jsonPath"].startswith(".metadata."):
        return
    node = version_schema()
    for part in column["jsonPath"].lstrip(".").split("."):
        assert part in node.get("properties", {}), f"{column['jsonPath']}: no field {part!r} in the schema"
        node = node["properties"][part]
    expected = {"string": "string", "number": "number", "integer": "integer", "date": "string"}[
        column["type"]
    ]
    assert node["type"] == expected


# --- the schema is structural, documented and bounded -------------------------------------------------------


def test_schema_is_structural() -> None:
    schema = version_schema()
    assert schema["type"] == "object"
    # The API server refuses anything else at the root metadata, a description included.
    assert schema["properties"]["metadata"] == {"type": "object"}
    problems = []
    for node in walk_schema(schema):
        s = node.schema
        if "type" not in s and not s.get("x-kubernetes-int-or-string"):
            problems.append(f"{node.path}: no type")
        if "properties" in s and "additionalProperties" in s:
            problems.append(f"{node.path}: both properties and additionalProperties")
        if (
            s.get("type") == "object"
            and not (
                "properties" in s
                or "additionalProperties" in s
                or s.get("x-kubernetes-preserve-unknown-fields")
            )
            and node.path != "metadata"
        ):
            problems.append(f"{node.path}: object without properties (would be pruned to {{}})")
        if s.get("type") == "array" and "items" not in s:
            problems.append(f"{node.path}: array without items")
        if s.get("x-kubernetes-list-type") == "map":
            missing = set(s.get("x-kubernetes-list-map-keys", [])) - set(s["items"].get("required", []))
            if missing or not s.get("x-kubernetes-list-map-keys"):
                problems.append(f"{node.path}: list-map keys must be required fields of the items")
        if s.get("x-kubernetes-int-or-string") and s.get("anyOf") != [
            {"type": "integer"},
            {"type": "string"},
        ]:
            problems.append(f"{node.path}: int-or-string without the anyOf [integer, string] form")
        if "anyOf" in s and not s.get("x-kubernetes-int-or-string"):
            problems.append(f"{node.path}: uses anyOf")
        for key in ("oneOf", "allOf", "not", "$ref", "nullable", "uniqueItems"):
            if key in s:
                problems.append(f"{node.path}: uses {key}")
    assert not problems, "\n".join(problems)


def test_every_field_has_a_description() -> None:
    undocumented = [
        node.path
        for node in walk_schema(version_schema())
        if node.path != "metadata" and not node.schema.get("description", "").strip()
    ]
    assert undocumented == []


def test_defaults_are_valid_for_their_field() -> None:
    checked = 0
    for node in walk_schema(version_schema()):
        if "default" in node.schema:
            validator = jsonschema.Draft4Validator(crd_helpers.to_jsonschema(node.schema))
            value = crd_helpers.apply_defaults(node.schema, node.schema["default"])
            assert not list(validator.iter_errors(value)), f"{node.path}: default {node.schema['default']!r}"
            checked += 1
    assert checked >= 20


def test_spec_strings_lists_and_maps_are_bounded_for_the_cel_cost_budget() -> None:
    unbounded = []
    for node in walk_schema(version_schema()["properties"]["spec"], "spec"):
        s = node.schema
        if s.get("type") == "string" and "enum" not in s and "maxLength" not in s:
            unbounded.append(f"{node.path}: string without maxLength")
        if s.get("type") == "array" and "maxItems" not in s:
            unbounded.append(f"{node.path}: array without maxItems")
        if isinstance(s.get("additionalProperties"), dict) and "maxProperties" not in s:
            unbounded.append(f"{node.path}: map without maxProperties")
    assert unbounded == []


def test_every_rule_has_a_message_that_names_the_field() -> None:
    rules = crd_helpers.all_rules()
    assert len(rules) >= 15
    for rule in rules:
        assert rule.message, f"{rule.path}: {rule.rule} has no message"
        assert "\n" not in rule.message and "\n" not in rule.rule, "the API server refuses line breaks"
        assert "spec." in rule.message or "metadata.name" in rule.message, rule.message


def test_immutable_run_fields_have_transition_rules_and_the_rest_stay_mutable() -> None:
    spec = version_schema()["properties"]["spec"]
    for name in SPEC_IMMUTABLE:
        rules = spec["properties"][name].get("x-kubernetes-validations", [])
        assert {
            "rule": "self == oldSelf",
            "message": f"spec.{name} is immutable: create a new FineTuneJob instead",
        } in rules
    spec_level = [r["rule"] for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert sorted(spec_level) == [
        "has(self.dpo) == has(oldSelf.dpo) && (!has(self.dpo) || self.dpo == oldSelf.dpo)",
        "has(self.lora) == has(oldSelf.lora) && (!has(self.lora) || self.lora == oldSelf.lora)",
        "has(self.validation) == has(oldSelf.validation) && (!has(self.validation) || self.validation =="
        " oldSelf.validation)",
    ]
    for node in walk_schema(spec, "spec"):
        top = node.path.split(".")[1] if "." in node.path else ""
        if top in SPEC_MUTABLE:
            assert all("oldSelf" not in r["rule"] for r in node.schema.get("x-kubernetes-validations", [])), (
                node.path
            )


def test_status_conditions_follow_metav1_condition() -> None:
    conditions = version_schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert sorted(item["required"]) == sorted(["type", "status", "lastTransitionTime", "reason", "message"])
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_spec_and_status_fields_are_the_agreed_ones() -> None:
    props = version_schema()["properties"]
    spec, status = props["spec"]["properties"], props["status"]["properties"]
    assert set(spec) == {
        "baseModel", "dataset", "method", "lora", "dpo", "hyperparameters", "output", "s3", "resources",
        "checkpointing", "suspend", "activeDeadlineSeconds", "backoffLimit", "schedulingTimeoutSeconds",
        "progressDeadlineSeconds", "startupDeadlineSeconds", "peerTimeoutSeconds",
            "ttlSecondsAfterFinished",
        "queueName", "trainer",
        "dryRun", "validation",
    }  # fmt: skip
    assert set(spec["hyperparameters"]["properties"]) == {
        "epochs", "maxSteps", "learningRate", "batchTokens", "microBatchSize", "gradientAccumulation",
        "warmupRatio", "scheduler", "weightDecay", "seed", "trainOn", "packing", "activationCheckpointing",
        "evalEverySteps", "earlyStoppingPatience",
    }  # fmt: skip
    assert set(spec["output"]["properties"]) == {"uri", "mergeAdapter", "select"}
    assert set(spec["dataset"]["properties"]) == {
        "train", "validation", "validationSplit", "format", "columnMap", "maxSeqLength", "textMode",
    }  # fmt: skip
    assert set(status) == {
        "conditions", "phase", "message", "progress", "metrics", "adapter", "model", "checkpoint",
        "restarts", "noProgressRestarts", "plan", "startTime", "completionTime", "observedGeneration",
        "trainerJob", "provenance",
        "history",
    }  # fmt: skip
    record = {"uri", "files", "sizeBytes", "sha256", "baseModel", "selected"}
    assert set(status["adapter"]["properties"]) == set(status["model"]["properties"]) == record
    assert set(status["adapter"]["properties"]["selected"]["properties"]) == {"select", "step", "evalLoss"}
    assert "evalTokenAccuracy" in status["metrics"]["properties"]
    assert status["provenance"]["x-kubernetes-preserve-unknown-fields"] is True


# --- defaults -----------------------------------------------------------------------------------------------


def test_a_minimal_job_gets_the_documented_defaults() -> None:
    minimal = {
        "apiVersion": crd_cases.API_VERSION,
        "kind": crd_cases.KIND,
        "metadata": {"name": "minimal"},
        "spec": {
            "baseModel": {"uri": "hf://gpt2"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "method": "LoRA",
            "lora": {},
            "hyperparameters": {"epochs": 1},
            "output": {"uri": "s3://out/"},
        },
    }
    assert check(minimal).ok
    spec = crd_helpers.apply_defaults(version_schema(), minimal)["spec"]
    assert spec["dataset"] == {
        "train": "s3://data/train.jsonl",
        "format": "Auto",
        "maxSeqLength": 2048,
        "textMode": "Chunk",
    }
    assert spec["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05}
    assert spec["hyperparameters"] == {
        "epochs": 1,
        "learningRate": 0.0002,
        "warmupRatio": 0.03,
        "scheduler": "Cosine",
        "weightDecay": 0,
        "seed": 42,
        "trainOn": "Completions",
        "packing": True,
        "activationCheckpointing": "Auto",
    }
    assert spec["output"] == {"uri": "s3://out/", "mergeAdapter": False, "select": "Last"}
    assert spec["s3"] == {"region": "us-east-1", "forcePathStyle": False}
    # No schema default for gpuResourceName: unset means the operator's setting, which a default would hide.
    assert spec["resources"] == {"nodes": 1, "gpus": 1}
    assert spec["peerTimeoutSeconds"] == 60
    assert spec["checkpointing"] == {"keep": 2}
    assert (spec["suspend"], spec["backoffLimit"]) == (False, 3)
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec


def test_unknown_fields_are_rejected() -> None:
    manifest = crd_cases.apply_changes(crd_cases.base_manifest(), {"spec.hyperparameters.learning_rate": 0.1})
    verdict = check(manifest)
    assert [(crd_helpers.schema_error_field(e), e.validator) for e in verdict.schema_errors] == [
        ("spec.hyperparameters", "additionalProperties")
    ]


def test_duplicate_env_names_are_rejected() -> None:
    env = [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]
    verdict = check(crd_cases.apply_changes(crd_cases.base_manifest(), {"spec.trainer": {"env": env}}))
    assert verdict.list_errors == ["spec.trainer.env[1]: Duplicate value: {'name': 'A'}"]


# --- the examples -------------------------------------------------------------------------------------------

EXAMPLES = crd_helpers.load_examples()
REQUIRED_EXAMPLES = {
    "lora-s3.yaml",
    "full-sft.yaml",
    "with-validation.yaml",
    "suspended-kueue.yaml",
    "sft-then-dpo.yaml",
}


def _jobs(file_name: str) -> list[dict[str, Any]]:
    return [doc for doc in EXAMPLES[file_name] if doc.get("kind") == "FineTuneJob"]


def test_the_required_examples_exist_and_show_what_they_are_named_for() -> None:
    assert set(EXAMPLES) >= REQUIRED_EXAMPLES
    (lora,) = _jobs("lora-s3.yaml")
    assert lora["spec"]["method"] == "LoRA" and lora["spec"]["baseModel"]["uri"].startswith("s3://")
    (full,) = _jobs("full-sft.yaml")
    assert full["spec"]["method"] == "Full" and "lora" not in full["spec"]
    (with_validation,) = _jobs("with-validation.yaml")
    dataset = with_validation["spec"]["dataset"]
    assert "validation" in dataset or "validationSplit" in dataset
    (suspended,) = _jobs("suspended-kueue.yaml")
    assert suspended["spec"]["suspend"] is True and suspended["spec"]["queueName"]
    sft, dpo = _jobs("sft-then-dpo.yaml")
    assert sft["spec"]["method"] == "LoRA" and dpo["spec"]["method"] == "DPO"
    assert dpo["spec"]["baseModel"]["adapter"]["uri"] == sft["spec"]["output"]["uri"]
    assert dpo["spec"]["baseModel"]["uri"] == sft["spec"]["baseModel"]["uri"]


@pytest.mark.parametrize("file_name", sorted(EXAMPLES))
def test_example_is_a_valid_manifest(file_name: str) -> None:
    docs = EXAMPLES[file_name]
    assert docs, f"{file_name} is empty"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        assert "namespace" not in doc["metadata"], "examples are applied with -n <namespace>"
        if doc["kind"] == "FineTuneJob":
            assert doc["apiVersion"] == crd_cases.API_VERSION
            verdict = check(doc)
            assert verdict.ok, "\n".join(verdict.messages())
        else:
            assert (doc["apiVersion"], doc["kind"]) == ("v1", "Secret")
            assert set(doc["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_examples_reference_a_secret_that_the_examples_define() -> None:
    secrets = {
        doc["metadata"]["name"] for docs in EXAMPLES.values() for doc in docs if doc["kind"] == "Secret"
    }
    for file_name in EXAMPLES:
        for job in _jobs(file_name):
            ref = job["spec"].get("s3", {}).get("credentialsSecretRef")
            if ref:
                assert ref["name"] in secrets, f"{file_name}: Secret {ref['name']} is not in examples/"


# --- the cases, with CEL ------------------------------------------------------------------------------------


def _verdict(case: CrdCase, log: crd_helpers.RuleLog | None = None) -> crd_helpers.Verdict:
    created, updated = case.manifests()
    first = check(created, log=log)
    if updated is None:
        return first
    assert first.ok, f"the object an update case starts from must be valid: {first.messages()}"
    return check(updated, old=created, log=log)


def test_the_case_table_is_big_enough() -> None:
    assert len(crd_cases.INVALID_CASES) >= 15
    assert len(CASES) >= 25
    assert len({case.name for case in CASES}) == len(CASES)
    assert sum(1 for case in CASES if case.update is not None) >= 10


@pytest.mark.parametrize("case", crd_cases.VALID_CASES, ids=lambda c: c.name)
def test_valid_case_is_accepted(case: CrdCase) -> None:
    verdict = _verdict(case)
    assert verdict.ok, "\n".join(verdict.messages())


@pytest.mark.parametrize(
    "case", [c for c in crd_cases.INVALID_CASES if c.keyword is None], ids=lambda c: c.name
)
def test_cel_rule_rejects_case_with_its_message(case: CrdCase) -> None:
    verdict = _verdict(case)
    assert not verdict.schema_errors, verdict.messages()
    assert [(v.field, v.detail) for v in verdict.violations] == [(case.field, "")], verdict.messages()
    assert case.message in verdict.violations[0].message


@pytest.mark.parametrize("case", [c for c in crd_cases.INVALID_CASES if c.keyword], ids=lambda c: c.name)
def test_schema_rejects_case_at_its_field(case: CrdCase) -> None:
    verdict = _verdict(case)
    assert [(crd_helpers.schema_error_field(e), e.validator) for e in verdict.schema_errors] == [
        (case.field, case.keyword)
    ]


def test_every_cel_rule_is_seen_passing_and_failing() -> None:
    log = crd_helpers.RuleLog()
    for case in CASES:
        _verdict(case, log)
    rules = set(crd_helpers.all_rules())
    assert rules - log.failed == set(), "rules no invalid case breaks"
    assert rules - log.passed == set(), "rules no valid case satisfies"


@pytest.mark.parametrize(
    ("uri", "accepted"),
    [
        ("s3://models/llama-3.2-1b/", True),
        ("s3://models/", True),
        ("hf://meta-llama/Llama-3.2-1B", True),
        ("hf://meta-llama/Llama-3.2-1B@a1b2c3d", True),
        ("hf://org/name@refs/pr/1", True),
        ("pvc://model-cache", True),
        ("pvc://model-cache/llama/3.2", True),
        ("s3://models", False),
        ("s3://Models/x/", False),
        ("s3://models/with space/", False),
        ("hf://", False),
        ("hf://org/name@", False),
        ("pvc://Claim/path", False),
        ("/models/llama", False),
        ("S3://models/x/", False),
    ],
)
def test_base_model_uri_rule(uri: str, accepted: bool) -> None:
    manifest = crd_cases.apply_changes(crd_cases.base_manifest(), {"spec.baseModel.uri": uri})
    assert check(manifest).ok is accepted


@pytest.mark.parametrize(
    ("uri", "accepted"),
    [
        ("s3://adapters/support-bot/", True),
        ("s3://adapters/", True),
        ("s3://adapters/a/b/c/", True),
        ("s3://adapters/support-bot", False),
        ("s3://adapters", False),
        ("s3://adapters/with space/", False),
        ("s3:///missing-bucket/", False),
    ],
)
def test_output_uri_rules(uri: str, accepted: bool) -> None:
    manifest = crd_cases.apply_changes(crd_cases.base_manifest(), {"spec.output.uri": uri})
    assert check(manifest).ok is accepted


def test_numbers_compare_as_the_api_server_types_them() -> None:
    # learningRate is a `number`: 1 and 1.0 are the same double, so re-applying with either is no change.
    created = crd_cases.apply_changes(crd_cases.base_manifest(), {"spec.hyperparameters.learningRate": 1})
    updated = crd_cases.apply_changes(created, {"spec.hyperparameters.learningRate": 1.0})
    assert check(updated, old=created).ok


def test_a_full_status_validates() -> None:
    status = {
        "phase": "Succeeded",
        "message": "adapter written to s3://adapters/support-bot/",
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "Completed",
                "message": "adapter written to s3://adapters/support-bot/",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "observedGeneration": 1,
            },
            {
                "type": "Reconciling",
                "status": "False",
                "reason": "Completed",
                "message": "",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
            },
        ],
        "progress": {
            "step": 420,
            "totalSteps": 420,
            "epoch": 3,
            "percent": 100,
            "etaSeconds": 0,
            "tokensPerSecond": 51234.5,
            "trainedTokens": 6881280,
        },
        "metrics": {
            "trainLoss": 1.21,
            "evalLoss": 1.35,
            "bestEvalLoss": 1.33,
            "bestStep": 280,
            "gradNorm": 0.4,
        },
        "adapter": {
            "uri": "s3://adapters/support-bot/",
            "files": ["adapter_config.json", "adapter_model.safetensors"],
            "sizeBytes": 45219840,
            "sha256": "0" * 64,
            "baseModel": "s3://models/llama-3.2-1b/",
        },
        "checkpoint": {"uri": "s3://adapters/support-bot/checkpoints/step-400/", "step": 400},
        "restarts": 1,
        "startTime": "2026-01-02T02:00:00Z",
        "completionTime": "2026-01-02T03:04:05Z",
        "trainerJob": "support-bot-lora-trainer",
        "provenance": {"dataset": {"etag": "abc", "rows": 1000}, "trainerImage": "kubetune/trainer:0.1.0"},
        "history": {
            "step": [140, 280, 420],
            "trainLoss": [1.9, 1.4, 1.21],
            "learningRate": [0.0002, 0.00012, 0.0],
            "evalStep": [280, 420],
            "evalLoss": [1.33, 1.35],
        },
    }
    manifest = {**crd_cases.base_manifest(), "status": status}
    assert check(manifest).ok, check(manifest).messages()
    broken = {**status, "conditions": [{"type": "Succeeded", "status": "Yes"}]}
    errors = check({**manifest, "status": broken}).schema_errors
    assert sorted((crd_helpers.schema_error_field(e), e.validator) for e in errors) == [
        ("status.conditions[0].lastTransitionTime", "required"),
        ("status.conditions[0].message", "required"),
        ("status.conditions[0].reason", "required"),
        ("status.conditions[0].status", "enum"),
    ]
    # The history is bounded, and holds numbers only.
    too_long = {"step": list(range(121))}
    assert not check({**manifest, "status": {"history": too_long}}).ok
    assert not check({**manifest, "status": {"history": {"trainLoss": ["NaN"]}}}).ok
    # Integer fields take integers only: the operator must cast scraped gauges before writing them.
    assert not check({**manifest, "status": {"progress": {"step": 4.5}}}).ok
