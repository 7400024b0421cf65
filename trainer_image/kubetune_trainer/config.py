"""Read the rendered trainer config and check every knob at once, before anything is fetched."""

from __future__ import annotations

import os
from pathlib import Path

from kubetune_trainer.contract import (
    ACTIVATION_CHECKPOINTING_SETTINGS,
    ADAPTER_METHODS,
    CONFIG_FILE_NAME,
    CONFIG_MOUNT_DIR,
    CONFIG_PATH_ENV,
    DPO_PARAMETERS,
    METHODS,
    PREFERENCE_METHODS,
    SELECT_POLICIES,
    TEXT_MODES,
    TrainerConfig,
    TrainerReason,
)
from kubetune_trainer.errors import TrainerError

FORMATS = ("Auto", "Messages", "PromptCompletion", "Alpaca", "ShareGPT", "Text", "Preference")
SCHEDULERS = ("Cosine", "Linear", "Constant")
TRAIN_ON = ("Completions", "All")
MODEL_SCHEMES = ("s3://", "hf://", "pvc://", "/")


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_PATH_ENV) or f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}")


def load_config(path: Path | None = None) -> TrainerConfig:
    """Parse and validate the config; any problem fails with ``InvalidConfig`` listing all of them."""
    path = path or config_path()
    try:
        text = path.read_text()
    except OSError as err:
        raise TrainerError(
            TrainerReason.INVALID_CONFIG,
            f"cannot read the trainer config at {path}: {err.strerror}; set {CONFIG_PATH_ENV} to its path",
        ) from err
    try:
        config = TrainerConfig.from_json(text)
    except (ValueError, TypeError) as err:
        raise TrainerError(TrainerReason.INVALID_CONFIG, f"{path}: {err}") from err
    problems = validate(config)
    if problems:
        raise TrainerError(
            TrainerReason.INVALID_CONFIG, f"{path}: {len(problems)} problem(s): " + "; ".join(problems)
        )
    return config


def validate(config: TrainerConfig) -> list[str]:
    """Every problem in the config, each naming its field (empty when the config is usable)."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(bool(config.base_model), "baseModel is required")
    need(
        not config.base_model or config.base_model.startswith(MODEL_SCHEMES),
        f"baseModel {config.base_model!r} must start with s3://, hf://, pvc:// or be an absolute path",
    )
    need(config.method in METHODS, f"method {config.method!r} must be one of {', '.join(METHODS)}")
    weights = config.weights_method
    need(
        config.lora is None or weights in ADAPTER_METHODS,
        f"lora is allowed only with the adapter methods ({', '.join(ADAPTER_METHODS)}) and DPO on LoRA",
    )
    preference = config.method in PREFERENCE_METHODS
    need(config.dpo is None or preference, "dpo is allowed only with method DPO")
    if config.dpo is not None:
        need(config.dpo.beta > 0, f"dpo.beta must be > 0, got {config.dpo.beta}")
        need(
            0 <= config.dpo.label_smoothing < 0.5,
            f"dpo.labelSmoothing must be in [0, 0.5), got {config.dpo.label_smoothing}",
        )
        need(
            config.dpo.parameters in DPO_PARAMETERS,
            f"dpo.parameters {config.dpo.parameters!r} must be one of {', '.join(DPO_PARAMETERS)}",
        )
    if config.adapter is not None:
        need(
            config.adapter.uri.startswith("s3://") and len(config.adapter.uri) > len("s3://x/"),
            f"baseModel.adapter.uri {config.adapter.uri!r} must be an s3:// prefix holding a PEFT adapter",
        )
        need(
            weights in ADAPTER_METHODS,
            f"baseModel.adapter needs adapters to train: method {config.method} trains "
            f"{weights} weights; use LoRA, QLoRA or DPO on LoRA",
        )
        digest = config.adapter.sha256
        need(
            digest is None or (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)),
            f"baseModel.adapter.sha256 {digest!r} must be 64 lowercase hex digits",
        )
    if config.lora is not None:
        need(config.lora.r >= 1, f"lora.r must be >= 1, got {config.lora.r}")
        need(config.lora.alpha > 0, f"lora.alpha must be > 0, got {config.lora.alpha}")
        need(0 <= config.lora.dropout < 1, f"lora.dropout must be in [0, 1), got {config.lora.dropout}")

    data = config.dataset
    need(data.train.startswith("s3://"), f"dataset.train {data.train!r} must be an s3:// URI")
    need(
        data.validation is None or data.validation.startswith("s3://"),
        f"dataset.validation {data.validation!r} must be an s3:// URI",
    )
    need(
        data.validation is None or data.validation_split is None,
        "dataset.validation and dataset.validationSplit are exclusive: give one",
    )
    need(
        data.validation_split is None or 0 < data.validation_split < 0.5,
        f"dataset.validationSplit must be in (0, 0.5), got {data.validation_split}",
    )
    need(data.format in FORMATS, f"dataset.format {data.format!r} must be one of {', '.join(FORMATS)}")
    need(
        data.format in ("Auto", "Preference") or not preference,
        f"method DPO reads preference pairs: dataset.format must be Auto or Preference, got {data.format!r}",
    )
    need(
        data.format != "Preference" or preference,
        "dataset.format Preference holds preference pairs, which only method DPO trains on",
    )
    need(
        16 <= data.max_seq_length <= 131072,
        f"dataset.maxSeqLength must be in [16, 131072], got {data.max_seq_length}",
    )
    need(
        data.text_mode in TEXT_MODES,
        f"dataset.textMode {data.text_mode!r} must be one of {', '.join(TEXT_MODES)}",
    )
    need(
        all(isinstance(k, str) and isinstance(v, str) for k, v in (data.column_map or {}).items()),
        "dataset.columnMap must map strings to strings",
    )

    hp = config.hyperparameters
    need(
        (hp.epochs is None) != (hp.max_steps is None),
        "hyperparameters: give exactly one of epochs and maxSteps",
    )
    need(hp.epochs is None or hp.epochs > 0, f"hyperparameters.epochs must be > 0, got {hp.epochs}")
    need(
        hp.max_steps is None or hp.max_steps >= 1,
        f"hyperparameters.maxSteps must be >= 1, got {hp.max_steps}",
    )
    need(hp.learning_rate > 0, f"hyperparameters.learningRate must be > 0, got {hp.learning_rate}")
    per_example_style = hp.micro_batch_size is not None or hp.gradient_accumulation is not None
    need(
        not (hp.batch_tokens is not None and per_example_style),
        "hyperparameters: batchTokens and microBatchSize/gradientAccumulation are exclusive",
    )
    need(hp.batch_tokens is None or hp.batch_tokens >= 1, "hyperparameters.batchTokens must be >= 1")
    need(
        hp.micro_batch_size is None or hp.micro_batch_size >= 1, "hyperparameters.microBatchSize must be >= 1"
    )
    need(
        hp.gradient_accumulation is None or hp.gradient_accumulation >= 1,
        "hyperparameters.gradientAccumulation must be >= 1",
    )
    need(0 <= hp.warmup_ratio <= 1, f"hyperparameters.warmupRatio must be in [0, 1], got {hp.warmup_ratio}")
    need(
        hp.scheduler in SCHEDULERS, f"hyperparameters.scheduler {hp.scheduler!r} must be one of {SCHEDULERS}"
    )
    need(hp.weight_decay >= 0, f"hyperparameters.weightDecay must be >= 0, got {hp.weight_decay}")
    need(hp.train_on in TRAIN_ON, f"hyperparameters.trainOn {hp.train_on!r} must be one of {TRAIN_ON}")
    need(
        hp.eval_every_steps is None or hp.eval_every_steps >= 1,
        "hyperparameters.evalEverySteps must be >= 1",
    )
    need(
        hp.early_stopping_patience is None or hp.early_stopping_patience >= 1,
        f"hyperparameters.earlyStoppingPatience must be >= 1, got {hp.early_stopping_patience}",
    )
    need(
        hp.activation_checkpointing in ACTIVATION_CHECKPOINTING_SETTINGS,
        f"hyperparameters.activationCheckpointing {hp.activation_checkpointing!r} must be one of "
        + ", ".join(ACTIVATION_CHECKPOINTING_SETTINGS),
    )

    out = config.output
    need(
        out.uri.startswith("s3://") and out.uri.endswith("/") and len(out.uri) > len("s3://x/"),
        f"output.uri {out.uri!r} must be an s3:// prefix ending in '/', e.g. s3://adapters/my-job/",
    )
    need(not (out.merge_adapter and weights != "LoRA"), "output.mergeAdapter applies only to LoRA adapters")
    need(
        out.select in SELECT_POLICIES,
        f"output.select {out.select!r} must be one of {', '.join(SELECT_POLICIES)}",
    )
    problems.extend(evaluation_problems(config))

    ckpt = config.checkpointing
    need(ckpt.every_steps is None or ckpt.every_steps >= 1, "checkpointing.everySteps must be >= 1")
    need(ckpt.every_minutes is None or ckpt.every_minutes > 0, "checkpointing.everyMinutes must be > 0")
    need(ckpt.keep >= 1, f"checkpointing.keep must be >= 1, got {ckpt.keep}")
    need(0 <= config.gpus <= 16, f"gpus must be in [0, 16], got {config.gpus}")
    return problems


def evaluation_problems(config: TrainerConfig) -> list[str]:
    """The settings that act on evaluations, set on a job that has no validation set to evaluate on."""
    data, hp = config.dataset, config.hyperparameters
    if data.validation is not None or data.validation_split is not None:
        return []
    problems = []
    if config.output.select == "BestEval":
        problems.append(
            "output.select BestEval picks the step with the lowest validation loss, but the job has no "
            "validation set: set dataset.validation or dataset.validationSplit, or output.select Last"
        )
    if hp.early_stopping_patience is not None:
        problems.append(
            "hyperparameters.earlyStoppingPatience stops when the validation loss stops improving, but the "
            "job has no validation set: set dataset.validation or dataset.validationSplit, or remove it"
        )
    return problems
