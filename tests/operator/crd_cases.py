"""FineTuneJob manifests the CRD must accept or reject, as data.

The unit tests check every case against the CRD with jsonschema and a CEL interpreter; the e2e suite
replays the same cases against a real API server. Dependency-free on purpose, so both can import it.

A case starts from a valid base manifest (``"lora"`` or ``"full"``) and applies ``changes``: dotted field
paths mapped to new values, ``None`` removing the field. With ``update`` set, the changed manifest is
created first and ``update`` is then applied on top of it as an update (this is how the transition rules,
the ones that compare with ``oldSelf``, get exercised). ``message`` is a fragment of the API server's
rejection (``""``: the object is accepted) and ``field`` is the field path the server reports it under
(``""`` for a rule on the whole object). ``keyword`` names the OpenAPI keyword that rejects the object;
``None`` means a CEL rule does.

Against a real API server, create with POST and update with PUT (carrying the created object's
resourceVersion), both with ``fieldValidation=Strict``. A rejection is HTTP 422 whose message reads
``<field>: Invalid value: ...: <message>``, with ``<nil>`` as the field of a rule on the whole object.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"


def base_manifest(base: str = "lora", name: str = "ftj-case") -> dict[str, Any]:
    """A complete, valid FineTuneJob: ``"lora"`` (LoRA, batchTokens, validation file) or ``"full"``."""
    spec: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/llama-3.2-1b/"},
        "dataset": {"train": "s3://datasets/support/train.jsonl", "format": "Auto"},
        "hyperparameters": {"epochs": 3, "learningRate": 0.0002, "batchTokens": 16384},
        "output": {"uri": "s3://adapters/support-bot/"},
        "s3": {
            "endpoint": "http://minio.storage:9000",
            "forcePathStyle": True,
            "credentialsSecretRef": {"name": "s3-creds"},
        },
        "resources": {"gpus": 1},
    }
    if base == "lora":
        spec["method"] = "LoRA"
        spec["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05}
        spec["dataset"]["validation"] = "s3://datasets/support/val.jsonl"
    elif base == "full":
        spec["method"] = "Full"
        spec["output"] = {"uri": "s3://models-out/support-bot-full/"}
        spec["hyperparameters"] = {"maxSteps": 500, "learningRate": 0.00002, "microBatchSize": 2}
    else:
        raise ValueError(f"unknown base manifest {base!r}: use 'lora' or 'full'")
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def apply_changes(manifest: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``manifest`` with each dotted path set to its value (``None`` removes the field)."""
    result = copy.deepcopy(manifest)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return result


@dataclass(frozen=True)
class CrdCase:
    name: str
    changes: dict[str, Any]
    message: str = ""
    field: str = ""
    keyword: str | None = None
    base: str = "lora"
    update: dict[str, Any] | None = None

    @property
    def valid(self) -> bool:
        return not self.message

    def manifests(self, name: str = "ftj-case") -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the object to create, the object to update it to or None). ``name`` is used unless the case
        sets metadata.name itself."""
        created = apply_changes(base_manifest(self.base, name), self.changes)
        updated = apply_changes(created, self.update) if self.update is not None else None
        return created, updated


IMMUTABLE = "create a new FineTuneJob instead"

_ENV_FROM_SECRET = {"secretKeyRef": {"name": "hf", "key": "token"}}

CASES: list[CrdCase] = [
    # trainer pod labels: the operator's own keys are refused
    CrdCase(
        "trainer-pod-labels-accepted",
        {"spec.trainer": {"podLabels": {"team": "nlp"}, "podAnnotations": {"sidecar.io/inject": "false"}}},
    ),
    CrdCase(
        "trainer-pod-labels-operator-key-rejected",
        {"spec.trainer": {"podLabels": {"kubetune.io/job-name": "other"}}},
        "spec.trainer.podLabels may not set kubetune.io/ or app.kubernetes.io/ labels",
        field="spec.trainer.podLabels",
    ),
    # metadata.name length (children are <name>-validate, <name>-trainer and <name>-config)
    CrdCase("name-54-chars-accepted", {"metadata.name": "a" * 54}),
    CrdCase(
        "name-55-chars-rejected",
        {"metadata.name": "a" * 55},
        "metadata.name must be at most 54 characters",
    ),
    # the validation pod and the dry run
    CrdCase("dry-run", {"spec.dryRun": True}),
    CrdCase(
        "validation-settings",
        {"spec.validation": {"queueName": "cpu-queue", "resources": {"cpu": 2, "memory": "8Gi"}}},
    ),
    CrdCase("validation-skipped", {"spec.validation": {"skip": True}}),
    CrdCase(
        "dry-run-without-validation-rejected",
        {"spec.dryRun": True, "spec.validation": {"skip": True}},
        "spec.dryRun needs the validation pod",
        "spec",
    ),
    CrdCase(
        "validation-memory-not-a-quantity",
        {"spec.validation": {"resources": {"memory": "lots"}}},
        "should match",
        "spec.validation.resources.memory",
        "anyOf",
    ),
    # lora only with the adapter methods, LoRA and QLoRA
    CrdCase("lora-block-with-lora-method", {}),
    CrdCase("lora-block-with-qlora-method", {"spec.method": "QLoRA"}),
    CrdCase("qlora-method-without-lora-block", {"spec.method": "QLoRA", "spec.lora": None}),
    CrdCase("lora-method-without-lora-block", {"spec.lora": None}),
    CrdCase("full-method-without-lora-block", {}, base="full"),
    CrdCase(
        "lora-block-with-full-method",
        {"spec.lora": {"r": 8}},
        "spec.lora is allowed only when spec.method is LoRA, QLoRA or DPO on LoRA adapters",
        field="spec",
        base="full",
    ),
    # DPO: preference tuning on LoRA adapters (lora block allowed) or Full (no lora block); dpo only with DPO
    CrdCase("dpo-on-lora-with-lora-block", {"spec.method": "DPO", "spec.dpo": {"beta": 0.2}}),
    CrdCase("dpo-without-dpo-block", {"spec.method": "DPO", "spec.dataset.format": "Preference"}),
    CrdCase(
        "dpo-full-without-lora-block",
        {"spec.method": "DPO", "spec.lora": None, "spec.dpo": {"parameters": "Full", "labelSmoothing": 0.1}},
    ),
    CrdCase(
        "dpo-full-with-lora-block",
        {"spec.method": "DPO", "spec.dpo": {"parameters": "Full"}},
        "spec.lora is allowed only when spec.method is LoRA, QLoRA or DPO on LoRA adapters",
        field="spec",
    ),
    CrdCase(
        "dpo-block-with-lora-method",
        {"spec.dpo": {"beta": 0.1}},
        "spec.dpo is allowed only when spec.method is DPO",
        field="spec",
    ),
    CrdCase(
        "dpo-beta-zero",
        {"spec.method": "DPO", "spec.dpo": {"beta": 0}},
        "greater than 0",
        "spec.dpo.beta",
        "minimum",
    ),
    CrdCase(
        "dpo-label-smoothing-half",
        {"spec.method": "DPO", "spec.dpo": {"labelSmoothing": 0.5}},
        "spec.dpo.labelSmoothing must be less than 0.5",
        field="spec.dpo.labelSmoothing",
    ),
    CrdCase("dpo-label-smoothing-zero", {"spec.method": "DPO", "spec.dpo": {"labelSmoothing": 0}}),
    CrdCase("dpo-label-smoothing-fraction", {"spec.method": "DPO", "spec.dpo": {"labelSmoothing": 0.25}}),
    CrdCase(
        "dpo-parameters-unknown",
        {"spec.method": "DPO", "spec.dpo": {"parameters": "QLoRA"}},
        "supported values",
        "spec.dpo.parameters",
        "enum",
    ),
    CrdCase(
        "dpo-on-messages",
        {"spec.method": "DPO", "spec.dataset.format": "Messages"},
        "spec.dataset.format Preference goes with spec.method DPO",
        field="spec",
    ),
    CrdCase(
        "lora-on-preference-pairs",
        {"spec.dataset.format": "Preference"},
        "spec.dataset.format Preference goes with spec.method DPO",
        field="spec",
    ),
    # baseModel.adapter: an S3 prefix (optional digest), only where adapters train
    CrdCase(
        "start-adapter-with-lora",
        {"spec.baseModel.adapter": {"uri": "s3://adapters/sft/", "sha256": "ab" * 32}},
    ),
    CrdCase("start-adapter-with-dpo", {"spec.method": "DPO", "spec.baseModel.adapter": {"uri": "s3://adapters/sft/"}}),
    CrdCase(
        "start-adapter-with-full",
        {"spec.baseModel.adapter": {"uri": "s3://adapters/sft/"}},
        "spec.baseModel.adapter needs a method that trains adapters",
        field="spec",
        base="full",
    ),
    CrdCase(
        "start-adapter-not-s3",
        {"spec.baseModel.adapter": {"uri": "hf://org/adapter"}},
        "spec.baseModel.adapter.uri must be an S3 prefix",
        field="spec.baseModel.adapter.uri",
    ),
    CrdCase(
        "start-adapter-bad-digest",
        {"spec.baseModel.adapter": {"uri": "s3://adapters/sft/", "sha256": "ABC"}},
        "should match",
        "spec.baseModel.adapter.sha256",
        "pattern",
    ),
    # exactly one of epochs / maxSteps
    CrdCase(
        "max-steps-instead-of-epochs",
        {"spec.hyperparameters.epochs": None, "spec.hyperparameters.maxSteps": 100},
    ),
    CrdCase(
        "epochs-and-max-steps",
        {"spec.hyperparameters.maxSteps": 100},
        "set exactly one of spec.hyperparameters.epochs or spec.hyperparameters.maxSteps",
        field="spec.hyperparameters",
    ),
    CrdCase(
        "neither-epochs-nor-max-steps",
        {"spec.hyperparameters.epochs": None},
        "set exactly one of spec.hyperparameters.epochs or spec.hyperparameters.maxSteps",
        field="spec.hyperparameters",
    ),
    # one batching style
    CrdCase(
        "micro-batch-with-accumulation",
        {
            "spec.hyperparameters.batchTokens": None,
            "spec.hyperparameters.microBatchSize": 4,
            "spec.hyperparameters.gradientAccumulation": 8,
        },
    ),
    CrdCase("no-batching-style-lets-the-trainer-pick", {"spec.hyperparameters.batchTokens": None}),
    CrdCase(
        "batch-tokens-with-micro-batch",
        {"spec.hyperparameters.microBatchSize": 4},
        "batchTokens cannot be combined with microBatchSize or",
        field="spec.hyperparameters",
    ),
    CrdCase(
        "batch-tokens-with-accumulation",
        {"spec.hyperparameters.gradientAccumulation": 4},
        "batchTokens cannot be combined with microBatchSize or",
        field="spec.hyperparameters",
    ),
    # validation xor validationSplit
    CrdCase("validation-split-only", {"spec.dataset.validation": None, "spec.dataset.validationSplit": 0.1}),
    CrdCase("no-validation-set", {"spec.dataset.validation": None}),
    CrdCase(
        "validation-and-validation-split",
        {"spec.dataset.validationSplit": 0.1},
        "set at most one of spec.dataset.validation",
        field="spec.dataset",
    ),
    # checkpointing: at most one interval
    CrdCase("checkpoint-every-steps", {"spec.checkpointing": {"everySteps": 200, "keep": 3}}),
    CrdCase("checkpoint-every-minutes", {"spec.checkpointing": {"everyMinutes": 15}}),
    CrdCase(
        "checkpoint-every-steps-and-minutes",
        {"spec.checkpointing": {"everySteps": 200, "everyMinutes": 15}},
        "set at most one of spec.checkpointing.everySteps or spec.checkpointing.everyMinutes",
        field="spec.checkpointing",
    ),
    # URIs
    CrdCase("base-model-from-hub-with-revision", {"spec.baseModel.uri": "hf://meta-llama/Llama-3.2-1B@main"}),
    CrdCase("base-model-from-hub-without-org", {"spec.baseModel.uri": "hf://gpt2"}),
    CrdCase("base-model-from-pvc", {"spec.baseModel.uri": "pvc://models/llama-3.2-1b"}),
    CrdCase(
        "base-model-over-http",
        {"spec.baseModel.uri": "https://example.com/llama"},
        "spec.baseModel.uri must be s3://bucket/prefix/, hf://org/name[@revision] or",
        field="spec.baseModel.uri",
    ),
    CrdCase(
        "base-model-hub-path-too-deep",
        {"spec.baseModel.uri": "hf://meta-llama/Llama-3.2-1B/extra"},
        "spec.baseModel.uri must be s3://bucket/prefix/, hf://org/name[@revision] or",
        field="spec.baseModel.uri",
    ),
    CrdCase("train-is-a-prefix", {"spec.dataset.train": "s3://datasets/support/"}),
    CrdCase(
        "train-is-a-local-path",
        {"spec.dataset.train": "/data/train.jsonl"},
        "spec.dataset.train must be an S3 URI",
        field="spec.dataset.train",
    ),
    CrdCase(
        "validation-on-another-store",
        {"spec.dataset.validation": "gs://datasets/val.jsonl"},
        "spec.dataset.validation must be an S3 URI",
        field="spec.dataset.validation",
    ),
    CrdCase(
        "output-without-trailing-slash",
        {"spec.output.uri": "s3://adapters/support-bot"},
        "spec.output.uri must end with '/'",
        field="spec.output.uri",
    ),
    CrdCase(
        "output-not-in-s3",
        {"spec.output.uri": "file:///tmp/out/"},
        "spec.output.uri must be an S3 prefix",
        field="spec.output.uri",
    ),
    CrdCase("s3-endpoint-https", {"spec.s3.endpoint": "https://s3.eu-central-1.amazonaws.com"}),
    CrdCase("s3-block-omitted", {"spec.s3": None}),
    CrdCase(
        "s3-endpoint-without-scheme",
        {"spec.s3.endpoint": "minio.storage:9000"},
        "spec.s3.endpoint must be an http:// or https:// URL",
        field="spec.s3.endpoint",
    ),
    # trainer env entries
    CrdCase(
        "trainer-env-value-from-secret",
        {"spec.trainer": {"env": [{"name": "HF_TOKEN", "valueFrom": _ENV_FROM_SECRET}]}},
    ),
    CrdCase(
        "trainer-env-value-and-value-from",
        {"spec.trainer": {"env": [{"name": "HF_TOKEN", "value": "x", "valueFrom": _ENV_FROM_SECRET}]}},
        "sets value or valueFrom, not both",
        field="spec.trainer.env[0]",
    ),
    # what the OpenAPI schema itself rejects
    CrdCase("method-unknown", {"spec.method": "DoRA"}, 'Unsupported value: "DoRA"', "spec.method", "enum"),
    CrdCase(
        "activation-checkpointing-unknown",
        {"spec.hyperparameters.activationCheckpointing": "Sometimes"},
        'Unsupported value: "Sometimes"',
        "spec.hyperparameters.activationCheckpointing",
        "enum",
    ),
    CrdCase("activation-checkpointing-always", {"spec.hyperparameters.activationCheckpointing": "Always"}),
    CrdCase(
        "format-unknown",
        {"spec.dataset.format": "CSV"},
        'Unsupported value: "CSV"',
        "spec.dataset.format",
        "enum",
    ),
    CrdCase(
        "scheduler-unknown",
        {"spec.hyperparameters.scheduler": "Step"},
        'Unsupported value: "Step"',
        "spec.hyperparameters.scheduler",
        "enum",
    ),
    CrdCase("lora-rank-zero", {"spec.lora.r": 0}, "greater than or equal to 1", "spec.lora.r", "minimum"),
    CrdCase(
        "learning-rate-zero",
        {"spec.hyperparameters.learningRate": 0},
        "should be greater than 0",
        "spec.hyperparameters.learningRate",
        "minimum",
    ),
    CrdCase(
        "too-many-gpus",
        {"spec.resources.gpus": 17},
        "less than or equal to 16",
        "spec.resources.gpus",
        "maximum",
    ),
    CrdCase(
        "validation-split-half",
        {"spec.dataset.validation": None, "spec.dataset.validationSplit": 0.5},
        "should be less than 0.5",
        "spec.dataset.validationSplit",
        "maximum",
    ),
    CrdCase(
        "max-seq-length-too-short",
        {"spec.dataset.maxSeqLength": 8},
        "greater than or equal to 16",
        "spec.dataset.maxSeqLength",
        "minimum",
    ),
    CrdCase(
        "epochs-as-string",
        {"spec.hyperparameters.epochs": "3"},
        "must be of type integer",
        "spec.hyperparameters.epochs",
        "type",
    ),
    CrdCase("output-missing", {"spec.output": None}, "Required value", "spec.output", "required"),
    CrdCase(
        "method-missing",
        {"spec.method": None, "spec.lora": None},
        "Required value",
        "spec.method",
        "required",
    ),
    CrdCase(
        "queue-name-not-a-label-value",
        {"spec.queueName": "Team Queue"},
        "should match",
        "spec.queueName",
        "pattern",
    ),
    CrdCase(
        "memory-not-a-quantity",
        {"spec.resources.memory": "lots"},
        "should match",
        "spec.resources.memory",
        "anyOf",
    ),
    CrdCase("memory-quantity", {"spec.resources.memory": "64Gi", "spec.resources.cpu": "7500m"}),
    # multi-node: nodes x gpus, the peer timeout, extended resources for the interconnect
    CrdCase(
        "multi-node-with-gpus",
        {
            "spec.resources": {"nodes": 4, "gpus": 8, "extraResources": {"rdma/ib": 1}},
            "spec.peerTimeoutSeconds": 120,
        },
    ),
    CrdCase("multi-node-name-52-chars", {"metadata.name": "a" * 52, "spec.resources.nodes": 2}),
    CrdCase(
        "multi-node-name-53-chars",
        {"metadata.name": "a" * 53, "spec.resources.nodes": 2},
        "metadata.name must be at most 52 characters when spec.resources.nodes is greater than 1",
    ),
    CrdCase("one-node-on-the-cpu", {"spec.resources": {"nodes": 1, "gpus": 0}}),
    CrdCase(
        "multi-node-without-gpus",
        {"spec.resources": {"nodes": 2, "gpus": 0}},
        "spec.resources.nodes greater than 1 needs spec.resources.gpus of at least 1",
        field="spec.resources",
    ),
    CrdCase(
        "too-many-nodes",
        {"spec.resources.nodes": 65},
        "less than or equal to 64",
        "spec.resources.nodes",
        "maximum",
    ),
    CrdCase(
        "zero-nodes",
        {"spec.resources.nodes": 0},
        "greater than or equal to 1",
        "spec.resources.nodes",
        "minimum",
    ),
    CrdCase(
        "peer-timeout-too-short",
        {"spec.peerTimeoutSeconds": 2},
        "greater than or equal to 5",
        "spec.peerTimeoutSeconds",
        "minimum",
    ),
    CrdCase(
        "extra-resource-without-domain",
        {"spec.resources.extraResources": {"cpu": 4}},
        "spec.resources.extraResources keys must be extended resource names with a domain",
        field="spec.resources.extraResources",
    ),
    CrdCase(
        "extra-resource-kubernetes-io",
        {"spec.resources.extraResources": {"hugepages.kubernetes.io/x": 1}},
        "spec.resources.extraResources keys must be extended resource names with a domain",
        field="spec.resources.extraResources",
    ),
    CrdCase(
        "extra-resource-not-a-whole-number",
        {"spec.resources.extraResources": {"rdma/ib": "500m"}},
        "must be of type integer",
        "spec.resources.extraResources.rdma/ib",
        "type",
    ),
    CrdCase(
        "extra-resource-zero",
        {"spec.resources.extraResources": {"rdma/ib": 0}},
        "greater than or equal to 1",
        "spec.resources.extraResources.rdma/ib",
        "minimum",
    ),
    CrdCase("cpu-as-integer", {"spec.resources.cpu": 8}),
    # output.select, earlyStoppingPatience (need a validation set) and dataset.textMode
    CrdCase("select-best-eval-with-validation-file", {"spec.output.select": "BestEval"}),
    CrdCase(
        "select-best-eval-with-validation-split",
        {
            "spec.output.select": "BestEval",
            "spec.dataset.validation": None,
            "spec.dataset.validationSplit": 0.1,
        },
    ),
    CrdCase("select-last-without-validation", {"spec.output.select": "Last"}, base="full"),
    CrdCase(
        "select-best-eval-without-validation",
        {"spec.output.select": "BestEval"},
        "spec.output.select BestEval picks the step with the lowest validation loss and needs a",
        field="spec",
        base="full",
    ),
    CrdCase(
        "select-unknown",
        {"spec.output.select": "Best"},
        'Unsupported value: "Best"',
        "spec.output.select",
        "enum",
    ),
    CrdCase(
        "early-stopping-with-validation",
        {"spec.hyperparameters.earlyStoppingPatience": 3, "spec.output.select": "BestEval"},
    ),
    CrdCase(
        "early-stopping-without-validation",
        {"spec.hyperparameters.earlyStoppingPatience": 3},
        "spec.hyperparameters.earlyStoppingPatience stops when the validation loss stops improving",
        field="spec",
        base="full",
    ),
    CrdCase(
        "early-stopping-patience-zero",
        {"spec.hyperparameters.earlyStoppingPatience": 0},
        "greater than or equal to 1",
        "spec.hyperparameters.earlyStoppingPatience",
        "minimum",
    ),
    CrdCase("text-mode-truncate", {"spec.dataset.format": "Text", "spec.dataset.textMode": "Truncate"}),
    CrdCase(
        "text-mode-unknown",
        {"spec.dataset.textMode": "Split"},
        'Unsupported value: "Split"',
        "spec.dataset.textMode",
        "enum",
    ),
    CrdCase(
        "update-select",
        {},
        "spec.output is immutable: " + IMMUTABLE,
        field="spec.output",
        update={"spec.output.select": "BestEval"},
    ),
    # immutability of the fields that define the run (updates)
    CrdCase("reapply-same-manifest", {}, update={}),
    CrdCase(
        "update-validation-skip",
        {},
        "spec.validation is immutable",
        field="spec",
        update={"spec.validation": {"skip": True}},
    ),
    CrdCase(
        "update-dry-run-off",
        {"spec.dryRun": True},
        "spec.dryRun is immutable",
        field="spec.dryRun",
        update={"spec.dryRun": False},
    ),
    CrdCase(
        "update-base-model",
        {},
        "spec.baseModel is immutable: " + IMMUTABLE,
        field="spec.baseModel",
        update={"spec.baseModel.uri": "s3://models/llama-3.2-3b/"},
    ),
    CrdCase(
        "update-dataset-train",
        {},
        "spec.dataset is immutable: " + IMMUTABLE,
        field="spec.dataset",
        update={"spec.dataset.train": "s3://datasets/support/train-v2.jsonl"},
    ),
    CrdCase(
        "update-dataset-add-column-map",
        {},
        "spec.dataset is immutable: " + IMMUTABLE,
        field="spec.dataset",
        update={"spec.dataset.columnMap": {"prompt": "question"}},
    ),
    CrdCase(
        "update-dpo-beta",
        {"spec.method": "DPO", "spec.dpo": {"beta": 0.1}},
        "spec.dpo is immutable: it defines the training run; " + IMMUTABLE,
        field="spec",
        update={"spec.dpo.beta": 0.3},
    ),
    CrdCase(
        "update-method",
        {},
        "spec.method is immutable: " + IMMUTABLE,
        field="spec.method",
        base="full",
        update={"spec.method": "LoRA"},
    ),
    CrdCase(
        "update-lora-rank",
        {},
        "spec.lora is immutable: it defines the training run; " + IMMUTABLE,
        field="spec",
        update={"spec.lora.r": 64},
    ),
    CrdCase(
        "update-remove-lora",
        {},
        "spec.lora is immutable: it defines the training run; " + IMMUTABLE,
        field="spec",
        update={"spec.lora": None},
    ),
    CrdCase(
        "update-add-lora",
        {"spec.lora": None},
        "spec.lora is immutable: it defines the training run; " + IMMUTABLE,
        field="spec",
        update={"spec.lora": {"r": 8}},
    ),
    CrdCase(
        "update-learning-rate",
        {},
        "spec.hyperparameters is immutable: " + IMMUTABLE,
        field="spec.hyperparameters",
        update={"spec.hyperparameters.learningRate": 0.0001},
    ),
    CrdCase(
        "update-output-uri",
        {},
        "spec.output is immutable: " + IMMUTABLE,
        field="spec.output",
        update={"spec.output.uri": "s3://adapters/support-bot-v2/"},
    ),
    CrdCase(
        "update-merge-adapter",
        {},
        "spec.output is immutable: " + IMMUTABLE,
        field="spec.output",
        update={"spec.output.mergeAdapter": True},
    ),
    # what may change on a live job
    CrdCase("update-suspend", {"spec.suspend": True}, update={"spec.suspend": False}),
    CrdCase(
        "update-scheduling",
        {},
        update={
            "spec.resources": {
                "nodes": 2,
                "gpus": 2,
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "training-low",
            },
            "spec.queueName": "team-a",
        },
    ),
    CrdCase(
        "update-lifecycle",
        {},
        update={
            "spec.ttlSecondsAfterFinished": 3600,
            "spec.activeDeadlineSeconds": 86400,
            "spec.backoffLimit": 5,
        },
    ),
    CrdCase(
        "update-trainer-s3-and-checkpointing",
        {},
        update={
            "spec.trainer": {"image": "registry.example.com/kubetune/trainer:0.1.1"},
            "spec.s3.endpoint": "http://minio.storage.svc:9000",
            "spec.checkpointing": {"everySteps": 50},
        },
    ),
]

INVALID_CASES = [case for case in CASES if not case.valid]
VALID_CASES = [case for case in CASES if case.valid]
