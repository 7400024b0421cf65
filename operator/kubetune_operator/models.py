"""Typed view of a FineTuneJob, parsed once from the object the API server sends.

The CRD schema (crds/kubetune.io_finetunejobs.yaml) is the source of truth for the API; these models mirror
it with the same camelCase names (as aliases) and the same defaults, so that code below the handlers never
touches a raw dict. Unknown fields are ignored: the API server has already pruned what the schema does not
know.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="ignore",
        coerce_numbers_to_str=True,
    )


# --- spec -------------------------------------------------------------------------------------------------


class SecretRef(_Model):
    name: str


class AdapterRef(_Model):
    uri: str
    sha256: str | None = None


class BaseModelSpec(_Model):
    uri: str
    credentials_secret_ref: SecretRef | None = None
    adapter: AdapterRef | None = None  # a PEFT adapter to start from


class DatasetSpec(_Model):
    train: str
    validation: str | None = None
    validation_split: float | None = None
    format: str = "Auto"
    column_map: dict[str, str] | None = None
    max_seq_length: int = 2048
    text_mode: str = "Chunk"


class LoraSpec(_Model):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()


class DpoSpec(_Model):
    beta: float = 0.1
    label_smoothing: float = 0.0
    parameters: str = "LoRA"  # LoRA | Full


class HyperparametersSpec(_Model):
    epochs: int | None = None
    max_steps: int | None = None
    learning_rate: float = 2e-4
    batch_tokens: int | None = None
    micro_batch_size: int | None = None
    gradient_accumulation: int | None = None
    warmup_ratio: float = 0.03
    scheduler: str = "Cosine"
    weight_decay: float = 0.0
    seed: int = 42
    train_on: str = "Completions"
    packing: bool = True
    activation_checkpointing: str = "Auto"
    eval_every_steps: int | None = None
    early_stopping_patience: int | None = None


class OutputSpec(_Model):
    uri: str
    merge_adapter: bool = False
    select: str = "Last"


class S3Spec(_Model):
    endpoint: str | None = None
    region: str = "us-east-1"
    credentials_secret_ref: SecretRef | None = None
    force_path_style: bool = False


class ResourcesSpec(_Model):
    nodes: int = 1
    gpus: int = 1
    gpu_resource_name: str | None = None  # None: the operator's KUBETUNE_GPU_RESOURCE_NAME
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: tuple[dict[str, Any], ...] = ()
    priority_class_name: str | None = None
    runtime_class_name: str | None = None
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: tuple[dict[str, Any], ...] = ()
    ephemeral_storage: str | None = None
    extra_resources: dict[str, int] | None = None


class CheckpointingSpec(_Model):
    every_steps: int | None = None
    every_minutes: int | None = None
    keep: int = 2


class TrainerSpec(_Model):
    image: str | None = None
    env: tuple[dict[str, Any], ...] = ()
    service_account_name: str | None = None
    image_pull_secrets: tuple[dict[str, str], ...] = ()
    pod_annotations: dict[str, str] | None = None
    pod_labels: dict[str, str] | None = None
    termination_grace_period_seconds: int | None = None


class ValidationResources(_Model):
    cpu: str | None = None
    memory: str | None = None


class ValidationSpec(_Model):
    skip: bool = False
    resources: ValidationResources = Field(default_factory=ValidationResources)
    queue_name: str | None = None


class FineTuneJobSpec(_Model):
    base_model: BaseModelSpec
    dataset: DatasetSpec
    method: str
    lora: LoraSpec | None = None
    dpo: DpoSpec | None = None
    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec)
    output: OutputSpec
    s3: S3Spec = Field(default_factory=S3Spec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    suspend: bool = False
    active_deadline_seconds: int | None = None
    backoff_limit: int = 3
    scheduling_timeout_seconds: int = 600
    progress_deadline_seconds: int = 1800
    startup_deadline_seconds: int = 3600
    peer_timeout_seconds: int = 60
    ttl_seconds_after_finished: int | None = None
    queue_name: str | None = None
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    dry_run: bool = False
    validation: ValidationSpec = Field(default_factory=ValidationSpec)

    @property
    def weights_method(self) -> str:
        """LoRA, QLoRA or Full: what trains and what is published (DPO trains LoRA adapters or Full)."""
        if self.method == "DPO":
            return (self.dpo or DpoSpec()).parameters
        return self.method


# --- status -----------------------------------------------------------------------------------------------


class Condition(_Model):
    """One metav1.Condition."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class Progress(_Model):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: float | None = None
    eta_seconds: int | None = None
    tokens_per_second: float | None = None
    trained_tokens: int | None = None
    last_progress_time: str | None = None


class TrainingMetrics(_Model):
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    eval_token_accuracy: float | None = None
    # method DPO
    reward_margin: float | None = None
    preference_accuracy: float | None = None
    chosen_logps: float | None = None
    rejected_logps: float | None = None
    eval_reward_margin: float | None = None
    eval_preference_accuracy: float | None = None


class SelectedStep(_Model):
    """Which step's weights a published result holds (spec.output.select) and their validation loss."""

    select: str = "Last"
    step: int = 0
    eval_loss: float | None = None


class ArtifactRecord(_Model):
    """Where the trained adapter (LoRA) or model (Full) was written, and what it holds."""

    uri: str = ""
    files: tuple[str, ...] = ()
    size_bytes: int = 0
    sha256: str = ""
    base_model: str = ""
    selected: SelectedStep | None = None


class CheckpointRecord(_Model):
    uri: str = ""
    step: int = 0


class History(_Model):
    """The run's loss curve as columns: train points (step, train_loss, learning_rate) and eval points
    (eval_step, eval_loss). kubetune_operator.history keeps it bounded."""

    step: tuple[int, ...] = ()
    train_loss: tuple[float, ...] = ()
    learning_rate: tuple[float, ...] = ()
    eval_step: tuple[int, ...] = ()
    eval_loss: tuple[float, ...] = ()


class PlanParts(_Model):
    weights: float | None = None
    gradients: float | None = None
    optimizer: float | None = None
    activations: float | None = None
    workspace: float | None = None
    total: float | None = None


class SplitCounts(_Model):
    train: int | None = None
    validation: int | None = None


class Estimate(_Model):
    """How long the run should take on the requested GPUs: an estimate from a table, labelled by basis."""

    seconds: float | None = None
    gpu_hours: float | None = None
    tokens_per_second: float | None = None
    gpu_product: str | None = None
    model_size: str | None = None
    basis: str | None = None  # measured | estimated
    source: str | None = None


class CacheRef(_Model):
    uri: str | None = None
    digest: str | None = None


class MemoryPlan(_Model):
    """The plan as the validation pod (or the trainer) reported it: memory per GPU, steps, counts and the
    time estimate. An estimate, not a measurement."""

    strategy: str | None = None
    world_size: int | None = None
    activation_checkpointing: bool | None = None
    micro_step_tokens: int | None = None
    gpu_gi_b: float | None = Field(default=None, alias="gpuGiB")
    per_gpu_gi_b: PlanParts | None = Field(default=None, alias="perGpuGiB")
    steps: int | None = None
    examples: SplitCounts | None = None
    tokens: SplitCounts | None = None
    estimate: Estimate | None = None
    cache: CacheRef | None = None


class FineTuneJobStatus(_Model):
    conditions: tuple[Condition, ...] = ()
    phase: str | None = None
    message: str | None = None
    progress: Progress | None = None
    metrics: TrainingMetrics | None = None
    adapter: ArtifactRecord | None = None
    model: ArtifactRecord | None = None
    checkpoint: CheckpointRecord | None = None
    restarts: int | None = None
    no_progress_restarts: int | None = None
    plan: MemoryPlan | None = None
    start_time: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None
    trainer_job: str | None = None
    provenance: dict[str, Any] | None = None
    history: History | None = None

    def to_dict(self) -> dict[str, Any]:
        """The status as the API stores it: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- the whole object -------------------------------------------------------------------------------------

JobKey = tuple[str, str]
"""(namespace, name) of a FineTuneJob: how the work queue, the per-job locks and the scrape loop name it."""


class ObjectMeta(_Model):
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 1
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(_Model):
    """A FineTuneJob as the operator sees it. ``spec`` is None when the object's spec could not be parsed;
    ``spec_errors`` then says why, one line per problem, and the job is reported as InvalidSpec."""

    metadata: ObjectMeta
    spec: FineTuneJobSpec | None = None
    spec_errors: tuple[str, ...] = ()
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @classmethod
    def from_body(cls, body: dict[str, Any] | Any) -> FineTuneJob:
        """Parse an object from the API. Metadata and status must parse; a spec that does not is kept as
        ``spec_errors`` so the job can say what is wrong in its status instead of crashing the handler."""
        data = dict(body)
        metadata = ObjectMeta.model_validate(dict(data.get("metadata") or {}))
        status = FineTuneJobStatus.model_validate(dict(data.get("status") or {}))
        try:
            spec: FineTuneJobSpec | None = FineTuneJobSpec.model_validate(dict(data.get("spec") or {}))
            errors: tuple[str, ...] = ()
        except ValidationError as exc:
            spec, errors = None, tuple(describe_validation_error(exc))
        return cls(metadata=metadata, spec=spec, spec_errors=errors, status=status)


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem, naming the field by its API path (spec.dataset.train: Field required)."""
    lines = []
    for error in exc.errors():
        path = ".".join(
            ["spec", *(to_camel(str(p)) if isinstance(p, str) else f"[{p}]" for p in error["loc"])]
        )
        lines.append(f"{path.replace('.[', '[')}: {error['msg']}")
    return lines
