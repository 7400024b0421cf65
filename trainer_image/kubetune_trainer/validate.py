"""``python -m kubetune_trainer validate``: the validation pod, which runs before any GPU is reserved.

One path, on the CPU: load config -> read the base model's config.json and tokenizer (never its weights) ->
validate every record -> tokenize, count -> memory plan and step plan for the requested GPUs -> estimate ->
write the tokenized cache under ``<output.uri>cache/<digest>/`` -> report. The report is the same termination
summary the trainer writes: ``outcome: Succeeded, reason: Validated`` with the plan, or a failure with the
trainer's reasons (InvalidDataset, EmptyDataset, AccessDenied, InsufficientGPUMemory, ...), so the operator
fails the job before its GPU Job exists.
"""

from __future__ import annotations

import math
import traceback
from typing import Any

from kubetune_trainer.config import load_config
from kubetune_trainer.contract import (
    PREFERENCE_METHODS,
    VALIDATED_REASON,
    TerminationSummary,
    TrainerConfig,
    TrainerReason,
)
from kubetune_trainer.errors import EXIT_OK, EXIT_RETRYABLE, TrainerError
from kubetune_trainer.metrics import log_event

GIB = 1 << 30


def main() -> int:
    from kubetune_trainer.recipe import write_termination_message

    try:
        summary = run()
        code = EXIT_OK
    except TrainerError as err:
        summary = TerminationSummary(outcome="Failed", reason=err.reason, message=err.message)
        code = err.exit_code
    except Exception as err:  # report it; the Job retries a crash
        traceback.print_exc()
        summary = TerminationSummary(
            outcome="Failed", reason=TrainerReason.INTERNAL_ERROR, message=f"{type(err).__name__}: {err}"
        )
        code = EXIT_RETRYABLE
    write_termination_message(summary)
    log_event("exit", outcome=summary.outcome, reason=summary.reason, message=summary.message, code=code)
    return code


def run() -> TerminationSummary:
    from kubetune_trainer import dataset_cache, memory_plan, model, preparation, prepared_data, throughput
    from kubetune_trainer.recipe import example_length, plan_memory, work_directory
    from kubetune_trainer.storage import Storage, make_client

    config = load_config()
    work_dir = work_directory()
    storage = Storage(make_client(config.s3))
    product = config.gpu_product or (throughput.CPU if config.gpus == 0 else throughput.DEFAULT_GPU_PRODUCT)
    log_event(
        "validate", job=config.job.name, method=config.method, base_model=config.base_model, gpus=product
    )

    # The model's shape and tokenizer, without its weights.
    model_config = model.read_model_config(config.base_model, storage, work_dir)
    if model_config is None:
        raise TrainerError(
            TrainerReason.MODEL_NOT_FOUND,
            f"baseModel {config.base_model}: no config.json there; upload a Hugging Face model directory",
        )
    if config.method == "QLoRA":
        preparation.check_quantizable(model_config, config.base_model)
    tokenizer_dir = model.fetch_tokenizer_files(config.base_model, storage, work_dir)
    tokenizer = model.load_tokenizer(tokenizer_dir, config.base_model)

    # Every record, validated; then tokenized and counted.
    records = prepared_data.read_records(config, storage)
    prepared = prepared_data.tokenize(records, tokenizer, config)

    # The memory plan for the requested GPUs (InsufficientGPUMemory here costs no GPU).
    devices = max(config.gpus, 1)
    gpu = throughput.GPU_PRODUCTS.get(product)
    capacity = int(gpu.memory_gib * GIB) if gpu is not None else None
    device_type = "cpu" if config.gpus == 0 else "cuda"
    plan = plan_memory(config, model_config, device_type=device_type, processes=devices, capacity=capacity)
    shape = memory_plan.model_shape(model_config)
    train_lengths = [example_length(e) for e in prepared.train]
    steps, trained_tokens = step_plan(config, train_lengths, plan.micro_tokens, devices)

    cache_record: dict[str, str] | None = None
    if config.method not in PREFERENCE_METHODS:  # the cache holds SFT examples; the trainer tokenizes pairs
        key = prepared_data.key_of_records(config, tokenizer_dir, records)
        cache = dataset_cache.write(storage, key, config.output.uri, prepared)
        log_event("dataset_cache_written", uri=str(cache), digest=key.digest)
        cache_record = {"uri": str(cache), "digest": key.digest}

    summary = plan.summary()
    if gpu is None and config.gpus > 0:
        summary.pop("gpuGiB", None)
    summary.update(
        {
            "steps": steps,
            "examples": {"train": len(prepared.train), "validation": len(prepared.validation)},
            "tokens": {
                "train": sum(train_lengths),
                "validation": sum(example_length(e) for e in prepared.validation),
            },
        }
    )
    if cache_record is not None:
        summary["cache"] = cache_record
    estimate = throughput.estimate(product, shape.parameters, config.method, devices, trained_tokens)
    if estimate is not None:
        summary["estimate"] = estimate
    log_event("validated", **summary)
    return TerminationSummary(
        outcome="Succeeded",
        reason=VALIDATED_REASON,
        message=describe(summary),
        plan=summary,
        provenance={
            "dataset": {"format": prepared.format, **{k: v for k, v in prepared.objects.items() if v}}
        },
    )


def step_plan(
    config: TrainerConfig, lengths: list[int], micro_tokens: int, processes: int
) -> tuple[int, int]:
    """(optimizer steps, tokens trained over them) as the trainer plans them, at the memory plan's tokens
    per micro-step. A GPU trainer sizes its micro-steps from its free memory, so its own count may differ a
    little; steps follow from batchTokens either way."""
    from kubetune_trainer.recipe import DEFAULT_BATCH_TOKENS
    from kubetune_trainer.schedule import Batching, build_plan

    hp = config.hyperparameters
    if hp.micro_batch_size is not None or hp.gradient_accumulation is not None:
        batching = Batching(None, hp.micro_batch_size or 1, (hp.gradient_accumulation or 1) * processes)
    else:
        step_tokens = hp.batch_tokens or DEFAULT_BATCH_TOKENS
        budget = min(micro_tokens, math.ceil(step_tokens / processes))
        budget = max(budget, 1)
        accumulation = processes * max(1, math.ceil(step_tokens / (budget * processes)))
        batching = Batching(budget, None, accumulation)
    plan = build_plan(lengths, batching, hp.seed, epochs=hp.epochs, max_steps=hp.max_steps)
    tokens = sum(lengths[i] for step in plan.steps for micro in step for i in micro)
    return plan.total_steps, tokens


def describe(summary: dict[str, Any]) -> str:
    examples, tokens = summary["examples"], summary["tokens"]
    text = (
        f"{examples['train']} train examples ({tokens['train']} tokens), {examples['validation']} validation "
        f"examples; {summary['steps']} steps, {summary['strategy']} on {summary['worldSize']} device(s), "
        f"{summary['perGpuGiB']['total']} GiB per GPU"
    )
    estimate = summary.get("estimate")
    if estimate and estimate["gpuProduct"] == "cpu":
        text += f"; about {estimate['seconds']:.0f} s on the CPU ({estimate['basis']})"
    elif estimate:
        text += (
            f"; about {estimate['seconds']:.0f} s, {estimate['gpuHours']} GPU-hours on "
            f"{estimate['gpuProduct']} ({estimate['basis']})"
        )
    return text
