"""The one contract between the operator and the trainer.

Torch-free and dependency-free on purpose: the operator imports this module to render the trainer config
(the ConfigMap) and to parse the termination message; the trainer imports it to read the config and to
write that message. Both sides change together, behind ``CONTRACT_VERSION``.

JSON keys are camelCase, as in the FineTuneJob spec they come from.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

CONTRACT_VERSION = 1

# Where things are inside the trainer pod.
CONFIG_MOUNT_DIR = "/etc/kubetune"
CONFIG_FILE_NAME = "config.json"
CONFIG_PATH_ENV = "KUBETUNE_CONFIG"
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
WORK_DIR_ENV = "KUBETUNE_WORK_DIR"
DEFAULT_WORK_DIR = "/scratch"
METRICS_PORT = 9090
# Comma-separated names of the trainer's environment variables whose values come from Secrets; the trainer
# keeps those values out of its log and its termination message.
SECRET_ENV_NAMES_ENV = "KUBETUNE_SECRET_ENV"
# A pvc://claim/path base model is read from <PVC_ROOT>/claim/path: the operator mounts the claim read-only
# at DEFAULT_PVC_ROOT/<claim>; the env variable moves the root (tests, local runs).
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
# Kubernetes truncates a termination message at 4096 bytes; we stay below it so the JSON always parses.
TERMINATION_MESSAGE_LIMIT = 4000
# A reader refuses a termination message longer than this before parsing it (it comes from a pod, which any
# image can fill with anything).
TERMINATION_MESSAGE_READ_LIMIT = 16384

# Prometheus metric names the trainer serves and the operator scrapes (all gauges).
METRIC_STEP = "kubetune_trainer_step"
METRIC_TOTAL_STEPS = "kubetune_trainer_total_steps"
METRIC_EPOCH = "kubetune_trainer_epoch"
METRIC_TRAIN_LOSS = "kubetune_trainer_train_loss"
METRIC_EVAL_LOSS = "kubetune_trainer_eval_loss"
METRIC_BEST_EVAL_LOSS = "kubetune_trainer_best_eval_loss"
METRIC_BEST_STEP = "kubetune_trainer_best_step"
METRIC_LEARNING_RATE = "kubetune_trainer_learning_rate"
METRIC_GRAD_NORM = "kubetune_trainer_grad_norm"
METRIC_TOKENS_PER_SECOND = "kubetune_trainer_tokens_per_second"
METRIC_TRAINED_TOKENS = "kubetune_trainer_trained_tokens"
METRIC_ETA_SECONDS = "kubetune_trainer_eta_seconds"
METRIC_EVAL_TOKEN_ACCURACY = "kubetune_trainer_eval_token_accuracy"
# Preference tuning (method DPO) only.
METRIC_REWARD_MARGIN = "kubetune_trainer_reward_margin"
METRIC_PREFERENCE_ACCURACY = "kubetune_trainer_preference_accuracy"
METRIC_CHOSEN_LOGPS = "kubetune_trainer_chosen_logps"
METRIC_REJECTED_LOGPS = "kubetune_trainer_rejected_logps"
METRIC_EVAL_REWARD_MARGIN = "kubetune_trainer_eval_reward_margin"
METRIC_EVAL_PREFERENCE_ACCURACY = "kubetune_trainer_eval_preference_accuracy"

# Training methods. The adapter methods train LoRA adapters on a frozen base (QLoRA: a 4-bit NF4 base) and
# publish the adapter; Full trains every weight and publishes the model.
ADAPTER_METHODS = ("LoRA", "QLoRA")
# DPO is preference tuning: it trains LoRA adapters (dpo.parameters: LoRA, the default) or every weight
# (dpo.parameters: Full) to prefer each pair's chosen answer over its rejected one, relative to the model it
# starts from.
PREFERENCE_METHODS = ("DPO",)
METHODS = (*ADAPTER_METHODS, "Full", *PREFERENCE_METHODS)
# dpo.parameters: which weights preference tuning trains.
DPO_PARAMETERS = ("LoRA", "Full")
# hyperparameters.activationCheckpointing: Auto follows the memory plan.
ACTIVATION_CHECKPOINTING_SETTINGS = ("Auto", "Always", "Never")
# output.select: which weights are published. Last: those after the last step; BestEval: those of the
# evaluation with the lowest validation loss (needs a validation set).
SELECT_POLICIES = ("Last", "BestEval")
# dataset.textMode: what happens to a Text record longer than maxSeqLength. Chunk: cut into windows that
# together train on every token once; Truncate: keep its first maxSeqLength tokens.
TEXT_MODES = ("Chunk", "Truncate")


# The reason of the validation pod's successful summary (``python -m kubetune_trainer validate``): the
# operator takes a plan as the data's validation only with it.
VALIDATED_REASON = "Validated"


# Exit codes of the trainer process. The operator's Job has a podFailurePolicy that fails the whole Job at
# once on EXIT_CODE_PERMANENT_FAILURE (no retry: a restart would fail the same way); any other non-zero exit
# code is retried up to spec.backoffLimit times, resuming from the newest checkpoint.
EXIT_CODE_PERMANENT_FAILURE = 2
# 128 + SIGTERM: the run was stopped from outside after writing a checkpoint (TrainerReason.INTERRUPTED). The
# operator's podFailurePolicy ignores it, so stopping a run never uses up spec.backoffLimit.
EXIT_CODE_INTERRUPTED = 143
EXIT_CODE_PEER_LOST = 3


class TrainerReason:
    """Reasons the trainer reports in a failed termination message; the operator copies them onto the
    FineTuneJob's ``Failed`` condition unchanged."""

    INVALID_CONFIG = "InvalidConfig"
    """The rendered config could not be read or has values the trainer cannot use."""
    DATASET_NOT_FOUND = "DatasetNotFound"
    """The dataset URI names no object (or a prefix with no .jsonl/.json/.parquet object)."""
    INVALID_DATASET = "InvalidDataset"
    """One or more records are malformed; the message names the first line numbers and the count."""
    EMPTY_DATASET = "EmptyDataset"
    """The dataset was read but holds no usable example."""
    ACCESS_DENIED = "AccessDenied"
    """S3 refused the credentials for a read or a write."""
    MODEL_NOT_FOUND = "ModelNotFound"
    """The base model URI names nothing loadable."""
    INVALID_MODEL = "InvalidModel"
    """The base model was found but could not be loaded (missing config, tokenizer or weights)."""
    OUT_OF_MEMORY = "OutOfMemory"
    """The accelerator ran out of memory even at the smallest token budget."""
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    """The memory plan, made from the model's config.json before any weights are fetched, found no way to
    run the job on its GPUs (one process, DDP or FSDP, activation checkpointing on or off); the message gives
    the bytes per GPU and what would fit (QLoRA, more GPUs, a shorter dataset.maxSeqLength)."""
    QUANTIZATION_UNSUPPORTED = "QuantizationUnsupported"
    """Method QLoRA on a base model bitsandbytes cannot quantize to 4-bit NF4 (one stored quantized already,
    one without Linear layers it converts) or in an image without bitsandbytes; the message says what to
    change (the unquantized weights, or method LoRA)."""
    TRAINING_DIVERGED = "TrainingDiverged"
    """The loss became NaN or infinite."""
    UPLOAD_FAILED = "UploadFailed"
    """The result could not be written to the output URI."""
    STORAGE_ERROR = "StorageError"
    """S3 failed in a way other than not-found or access-denied (endpoint unreachable, throttled, ...)."""
    INTERNAL_ERROR = "InternalError"
    """An unexpected error in the trainer; the message carries its type and text."""
    INTERRUPTED = "Interrupted"
    """Not a failure: SIGTERM stopped the run (suspension, preemption, node drain); the trainer wrote a
    checkpoint (in the summary's ``checkpoint``) and exited with EXIT_CODE_INTERRUPTED. The Job starts a new
    pod, which resumes from that checkpoint; the operator never copies this reason onto ``Failed``."""
    PEER_LOST = "PeerLost"
    """Not this pod's failure: another pod of a multi-node group was lost (or stopped answering), so this
    pod's training stopped too and it exited with EXIT_CODE_PEER_LOST, which the Job ignores; the pod whose
    failure started it is counted. The whole group resumes from the last checkpoint."""


# Failures a restart cannot fix: the trainer exits with EXIT_CODE_PERMANENT_FAILURE for these.
PERMANENT_REASONS = frozenset(
    {
        TrainerReason.INVALID_CONFIG,
        TrainerReason.DATASET_NOT_FOUND,
        TrainerReason.INVALID_DATASET,
        TrainerReason.EMPTY_DATASET,
        TrainerReason.ACCESS_DENIED,
        TrainerReason.MODEL_NOT_FOUND,
        TrainerReason.INVALID_MODEL,
        TrainerReason.OUT_OF_MEMORY,
        TrainerReason.INSUFFICIENT_GPU_MEMORY,
        TrainerReason.QUANTIZATION_UNSUPPORTED,
    }
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _to_json_dict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {
            _camel(f.name): _to_json_dict(getattr(obj, f.name))
            for f in fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, dict):
        return {k: _to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json_dict(v) for v in obj]
    return obj


class ContractError(ValueError):
    """A config or a termination summary that does not have the contract's shape; the message names the
    field (camelCase path), what it should be and what it was."""


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` of a contract field; ContractError names ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _typed(value, inner[0], where)
    if hint is Any:
        return value
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {_json_kind(value)}")
        return _from_json_dict(typing.cast(type[Any], hint), value, where)
    expected = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if expected is not None:
        raise ContractError(f"{where}: expected {expected}, got {_json_kind(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ContractError(f"{where}: expected a list, got {_json_kind(value)}")
        (item,) = typing.get_args(hint)
        return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected an object, got {_json_kind(value)}")
        _, item = typing.get_args(hint)
        return {str(k): _typed(v, item, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: the contract has no rule for type {hint!r}")


def _from_json_dict(cls: type[Any], data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a camelCase dict, checking every value's type; unknown keys are rejected
    so a typo cannot hide."""
    hints = typing.get_type_hints(cls)
    known = {_camel(f.name): f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    prefix = f"{where}." if where else ""
    if unknown:
        raise ContractError(f"{where or cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {
        f.name: _typed(data[key], hints[f.name], prefix + key) for key, f in known.items() if key in data
    }
    return cls(**kwargs)


@dataclass(frozen=True)
class DatasetConfig:
    train: str = ""  # s3:// URI of an object or a prefix
    validation: str | None = None  # s3:// URI; exclusive with validation_split
    validation_split: float | None = None  # fraction of train held out for eval
    format: str = "Auto"  # Auto | Messages | PromptCompletion | Alpaca | ShareGPT | Text
    column_map: dict[str, str] | None = None  # our key -> the dataset's key, e.g. {"prompt": "question"}
    max_seq_length: int = 2048  # longer examples are truncated (Text records: see text_mode), and counted
    text_mode: str = "Chunk"  # Chunk | Truncate: how Text records longer than max_seq_length are cut


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every linear layer but the output head


@dataclass(frozen=True)
class DpoConfig:
    beta: float = 0.1  # strength of the pull towards the reference model (higher: stay closer to it)
    label_smoothing: float = 0.0  # assumed fraction of pairs whose preference is wrong (conservative DPO)
    parameters: str = "LoRA"  # LoRA (adapters, the lora block applies) | Full (every weight)


@dataclass(frozen=True)
class StartAdapter:
    """A PEFT adapter (an S3 prefix holding adapter_config.json and adapter_model.safetensors) that training
    starts from: SFT continues it, DPO starts its policy from it and takes it as the reference."""

    uri: str = ""
    sha256: str | None = None  # of adapter_model.safetensors, checked when given


@dataclass(frozen=True)
class Hyperparameters:
    epochs: float | None = None  # exclusive with max_steps; one of them is set after defaulting
    max_steps: int | None = None
    learning_rate: float = 2e-4
    batch_tokens: int | None = None  # tokens per optimizer step (exclusive with micro_batch_size)
    micro_batch_size: int | None = None  # examples per micro-step, with gradient_accumulation
    gradient_accumulation: int | None = None
    warmup_ratio: float = 0.03
    scheduler: str = "Cosine"  # Cosine | Linear | Constant
    weight_decay: float = 0.0
    seed: int = 42
    train_on: str = "Completions"  # Completions | All
    packing: bool = True
    # Auto | Always | Never: recompute each decoder layer in backward instead of keeping its activations
    # (Auto: when the memory plan needs it to fit)
    activation_checkpointing: str = "Auto"
    eval_every_steps: int | None = None  # None: about ten evaluations per run
    # Stop after this many evaluations in a row without a lower validation loss (None: never stop early).
    early_stopping_patience: int | None = None


@dataclass(frozen=True)
class OutputConfig:
    uri: str = ""  # s3:// prefix, ends with "/"
    merge_adapter: bool = False
    select: str = "Last"  # Last | BestEval: which step's weights are published


@dataclass(frozen=True)
class S3Config:
    endpoint: str | None = None  # None: AWS
    region: str = "us-east-1"
    force_path_style: bool = False
    # Credentials never travel in the config: they arrive as AWS_* env vars from the referenced Secret.


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep: int = 2


@dataclass(frozen=True)
class JobRef:
    name: str = ""
    namespace: str = ""
    uid: str = ""


@dataclass(frozen=True)
class TrainerConfig:
    """Everything the trainer needs, rendered by the operator from a FineTuneJob spec."""

    version: int = CONTRACT_VERSION
    job: JobRef = field(default_factory=JobRef)
    base_model: str = ""  # s3://bucket/prefix/, hf://org/name[@rev], pvc://claim/path or a local path
    adapter: StartAdapter | None = None  # start from this adapter instead of fresh ones
    method: str = "LoRA"  # LoRA | QLoRA | Full | DPO
    lora: LoraConfig | None = None
    dpo: DpoConfig | None = None  # method DPO only
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    output: OutputConfig = field(default_factory=OutputConfig)
    s3: S3Config = field(default_factory=S3Config)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    gpus: int = 1
    metrics_port: int = METRICS_PORT
    # The GPU product the job asked for (the nodeSelector on nvidia.com/gpu.product, else the operator's
    # default): the validation pod plans memory and estimates time for it. None: the trainer's default.
    gpu_product: str | None = None

    @property
    def weights_method(self) -> str:
        """How the weights train and publish: the method itself, or for DPO the method of the weights it
        trains (LoRA adapters or Full)."""
        if self.method in PREFERENCE_METHODS:
            return (self.dpo or DpoConfig()).parameters
        return self.method

    def to_json(self) -> str:
        return json.dumps(_to_json_dict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("trainer config: expected a JSON object")
        version = data.get("version")
        if version != CONTRACT_VERSION:
            raise ValueError(
                f"trainer config version {version!r} is not {CONTRACT_VERSION}: "
                "the operator and the trainer image are from different releases"
            )
        config: TrainerConfig = _from_json_dict(cls, data, "config")
        return config


@dataclass(frozen=True)
class Selection:
    """Which step's weights a result holds (output.select), and their validation loss."""

    select: str = "Last"  # Last | BestEval
    step: int = 0
    eval_loss: float | None = None  # None: no evaluation ran at that step


@dataclass(frozen=True)
class EarlyStop:
    """Why a run ended before its planned steps (hyperparameters.earlyStoppingPatience)."""

    step: int = 0  # the last step trained
    total_steps: int = 0  # the steps planned
    patience: int = 0  # evaluations in a row without a lower validation loss
    best_step: int = 0
    best_eval_loss: float = 0.0


@dataclass(frozen=True)
class AdapterRecord:
    uri: str = ""
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    sha256: str = ""  # of adapter_model.safetensors (LoRA, QLoRA) or model.safetensors (Full, first shard)
    base_model: str = ""
    files_omitted: int | None = None  # files under uri left out of `files` to fit the termination message
    selected: Selection | None = None  # which step's weights these are

    def missing(self) -> list[str]:
        """What this record lacks to prove a result exists: empty when it names the object and its digest."""
        problems = []
        if not self.uri.startswith("s3://"):
            problems.append(f"uri {self.uri!r} is not an s3:// URI")
        if not self.files:
            problems.append("files is empty")
        if not _SHA256.match(self.sha256):
            problems.append(f"sha256 {self.sha256!r} is not 64 hex digits")
        if self.size_bytes <= 0:
            problems.append(f"sizeBytes is {self.size_bytes}")
        return problems


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
OUTCOMES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class TerminationSummary:
    """What the trainer writes to its termination message, success or failure."""

    version: int = CONTRACT_VERSION
    outcome: str = "Failed"  # Succeeded | Failed
    reason: str = ""  # a TrainerReason on failure, "Completed" on success
    message: str = ""
    adapter: AdapterRecord | None = None
    metrics: dict[str, float] | None = None  # trainLoss, evalLoss, bestEvalLoss, bestStep, ...
    progress: dict[str, float] | None = None  # step, totalSteps, epoch, trainedTokens
    checkpoint: dict[str, Any] | None = None  # {uri, step}
    provenance: dict[str, Any] | None = None
    # The memory plan: strategy, worldSize, activationCheckpointing, microStepTokens, perGpuGiB, gpuGiB.
    plan: dict[str, Any] | None = None
    early_stop: EarlyStop | None = None  # set when the run stopped before its planned steps

    def to_json(self) -> str:
        """Compact JSON under TERMINATION_MESSAGE_LIMIT bytes. The outcome, the reason and the result record
        (uri, sha256, sizeBytes, baseModel) always arrive; optional parts give way first, in the order of
        _SHRINK_STEPS: provenance, the long message, progress, metrics, the file list, the checkpoint."""
        data = _to_json_dict(self)
        text = json.dumps(data, separators=(",", ":"))
        for shrink in _SHRINK_STEPS:
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                break
            shrink(data)
            text = json.dumps(data, separators=(",", ":"))
        return text

    @classmethod
    def from_json(cls, text: str) -> TerminationSummary:
        """Parse a termination message; ContractError names the first field that breaks the contract."""
        if len(text) > TERMINATION_MESSAGE_READ_LIMIT:
            raise ContractError(
                f"termination message is {len(text)} bytes, over {TERMINATION_MESSAGE_READ_LIMIT}"
            )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ContractError(f"termination message is not JSON ({err})") from err
        if not isinstance(data, dict) or "outcome" not in data:
            raise ContractError("termination message is not a kubetune summary (no outcome field)")
        summary: TerminationSummary = _from_json_dict(cls, data, "summary")
        if summary.version != CONTRACT_VERSION:
            raise ContractError(f"summary.version: {summary.version} is not {CONTRACT_VERSION}")
        if summary.outcome not in OUTCOMES:
            raise ContractError(
                f"summary.outcome: expected one of {', '.join(OUTCOMES)}, got {summary.outcome!r}"
            )
        return summary

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _drop(key: str) -> typing.Callable[[dict[str, Any]], None]:
    def shrink(data: dict[str, Any]) -> None:
        data.pop(key, None)

    return shrink


def _shorten_message(limit: int) -> typing.Callable[[dict[str, Any]], None]:
    def shrink(data: dict[str, Any]) -> None:
        message = str(data.get("message", ""))
        if len(message) > limit:
            data["message"] = message[:limit] + " ...(truncated)"

    return shrink


def _trim_files(data: dict[str, Any]) -> None:
    """Keep the head of the file list within the room left and count the rest (manifest.json under the
    result's URI lists every file with its digest)."""
    adapter = data.get("adapter")
    if not adapter or not adapter.get("files"):
        return
    files = list(adapter["files"])
    room = TERMINATION_MESSAGE_LIMIT - len(json.dumps({**data, "adapter": {**adapter, "files": []}}).encode())
    room -= 32  # the filesOmitted field
    kept: list[str] = []
    for name in files:
        room -= len(json.dumps(name).encode()) + 1
        if room < 0:
            break
        kept.append(name)
    adapter["files"] = kept or files[:1]
    adapter["filesOmitted"] = len(files) - len(adapter["files"]) + int(adapter.get("filesOmitted") or 0)


_SHRINK_STEPS: tuple[typing.Callable[[dict[str, Any]], None], ...] = (
    _drop("provenance"),
    _shorten_message(400),
    _drop("progress"),
    _drop("metrics"),
    _trim_files,
    _shorten_message(40),
    _drop("checkpoint"),
)
