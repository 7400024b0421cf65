"""The trainer, as one path: load config -> validate -> fetch inputs -> build data -> build model -> train ->
save -> report.

``main()`` runs one training process: the whole pod, or one worker of several under ``launch`` (see
``__main__``). It always ends by writing a ``TerminationSummary`` to the termination log, and exits 0 (done),
``EXIT_PERMANENT`` (a restart cannot help: bad data, refused credentials, ...), ``EXIT_INTERRUPTED`` (SIGTERM:
a checkpoint was written, restart me) or ``EXIT_RETRYABLE`` (anything else).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer import __name__ as package_name
from kubetune_trainer.config import load_config
from kubetune_trainer.contract import (
    DEFAULT_TERMINATION_LOG,
    DEFAULT_WORK_DIR,
    PREFERENCE_METHODS,
    TERMINATION_LOG_ENV,
    WORK_DIR_ENV,
    AdapterRecord,
    DpoConfig,
    EarlyStop,
    Hyperparameters,
    LoraConfig,
    Selection,
    TerminationSummary,
    TrainerConfig,
    TrainerReason,
)
from kubetune_trainer.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_RETRYABLE,
    Interrupted,
    TrainerError,
)
from kubetune_trainer.metrics import Metrics, log_event
from kubetune_trainer.redact import redact, secret_values
from kubetune_trainer.storage import Storage, make_client

# Tokens per optimizer step when the job gives neither batchTokens nor microBatchSize.
DEFAULT_BATCH_TOKENS = 16384
# Tokens per micro-step; unset: sized from the accelerator's free memory (a fixed default on CPU).
MICRO_BATCH_TOKENS_ENV = "KUBETUNE_MICRO_BATCH_TOKENS"


@dataclass
class Progress:
    """What the report needs even when the run stops half-way."""

    config: TrainerConfig | None = None
    trainer: Any = None
    checkpoint: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # the memory plan's summary


def main() -> int:
    from kubetune_trainer.train import StopFlag

    stop = StopFlag().install()
    metrics = Metrics()
    progress = Progress()
    try:
        summary = run(stop, metrics, progress)
        code = EXIT_OK
    except Interrupted as stopped:
        summary = _failure(
            progress, TrainerReason.INTERRUPTED, f"{stopped}; the Job restarts from the last checkpoint"
        )
        code = EXIT_INTERRUPTED
    except TrainerError as err:
        summary = _failure(progress, err.reason, err.message)
        code = err.exit_code
    except Exception as err:  # the last line of defence: report it, let the Job retry
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and is_peer_failure(err):
            traceback.print_exc()
            summary = _failure(
                progress,
                TrainerReason.PEER_LOST,
                f"another training process of the group vanished or stopped answering ({type(err).__name__}: "
                f"{str(err)[:300]}); the group resumes from the last checkpoint",
            )
            code = EXIT_PEER_LOST
        elif type(err).__name__ == "OutOfMemoryError":
            error = TrainerError(
                TrainerReason.OUT_OF_MEMORY,
                f"the accelerator ran out of memory ({err}); lower dataset.maxSeqLength or set "
                f"{MICRO_BATCH_TOKENS_ENV} in trainer.env to a smaller token budget",
            )
            summary, code = _failure(progress, error.reason, error.message), error.exit_code
        else:
            traceback.print_exc()
            summary = _failure(progress, TrainerReason.INTERNAL_ERROR, f"{type(err).__name__}: {err}")
            code = EXIT_RETRYABLE
    finally:
        metrics.close()
    write_termination_message(summary)
    log_event(
        "exit",
        every_rank=True,
        outcome=summary.outcome,
        reason=summary.reason,
        message=summary.message,
        code=code,
    )
    return code


def run(stop: Any, metrics: Metrics, progress: Progress) -> TerminationSummary:
    # 1. Config: every problem at once, before anything is fetched.
    config = load_config()
    progress.config = config
    hp = config.hyperparameters
    weights = config.weights_method  # LoRA | QLoRA | Full; DPO trains LoRA adapters or Full weights
    preference = config.method in PREFERENCE_METHODS

    import torch

    from kubetune_trainer import dataset_cache, model, preparation, prepared_data, publish
    from kubetune_trainer.checkpoint import Checkpointer, keeps_best
    from kubetune_trainer.fastpath import prepare_model
    from kubetune_trainer.parallel import (
        FORCE_STRATEGY_ENV,
        FSDP,
        LossModel,
        device_capacity,
        full_state_dict,
        run_strategy,
        shard,
    )
    from kubetune_trainer.schedule import build_plan, warmup_steps
    from kubetune_trainer.train import (
        LoopSettings,
        Trainer,
        TrainState,
        load_snapshot,
        make_optimizer,
        setup_runtime,
        snapshot_weights,
    )

    runtime = setup_runtime(config.gpus, hp.seed)
    if runtime.is_main:
        metrics.serve(config.metrics_port)
        log_event("metrics", port=metrics.port)
    work_dir = work_directory()
    storage = Storage(make_client(config.s3))
    log_event(
        "start",
        job=config.job.name,
        method=config.method,
        base_model=config.base_model,
        device=str(runtime.device),
        world_size=runtime.world_size,
    )

    already = publish.published(storage, config.output.uri, config.job.uid)
    if already is not None:
        record, manifest = already
        log_event("already_published", uri=record.uri, completed_at=manifest.get("completedAt"))
        mine = record if runtime.is_main else None
        return _success(mine, manifest.get("metrics") or {}, manifest.get("progress") or {}, {}, None)

    # Memory plan, from config.json alone: a job that cannot fit fails here, before any weights are fetched.
    model_config = model.read_model_config(config.base_model, storage, work_dir)
    if model_config is not None:
        if config.method == "QLoRA":
            preparation.check_quantizable(model_config, config.base_model)
        progress.plan = plan_memory(
            config,
            model_config,
            device_type=runtime.device.type,
            processes=runtime.world_size,
            capacity=device_capacity(runtime.device),
        ).summary()
        log_event("memory_plan", **progress.plan)

    # 2. Data: the validation pod's tokenized cache when its key (dataset ETags, tokenizer, data settings,
    # trainer version) still matches; else every record fetched and validated, in one pass, before any heavy
    # work. A dataset changed since validation names another cache, so it is validated again here.
    key, cached, why_not = _cached_examples(config, storage, work_dir, model_config)
    records = None
    if cached is not None:
        assert key is not None
        log_event("dataset_cache", used=True, uri=str(dataset_cache.cache_uri(config.output.uri, key.digest)))
    else:
        log_event("dataset_cache", used=False, reason=why_not)
        records = prepared_data.read_records(config, storage)

    # 3. Base model files; tokenize what the cache did not hold (chat template, label masks, truncation;
    # long Text records cut into windows). Each pod's first process fetches; its other processes read that.
    fetching = runtime.local_rank == 0
    fetched = model.fetch_base_model(config.base_model, storage, work_dir) if fetching else None
    model_dir, model_provenance = runtime.from_local_main(fetched)
    tokenizer = model.load_tokenizer(model_dir, config.base_model)
    prepared = cached if records is None else prepared_data.tokenize(records, tokenizer, config)
    assert prepared is not None
    train_examples, eval_examples = prepared.train, prepared.validation

    # 4. Model: weights onto the device (QLoRA: quantized to NF4), attention for packed batches, LoRA adapters
    # or full training, activation checkpointing where the memory plan (or the job) asks for it.
    on_gpu = runtime.device.type == "cuda"
    planned_strategy = progress.plan.get("strategy") if progress.plan else None
    forced = os.environ.get(FORCE_STRATEGY_ENV) or None
    strategy = run_strategy(planned_strategy, runtime.world_size, forced)
    place = preparation.load_place(strategy, weights, runtime.device)
    base = preparation.load_base_model(model_dir, config.base_model, weights, runtime.device, place)
    prepare_model(base, runtime.device)
    start_adapter, start_provenance = None, None
    if config.adapter is not None:  # continue this adapter (SFT), or start the policy from it (DPO)
        fetched_adapter = (
            model.fetch_start_adapter(config.adapter, storage, work_dir) if runtime.local_rank == 0 else None
        )
        start_adapter, start_provenance = runtime.from_local_main(fetched_adapter)
        log_event("start_adapter", **start_provenance)
    torch.manual_seed(hp.seed)  # adapter initialisation depends on the seed only
    trainable = model.apply_method(base, weights, config.lora, start_adapter)
    if preference:
        log_event("dropout_disabled", layers=model.disable_dropout(trainable))
    planned = progress.plan.get("activationCheckpointing") if progress.plan else None
    checkpointing = preparation.use_activation_checkpointing(hp.activation_checkpointing, planned)
    if checkpointing:
        preparation.enable_activation_checkpointing(trainable)

    # 5. Plan every step up front, or take the plan of the newest checkpoint (whatever device this is).
    checkpointer = Checkpointer(
        storage, config.output.uri, work_dir, config.checkpointing.keep, runtime.rank, runtime.world_size
    )
    restored = checkpointer.fetch_latest()
    if restored is not None:
        plan = restored_plan(restored, len(train_examples))
    else:
        # A model still on the host (FSDP) cannot be probed on the GPU: the memory plan's budget stands in.
        on_host = progress.plan is not None and place != runtime.device
        planned_tokens = progress.plan.get("microStepTokens") if on_host else None
        batching = resolve_batching(hp, trainable, runtime, longest_example(config), planned_tokens)
        lengths = [example_length(e) for e in train_examples]
        plan = build_plan(lengths, batching, hp.seed, epochs=hp.epochs, max_steps=hp.max_steps)
    batching = plan.batching
    eval_batches = batching.micro_batches(
        [example_length(e) for e in eval_examples], range(len(eval_examples))
    )

    # 6. Share the model out (FSDP) or replicate it; then the optimizer, and the checkpoint's state.
    loss_model = (
        shard(trainable, runtime.device.type, runtime.world_size)
        if strategy == FSDP
        else LossModel(trainable)
    )
    optimizer = make_optimizer(trainable, hp.learning_rate, hp.weight_decay)
    keep_best = config.output.select == "BestEval"
    # The best evaluation's weights a checkpoint kept (BestEval) are read into a copy of the weights' shape.
    best_weights = snapshot_weights(trainable) if keep_best and restored and keeps_best(restored) else None
    restored_state = checkpointer.restore(restored, trainable, optimizer, best_weights) if restored else None
    state = TrainState.from_dict(restored_state) if restored_state else TrainState()
    progress.provenance = {
        "dataset": {
            "format": prepared.format,
            "train": prepared.objects.get("train", []),
            "validation": prepared.objects.get("validation", []),
            "rows": prepared.rows.get("train", len(train_examples)),
            "validationRows": prepared.rows.get("validation", len(eval_examples)),
            "tokenizedCache": str(dataset_cache.cache_uri(config.output.uri, key.digest))
            if key is not None and records is None
            else None,
            **{f"{split}_{k}": v for split, stats in prepared.stats.items() for k, v in stats.items()},
        },
        "baseModel": model_provenance,
        **({"startAdapter": start_provenance} if start_provenance else {}),
        "resolved": {
            "totalSteps": plan.total_steps,
            "stepsPerEpoch": plan.steps_per_epoch,
            "warmupSteps": warmup_steps(plan.total_steps, hp.warmup_ratio),
            "microBatchTokens": batching.token_budget,
            "microBatchExamples": batching.examples_per_micro,
            "gradientAccumulation": batching.accumulation // runtime.world_size,  # per process
            "precision": "bf16" if on_gpu else "fp32",
            "activationCheckpointing": checkpointing,
            "worldSize": runtime.world_size,
            "strategy": strategy,
            "trainableParameters": sum(p.numel() for p in model.trainable_parameters(trainable).values()),
        },
        "trainer": {"package": package_name, "image": os.environ.get("KUBETUNE_TRAINER_IMAGE", "")},
    }
    log_event(
        "plan",
        total_steps=plan.total_steps,
        resumed_from=restored.uri if restored else None,
        resumed_step=state.step,
        examples=len(train_examples),
        tokens=sum(example_length(e) for e in train_examples),
        micro_batch_tokens=batching.token_budget,
        accumulation=batching.accumulation // runtime.world_size,
    )

    # 7. Train.
    settings = LoopSettings(
        learning_rate=hp.learning_rate,
        scheduler=hp.scheduler,
        warmup_ratio=hp.warmup_ratio,
        packing=hp.packing,
        pad_id=int(tokenizer.pad_token_id),
        eval_every_steps=hp.eval_every_steps,
        checkpoint_every_steps=config.checkpointing.every_steps,
        checkpoint_every_minutes=config.checkpointing.every_minutes,
        keep_best=keep_best,
        early_stopping_patience=hp.early_stopping_patience,
        dpo_beta=(config.dpo or DpoConfig()).beta if preference else None,
        dpo_label_smoothing=(config.dpo or DpoConfig()).label_smoothing,
    )
    trainer = Trainer(
        loss_model,
        optimizer,
        plan,
        train_examples,
        eval_batches,
        eval_examples,
        settings,
        runtime,
        checkpointer,
        metrics,
        stop,
        state,
        best_weights,
    )
    progress.trainer = trainer
    started, tokens_before = time.monotonic(), state.trained_tokens
    trainer.run()
    seconds = time.monotonic() - started
    selected = selection(config.output.select, state, trainer.best_weights is not None)
    if keep_best and trainer.best_weights is not None:
        load_snapshot(trainable, trainer.best_weights)  # every rank: each holds its shards under FSDP
    log_event("selected", select=selected.select, step=selected.step, eval_loss=selected.eval_loss)

    # 8. Save: files first, manifest last; then the checkpoints are no longer needed.
    final_metrics = _metrics(state)
    final_progress = _progress(trainer)
    # This attempt's average: a resumed run trained the earlier tokens in another process.
    final_progress["tokensPerSecond"] = round((state.trained_tokens - tokens_before) / max(seconds, 1e-9), 1)
    record = AdapterRecord()
    result = trainable
    gathered = full_state_dict(trainable) if strategy == FSDP else None  # every rank takes part
    if runtime.is_main:
        if gathered is not None:  # sharded: publish a whole copy, rebuilt on the CPU from the shards
            result = model.apply_method(
                model.load_model(model_dir, config.base_model, preparation.load_dtype(weights, "cpu")),
                weights,
                config.lora,
                start_adapter,
            )
            result.load_state_dict(gathered)
        job = {"name": config.job.name, "namespace": config.job.namespace, "uid": config.job.uid}
        summary_file = {
            "job": job,
            "method": config.method,
            "baseModel": config.base_model,
            "metrics": final_metrics,
            "progress": final_progress,
            "losses": state.losses,
            "selected": dataclasses.asdict(selected),
            "trainSeconds": round(seconds, 3),
            "provenance": progress.provenance,
        }
        local = work_dir / "output"
        publish.write_local(
            result,
            tokenizer,
            weights,
            config.base_model,
            summary_file,
            local,
            config.output.merge_adapter,
            publish.base_dtype(json.loads((model_dir / "config.json").read_text())),
        )
        record = publish.upload(
            storage,
            local,
            config.output.uri,
            config.base_model,
            weights,
            job,
            {"metrics": final_metrics, "progress": final_progress, "selected": _camel_keys(selected)},
        )
        storage.delete_prefix(checkpointer.root)
        shutil.rmtree(local, ignore_errors=True)
        print(f"sha256 {record.sha256}  {config.output.uri}{publish.weights_file(weights)}", flush=True)
    # The group is done once the result is published: no process reports success before rank 0 has.
    runtime.barrier()
    # 9. Report: rank 0 carries the result record; the others only say that training finished.
    mine = record if runtime.is_main else None
    early_stop = early_stop_of(state, trainer.total, hp.early_stopping_patience)
    return _success(mine, final_metrics, final_progress, progress.provenance, progress.plan, early_stop)


def selection(select: str, state: Any, holds_best: bool) -> Selection:
    """Which step's weights the result holds: the best evaluation's under BestEval (once one ran and its
    weights are held), else the last step's, with the validation loss measured on them (None where no
    evaluation ran there)."""
    if select == "BestEval" and holds_best and state.best_weights_step is not None:
        return Selection("BestEval", int(state.best_weights_step), state.best_eval_loss)
    last_eval = state.eval_loss if state.best_step is not None else None
    # The loop evaluates at its last step (planned or early-stopped) whenever it evaluates at all.
    return Selection("Last", int(state.step), last_eval)


def early_stop_of(state: Any, total_steps: int, patience: int | None) -> EarlyStop | None:
    if not state.stopped_early or patience is None:
        return None
    return EarlyStop(
        step=int(state.step),
        total_steps=int(total_steps),
        patience=patience,
        best_step=int(state.best_step or 0),
        best_eval_loss=float(state.best_eval_loss or 0.0),
    )


def _camel_keys(selected: Selection) -> dict[str, Any]:
    return {"select": selected.select, "step": selected.step, "evalLoss": selected.eval_loss}


def _cached_examples(
    config: TrainerConfig, storage: Storage, work_dir: Path, model_config: dict[str, Any] | None
) -> tuple[Any, Any, str]:
    """(cache key, the validation pod's cached examples or None, why not). The key needs the tokenizer's
    files; a base model that cannot give them is a miss here, so the data is still validated before the
    model is fetched (and its own error reported after)."""
    from kubetune_trainer import dataset_cache, model, prepared_data

    if config.method in PREFERENCE_METHODS:
        return None, None, "preference pairs are not cached; the trainer tokenizes them"
    try:
        tokenizer_dir = model.fetch_tokenizer_files(config.base_model, storage, work_dir)
        tokenizer = model.load_tokenizer(tokenizer_dir, config.base_model)
    except TrainerError as err:
        if err.reason not in (TrainerReason.MODEL_NOT_FOUND, TrainerReason.INVALID_MODEL):
            raise
        return None, None, f"the base model's tokenizer cannot be read ({err.reason})"
    key = prepared_data.current_key(config, storage, tokenizer_dir)
    vocab = prepared_data.vocabulary_size(tokenizer, model_config)
    cached, why_not = dataset_cache.read(
        storage, key, config.output.uri, vocab, config.dataset.max_seq_length
    )
    return key, cached, why_not


def longest_example(config: TrainerConfig) -> int:
    """Tokens of the longest example a micro-step must hold: maxSeqLength, or twice that for a preference
    pair (both sides share a micro-step)."""
    sides = 2 if config.method in PREFERENCE_METHODS else 1
    return sides * config.dataset.max_seq_length


def example_length(example: Any) -> int:
    """Tokens an example (or a preference pair, both sides) takes in a micro-batch."""
    from kubetune_trainer.dpo import PreferenceExample

    return example.length if isinstance(example, PreferenceExample) else len(example.input_ids)


def resolve_batching(
    hp: Hyperparameters, model: Any, runtime: Any, max_seq_length: int, planned_tokens: int | None = None
) -> Any:
    """Micro-batches by example count (microBatchSize per process x gradientAccumulation) or by a token
    budget sized to the device, with enough accumulation to reach batchTokens per optimizer step over all
    processes. With several processes each step holds a multiple of their count in micro-batches, so every
    process takes an equal share."""
    import torch

    from kubetune_trainer.fastpath import choose_token_budget
    from kubetune_trainer.schedule import Batching

    processes = runtime.world_size
    if hp.micro_batch_size is not None or hp.gradient_accumulation is not None:
        return Batching(None, hp.micro_batch_size or 1, (hp.gradient_accumulation or 1) * processes)
    step_tokens = hp.batch_tokens or DEFAULT_BATCH_TOKENS
    requested = requested_micro_tokens() or planned_tokens
    budget = choose_token_budget(model, runtime.device, requested, max_seq_length)
    # Every process must plan the same steps: the smallest device decides.
    budget = int(runtime.all_reduce(torch.tensor([budget], device=runtime.device), op="min").item())
    budget = min(budget, math.ceil(step_tokens / processes))
    return Batching(budget, None, processes * max(1, math.ceil(step_tokens / (budget * processes))))


def restored_plan(found: Any, examples: int) -> Any:
    """The step plan a checkpoint carries, for a dataset of ``examples`` examples."""
    from kubetune_trainer.checkpoint import STEP_PLAN
    from kubetune_trainer.schedule import Plan

    try:
        plan = Plan.from_dict(found.read_json(STEP_PLAN), examples)
        if plan.batching is None:
            raise ValueError("it has no batching")
    except ValueError as err:
        raise TrainerError(
            TrainerReason.INVALID_CONFIG,
            f"checkpoint {found.uri} cannot resume this job: its step plan {err}; the dataset changed since "
            f"it was written, delete {found.uri} to start over",
        ) from err
    return plan


def requested_micro_tokens() -> int | None:
    """Tokens per micro-step set in the trainer's env, if any."""
    requested = os.environ.get(MICRO_BATCH_TOKENS_ENV)
    return int(requested) if requested else None


def plan_memory(
    config: TrainerConfig,
    model_config: dict[str, Any],
    *,
    device_type: str,
    processes: int,
    capacity: int | None,
) -> Any:
    """The memory plan for this job on ``processes`` devices of ``device_type`` with ``capacity`` bytes each
    (``memory_plan.choose``), at the tokens per micro-step ``resolve_batching`` will use. Where that budget
    is sized later from the GPU's free memory, the plan takes one example of maxSeqLength: the least a
    micro-step must hold. The trainer plans for its own devices; the validation pod for the requested ones."""
    import torch

    from kubetune_trainer import memory_plan
    from kubetune_trainer.fastpath import choose_token_budget

    hp, lora = config.hyperparameters, config.lora or LoraConfig()
    max_seq_length = longest_example(config)
    if hp.micro_batch_size is not None or hp.gradient_accumulation is not None:
        tokens = (hp.micro_batch_size or 1) * max_seq_length
    else:
        requested = requested_micro_tokens()
        if device_type == "cuda" and requested is None:
            budget = max_seq_length
        else:
            budget = choose_token_budget(None, torch.device(device_type), requested, max_seq_length)
        step_share = math.ceil((hp.batch_tokens or DEFAULT_BATCH_TOKENS) / processes)
        # A longer example still gets a micro-step of its own.
        tokens = max(min(budget, step_share), max_seq_length)
    try:
        shape = memory_plan.model_shape(model_config)
    except (ValueError, KeyError, TypeError) as err:
        raise TrainerError(
            TrainerReason.INVALID_MODEL,
            f"baseModel {config.base_model}: config.json does not describe a causal LM transformers builds "
            f"({type(err).__name__}: {err})",
        ) from err
    request = memory_plan.Request(
        method=config.weights_method,
        processes=processes,
        micro_tokens=tokens,
        device_type=device_type,
        capacity=capacity,
        lora_r=lora.r,
        lora_dropout=lora.dropout,
        lora_targets=tuple(lora.target_modules) if lora.target_modules else None,
        activation_checkpointing=hp.activation_checkpointing,
        keep_best=config.output.select == "BestEval",
    )
    return memory_plan.choose(shape, request, model=config.base_model)


def work_directory() -> Path:
    """Scratch space: $KUBETUNE_WORK_DIR (an emptyDir in the pod), or a temporary directory elsewhere."""
    configured = Path(os.environ.get(WORK_DIR_ENV, DEFAULT_WORK_DIR))
    try:
        configured.mkdir(parents=True, exist_ok=True)
        probe = configured / ".write-test"
        probe.write_text("")
        probe.unlink()
        return Path(tempfile.mkdtemp(prefix="run-", dir=configured))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="kubetune-"))


def write_termination_message(summary: TerminationSummary) -> None:
    path = Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))
    try:
        safe = dataclasses.replace(summary, message=redact(summary.message, secret_values()))
        path.write_text(safe.to_json())
    except OSError as err:
        log_event("termination_message_not_written", path=str(path), error=str(err))


def _metrics(state: Any) -> dict[str, float]:
    values = {
        "trainLoss": state.train_loss,
        "evalLoss": state.eval_loss,
        "bestEvalLoss": state.best_eval_loss,
        "bestStep": state.best_step,
        "evalTokenAccuracy": state.eval_token_accuracy,
        "learningRate": state.learning_rate,
        "gradNorm": state.grad_norm,
        "rewardMargin": state.reward_margin,
        "preferenceAccuracy": state.preference_accuracy,
        "chosenLogps": state.chosen_logps,
        "rejectedLogps": state.rejected_logps,
        "evalRewardMargin": state.eval_reward_margin,
        "evalPreferenceAccuracy": state.eval_preference_accuracy,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def _progress(trainer: Any) -> dict[str, float]:
    return {
        "step": trainer.state.step,
        "totalSteps": trainer.total,
        "epoch": trainer.epoch(),
        "trainedTokens": trainer.state.trained_tokens,
    }


def _success(
    record: AdapterRecord | None,
    metrics: dict[str, float],
    progress: dict[str, float],
    provenance: dict[str, Any],
    plan: dict[str, Any] | None,
    early_stop: EarlyStop | None = None,
) -> TerminationSummary:
    """A finished run's report; ``record`` None for a process other than rank 0, which publishes."""
    message = f"written to {record.uri}" if record else "training finished; rank 0 published the result"
    if early_stop is not None:
        message += (
            f"; stopped early after step {early_stop.step} of {early_stop.total_steps}: the validation loss "
            f"did not improve in {early_stop.patience} evaluations"
        )
    return TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message=message,
        adapter=record,
        metrics=metrics,
        progress=progress,
        provenance=_compact(provenance),
        plan=plan,
        early_stop=early_stop,
    )


# What gloo, NCCL and the store say when the other end of a collective is gone or silent.
_PEER_FAILURE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "remote process exited",
    "communicator was aborted",
)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective (or the group's store) failing because another process of the group
    vanished or stopped answering, rather than this process's own failure. Asked only of a process with
    peers: alone, a broken connection is its own failure."""
    import torch.distributed as dist

    if isinstance(err, dist.DistNetworkError | dist.DistStoreError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def _compact(provenance: dict[str, Any]) -> dict[str, Any] | None:
    """Provenance for the 4 KiB termination message: the base model's per-file digests stay in
    training_summary.json; its combined digest (or Hub revision) is enough here."""
    if not provenance:
        return None
    model = {k: v for k, v in provenance.get("baseModel", {}).items() if k != "files"}
    return {**provenance, "baseModel": model}


def _failure(progress: Progress, reason: str, message: str) -> TerminationSummary:
    trainer = progress.trainer
    metrics = _metrics(trainer.state) if trainer is not None else None
    steps = _progress(trainer) if trainer is not None else None
    checkpoint = None
    if trainer is not None and trainer.checkpointer is not None and trainer.last_checkpoint_step > 0:
        checkpoint = {
            "uri": str(trainer.checkpointer.uri(trainer.last_checkpoint_step)),
            "step": trainer.last_checkpoint_step,
        }
    return TerminationSummary(
        outcome="Failed",
        reason=reason,
        message=message,
        metrics=metrics or None,
        progress=steps,
        checkpoint=checkpoint,
        provenance=_compact(progress.provenance),
        plan=progress.plan,
    )
