"""FineTuneJob conditions: metav1.Condition shape, the documented reasons, and the phase derived from them.

Condition types (a list-map keyed by ``type``):

- ``Validated``  the spec passed the operator's checks and the trainer config was rendered.
- ``Running``    the trainer container is running (True), or why it is not (False).
- ``Suspended``  the trainer Job is suspended, by ``spec.suspend`` or while Kueue has not admitted it.
- ``Succeeded``  terminal: the result was written (present only once True).
- ``Failed``     terminal: the run failed for the reason given (present only once True).
- ``Reconciling`` / ``Stalled``  the kstatus pair, so Flux, Argo CD and kpt judge health without custom code:
  Reconciling=True while the job is on its way, Stalled=True when it cannot get further on its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from kubetune_operator.models import Condition
from kubetune_trainer.contract import TrainerReason

VALIDATED: Final = "Validated"
RUNNING: Final = "Running"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
RECONCILING: Final = "Reconciling"
STALLED: Final = "Stalled"

TRUE: Final = "True"
FALSE: Final = "False"


class Reason:
    """Every reason the operator writes on a condition or an Event (CamelCase, stable: users and alerts match
    on them)."""

    # Validated
    SPEC_VALID = "SpecValid"
    """Validated=True: the spec is complete and consistent; the trainer config was rendered."""
    INVALID_SPEC = "InvalidSpec"
    """Validated=False and Failed=True: the spec cannot run; the message lists every problem and its field.
    Fixing the spec before a trainer Job was created lets the job continue."""
    CHILD_CONFLICT = "ChildConflict"
    """Failed=True: an object already holds a child's name (<name>-config, <name>-trainer) but is not
    controlled by this FineTuneJob (another tenant's, or a deleted FineTuneJob's of the same name); the
    message names it. It is never patched or adopted. Once it is gone the job continues."""
    CHILD_REJECTED = "ChildRejected"
    """Failed=True: the API server rejected the trainer ConfigMap or Job built from this spec (the message
    carries the server's reason), so the run cannot start."""
    CHILD_FORBIDDEN = "ChildForbidden"
    """Failed=True: the API server refused the operator the creation of the trainer ConfigMap or Job (HTTP
    403: the operator's RBAC lacks a grant, e.g. finetunejobs/finalizers for blockOwnerDeletion, or an
    admission policy or an object-count quota denies it); the message carries the server's words. The run
    cannot start and is not retried: fix the cause, then delete and re-apply the FineTuneJob."""

    VALIDATING = "Validating"
    """Validated=Unknown (and Running=False): the validation Job <name>-validate, on the CPU, reads every
    record, tokenizes and plans the run; no GPU Job exists yet."""
    DATA_VALID = "DataValid"
    """Validated=True: the validation pod checked every record, wrote the tokenized cache and the plan
    (status.plan, with its estimate); the GPU Job is created next (or, with spec.dryRun, the job ends)."""
    VALIDATION_FAILED = "ValidationFailed"
    """Failed=True: the validation Job failed without a valid kubetune report (its container crashed); the
    message carries its exit code and log tail. No GPU Job was created. Failures the validation pod
    reports (InvalidDataset, EmptyDataset, AccessDenied, InsufficientGPUMemory, ...) keep their own
    reason."""

    # Running (and Reconciling, which mirrors it while the job is on its way)
    CREATED = "Created"
    """Running=False: the trainer ConfigMap and Job were created; no trainer pod exists yet."""
    TRAINER_PENDING = "TrainerPending"
    """Running=False: the trainer pod exists but its container has not started (scheduling, image pull)."""
    UNSCHEDULABLE = "Unschedulable"
    """Running=False: the scheduler cannot place the trainer pod; the message carries the scheduler's words
    (e.g. insufficient nvidia.com/gpu). The job waits; it is not failed. Past spec.schedulingTimeoutSeconds
    it also reports Stalled=True (GitOps tools read it as failed) until the pod is scheduled."""
    CONTAINER_NOT_STARTING = "ContainerNotStarting"
    """Running=False: the trainer container is stuck waiting (ImagePullBackOff, CreateContainerConfigError
    for a missing credentials Secret, ...); the message says which and why. Causes that need a person (an
    image that cannot be pulled, a missing Secret or key) also set Stalled=True until they go away."""
    POD_CREATION_REFUSED = "PodCreationRefused"
    """Running=False and Stalled=True: the Job controller cannot create the trainer pod (a ResourceQuota, Pod
    Security admission or a webhook refused it); the message quotes the Job's FailedCreate Event. The Job
    keeps retrying, and Stalled clears once its pod exists."""
    TRAINER_STARTING = "TrainerStarting"
    """Running=True: the trainer container runs but has reported no training step yet (reading the data,
    loading the model)."""
    TRAINING = "Training"
    """Running=True: the trainer reports optimizer steps; progress and metrics are in the status."""
    NO_PROGRESS = "NoProgress"
    """Running=False (Event, Warning): the trainer made no step for spec.progressDeadlineSeconds (or none
    within spec.startupDeadlineSeconds of starting), so the operator deleted its pod and a new attempt
    resumes from the newest checkpoint. Failed=True once these restarts exceed spec.backoffLimit; the
    trainer Job is then suspended so it holds no GPU."""
    RESTARTING = "Restarting"
    """Running=False: a trainer attempt failed and the Job starts another (within spec.backoffLimit); the
    trainer resumes from its newest checkpoint. The message carries the failed attempt's reason."""
    PREEMPTED = "Preempted"
    """Running=False: the trainer pod was preempted or evicted (pod condition DisruptionTarget). This does not
    count against spec.backoffLimit; a new pod resumes from the newest checkpoint."""
    INTERRUPTED = TrainerReason.INTERRUPTED
    """Running=False: the trainer pod was stopped from outside (deleted, its node drained) and the trainer
    saved a checkpoint on the way out (status.checkpoint). This does not count against spec.backoffLimit; a
    new pod resumes from that checkpoint. Never a Failed reason."""

    # Suspended
    SUSPENDED = "Suspended"
    """Suspended=True: spec.suspend is true; the trainer pod is stopped and no GPU is held."""
    QUEUED = "Queued"
    """Suspended=True: spec.queueName is set and Kueue has not admitted the trainer Job yet (Reconciling=True:
    the job is on its way, so kstatus reads it as InProgress, not Current)."""
    ADMITTED = "Admitted"
    """Suspended=False: Kueue admitted the trainer Job (it unsuspended it)."""
    RESUMED = "Resumed"
    """Suspended=False: spec.suspend went back to false; training resumes from the newest checkpoint."""
    NOT_SUSPENDED = "NotSuspended"
    """Suspended=False: the job was never suspended."""

    # Succeeded
    COMPLETED = "Completed"
    """Succeeded=True: the trainer finished and wrote its result; status.adapter (LoRA) or status.model
    (Full) records it."""

    DRY_RUN = "DryRun"
    """Succeeded=True with spec.dryRun: the data is valid and the run is planned (status.plan, with the
    estimate); nothing was trained and no GPU was reserved. Terminal: kstatus reads it Current."""

    # Failed (besides the trainer's own reasons, copied from its termination message: see TRAINER_REASONS)
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    """Failed=True: the trainer failed more than spec.backoffLimit times; the message carries the last
    attempt's reason."""
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    """Failed=True: the run took longer than spec.activeDeadlineSeconds and was stopped."""
    TRAINER_FAILED = "TrainerFailed"
    """Failed=True: the trainer Job failed without a valid kubetune summary (the container crashed, or its
    termination message has the wrong shape or a reason outside the documented set); the message carries the
    container's exit code and its log tail with credential-looking values redacted."""
    NO_RESULT = "NoResult"
    """Failed=True: the trainer Job completed (exit 0) but its pod left no valid result record (uri, files,
    sizeBytes, sha256) in its termination message, so success cannot be proven; the message says what was
    missing and where the trainer's log is. Nothing is recorded in status.adapter or status.model."""
    TRAINER_JOB_MISSING = "TrainerJobMissing"
    """Failed=True: the trainer Job disappeared before its outcome was recorded (deleted by hand). The
    operator never re-creates it: a FineTuneJob trains at most once."""

    # Reconciling / Stalled
    FINISHED = "Finished"
    """Reconciling=False: the job reached Succeeded or Failed."""
    WAITING = "Waiting"
    """Reconciling=False: the job is suspended or queued and waits for a change from outside."""
    PROGRESSING = "Progressing"
    """Stalled=False: nothing blocks the job."""

    # Events only: a spec edit made while the trainer Job exists
    TRAINER_JOB_UPDATED = "TrainerJobUpdated"
    """Normal Event: an edit of spec.backoffLimit, spec.activeDeadlineSeconds or spec.ttlSecondsAfterFinished
    was copied onto the unfinished trainer Job; the message lists each field's old and new value."""
    SPEC_CHANGE_NOT_APPLIED = "SpecChangeNotApplied"
    """Warning Event, once per generation: spec fields that shape the trainer pod (spec.resources,
    spec.trainer, spec.queueName) changed after the trainer Job was created, which cannot take them; the
    message names them and says to delete and re-create the FineTuneJob to apply them."""


TRAINER_REASONS: Final = frozenset(
    value
    for key, value in vars(TrainerReason).items()
    if key.isupper() and isinstance(value, str) and value != TrainerReason.INTERRUPTED
)
"""Failure reasons the trainer reports in its termination message; copied onto Failed unchanged.
(``Interrupted`` is not a failure: the run stopped with a checkpoint and is retried.)"""


def now_rfc3339(now: datetime | None = None) -> str:
    """A metav1.Time as the API writes it: UTC, second precision, "Z"."""
    moment = now if now is not None else datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def set_condition(
    conditions: tuple[Condition, ...],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    generation: int,
    now: str,
) -> tuple[Condition, ...]:
    """Set one condition, keeping ``lastTransitionTime`` unless ``status`` flips (metav1 semantics).

    Other conditions keep their order; a new type is appended."""
    existing = next((c for c in conditions if c.type == type_), None)
    transition = existing.last_transition_time if existing and existing.status == status else now
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    if existing is None:
        return (*conditions, updated)
    return tuple(updated if c.type == type_ else c for c in conditions)


def remove_condition(conditions: tuple[Condition, ...], type_: str) -> tuple[Condition, ...]:
    return tuple(c for c in conditions if c.type != type_)


def find(conditions: tuple[Condition, ...], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: tuple[Condition, ...], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.status == TRUE


def derive_phase(conditions: tuple[Condition, ...]) -> str:
    """The one-word summary for humans and printer columns; the conditions remain the truth."""
    for type_, phase in (
        (FAILED, "Failed"),
        (SUCCEEDED, "Succeeded"),
        (SUSPENDED, "Suspended"),
        (RUNNING, "Running"),
    ):
        if is_true(conditions, type_):
            return phase
    return "Pending"
