"""Checks on a parsed spec, run before any child is created.

The CRD's schema and CEL rules reject most of these at admission; the operator repeats the cross-field rules
so that an object that got in another way (an older CRD, validation turned off) fails with a clear message
instead of a confused trainer.
"""

from __future__ import annotations

import re

from kubetune_operator import labels
from kubetune_operator.builders.trainer_job import PVC_SCHEME, pvc_claim
from kubetune_operator.models import FineTuneJob
from kubetune_trainer import contract

BASE_MODEL_SCHEMES = ("s3://", "hf://", PVC_SCHEME)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def validate(job: FineTuneJob) -> list[str]:
    """Every problem at once, each naming its field and what to do."""
    if job.spec is None:
        return list(job.spec_errors) or [
            "spec: missing; a FineTuneJob needs baseModel, dataset, method, output"
        ]
    spec = job.spec
    problems: list[str] = []
    if len(job.name) > labels.MAX_NAME_LENGTH:
        problems.append(
            f"metadata.name: {len(job.name)} characters, at most {labels.MAX_NAME_LENGTH} allowed "
            f"(the trainer Job is named <name>{labels.TRAINER_JOB_SUFFIX}); choose a shorter name"
        )
    if spec.method not in contract.METHODS:
        problems.append(f"spec.method: {spec.method!r} is not one of {', '.join(contract.METHODS)}")
    if spec.lora is not None and spec.weights_method not in contract.ADAPTER_METHODS:
        problems.append(
            "spec.lora: only allowed with the adapter methods (LoRA, QLoRA, DPO on LoRA); remove the lora "
            "block or set method: LoRA"
        )
    if spec.dpo is not None and spec.method not in contract.PREFERENCE_METHODS:
        problems.append("spec.dpo: only allowed with method DPO; remove the dpo block or set method: DPO")
    if spec.dpo is not None and spec.dpo.parameters not in contract.DPO_PARAMETERS:
        problems.append(
            f"spec.dpo.parameters: {spec.dpo.parameters!r} is not one of {', '.join(contract.DPO_PARAMETERS)}"
        )
    preference = spec.method in contract.PREFERENCE_METHODS
    if spec.dataset.format != "Auto" and preference != (spec.dataset.format == "Preference"):
        problems.append(
            f"spec.dataset.format: {spec.dataset.format} does not go with method {spec.method}: DPO reads "
            "preference pairs (format Auto or Preference), the other methods any other format"
        )
    adapter = spec.base_model.adapter
    if adapter is not None and spec.weights_method not in contract.ADAPTER_METHODS:
        problems.append(
            f"spec.baseModel.adapter: method {spec.method} trains {spec.weights_method} weights, not "
            "adapters; remove baseModel.adapter or use LoRA, QLoRA or DPO on LoRA"
        )
    if adapter is not None and not adapter.uri.startswith("s3://"):
        problems.append(f"spec.baseModel.adapter.uri: {adapter.uri!r} must be an s3:// prefix")
    checkpointing = spec.hyperparameters.activation_checkpointing
    if checkpointing not in contract.ACTIVATION_CHECKPOINTING_SETTINGS:
        problems.append(
            f"spec.hyperparameters.activationCheckpointing: {checkpointing!r} is not one of "
            + ", ".join(contract.ACTIVATION_CHECKPOINTING_SETTINGS)
        )
    hp = spec.hyperparameters
    if (hp.epochs is None) == (hp.max_steps is None):
        problems.append("spec.hyperparameters: set exactly one of epochs or maxSteps")
    if hp.batch_tokens is not None and (
        hp.micro_batch_size is not None or hp.gradient_accumulation is not None
    ):
        problems.append(
            "spec.hyperparameters: batchTokens cannot be combined with microBatchSize/gradientAccumulation; "
            "use one style"
        )
    if spec.dataset.validation is not None and spec.dataset.validation_split is not None:
        problems.append("spec.dataset: set validation or validationSplit, not both")
    if not spec.base_model.uri.startswith(BASE_MODEL_SCHEMES):
        problems.append(
            f"spec.baseModel.uri: {spec.base_model.uri!r} must start with one of "
            f"{', '.join(BASE_MODEL_SCHEMES)}"
        )
    claim = pvc_claim(spec.base_model.uri)
    if spec.base_model.uri.startswith(PVC_SCHEME) and not _DNS_LABEL.match(claim or ""):
        problems.append(
            f"spec.baseModel.uri: {spec.base_model.uri!r} must name a PersistentVolumeClaim of this "
            "namespace (lowercase letters, digits and '-'), as in pvc://models/llama-3.2-1b"
        )
    for field, uri in (
        ("spec.dataset.train", spec.dataset.train),
        ("spec.dataset.validation", spec.dataset.validation),
    ):
        if uri is not None and not uri.startswith("s3://"):
            problems.append(f"{field}: {uri!r} must be an s3:// URI")
    if spec.dataset.validation is None and spec.dataset.validation_split is None:
        if spec.output.select == "BestEval":
            problems.append(
                "spec.output.select: BestEval needs a validation set to pick the best step by; set "
                "spec.dataset.validation or spec.dataset.validationSplit, or select Last"
            )
        if hp.early_stopping_patience is not None:
            problems.append(
                "spec.hyperparameters.earlyStoppingPatience: needs a validation set to judge improvement "
                "by; set spec.dataset.validation or spec.dataset.validationSplit, or remove it"
            )
    if not (spec.output.uri.startswith("s3://") and spec.output.uri.endswith("/")):
        problems.append(f"spec.output.uri: {spec.output.uri!r} must be an s3:// prefix ending in '/'")
    if spec.checkpointing.every_steps is not None and spec.checkpointing.every_minutes is not None:
        problems.append("spec.checkpointing: set everySteps or everyMinutes, not both")
    if not 0 <= spec.resources.gpus <= 16:
        problems.append(f"spec.resources.gpus: {spec.resources.gpus} is outside 0..16")
    problems += _multi_node_problems(job)
    return problems


MAX_NODES = 64
_EXTENDED_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _multi_node_problems(job: FineTuneJob) -> list[str]:
    assert job.spec is not None
    resources, problems = job.spec.resources, []
    if not 1 <= resources.nodes <= MAX_NODES:
        problems.append(f"spec.resources.nodes: {resources.nodes} is outside 1..{MAX_NODES}")
    if resources.nodes > 1 and resources.gpus < 1:
        problems.append(
            "spec.resources.nodes greater than 1 needs spec.resources.gpus of at least 1 (GPUs per pod); "
            "train on the CPU with nodes 1, or ask for GPUs"
        )
    if resources.nodes > 1 and len(job.name) > labels.MAX_MULTI_NODE_NAME_LENGTH:
        problems.append(
            f"metadata.name: {len(job.name)} characters, at most {labels.MAX_MULTI_NODE_NAME_LENGTH} allowed "
            f"when spec.resources.nodes is greater than 1 (trainer pod i is named <name>-trainer-<i>, a DNS "
            "label); choose a shorter name"
        )
    if job.spec.peer_timeout_seconds < 5:
        problems.append(f"spec.peerTimeoutSeconds: {job.spec.peer_timeout_seconds} is below the minimum 5")
    for name, count in sorted((resources.extra_resources or {}).items()):
        where = f"spec.resources.extraResources[{name!r}]"
        if len(name) > 253 or not _EXTENDED_RESOURCE.match(name) or "kubernetes.io/" in name:
            problems.append(
                f"{where}: not an extended resource name with a domain, such as rdma/ib or "
                "vendor.example.com/hca (cpu, memory and kubernetes.io names are not extended resources)"
            )
        if not 1 <= count <= 1024:
            problems.append(f"{where}: {count} is outside 1..1024")
    return problems
