"""The one level-based reconcile: (FineTuneJob, what was observed) -> (what to do, the new status).

Pure: no API calls, no clock reads (the time comes in ``Observed.now``). Every handler funnels into this
function, so the same inputs always give the same answer, whichever event woke the operator.

Lifecycle, each step with the condition reason a user reads:

    created --Validated/SpecValid--> Running=False/Created (ConfigMap + Job created)
       |-- Suspended/Suspended (spec.suspend)  |-- Suspended/Queued (spec.queueName, until Kueue admits)
       v
    Running=False/TrainerPending | Unschedulable | ContainerNotStarting
       v
    Running=True/TrainerStarting -> Running=True/Training (progress + metrics scraped)
       |-- attempt failed: Running=False/Restarting (status.restarts++); stopped from outside:
       |   /Preempted or /Interrupted (not counted); then back
       v
    Succeeded/Completed (only with the adapter record from the termination message; a Job that completes
       without one ends Failed/NoResult)
    Failed/<trainer reason> | BackoffLimitExceeded | DeadlineExceeded | TrainerFailed | TrainerJobMissing
       | NoResult

A finished FineTuneJob (Succeeded or Failed, except the fixable InvalidSpec/ChildRejected) never creates a
child again: re-applying a manifest never retrains.

Spec edits while the trainer Job exists and is unfinished: spec.suspend, spec.backoffLimit,
spec.activeDeadlineSeconds and spec.ttlSecondsAfterFinished are patched onto the Job (Event
TrainerJobUpdated); edits of the fields the Job's pod template and labels were built from cannot reach it and
are reported once per generation (Warning SpecChangeNotApplied), judged against the hashes the builder wrote
on the Job, so the check needs no memory of earlier passes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune_operator import conditions as cond
from kubetune_operator import history, kueue, labels, observed, termination
from kubetune_operator.builders import (
    build_config_map,
    build_trainer_job,
    build_trainer_service,
    desired_suspend,
    is_multi_node,
    render_trainer_config,
)
from kubetune_operator.builders.trainer_job import built_from, trainer_image, updatable_job_fields
from kubetune_operator.builders.validate_job import build_validate_job
from kubetune_operator.conditions import FALSE, TRUE, Reason
from kubetune_operator.config import OperatorConfig
from kubetune_operator.events import Event, transition_events
from kubetune_operator.models import (
    ArtifactRecord,
    CheckpointRecord,
    Condition,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    MemoryPlan,
    Progress,
    SelectedStep,
    TrainingMetrics,
)
from kubetune_operator.observed import Obj, Observed
from kubetune_operator.trainer_metrics import TrainerSample
from kubetune_operator.validation import validate
from kubetune_trainer import contract
from kubetune_trainer.contract import TerminationSummary

FIXABLE_FAILURES = frozenset({Reason.INVALID_SPEC, Reason.CHILD_REJECTED, Reason.CHILD_CONFLICT})
"""Failed reasons that a spec edit (or removing the object in the way) can clear, because no trainer Job of
this FineTuneJob was ever created."""
MESSAGE_LIMIT = 1024
"""Longest message kept on a condition; longer texts (log tails) keep their end, where the error is."""


@dataclass(frozen=True)
class Outcome:
    create: tuple[Obj, ...]
    """Children to create (idempotently: an existing one is left alone)."""
    replace: tuple[Obj, ...]
    """Children to overwrite: only the ConfigMap, and only before the trainer Job exists."""
    set_suspend: bool | None
    """Patch the trainer Job's spec.suspend to this value; None: leave it."""
    job_spec_patch: Obj
    """A JSON merge patch for the trainer Job's spec (spec fields that follow edits; null removes one);
    empty: leave it."""
    status: FineTuneJobStatus
    events: tuple[Event, ...]
    delete_pod: Obj | None = None
    """A trainer pod to delete (the progress watchdog: it stopped making steps); the Job makes a new one."""
    recheck_after_seconds: float | None = None
    """Reconcile again after this long even if no child changes: a wait that ends by the clock (a scheduling
    timeout) or a cause that leaves the watched objects alone (a FailedCreate Event on the Job)."""

    def status_changed(self, old: FineTuneJobStatus) -> bool:
        return self.status.to_dict() != old.to_dict()


def is_finished(status: FineTuneJobStatus) -> bool:
    """Succeeded, or Failed for a reason a spec edit cannot clear."""
    if cond.is_true(status.conditions, cond.SUCCEEDED):
        return True
    failed = cond.find(status.conditions, cond.FAILED)
    return failed is not None and failed.status == TRUE and failed.reason not in FIXABLE_FAILURES


class _Status:
    """The status under construction, with the condition writer bound to this pass's generation and time."""

    def __init__(self, old: FineTuneJobStatus, generation: int, now: str) -> None:
        self.old = old
        self.fields: dict[str, Any] = {}
        self.conditions = old.conditions
        self.generation = generation
        self.now = now
        self.recheck_after_seconds: float | None = None
        self.delete_pod: Obj | None = None
        self.suspend_job = False

    def set(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = cond.set_condition(
            self.conditions, type_, status, reason, _clip(message), generation=self.generation, now=self.now
        )

    def remove(self, type_: str) -> None:
        self.conditions = cond.remove_condition(self.conditions, type_)

    def build(self) -> FineTuneJobStatus:
        return self.old.model_copy(
            update={
                **self.fields,
                "conditions": self.conditions,
                "phase": cond.derive_phase(self.conditions),
                "message": _headline(self.conditions),
                "observed_generation": self.generation,
            }
        )


def reconcile(job: FineTuneJob, seen: Observed, config: OperatorConfig) -> Outcome:
    now = cond.now_rfc3339(seen.now)
    old = job.status
    st = _Status(old, job.metadata.generation, now)
    if is_finished(old):
        return Outcome((), (), None, {}, st.build(), ())

    conflict = _conflicting_child(job, seen)
    if conflict is not None:
        _fail_before_start(st, Reason.CHILD_CONFLICT, conflict)
        st.recheck_after_seconds = RECHECK_SECONDS  # a ConfigMap in the way is not watched
        return _outcome(st, old, (), (), None)
    started = bool(old.trainer_job) or seen.trainer_job is not None
    problems = validate(job)
    if problems and not started:
        _fail_before_start(st, Reason.INVALID_SPEC, "; ".join(problems))
        return _outcome(st, old, (), (), None)
    if seen.rejected and not started:
        _fail_before_start(st, Reason.CHILD_REJECTED, f"the API server rejected a child: {seen.rejected}")
        return _outcome(st, old, (), (), None)
    if seen.forbidden and not started:
        message = (
            f"the API server forbade creating a child: {seen.forbidden}; grant the operator what the "
            "message names (see the chart's RBAC), then delete and re-apply this FineTuneJob"
        )
        _fail_before_start(st, Reason.CHILD_FORBIDDEN, message)
        return _outcome(st, old, (), (), None)
    if job.spec is None:
        # The run is under way but its spec no longer parses: leave the trainer alone and say so.
        message = "; ".join(problems)
        st.set(cond.VALIDATED, FALSE, Reason.INVALID_SPEC, message)
        st.set(cond.STALLED, TRUE, Reason.INVALID_SPEC, message)
        return _outcome(st, old, (), (), None)
    spec = job.spec

    if problems:
        st.set(cond.VALIDATED, FALSE, Reason.INVALID_SPEC, "; ".join(problems))
    elif spec.validation.skip or (started and not _data_validated(old)):
        st.set(cond.VALIDATED, TRUE, Reason.SPEC_VALID, "the spec is valid; the trainer config was rendered")
    if cond.find(st.conditions, cond.FAILED) is not None:
        st.remove(cond.FAILED)  # a fixable failure, now fixed
        st.remove(cond.STALLED)

    create: list[Obj] = []
    replace: list[Obj] = []
    desired_config = build_config_map(job, config)
    if seen.config_map is None:
        create.append(desired_config)
    elif not started and seen.config_map.get("data") != desired_config["data"]:
        replace.append(desired_config)

    set_suspend: bool | None = None
    job_spec_patch: Obj = {}
    spec_events: tuple[Event, ...] = ()
    trainer_job = seen.trainer_job
    if trainer_job is None and old.trainer_job:
        _finish_failed(
            st,
            Reason.TRAINER_JOB_MISSING,
            f"the trainer Job {old.trainer_job} was deleted before its outcome was recorded; a FineTuneJob "
            "trains at most once: create a new FineTuneJob to train again",
        )
        create = []
    elif trainer_job is None:
        if not spec.validation.skip:
            validating, validated = _validation(st, job, seen, config)
            if not validated or spec.dry_run:
                if validated:
                    _dry_run_done(st)
                return _outcome(st, old, (*create, *validating), tuple(replace), None)
        if is_multi_node(job) and seen.service is None:
            create.append(build_trainer_service(job))  # first: the pods look their peers up through it
        create.append(build_trainer_job(job, config))
        st.fields["trainer_job"] = labels.trainer_job_name(job.name)
        st.fields["restarts"] = 0
        if old.provenance is None:
            st.fields["provenance"] = _operator_provenance(job, config)
        if desired_suspend(job):
            _suspended(st, spec, seen)
        else:
            st.set(cond.SUSPENDED, FALSE, Reason.NOT_SUSPENDED, "the job is not suspended")
            st.set(
                cond.RUNNING,
                FALSE,
                Reason.CREATED,
                _created_message(labels.trainer_job_name(job.name)),
            )
            _reconciling(st)
            st.recheck_after_seconds = RECHECK_SECONDS
    else:
        st.fields["trainer_job"] = str(trainer_job["metadata"]["name"])
        set_suspend = _follow_job(st, job, spec, trainer_job, seen)
        if not is_finished(st.build()):
            job_spec_patch, spec_events = _spec_edits(job, trainer_job)
            if observed.is_indexed(trainer_job) and seen.service is None:
                create.append(build_trainer_service(job))  # deleted under a running group: names come back
    return _outcome(st, old, tuple(create), tuple(replace), set_suspend, job_spec_patch, spec_events)


def _conflicting_child(job: FineTuneJob, seen: Observed) -> str | None:
    """Why an object under a child's name is not this FineTuneJob's (its controller ownerReference has
    another uid, or none); None when every existing child is ours. Such an object is never used, patched or
    adopted: it may be another tenant's, or the previous run's of a FineTuneJob deleted and re-applied under
    the same name, whose result must not be taken for this one's."""
    for kind, child in (
        ("ConfigMap", seen.config_map),
        ("Service", seen.service),
        ("Job", seen.trainer_job),
        ("Job", seen.validate_job),
    ):
        if child is None:
            continue
        owner = observed.controller_uid(child)
        if owner == job.metadata.uid:
            continue
        meta = child.get("metadata") or {}
        where = f"{kind} {job.namespace}/{meta.get('name')}"
        refs = [r for r in meta.get("ownerReferences") or [] if isinstance(r, dict) and r.get("controller")]
        if refs and refs[0].get("kind") == labels.KIND and refs[0].get("name") == job.name:
            return (
                f"{where} belongs to an earlier FineTuneJob of the same name (uid {owner}), still being "
                "deleted or orphaned; its result is not this run's. This job starts once that object is "
                f"gone: wait for the garbage collector, or delete it (kubectl delete {kind.lower()} -n "
                f"{job.namespace} {meta.get('name')})"
            )
        controller = f"{refs[0].get('kind')} {refs[0].get('name')}" if refs else "nothing"
        return (
            f"{where} already exists and is not controlled by this FineTuneJob (its controller is "
            f"{controller}); kubetune never adopts or changes an object it did not create: delete or rename "
            "that object, or give this FineTuneJob another name"
        )
    return None


# --- the validation pod (before any GPU is reserved) -----------------------------------------------------


def _data_validated(status: FineTuneJobStatus) -> bool:
    validated = cond.find(status.conditions, cond.VALIDATED)
    return validated is not None and validated.status == TRUE and validated.reason == Reason.DATA_VALID


def _validation(
    st: _Status, job: FineTuneJob, seen: Observed, config: OperatorConfig
) -> tuple[list[Obj], bool]:
    """Follow the validation Job: (children to create, whether the data is validated). Until it is, no GPU
    Job exists; a failed validation ends the FineTuneJob with the validation pod's reason."""
    if _data_validated(st.old):
        return [], True
    name = labels.validate_job_name(job.name)
    validate_job = seen.validate_job
    if validate_job is None:
        _validating(st, f"validation Job {name} created: it checks every record and plans the run on the CPU")
        return [build_validate_job(job, config)], False
    if observed.job_condition(validate_job, "Complete") or observed.job_condition(
        validate_job, "SuccessCriteriaMet"
    ):
        pod = observed.last_finished_pod(seen.validate_pods, "Succeeded")
        summary, problem = termination.read_summary(pod)
        plan = _memory_plan(summary.plan) if summary is not None else None
        reported = (summary.outcome, summary.reason) if summary is not None else None
        if summary is None or reported != ("Succeeded", contract.VALIDATED_REASON) or plan is None:
            if summary is None:
                why = problem
            elif reported != ("Succeeded", contract.VALIDATED_REASON):
                why = (
                    f"it reported {summary.outcome}/{summary.reason or 'no reason'} instead of a validation: "
                    "is the trainer image older than the validate command?"
                )
            else:
                why = "its report has no plan of the expected shape"
            _fail_validation(
                st,
                Reason.VALIDATION_FAILED,
                f"the validation Job {name} completed without a valid report ({why}); "
                f"{termination.log_hint(pod, job.namespace)}",
            )
            return [], False
        st.fields["plan"] = plan
        if summary.provenance:
            st.fields["provenance"] = {**(st.old.provenance or {}), "validation": summary.provenance}
        st.set(
            cond.VALIDATED,
            TRUE,
            Reason.DATA_VALID,
            termination.redact(summary.message or "the data is valid"),
        )
        return [], True
    failed = observed.job_condition(validate_job, "Failed") or observed.job_condition(
        validate_job, "FailureTarget"
    )
    if failed is not None:
        pod = observed.last_finished_pod(seen.validate_pods, "Failed")
        summary, _ = termination.read_summary(pod)
        reason = termination.documented_failure(summary)
        if reason is not None and summary is not None:
            message = termination.redact(summary.message or summary.reason)
        else:
            detail = (
                termination.attempt_detail(pod) if pod is not None else "no validation pod is left to inspect"
            )
            reason = Reason.VALIDATION_FAILED
            message = f"the validation Job {name} failed ({failed.get('reason') or 'Failed'}): {detail}"
        _fail_validation(st, reason, message)
        return [], False
    pod = observed.current_pod(seen.validate_pods)
    unschedulable = observed.unschedulable_message(pod) if pod is not None else None
    stuck = observed.stuck_waiting(pod) if pod is not None else None
    if pod is not None and stuck is not None and stuck[0] in observed.NEEDS_A_PERSON_WAITING:
        detail = f"{stuck[0]}: {stuck[1]}" if stuck[1] else stuck[0]
        message = f"container trainer in validation pod {observed.pod_name(pod)} is waiting: {detail}"
        st.set(cond.VALIDATED, "Unknown", Reason.VALIDATING, message)
        st.set(cond.RUNNING, FALSE, Reason.CONTAINER_NOT_STARTING, message)
        _stalled(st, Reason.CONTAINER_NOT_STARTING, message)
    elif pod is not None and unschedulable is not None:
        _validating(
            st,
            f"validation pod {observed.pod_name(pod)} cannot be scheduled: {unschedulable}; set "
            "spec.validation.resources to what a node offers",
        )
    elif observed.job_suspended(validate_job):
        _validating(st, f"validation Job {name} waits for Kueue to admit it")
    else:
        ended = observed.newest_pod(seen.validate_pods) if pod is None else None
        if pod is not None and observed.running_since(pod) is not None:
            message = f"validation pod {observed.pod_name(pod)} is checking the data and planning the run"
        elif ended is not None and observed.is_finished_pod(ended):
            message = f"validation pod {observed.pod_name(ended)} ended; reading its report"
        else:
            message = f"validation Job {name} is starting its pod"
        _validating(st, message)
    return [], False


def _validating(st: _Status, message: str) -> None:
    st.set(cond.VALIDATED, "Unknown", Reason.VALIDATING, message)
    st.set(cond.RUNNING, FALSE, Reason.VALIDATING, message)
    st.set(cond.RECONCILING, TRUE, Reason.VALIDATING, message)
    st.set(cond.STALLED, FALSE, Reason.PROGRESSING, "")


def _fail_validation(st: _Status, reason: str, message: str) -> None:
    st.set(cond.VALIDATED, FALSE, reason, message)
    _finish_failed(st, reason, f"{message}; no GPU Job was created")


def _dry_run_done(st: _Status) -> None:
    """spec.dryRun: validated and planned, so the job ends here (Succeeded/DryRun, kstatus Current)."""
    plan: MemoryPlan | None = st.fields.get("plan") or st.old.plan
    estimate = plan.estimate if plan is not None else None
    cost = (
        f"; estimate: {estimate.seconds:.0f} s, {estimate.gpu_hours} GPU-hours on {estimate.gpu_product} "
        f"({estimate.basis})"
        if estimate is not None and estimate.seconds is not None
        else ""
    )
    message = (
        f"dry run: the data is valid and the run is planned (status.plan){cost}; nothing was trained and no "
        "GPU was reserved"
    )
    st.fields.setdefault("completion_time", st.now)
    st.set(cond.SUCCEEDED, TRUE, Reason.DRY_RUN, message)
    st.set(cond.RUNNING, FALSE, Reason.DRY_RUN, message)
    st.set(cond.RECONCILING, FALSE, Reason.FINISHED, "the job finished")
    st.set(cond.STALLED, FALSE, Reason.FINISHED, "")


# --- following the trainer Job ----------------------------------------------------------------------------


def _follow_job(
    st: _Status, job: FineTuneJob, spec: FineTuneJobSpec, trainer_job: Obj, seen: Observed
) -> bool | None:
    failed_attempts = observed.job_failed_count(trainer_job)
    # SuccessCriteriaMet / FailureTarget come first, while the Job controller still tidies up its pods; the
    # outcome is decided then, so the status need not wait for Complete / Failed.
    if observed.job_condition(trainer_job, "Complete") or observed.job_condition(
        trainer_job, "SuccessCriteriaMet"
    ):
        _succeed(st, job, spec, trainer_job, seen)
        return None
    job_failed = observed.job_condition(trainer_job, "Failed") or observed.job_condition(
        trainer_job, "FailureTarget"
    )
    if job_failed is not None:
        _fail_from_job(st, spec, trainer_job, job_failed, seen)
        return None

    st.fields["restarts"] = max(st.old.restarts or 0, failed_attempts)
    # A stopped attempt (suspension, preemption, drain) saved a checkpoint on its way out.
    _record_checkpoint(st, termination.read_summary(observed.last_finished_pod(seen.pods, "Failed"))[0])
    set_suspend: bool | None = None
    suspended = observed.job_suspended(trainer_job)
    if spec.suspend and not suspended:
        set_suspend, suspended = True, True
    elif not spec.suspend and suspended and not spec.queue_name:
        set_suspend, suspended = False, False
    if suspended:
        _suspended(st, spec, seen)
        return set_suspend

    was = cond.find(st.old.conditions, cond.SUSPENDED)
    if was is not None and was.status == TRUE:
        if was.reason == Reason.QUEUED and spec.queue_name and not spec.suspend:
            st.set(
                cond.SUSPENDED, FALSE, Reason.ADMITTED, kueue.admitted_message(spec.queue_name, seen.workload)
            )
        else:
            st.set(
                cond.SUSPENDED,
                FALSE,
                Reason.RESUMED,
                "spec.suspend is false; training resumes from the newest checkpoint",
            )
    elif was is None:
        st.set(cond.SUSPENDED, FALSE, Reason.NOT_SUSPENDED, "the job is not suspended")
    _trainer_progress(st, spec, trainer_job, seen)
    return set_suspend


def _spec_edits(job: FineTuneJob, trainer_job: Obj) -> tuple[Obj, tuple[Event, ...]]:
    """The merge patch that brings the Job's updatable fields in line with the spec, and the Events that
    say what was applied and what cannot be."""
    job_name = str(trainer_job["metadata"]["name"])
    current = trainer_job.get("spec") or {}
    patch: Obj = {
        name: value for name, value in updatable_job_fields(job).items() if current.get(name) != value
    }
    events: list[Event] = []
    if patch:
        changes = ", ".join(
            f"spec.{name} {_shown(current.get(name))} -> {_shown(value)}" for name, value in patch.items()
        )
        events.append(
            Event("Normal", Reason.TRAINER_JOB_UPDATED, f"trainer Job {job_name} updated: {changes}")
        )
    first_pass_of_generation = job.status.observed_generation != job.metadata.generation
    stale = _fields_edited_since_built(job, trainer_job) if first_pass_of_generation else []
    if stale:
        events.append(
            Event(
                "Warning",
                Reason.SPEC_CHANGE_NOT_APPLIED,
                f"{', '.join(stale)} changed after trainer Job {job_name} was created; they apply only to a "
                "trainer Job created from now on, so this run keeps the pod template it started with: "
                "delete and re-create the FineTuneJob to apply them",
            )
        )
    return patch, tuple(events)


def _fields_edited_since_built(job: FineTuneJob, trainer_job: Obj) -> list[str]:
    """Spec fields whose hash differs from the one the builder recorded on the Job. A Job without the record
    (or with one this version cannot read) reports nothing: there is nothing to compare with."""
    annotations = (trainer_job.get("metadata") or {}).get("annotations") or {}
    try:
        recorded = json.loads(annotations.get(labels.ANNOTATION_BUILT_FROM) or "{}")
    except ValueError:
        return []
    if not isinstance(recorded, dict):
        return []
    return [
        field for field, digest in built_from(job).items() if field in recorded and recorded[field] != digest
    ]


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


def _suspended(st: _Status, spec: FineTuneJobSpec, seen: Observed) -> None:
    if spec.suspend or not spec.queue_name:
        reason, message = Reason.SUSPENDED, "spec.suspend is true; the trainer is stopped and holds no GPU"
    else:
        reason = Reason.QUEUED
        message = kueue.queued_message(spec.queue_name, seen.workload, seen.kueue_unavailable)
        # Kueue writes its reasons on the Workload, which the operator does not watch: look again soon.
        st.recheck_after_seconds = QUEUED_RECHECK_SECONDS
    st.set(cond.SUSPENDED, TRUE, reason, message)
    st.set(cond.RUNNING, FALSE, reason, message)
    # Suspended by the user is a steady state (kstatus Current); queued is on its way (InProgress).
    if reason == Reason.QUEUED:
        st.set(cond.RECONCILING, TRUE, reason, message)
    else:
        st.set(cond.RECONCILING, FALSE, Reason.WAITING, message)
    st.set(cond.STALLED, FALSE, Reason.PROGRESSING, "")


def _reconciling(st: _Status) -> None:
    running = cond.find(st.conditions, cond.RUNNING)
    assert running is not None
    st.set(cond.RECONCILING, TRUE, running.reason, running.message)
    st.set(cond.STALLED, FALSE, Reason.PROGRESSING, "")


def _trainer_progress(st: _Status, spec: FineTuneJobSpec, trainer_job: Obj, seen: Observed) -> None:
    pods = seen.pods
    indexed = observed.is_indexed(trainer_job)
    pod = observed.group_pod(pods) if indexed else observed.current_pod(pods)
    last_failed = observed.last_failed_pod(pods, indexed=indexed)
    started_at = observed.running_since(pod) if pod is not None else None
    if pod is not None and started_at is not None:
        if st.old.start_time is None:
            st.fields["start_time"] = started_at
        previous = cond.find(st.old.conditions, cond.RUNNING)
        step = seen.sample.step if seen.sample is not None else None
        training = (step is not None and step > 0) or (
            seen.sample is None and previous is not None and previous.reason == Reason.TRAINING
        )
        where = f"pod {observed.pod_name(pod)}"
        if indexed:
            nodes = (trainer_job.get("spec") or {}).get("parallelism")
            where = f"{nodes} pods, rank 0 in {where}"
        if training:
            st.set(cond.RUNNING, TRUE, Reason.TRAINING, f"training in {where}")
        else:
            st.set(
                cond.RUNNING,
                TRUE,
                Reason.TRAINER_STARTING,
                f"trainer started in {where}; preparing data and model",
            )
        if seen.sample is not None:
            _apply_sample(st, seen.sample)
        # The watchdog judges only a trainer it can read: one whose metrics cannot be scraped (a network
        # policy, say) is never restarted for a silence that may be the operator's own.
        idle = _no_progress(st, spec, pod, started_at) if seen.sample is not None else None
        if idle is not None:
            _restart_stuck(st, spec, trainer_job, pod, idle)
            return
    elif pod is None and last_failed is not None and _about_to_fail(last_failed, st.old):
        pass  # the Job controller is failing the Job (podFailurePolicy): no "Restarting" in between
    elif pod is None and observed.last_finished_pod(pods, "Succeeded") is not None:
        # The trainer exited 0 and the Job controller has yet to mark the Job complete: still running.
        previous = cond.find(st.old.conditions, cond.RUNNING)
        reason = previous.reason if previous is not None and previous.status == TRUE else Reason.TRAINING
        st.set(cond.RUNNING, TRUE, reason, "the trainer finished; waiting for the trainer Job to complete")
    else:
        reason, message = _why_not_running(trainer_job, pod, last_failed, seen)
        st.set(cond.RUNNING, FALSE, reason, message)
        if _needs_a_person(st, spec, reason, pod, seen):
            _stalled(st, reason, message)
            return
    _reconciling(st)


def _no_progress(st: _Status, spec: FineTuneJobSpec, pod: Obj, started_at: str) -> str | None:
    """Why the running trainer counts as stuck (no step within the deadline that applies), or None."""
    now = cond.parse_rfc3339(st.now)
    started = cond.parse_rfc3339(started_at)
    if now is None or started is None:
        return None
    progress: Progress | None = st.fields.get("progress") or st.old.progress
    moved = cond.parse_rfc3339(progress.last_progress_time if progress is not None else None)
    name = observed.pod_name(pod)
    if moved is not None and moved >= started:  # this attempt has made a step
        idle = (now - moved).total_seconds()
        if idle <= spec.progress_deadline_seconds:
            return None
        step = progress.step if progress is not None else None
        return (
            f"trainer pod {name} made no training step for {int(idle)}s (spec.progressDeadlineSeconds="
            f"{spec.progress_deadline_seconds}) after step {step}"
        )
    idle = (now - started).total_seconds()
    if idle <= spec.startup_deadline_seconds:
        return None
    return (
        f"trainer pod {name} made no training step within {int(idle)}s of starting "
        f"(spec.startupDeadlineSeconds={spec.startup_deadline_seconds})"
    )


def _restart_stuck(st: _Status, spec: FineTuneJobSpec, trainer_job: Obj, pod: Obj, why: str) -> None:
    """Delete a trainer pod that stopped making steps, so an attempt resumes from the newest checkpoint; past
    spec.backoffLimit such restarts, fail the job and suspend its Job so it holds no GPU."""
    count = (st.old.no_progress_restarts or 0) + 1
    st.fields["no_progress_restarts"] = count
    st.fields["restarts"] = max(st.old.restarts or 0, observed.job_failed_count(trainer_job)) + 1
    if count > spec.backoff_limit:
        _finish_failed(
            st,
            Reason.NO_PROGRESS,
            f"{why}; this happened {count} times, more than backoffLimit {spec.backoff_limit}: look for a "
            "hung collective or an unreachable storage mount in the trainer's log",
        )
        st.suspend_job = True
        return
    st.delete_pod = pod
    message = f"{why}; deleted it, a new attempt resumes from the newest checkpoint"
    st.set(cond.RUNNING, FALSE, Reason.NO_PROGRESS, message)
    _reconciling(st)


RECHECK_SECONDS = 15.0
"""How often a job is looked at again while it waits on something the operator does not watch: a trainer Job
without a pod (FailedCreate Events), an object in the way of a child (ChildConflict)."""
QUEUED_RECHECK_SECONDS = 10.0
"""How often a queued job's Workload is read again for Kueue's latest explanation. Admission itself needs no
poll: Kueue unsuspends the trainer Job, and the Job's event wakes the operator at once."""


def _needs_a_person(st: _Status, spec: FineTuneJobSpec, reason: str, pod: Obj | None, seen: Observed) -> bool:
    """Whether the job waits on something that retrying alone will not fix. The operator keeps following
    the job either way; Stalled clears on the first pass after the cause goes away."""
    if reason == Reason.POD_CREATION_REFUSED:
        st.recheck_after_seconds = RECHECK_SECONDS
        return True
    if reason == Reason.CREATED:
        st.recheck_after_seconds = RECHECK_SECONDS
        return False
    if reason == Reason.CONTAINER_NOT_STARTING and pod is not None:
        stuck = observed.stuck_waiting(pod)
        return stuck is not None and stuck[0] in observed.NEEDS_A_PERSON_WAITING
    if reason == Reason.UNSCHEDULABLE and pod is not None:
        since = cond.parse_rfc3339(observed.unschedulable_since(pod)) or seen.now
        left = spec.scheduling_timeout_seconds - (seen.now - since).total_seconds()
        if left > 0:
            st.recheck_after_seconds = left + 1
            return False
        return True
    return False


def _stalled(st: _Status, reason: str, message: str) -> None:
    st.set(cond.RECONCILING, FALSE, reason, message)
    st.set(cond.STALLED, TRUE, reason, message)


def _about_to_fail(last_failed: Obj, old: FineTuneJobStatus) -> bool:
    terminated = observed.terminated_state(last_failed) or {}
    permanent = terminated.get("exitCode") == contract.EXIT_CODE_PERMANENT_FAILURE
    return permanent and cond.find(old.conditions, cond.RUNNING) is not None


def _why_not_running(
    trainer_job: Obj, pod: Obj | None, last_failed: Obj | None, seen: Observed
) -> tuple[str, str]:
    if pod is not None:
        name = observed.pod_name(pod)
        unschedulable = observed.unschedulable_message(pod)
        if unschedulable is not None:
            return Reason.UNSCHEDULABLE, f"trainer pod {name} cannot be scheduled: {unschedulable}"
        stuck = observed.stuck_waiting(pod)
        if stuck is not None:
            detail = f"{stuck[0]}: {stuck[1]}" if stuck[1] else stuck[0]
            return Reason.CONTAINER_NOT_STARTING, f"container trainer in pod {name} is waiting: {detail}"
    if last_failed is not None:
        if observed.was_disrupted(last_failed):
            return (
                Reason.PREEMPTED,
                f"trainer pod {observed.pod_name(last_failed)} was preempted or evicted; a new pod resumes "
                "from the newest checkpoint",
            )
        if termination.interrupted(last_failed):
            summary, _ = termination.read_summary(last_failed)
            checkpoint = (summary.checkpoint if summary is not None else None) or {}
            saved = (
                f"its checkpoint at step {checkpoint.get('step')} ({checkpoint['uri']})"
                if checkpoint.get("uri")
                else "the newest checkpoint"
            )
            return (
                Reason.INTERRUPTED,
                f"trainer pod {observed.pod_name(last_failed)} was stopped (SIGTERM); a new pod resumes from "
                f"{saved}",
            )
        attempts = observed.job_failed_count(trainer_job)
        return (
            Reason.RESTARTING,
            f"attempt {attempts} failed ({termination.attempt_detail(last_failed)}); "
            "restarting from the newest checkpoint",
        )
    if pod is not None:
        return Reason.TRAINER_PENDING, f"trainer pod {observed.pod_name(pod)} is starting"
    refused = observed.pod_creation_refused(seen.job_events)
    job_name = str(trainer_job["metadata"]["name"])
    if refused is not None:
        return (
            Reason.POD_CREATION_REFUSED,
            f"the trainer Job {job_name} cannot create its pod: {termination.redact(refused)}; fix the "
            "namespace's quota or Pod Security level (or the webhook that refused it); the Job retries",
        )
    return Reason.CREATED, _created_message(job_name)


def _created_message(job_name: str) -> str:
    return f"trainer Job {job_name} created; waiting for its pod"


def _apply_sample(st: _Status, sample: TrainerSample) -> None:
    old_progress = st.old.progress or Progress()
    step = _int(sample.step, old_progress.step)
    if step == 0 and old_progress.step:
        step = old_progress.step  # a new attempt still preparing has not restored its step yet
    total = _int(sample.total_steps, old_progress.total_steps)
    percent = old_progress.percent
    if step is not None and total:
        percent = round(min(100.0, 100.0 * step / total), 1)
    # A step counts as progress only once the trainer makes one: step 0 (still preparing) and a resumed
    # attempt's restored step are where it starts, judged by startupDeadlineSeconds.
    moved = step is not None and step > 0 and step != old_progress.step
    st.fields["progress"] = Progress(
        step=step,
        total_steps=total,
        epoch=_num(sample.epoch, old_progress.epoch, 3),
        percent=percent,
        eta_seconds=_int(sample.eta_seconds, old_progress.eta_seconds),
        tokens_per_second=_num(sample.tokens_per_second, old_progress.tokens_per_second, 1),
        trained_tokens=_int(sample.trained_tokens, old_progress.trained_tokens),
        last_progress_time=st.now if moved else old_progress.last_progress_time,
    )
    old_metrics = st.old.metrics or TrainingMetrics()
    st.fields["metrics"] = TrainingMetrics(
        train_loss=_sig(sample.train_loss, old_metrics.train_loss),
        eval_loss=_sig(sample.eval_loss, old_metrics.eval_loss),
        learning_rate=_sig(sample.learning_rate, old_metrics.learning_rate),
        grad_norm=_sig(sample.grad_norm, old_metrics.grad_norm),
        best_eval_loss=_sig(sample.best_eval_loss, old_metrics.best_eval_loss),
        best_step=_int(sample.best_step, old_metrics.best_step),
        eval_token_accuracy=_share(sample.eval_token_accuracy, old_metrics.eval_token_accuracy),
        reward_margin=_sig(sample.reward_margin, old_metrics.reward_margin),
        preference_accuracy=_sig(sample.preference_accuracy, old_metrics.preference_accuracy),
        chosen_logps=_sig(sample.chosen_logps, old_metrics.chosen_logps),
        rejected_logps=_sig(sample.rejected_logps, old_metrics.rejected_logps),
        eval_reward_margin=_sig(sample.eval_reward_margin, old_metrics.eval_reward_margin),
        eval_preference_accuracy=_sig(sample.eval_preference_accuracy, old_metrics.eval_preference_accuracy),
    )
    st.fields["history"] = history.add_sample(
        st.old.history, _int(sample.step, None), sample.train_loss, sample.eval_loss, sample.learning_rate
    )


# --- endings ----------------------------------------------------------------------------------------------


def _succeed(st: _Status, job: FineTuneJob, spec: FineTuneJobSpec, trainer_job: Obj, seen: Observed) -> None:
    """The trainer Job completed. Success needs the trainer's result record: without one the job fails
    with NoResult, so nothing downstream deploys an adapter that may not exist. Of a multi-node group, the
    record is the one the pod with completion index 0 (global rank 0) wrote."""
    pods = observed.leader_pods(seen.pods) if observed.is_indexed(trainer_job) else seen.pods
    pod = observed.last_finished_pod(pods, "Succeeded")
    summary, problem = termination.read_summary(pod)
    record, missing = termination.result_record(summary, problem)
    if summary is not None:
        _apply_summary(st, summary, finished=record is not None)
    completed = str((trainer_job.get("status") or {}).get("completionTime") or st.now)
    _record_times(st, trainer_job, pod, completed)
    st.fields["restarts"] = max(st.old.restarts or 0, observed.job_failed_count(trainer_job))
    kind = "adapter" if spec.weights_method in contract.ADAPTER_METHODS else "model"
    if record is None:
        _finish_failed(
            st,
            Reason.NO_RESULT,
            f"the trainer Job completed without a result record ({missing}); the {kind} under "
            f"{spec.output.uri} is not known to be complete and was not recorded; "
            f"{termination.log_hint(pod, job.namespace)}",
        )
        return
    st.fields[kind] = ArtifactRecord(
        uri=record.uri,
        files=tuple(record.files),
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        base_model=record.base_model or spec.base_model.uri,
        selected=_selected_step(record.selected),
    )
    message = f"{kind} written to {record.uri}"
    if record.files_omitted:
        message += f" ({record.files_omitted} more files are listed in its manifest.json)"
    message += _selection_note(kind, record.selected, summary.early_stop if summary else None)
    st.set(cond.SUCCEEDED, TRUE, Reason.COMPLETED, message)
    st.set(cond.RUNNING, FALSE, Reason.COMPLETED, "training finished")
    st.set(cond.RECONCILING, FALSE, Reason.FINISHED, "the job finished")
    st.set(cond.STALLED, FALSE, Reason.FINISHED, "")


def _selected_step(selected: contract.Selection | None) -> SelectedStep | None:
    """The trainer's record of which step's weights it published, if its values can be stored."""
    if selected is None or selected.select not in contract.SELECT_POLICIES or selected.step < 0:
        return None
    loss = selected.eval_loss
    return SelectedStep(
        select=selected.select,
        step=selected.step,
        eval_loss=_sig(loss, None),
    )


def _selection_note(kind: str, selected: contract.Selection | None, stop: contract.EarlyStop | None) -> str:
    """What the Succeeded message adds about an early stop and a result that is not the last step's."""
    note = ""
    if stop is not None:
        note += (
            f"; stopped early after step {stop.step} of {stop.total_steps}: the validation loss did not "
            f"improve in {stop.patience} evaluations "
            f"(best {stop.best_eval_loss:.4g} at step {stop.best_step})"
        )
    if selected is not None and selected.select == "BestEval":
        loss = f", validation loss {selected.eval_loss:.4g}" if selected.eval_loss is not None else ""
        note += f"; the {kind} holds the weights of step {selected.step} (output.select BestEval{loss})"
    return note


def _fail_from_job(
    st: _Status, spec: FineTuneJobSpec, trainer_job: Obj, job_failed: Obj, seen: Observed
) -> None:
    pod = observed.last_failed_pod(seen.pods, indexed=observed.is_indexed(trainer_job))
    summary, _ = termination.read_summary(pod)
    attempts = observed.job_failed_count(trainer_job)
    detail = termination.attempt_detail(pod) if pod is not None else "no trainer pod is left to inspect"
    job_reason = str(job_failed.get("reason") or "")
    if job_reason == "DeadlineExceeded":
        reason = Reason.DEADLINE_EXCEEDED
        message = (
            f"the run took longer than activeDeadlineSeconds={spec.active_deadline_seconds} and was stopped"
        )
    elif job_reason == "BackoffLimitExceeded":
        reason = Reason.BACKOFF_LIMIT_EXCEEDED
        message = (
            f"the trainer failed {attempts} times (backoffLimit {spec.backoff_limit}); last attempt: {detail}"
        )
    elif termination.documented_failure(summary) is not None and summary is not None:
        reason, message = summary.reason, termination.redact(summary.message or summary.reason)
    else:
        reason = Reason.TRAINER_FAILED
        job_message = str(job_failed.get("message") or job_reason or "failed")
        message = f"the trainer Job failed ({job_message}); last attempt: {detail}"
    if summary is not None:
        _apply_summary(st, summary, finished=False)
    _record_times(st, trainer_job, pod, str(job_failed.get("lastTransitionTime") or st.now))
    st.fields["restarts"] = max(st.old.restarts or 0, attempts - 1)
    _finish_failed(st, reason, message)


def _finish_failed(st: _Status, reason: str, message: str) -> None:
    st.fields.setdefault("completion_time", st.now)
    st.set(cond.FAILED, TRUE, reason, message)
    st.set(cond.RUNNING, FALSE, reason, message)
    st.set(cond.RECONCILING, FALSE, Reason.FINISHED, "the job finished")
    st.set(cond.STALLED, TRUE, reason, message)


def _fail_before_start(st: _Status, reason: str, message: str) -> None:
    if reason == Reason.INVALID_SPEC:
        st.set(cond.VALIDATED, FALSE, reason, message)
    st.set(cond.FAILED, TRUE, reason, message)
    st.set(cond.RECONCILING, FALSE, reason, message)
    st.set(cond.STALLED, TRUE, reason, message)


def _record_times(st: _Status, trainer_job: Obj, pod: Obj | None, completed: str) -> None:
    st.fields["completion_time"] = completed
    if st.old.start_time is None:
        terminated = observed.terminated_state(pod) if pod is not None else None
        started = (terminated or {}).get("startedAt") or (trainer_job.get("status") or {}).get("startTime")
        st.fields["start_time"] = str(started or completed)


def _record_checkpoint(st: _Status, summary: TerminationSummary | None) -> None:
    """The checkpoint an attempt reported on its way out, unless the status already has a newer one."""
    checkpoint = (summary.checkpoint if summary is not None else None) or {}
    if not checkpoint.get("uri"):
        return
    step = _int(checkpoint.get("step"), 0) or 0
    old = st.old.checkpoint
    if old is None or step >= (old.step or 0):
        st.fields["checkpoint"] = CheckpointRecord(uri=str(checkpoint["uri"]), step=step)


def _apply_summary(st: _Status, summary: TerminationSummary, *, finished: bool) -> None:
    """The final progress and metrics the trainer reported on its way out, read like a last scrape."""
    p, m = summary.progress or {}, summary.metrics or {}
    _apply_sample(
        st,
        TrainerSample(
            step=p.get("step"),
            total_steps=p.get("totalSteps"),
            epoch=p.get("epoch"),
            tokens_per_second=p.get("tokensPerSecond"),
            trained_tokens=p.get("trainedTokens"),
            train_loss=m.get("trainLoss"),
            eval_loss=m.get("evalLoss"),
            learning_rate=m.get("learningRate"),
            grad_norm=m.get("gradNorm"),
            best_eval_loss=m.get("bestEvalLoss"),
            best_step=m.get("bestStep"),
            eval_token_accuracy=m.get("evalTokenAccuracy"),
            reward_margin=m.get("rewardMargin"),
            preference_accuracy=m.get("preferenceAccuracy"),
            chosen_logps=m.get("chosenLogps"),
            rejected_logps=m.get("rejectedLogps"),
            eval_reward_margin=m.get("evalRewardMargin"),
            eval_preference_accuracy=m.get("evalPreferenceAccuracy"),
        ),
    )
    if finished:
        progress: Progress = st.fields["progress"]
        st.fields["progress"] = progress.model_copy(update={"percent": 100.0, "eta_seconds": 0})
    _record_checkpoint(st, summary)
    if summary.provenance:
        st.fields["provenance"] = {**(st.old.provenance or {}), **summary.provenance}
    # The trainer's plan for the devices it got, over the validation pod's (whose counts and estimate stay).
    before = st.old.plan.model_dump(by_alias=True, exclude_none=True, mode="json") if st.old.plan else {}
    plan = _memory_plan({**before, **summary.plan} if isinstance(summary.plan, dict) else summary.plan)
    if plan is not None:
        st.fields["plan"] = plan


STRATEGIES = frozenset({"Single", "DDP", "FSDP"})
ESTIMATE_BASES = frozenset({"measured", "estimated"})


def _memory_plan(reported: Any) -> MemoryPlan | None:
    """The trainer's memory plan, if it has the shape status.plan takes: a plan of any other shape is left
    out (it is an estimate to show, never worth a status write the API server would refuse)."""
    if not isinstance(reported, dict):
        return None
    try:
        plan = MemoryPlan.model_validate(reported)
    except ValidationError:
        return None
    numbers = [plan.gpu_gi_b, plan.world_size, plan.micro_step_tokens, plan.steps]
    for part in (plan.per_gpu_gi_b, plan.examples, plan.tokens):
        if part is not None:
            numbers += list(part.model_dump().values())
    if plan.estimate is not None:
        numbers += [plan.estimate.seconds, plan.estimate.gpu_hours, plan.estimate.tokens_per_second]
        if plan.estimate.basis not in ESTIMATE_BASES:
            return None
    if plan.strategy not in STRATEGIES or (plan.world_size is not None and plan.world_size < 1):
        return None
    if any(n is not None and (not math.isfinite(n) or n < 0) for n in numbers):
        return None
    return plan


# --- small helpers ----------------------------------------------------------------------------------------


def _operator_provenance(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    rendered = json.loads(render_trainer_config(job, config).to_json())
    return {
        "trainerImage": trainer_image(job, config),
        "baseModel": rendered["baseModel"],
        "method": rendered["method"],
        "hyperparameters": rendered["hyperparameters"],
        **({"lora": rendered["lora"]} if "lora" in rendered else {}),
    }


def _outcome(
    st: _Status,
    old: FineTuneJobStatus,
    create: tuple[Obj, ...],
    replace: tuple[Obj, ...],
    set_suspend: bool | None,
    job_spec_patch: Obj | None = None,
    spec_events: tuple[Event, ...] = (),
) -> Outcome:
    status = st.build()
    events = transition_events(old.conditions, status.conditions) + spec_events
    if st.suspend_job:
        set_suspend = True
    return Outcome(
        create,
        replace,
        set_suspend,
        job_spec_patch or {},
        status,
        events,
        st.delete_pod,
        st.recheck_after_seconds,
    )


def _headline(conditions: tuple[Condition, ...]) -> str | None:
    for type_ in (cond.FAILED, cond.SUCCEEDED, cond.SUSPENDED, cond.RUNNING, cond.VALIDATED):
        found = cond.find(conditions, type_)
        if found is not None and (found.status == TRUE or type_ in (cond.RUNNING, cond.VALIDATED)):
            return found.message or None
    return None


def _clip(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else "..." + message[-(MESSAGE_LIMIT - 3) :]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any, fallback: int | None) -> int | None:
    number = _finite(value)
    return max(0, int(number)) if number is not None else fallback


def _num(value: Any, fallback: float | None, digits: int) -> float | None:
    number = _finite(value)
    return round(max(0.0, number), digits) if number is not None else fallback


def _share(value: Any, fallback: float | None) -> float | None:
    """A fraction (0 to 1, as the CRD bounds it) to five significant digits; anything else is not taken."""
    number = _finite(value)
    return _sig(number, fallback) if number is not None and 0.0 <= number <= 1.0 else fallback


def _sig(value: Any, fallback: float | None) -> float | None:
    """Five significant digits: enough to read, few enough that noise does not rewrite the status."""
    number = _finite(value)
    return float(f"{number:.5g}") if number is not None else fallback
