"""The trainer ConfigMap: ``config.json`` is the shared contract's TrainerConfig rendered from the spec."""

from __future__ import annotations

from typing import Any

from kubetune_operator import labels
from kubetune_operator.builders.common import child_metadata, spec_of
from kubetune_operator.config import OperatorConfig
from kubetune_operator.models import FineTuneJob
from kubetune_trainer import contract


def render_trainer_config(job: FineTuneJob, config: OperatorConfig) -> contract.TrainerConfig:
    """Everything the trainer reads, with the operator's defaults filled in."""
    spec = spec_of(job)
    lora = None
    if spec.weights_method in contract.ADAPTER_METHODS:
        block = spec.lora
        lora = (
            contract.LoraConfig()
            if block is None
            else contract.LoraConfig(
                r=block.r,
                alpha=block.alpha,
                dropout=block.dropout,
                target_modules=list(block.target_modules) or None,
            )
        )
    dpo = None
    if spec.method in contract.PREFERENCE_METHODS:
        preference = spec.dpo
        dpo = (
            contract.DpoConfig()
            if preference is None
            else contract.DpoConfig(
                beta=preference.beta,
                label_smoothing=preference.label_smoothing,
                parameters=preference.parameters,
            )
        )
    start = spec.base_model.adapter
    hp = spec.hyperparameters
    checkpointing = spec.checkpointing
    every_minutes: float | None
    if checkpointing.every_minutes is not None:
        every_minutes = float(checkpointing.every_minutes)
    elif checkpointing.every_steps is not None:
        every_minutes = None
    else:
        every_minutes = contract.CheckpointConfig().every_minutes
    return contract.TrainerConfig(
        job=contract.JobRef(name=job.name, namespace=job.namespace, uid=job.metadata.uid),
        base_model=spec.base_model.uri,
        adapter=contract.StartAdapter(uri=start.uri, sha256=start.sha256) if start else None,
        method=spec.method,
        lora=lora,
        dpo=dpo,
        dataset=contract.DatasetConfig(
            train=spec.dataset.train,
            validation=spec.dataset.validation,
            validation_split=spec.dataset.validation_split,
            format=spec.dataset.format,
            column_map=dict(spec.dataset.column_map) if spec.dataset.column_map else None,
            max_seq_length=spec.dataset.max_seq_length,
            text_mode=spec.dataset.text_mode,
        ),
        hyperparameters=contract.Hyperparameters(
            epochs=float(hp.epochs) if hp.epochs is not None else None,
            max_steps=hp.max_steps,
            learning_rate=hp.learning_rate,
            batch_tokens=hp.batch_tokens,
            micro_batch_size=hp.micro_batch_size,
            gradient_accumulation=hp.gradient_accumulation,
            warmup_ratio=hp.warmup_ratio,
            scheduler=hp.scheduler,
            weight_decay=hp.weight_decay,
            seed=hp.seed,
            train_on=hp.train_on,
            packing=hp.packing,
            activation_checkpointing=hp.activation_checkpointing,
            eval_every_steps=hp.eval_every_steps,
            early_stopping_patience=hp.early_stopping_patience,
        ),
        # A merged model is written for LoRA adapters only (a 4-bit QLoRA base and Full have nothing to
        # merge into).
        output=contract.OutputConfig(
            uri=spec.output.uri,
            merge_adapter=spec.output.merge_adapter and spec.weights_method == "LoRA",
            select=spec.output.select,
        ),
        s3=contract.S3Config(
            endpoint=spec.s3.endpoint or config.default_s3_endpoint,
            region=spec.s3.region,
            force_path_style=spec.s3.force_path_style,
        ),
        checkpointing=contract.CheckpointConfig(
            every_steps=checkpointing.every_steps, every_minutes=every_minutes, keep=checkpointing.keep
        ),
        gpus=spec.resources.gpus,
        metrics_port=contract.METRICS_PORT,
        gpu_product=gpu_product(job, config),
    )


GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""The node label NVIDIA's GPU feature discovery sets: a job that selects nodes by it names its GPU."""


def gpu_product(job: FineTuneJob, config: OperatorConfig) -> str | None:
    """The GPU product the validation pod plans for: the job's nodeSelector on nvidia.com/gpu.product, else
    the operator's default; None for a CPU job (gpus: 0)."""
    spec = spec_of(job)
    if spec.resources.gpus == 0:
        return None
    return (spec.resources.node_selector or {}).get(GPU_PRODUCT_LABEL) or config.default_gpu_product


def build_config_map(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, labels.config_map_name(job.name)),
        "data": {contract.CONFIG_FILE_NAME: render_trainer_config(job, config).to_json()},
    }
