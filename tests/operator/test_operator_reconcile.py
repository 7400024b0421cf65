"""Table-driven tests of the pure reconcile(): one row per lifecycle transition."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from operator_factories import (
    failure_summary,
    job_condition,
    make_job,
    make_pod,
    make_trainer_job,
    observed,
    owner_reference,
    parse,
    success_summary,
    terminated,
    ts,
    with_status,
)

from kubetune_operator.builders import build_trainer_job
from kubetune_operator.config import OperatorConfig
from kubetune_operator.models import FineTuneJob
from kubetune_operator.observed import Observed
from kubetune_operator.reconcile import Outcome, reconcile
from kubetune_operator.trainer_metrics import TrainerSample
from kubetune_trainer import contract

Obj = dict[str, Any]
T, F = "True", "False"


def chain(body: Obj, steps: list[Observed], config: OperatorConfig) -> tuple[Obj, Outcome]:
    """Reconcile through ``steps``, writing each new status back, as the operator does."""
    outcome = None
    for seen in steps:
        outcome = reconcile(parse(body), seen, config)
        body = with_status(body, outcome.status)
    assert outcome is not None
    return body, outcome


def conds(job_status: Any) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in job_status.conditions}


def config_map() -> Obj:
    metadata = {"name": "a-config", "ownerReferences": [owner_reference()]}
    return {"kind": "ConfigMap", "metadata": metadata, "data": {}}


def observed_children(**kwargs: Any) -> Observed:
    """What a pass observes once the ConfigMap exists: ``trainer_job``, ``pods``, ``sample``, ``now``."""
    return observed(config_map=config_map(), **kwargs)


RUNNING_POD = make_pod(phase="Running", ip="10.0.0.7", running_since=ts(30))
CREATED = observed()
RUNNING = observed_children(trainer_job=make_trainer_job(active=1), pods=[RUNNING_POD])
TRAINING_SAMPLE = TrainerSample(
    step=100, total_steps=400, epoch=0.75, train_loss=1.52341234, tokens_per_second=51234.56
)


@dataclass
class Case:
    id: str
    body: Obj
    steps: list[Observed]
    phase: str
    conditions: dict[str, tuple[str, str]]
    creates: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    set_suspend: bool | None = None
    job_spec_patch: Obj = field(default_factory=dict)
    message_has: str = ""
    checkpoint: tuple[str, int] | None = None
    """(uri, step) expected in status.checkpoint; None: no checkpoint recorded."""


CASES = [
    Case(
        "created -> Validated, children created",
        make_job(),
        [CREATED],
        "Pending",
        {
            "Validated": (T, "SpecValid"),
            "Running": (F, "Created"),
            "Suspended": (F, "NotSuspended"),
            "Reconciling": (T, "Created"),
            "Stalled": (F, "Progressing"),
        },
        creates=["ConfigMap", "Job"],
        events=["SpecValid", "Created"],
    ),
    Case(
        "created with suspend -> Suspended",
        make_job(suspend=True),
        [CREATED],
        "Suspended",
        {"Suspended": (T, "Suspended"), "Running": (F, "Suspended"), "Reconciling": (F, "Waiting")},
        creates=["ConfigMap", "Job"],
        events=["SpecValid", "Suspended"],
    ),
    Case(
        "created with queueName -> Queued",
        make_job(queue_name="gpu-queue"),
        [CREATED],
        "Suspended",
        {"Suspended": (T, "Queued"), "Running": (F, "Queued")},
        creates=["ConfigMap", "Job"],
        events=["SpecValid", "Queued"],
        message_has="gpu-queue",
    ),
    Case(
        "invalid spec -> Failed InvalidSpec, nothing created",
        make_job(method="Full", lora={"r": 8}, hyperparameters={"learningRate": 0.001}),
        [CREATED],
        "Failed",
        {
            "Validated": (F, "InvalidSpec"),
            "Failed": (T, "InvalidSpec"),
            "Stalled": (T, "InvalidSpec"),
            "Reconciling": (F, "InvalidSpec"),
        },
        events=["InvalidSpec"],
        message_has="spec.lora: only allowed with the adapter methods (LoRA, QLoRA, DPO on LoRA)",
    ),
    Case(
        "Kueue admits the queued Job -> Suspended=False Admitted",
        make_job(queue_name="gpu-queue"),
        [
            CREATED,
            observed_children(trainer_job=make_trainer_job(active=1), pods=[make_pod()]),
        ],
        "Pending",
        {
            "Suspended": (F, "Admitted"),
            "Running": (F, "TrainerPending"),
            "Reconciling": (T, "TrainerPending"),
        },
        events=["Admitted", "TrainerPending"],
    ),
    Case(
        "still queued: Kueue has not admitted -> stays Queued, no patch",
        make_job(queue_name="gpu-queue"),
        [CREATED, observed_children(trainer_job=make_trainer_job(suspend=True))],
        "Suspended",
        {"Suspended": (T, "Queued")},
    ),
    Case(
        "running job suspended by the user -> Job patched suspend=true",
        make_job(suspend=True),
        [RUNNING],
        "Suspended",
        {"Suspended": (T, "Suspended"), "Running": (F, "Suspended"), "Reconciling": (F, "Waiting")},
        events=["SpecValid", "Suspended"],
        set_suspend=True,
    ),
    Case(
        "backoffLimit edited on a running job -> Job patched, TrainerJobUpdated",
        make_job(backoffLimit=5),
        [RUNNING],
        "Running",
        {"Running": (T, "TrainerStarting")},
        events=["SpecValid", "TrainerStarting", "TrainerJobUpdated"],
        job_spec_patch={"backoffLimit": 5},
    ),
    Case(
        "deadline and TTL set on a suspended job -> Job patched while it stays suspended",
        make_job(suspend=True, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=600),
        [observed_children(trainer_job=make_trainer_job(suspend=True))],
        "Suspended",
        {"Suspended": (T, "Suspended")},
        events=["SpecValid", "Suspended", "TrainerJobUpdated"],
        job_spec_patch={"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 600},
    ),
    Case(
        "backoffLimit edited after the trainer Job completed -> nothing patched",
        make_job(backoffLimit=5),
        [
            observed_children(
                trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]),
                pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
            )
        ],
        "Succeeded",
        {"Succeeded": (T, "Completed")},
        events=["SpecValid", "Completed"],
        checkpoint=("s3://adapters/support-bot/checkpoints/step-420/", 420),
    ),
    Case(
        "suspended job resumed -> Job patched suspend=false, Resumed",
        make_job(suspend=False),
        [
            observed_children(trainer_job=make_trainer_job(suspend=True)),
        ],
        "Pending",
        {"Suspended": (F, "NotSuspended"), "Running": (F, "Created")},
        set_suspend=False,
        events=["SpecValid", "Created"],
    ),
    Case(
        "trainer pod unschedulable -> Running=False Unschedulable with the scheduler's words",
        make_job(),
        [
            CREATED,
            observed_children(
                trainer_job=make_trainer_job(active=1),
                pods=[make_pod(unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")],
            ),
        ],
        "Pending",
        {"Running": (F, "Unschedulable"), "Reconciling": (T, "Unschedulable")},
        events=["Unschedulable"],
        message_has="3 Insufficient nvidia.com/gpu",
    ),
    Case(
        "missing credentials Secret -> ContainerNotStarting",
        make_job(),
        [
            CREATED,
            observed_children(
                trainer_job=make_trainer_job(active=1),
                pods=[make_pod(waiting=("CreateContainerConfigError", 'secret "s3-creds" not found'))],
            ),
        ],
        "Pending",
        {"Running": (F, "ContainerNotStarting")},
        events=["ContainerNotStarting"],
        message_has='secret "s3-creds" not found',
    ),
    Case(
        "trainer container started -> Running TrainerStarting",
        make_job(),
        [CREATED, RUNNING],
        "Running",
        {"Running": (T, "TrainerStarting"), "Reconciling": (T, "TrainerStarting")},
        events=["TrainerStarting"],
    ),
    Case(
        "trainer reports steps -> Running Training",
        make_job(),
        [
            CREATED,
            observed_children(
                trainer_job=make_trainer_job(active=1),
                pods=[RUNNING_POD],
                sample=TRAINING_SAMPLE,
            ),
        ],
        "Running",
        {"Running": (T, "Training")},
        events=["Training"],
    ),
    Case(
        "attempt failed, Job retries -> Restarting with the trainer's reason",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(active=1, failed=1),
                pods=[
                    make_pod(
                        phase="Failed",
                        created=2,
                        terminated=terminated(
                            1,
                            failure_summary("StorageError", "endpoint http://minio.storage:9000 unreachable"),
                        ),
                    ),
                    make_pod(created=300),
                ],
            ),
        ],
        "Pending",
        {"Running": (F, "Restarting")},
        events=["Restarting"],
        message_has="StorageError: endpoint http://minio.storage:9000 unreachable",
    ),
    Case(
        "trainer pod preempted -> Preempted",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(active=1),
                pods=[
                    make_pod(phase="Failed", created=2, disrupted=True, terminated=terminated(143)),
                    make_pod(created=300),
                ],
            ),
        ],
        "Pending",
        {"Running": (F, "Preempted")},
        events=["Preempted"],
    ),
    Case(
        "trainer pod succeeded, Job not yet complete -> still Running, never back to Pending",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(active=0),
                pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
            ),
        ],
        "Running",
        {"Running": (T, "TrainerStarting"), "Reconciling": (T, "TrainerStarting")},
        message_has="the trainer finished",
    ),
    Case(
        "Job complete -> Succeeded Completed with the adapter record",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(
                    succeeded=1, conditions=[job_condition("Complete")], completion_time=ts(400)
                ),
                pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
            ),
        ],
        "Succeeded",
        {
            "Succeeded": (T, "Completed"),
            "Running": (F, "Completed"),
            "Reconciling": (F, "Finished"),
            "Stalled": (F, "Finished"),
        },
        events=["Completed"],
        message_has="adapter written to s3://adapters/support-bot/",
        checkpoint=("s3://adapters/support-bot/checkpoints/step-420/", 420),
    ),
    Case(
        "trainer exits with a permanent failure -> Failed with the trainer's reason",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(
                    failed=1, conditions=[job_condition("Failed", "PodFailurePolicy")]
                ),
                pods=[
                    make_pod(
                        phase="Failed",
                        terminated=terminated(
                            contract.EXIT_CODE_PERMANENT_FAILURE,
                            failure_summary("InvalidDataset", "lines 3, 7 are not JSON (2 bad lines)"),
                        ),
                    )
                ],
            ),
        ],
        "Failed",
        {
            "Failed": (T, "InvalidDataset"),
            "Running": (F, "InvalidDataset"),
            "Stalled": (T, "InvalidDataset"),
            "Reconciling": (F, "Finished"),
        },
        events=["InvalidDataset"],
        message_has="lines 3, 7 are not JSON",
    ),
    Case(
        "retries exhausted -> Failed BackoffLimitExceeded naming the last attempt",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(
                    failed=4, conditions=[job_condition("Failed", "BackoffLimitExceeded")]
                ),
                pods=[
                    make_pod(
                        phase="Failed",
                        created=9,
                        terminated=terminated(1, failure_summary("StorageError", "throttled")),
                    )
                ],
            ),
        ],
        "Failed",
        {"Failed": (T, "BackoffLimitExceeded"), "Stalled": (T, "BackoffLimitExceeded")},
        events=["BackoffLimitExceeded"],
        message_has="failed 4 times (backoffLimit 3); last attempt: StorageError: throttled",
    ),
    Case(
        "activeDeadlineSeconds passed -> Failed DeadlineExceeded",
        make_job(activeDeadlineSeconds=3600),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(
                    failed=1, conditions=[job_condition("Failed", "DeadlineExceeded")]
                ),
                pods=[make_pod(phase="Failed", terminated=terminated(137))],
            ),
        ],
        "Failed",
        {"Failed": (T, "DeadlineExceeded")},
        events=["DeadlineExceeded"],
        message_has="activeDeadlineSeconds=3600",
    ),
    Case(
        "trainer crashed without a summary -> Failed TrainerFailed with exit code and log tail",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(
                    failed=1,
                    conditions=[job_condition("Failed", "PodFailurePolicy", "container trainer exited 2")],
                ),
                pods=[
                    make_pod(
                        phase="Failed", terminated=terminated(2, "Traceback ...\nImportError: no module x")
                    )
                ],
            ),
        ],
        "Failed",
        {"Failed": (T, "TrainerFailed")},
        events=["TrainerFailed"],
        message_has="exit code 2, Error: Traceback ...\nImportError: no module x",
    ),
    Case(
        "trainer Job deleted mid-run -> Failed TrainerJobMissing, never re-created",
        make_job(),
        [CREATED, RUNNING, observed_children()],
        "Failed",
        {"Failed": (T, "TrainerJobMissing"), "Stalled": (T, "TrainerJobMissing")},
        events=["TrainerJobMissing"],
        message_has="create a new FineTuneJob",
    ),
]

CASES += [
    Case(
        "Job SuccessCriteriaMet (before Complete) -> Succeeded at once",
        make_job(),
        [
            CREATED,
            observed_children(
                trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("SuccessCriteriaMet")]),
                pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
            ),
        ],
        "Succeeded",
        {"Succeeded": (T, "Completed")},
        events=["Completed"],
        checkpoint=("s3://adapters/support-bot/checkpoints/step-420/", 420),
    ),
    Case(
        "Job FailureTarget (before Failed) -> Failed at once",
        make_job(),
        [
            CREATED,
            observed_children(
                trainer_job=make_trainer_job(
                    failed=1, conditions=[job_condition("FailureTarget", "PodFailurePolicy")]
                ),
                pods=[
                    make_pod(
                        phase="Failed",
                        terminated=terminated(2, failure_summary("AccessDenied", "403 on s3://d")),
                    )
                ],
            ),
        ],
        "Failed",
        {"Failed": (T, "AccessDenied")},
        events=["AccessDenied"],
    ),
    Case(
        "permanent exit seen before the Job fails -> no Restarting in between",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(failed=1),
                pods=[
                    make_pod(phase="Failed", terminated=terminated(2, failure_summary("AccessDenied", "403")))
                ],
            ),
        ],
        "Running",
        {"Running": (T, "TrainerStarting")},
    ),
]

CHECKPOINT_URI = "s3://adapters/support-bot/checkpoints/step-120/"


def interrupted_summary(step: int = 120) -> str:
    """What the trainer writes when SIGTERM stops it: reason Interrupted and the checkpoint it saved."""
    return contract.TerminationSummary(
        outcome="Failed",
        reason=contract.TrainerReason.INTERRUPTED,
        message=f"stopped by SIGTERM after step {step}; the Job restarts from the last checkpoint",
        progress={"step": step, "totalSteps": 400},
        checkpoint={"uri": CHECKPOINT_URI, "step": step},
    ).to_json()


def stopped_pod(created: float = 2, **kwargs: Any) -> Obj:
    return make_pod(
        phase="Failed",
        created=created,
        terminated=terminated(contract.EXIT_CODE_INTERRUPTED, interrupted_summary()),
        **kwargs,
    )


CASES += [
    Case(
        "trainer stopped by SIGTERM (drain) -> Interrupted, checkpoint recorded, not Failed",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(active=1),
                pods=[stopped_pod(), make_pod(created=300)],
            ),
        ],
        "Pending",
        {"Running": (F, "Interrupted"), "Reconciling": (T, "Interrupted"), "Stalled": (F, "Progressing")},
        events=["Interrupted"],
        message_has=f"resumes from its checkpoint at step 120 ({CHECKPOINT_URI})",
        checkpoint=(CHECKPOINT_URI, 120),
    ),
    Case(
        "SIGTERM without a summary (exit 143 only) -> Interrupted, no checkpoint invented",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(active=0),
                pods=[make_pod(phase="Failed", terminated=terminated(contract.EXIT_CODE_INTERRUPTED))],
            ),
        ],
        "Pending",
        {"Running": (F, "Interrupted")},
        events=["Interrupted"],
        message_has="resumes from the newest checkpoint",
    ),
    Case(
        "suspended job: the stopped trainer's checkpoint is recorded and the job stays Suspended",
        make_job(suspend=True),
        [
            RUNNING,
            observed_children(trainer_job=make_trainer_job(suspend=True), pods=[stopped_pod()]),
        ],
        "Suspended",
        {"Suspended": (T, "Suspended"), "Running": (F, "Suspended"), "Reconciling": (F, "Waiting")},
        checkpoint=(CHECKPOINT_URI, 120),
    ),
    Case(
        "Job fails for another reason after an interruption -> Failed TrainerFailed, never Interrupted",
        make_job(),
        [
            CREATED,
            RUNNING,
            observed_children(
                trainer_job=make_trainer_job(
                    conditions=[job_condition("Failed", "MaxFailedIndexesExceeded", "the Job gave up")]
                ),
                pods=[stopped_pod()],
            ),
        ],
        "Failed",
        {"Failed": (T, "TrainerFailed")},
        events=["TrainerFailed"],
        message_has="the Job gave up",
        checkpoint=(CHECKPOINT_URI, 120),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_transition(case: Case, config: OperatorConfig) -> None:
    _, outcome = chain(case.body, case.steps, config)
    status = outcome.status
    assert status.phase == case.phase
    got = conds(status)
    for type_, expected in case.conditions.items():
        assert got.get(type_) == expected, f"{type_}: {got.get(type_)} != {expected}"
    assert [obj["kind"] for obj in outcome.create] == case.creates
    assert [e.reason for e in outcome.events] == case.events
    assert outcome.set_suspend == case.set_suspend
    assert outcome.job_spec_patch == case.job_spec_patch
    assert case.message_has in (status.message or "")
    assert status.observed_generation == 1
    got_checkpoint = (status.checkpoint.uri, status.checkpoint.step) if status.checkpoint else None
    assert got_checkpoint == case.checkpoint


def test_new_job_records_trainer_job_and_provenance(config: OperatorConfig) -> None:
    _, outcome = chain(make_job("support-bot"), [CREATED], config)
    assert outcome.status.trainer_job == "support-bot-trainer"
    assert outcome.status.restarts == 0
    provenance = outcome.status.provenance or {}
    assert provenance["trainerImage"] == config.trainer_image
    assert provenance["hyperparameters"]["epochs"] == 3
    assert provenance["lora"]["r"] == 16
    job_obj = next(o for o in outcome.create if o["kind"] == "Job")
    assert job_obj["spec"]["suspend"] is False


def test_training_progress_and_metrics_from_the_scrape(config: OperatorConfig) -> None:
    seen = observed_children(
        trainer_job=make_trainer_job(active=1),
        pods=[RUNNING_POD],
        sample=TRAINING_SAMPLE,
    )
    _, outcome = chain(make_job(), [CREATED, seen], config)
    status = outcome.status
    assert status.progress is not None and status.metrics is not None
    assert (status.progress.step, status.progress.total_steps, status.progress.percent) == (100, 400, 25.0)
    assert status.progress.epoch == 0.75
    assert status.progress.tokens_per_second == 51234.6
    assert status.metrics.train_loss == 1.5234
    assert status.start_time == ts(30)


def test_without_a_new_scrape_progress_and_training_state_are_kept(config: OperatorConfig) -> None:
    scraped = observed_children(
        trainer_job=make_trainer_job(active=1),
        pods=[RUNNING_POD],
        sample=TRAINING_SAMPLE,
    )
    body, first = chain(make_job(), [CREATED, scraped], config)
    _, second = chain(body, [RUNNING], config)  # a pod event: no scrape
    assert second.status.progress == first.status.progress
    assert conds(second.status)["Running"] == (T, "Training")
    assert second.events == ()
    assert not second.status_changed(first.status)


def test_condition_time_survives_progress_updates(config: OperatorConfig) -> None:
    def scraped(step: int, now: float) -> Observed:
        return observed_children(
            trainer_job=make_trainer_job(active=1),
            pods=[RUNNING_POD],
            sample=TrainerSample(step=step, total_steps=400),
            now=now,
        )

    body, _ = chain(make_job(), [CREATED, scraped(10, 100)], config)
    _, later = chain(body, [scraped(20, 200)], config)
    running = next(c for c in later.status.conditions if c.type == "Running")
    assert running.last_transition_time == ts(100)
    assert later.status.progress is not None and later.status.progress.step == 20


def test_restarts_follow_the_jobs_failed_count(config: OperatorConfig) -> None:
    retry = observed_children(
        trainer_job=make_trainer_job(active=1, failed=2),
        pods=[make_pod(phase="Failed", terminated=terminated(1)), make_pod(created=50)],
    )
    _, outcome = chain(make_job(), [CREATED, retry], config)
    assert outcome.status.restarts == 2
    assert "exit code 1" in (outcome.status.message or "")


def test_success_record_progress_and_times(config: OperatorConfig) -> None:
    done = observed_children(
        trainer_job=make_trainer_job(
            succeeded=1, conditions=[job_condition("Complete")], completion_time=ts(400)
        ),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
    )
    _, outcome = chain(make_job(), [CREATED, RUNNING, done], config)
    status = outcome.status
    assert status.adapter is not None and status.model is None
    assert status.adapter.uri == "s3://adapters/support-bot/"
    assert status.adapter.files == ("adapter_config.json", "adapter_model.safetensors")
    assert (status.adapter.size_bytes, status.adapter.sha256) == (45219840, "ab" * 32)
    assert status.progress is not None and (status.progress.step, status.progress.percent) == (420, 100.0)
    assert status.metrics is not None and status.metrics.best_step == 280
    assert status.checkpoint is not None and status.checkpoint.step == 420
    assert (status.start_time, status.completion_time) == (ts(30), ts(400))
    assert (status.provenance or {})["rows"] == 1000 and "trainerImage" in (status.provenance or {})


def test_qlora_records_the_adapter(config: OperatorConfig) -> None:
    done = observed_children(
        trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
    )
    _, outcome = chain(make_job(method="QLoRA"), [CREATED, done], config)
    assert outcome.status.model is None
    assert outcome.status.adapter is not None and outcome.status.adapter.uri == "s3://adapters/support-bot/"
    assert outcome.status.message == "adapter written to s3://adapters/support-bot/"


def test_full_fine_tune_records_the_model(config: OperatorConfig) -> None:
    done = observed_children(
        trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary("s3://models/out/")))],
    )
    _, outcome = chain(make_job(method="Full"), [CREATED, done], config)
    assert outcome.status.adapter is None
    assert outcome.status.model is not None and outcome.status.model.uri == "s3://models/out/"
    assert outcome.status.message == "model written to s3://models/out/"


DPO_METRICS = {
    "trainLoss": 0.41,
    "rewardMargin": 1.25,
    "preferenceAccuracy": 0.9,
    "chosenLogps": -12.5,
    "rejectedLogps": -20.25,
    "evalRewardMargin": 1.1,
    "evalPreferenceAccuracy": 0.875,
}


@pytest.mark.parametrize(("parameters", "kind"), [("LoRA", "adapter"), ("Full", "model")])
def test_dpo_records_its_result_and_preference_metrics(
    config: OperatorConfig, parameters: str, kind: str
) -> None:
    done = observed_children(
        trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, _summary_with(metrics=DPO_METRICS)))],
    )
    job = make_job(method="DPO", dpo={"beta": 0.1, "parameters": parameters})
    _, outcome = chain(job, [CREATED, done], config)
    status = outcome.status
    assert getattr(status, kind) is not None and getattr(status, kind).uri == "s3://adapters/support-bot/"
    assert getattr(status, "model" if kind == "adapter" else "adapter") is None
    assert status.message == f"{kind} written to s3://adapters/support-bot/"
    assert status.metrics is not None
    assert status.metrics.model_dump(by_alias=True, exclude_none=True) == DPO_METRICS


def test_dpo_metrics_come_from_the_scrape_while_training(config: OperatorConfig) -> None:
    sample = TrainerSample(
        step=10,
        total_steps=40,
        train_loss=0.6,
        reward_margin=0.31,
        preference_accuracy=0.75,
        chosen_logps=-9.5,
        rejected_logps=-11.0,
        eval_reward_margin=0.2,
        eval_preference_accuracy=0.625,
    )
    seen = observed_children(trainer_job=make_trainer_job(active=1), pods=[RUNNING_POD], sample=sample)
    _, outcome = chain(make_job(method="DPO"), [CREATED, seen], config)
    metrics = outcome.status.metrics
    assert metrics is not None
    assert (metrics.reward_margin, metrics.preference_accuracy) == (0.31, 0.75)
    assert (metrics.chosen_logps, metrics.rejected_logps) == (-9.5, -11.0)
    assert (metrics.eval_reward_margin, metrics.eval_preference_accuracy) == (0.2, 0.625)


def _complete(*pods: Obj) -> Observed:
    return observed_children(
        trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]), pods=list(pods)
    )


def _summary_with(**changes: Any) -> str:
    """A success summary as JSON with some fields replaced (values of any type, as a foreign image could)."""
    data = json.loads(success_summary())
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = data
        for key in parents:
            target = target[key]
        target[leaf] = value
    return json.dumps(data)


NO_RESULT_CASES = [
    pytest.param(_complete(), "no trainer pod is left", id="pod gone"),
    pytest.param(
        _complete(make_pod(phase="Succeeded", terminated=terminated(0))),
        "has no termination message",
        id="exit 0 silently",
    ),
    pytest.param(
        _complete(make_pod(phase="Succeeded", terminated=terminated(0, "all good, bye"))),
        "not a valid kubetune summary: termination message is not JSON",
        id="plain text",
    ),
    pytest.param(
        _complete(make_pod(phase="Succeeded", terminated=terminated(0, _summary_with(adapter=None)))),
        "has no result record",
        id="no adapter",
    ),
    pytest.param(
        _complete(
            make_pod(phase="Succeeded", terminated=terminated(0, _summary_with(**{"adapter.sha256": "a"})))
        ),
        "sha256 'a' is not 64 hex digits",
        id="no digest",
    ),
    pytest.param(
        _complete(
            make_pod(phase="Succeeded", terminated=terminated(0, _summary_with(**{"adapter.sizeBytes": "4"})))
        ),
        "summary.adapter.sizeBytes: expected an integer, got a string",
        id="wrong type",
    ),
    pytest.param(
        _complete(make_pod(phase="Succeeded", terminated=terminated(0, _summary_with(outcome="Failed")))),
        "the trainer's summary says Failed",
        id="summary says failed",
    ),
    pytest.param(
        _complete(make_pod(phase="Succeeded", terminated=terminated(0, _summary_with(outcome="Maybe")))),
        "summary.outcome: expected one of Succeeded, Failed, got 'Maybe'",
        id="unknown outcome",
    ),
]


@pytest.mark.parametrize(("done", "missing"), NO_RESULT_CASES)
def test_completed_job_without_a_result_record_fails_with_no_result(
    done: Observed, missing: str, config: OperatorConfig
) -> None:
    _, outcome = chain(make_job(), [CREATED, RUNNING, done], config)
    status = outcome.status
    assert conds(status)["Failed"] == (T, "NoResult")
    assert conds(status)["Stalled"] == (T, "NoResult")
    assert "Succeeded" not in conds(status)
    assert status.phase == "Failed"
    assert status.adapter is None and status.model is None
    message = status.message or ""
    assert "without a result record" in message and missing in message, message
    assert "s3://adapters/support-bot/" in message
    pods = done.pods
    if pods:
        assert f"kubectl logs -n ml {pods[0]['metadata']['name']} -c trainer" in message
    assert [e.reason for e in outcome.events if e.type == "Warning"] == ["NoResult"]


def test_a_result_record_with_a_trimmed_file_list_still_succeeds(config: OperatorConfig) -> None:
    summary = contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message="m" * 5000,
        adapter=contract.AdapterRecord(
            uri="s3://models/out/",
            files=[f"model-{i:05d}-of-00400.safetensors" for i in range(400)],
            size_bytes=16_000_000_000,
            sha256="ef" * 32,
        ),
        provenance={"rows": 1},
    ).to_json()
    done = _complete(make_pod(phase="Succeeded", terminated=terminated(0, summary)))
    _, outcome = chain(make_job(method="Full"), [CREATED, done], config)
    record = outcome.status.model
    assert record is not None and (record.sha256, record.size_bytes) == ("ef" * 32, 16_000_000_000)
    assert 0 < len(record.files) < 400
    omitted = f"{400 - len(record.files)} more files are listed in its manifest.json"
    assert omitted in (outcome.status.message or "")


def test_a_reason_outside_the_documented_set_is_not_copied(config: OperatorConfig) -> None:
    failed = observed_children(
        trainer_job=make_trainer_job(failed=1, conditions=[job_condition("Failed", "PodFailurePolicy")]),
        pods=[make_pod(phase="Failed", terminated=terminated(2, failure_summary("AllFine", "no problem")))],
    )
    _, outcome = chain(make_job(), [CREATED, failed], config)
    assert conds(outcome.status)["Failed"] == (T, "TrainerFailed")
    assert "AllFine" not in (outcome.status.message or "")
    assert "unknown reason: no problem" in (outcome.status.message or "")


def test_a_failed_summary_of_the_wrong_shape_ends_trainer_failed_and_names_the_field(
    config: OperatorConfig,
) -> None:
    bad = json.dumps({"version": 1, "outcome": "Failed", "reason": ["InvalidDataset"], "message": 7})
    failed = observed_children(
        trainer_job=make_trainer_job(failed=1, conditions=[job_condition("Failed", "PodFailurePolicy")]),
        pods=[make_pod(phase="Failed", terminated=terminated(2, bad))],
    )
    _, outcome = chain(make_job(), [CREATED, failed], config)
    assert conds(outcome.status)["Failed"] == (T, "TrainerFailed")
    message = outcome.status.message or ""
    assert "not a valid kubetune summary: summary.reason: expected a string, got a list" in message, message


def test_credentials_in_a_crash_log_tail_stay_out_of_status_and_events(config: OperatorConfig) -> None:
    tail = (
        "Traceback ...\nbotocore error with AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY and "
        "key id AKIAIOSFODNN7EXAMPLE, url https://bob:hunter2@store.example/x, header Bearer abcdefghijklmn"
    )
    failed = observed_children(
        trainer_job=make_trainer_job(failed=1, conditions=[job_condition("Failed", "BackoffLimitExceeded")]),
        pods=[make_pod(phase="Failed", terminated=terminated(1, tail))],
    )
    _, outcome = chain(make_job(), [CREATED, failed], config)
    texts = [outcome.status.message or "", *(c.message for c in outcome.status.conditions)]
    texts += [e.message for e in outcome.events]
    secrets = ("wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "AKIAIOSFODNN7EXAMPLE", "hunter2", "abcdefghijklmn")
    for secret in secrets:
        assert all(secret not in text for text in texts), secret
    assert "AWS_SECRET_ACCESS_KEY=<redacted>" in (outcome.status.message or "")


def test_backoff_failure_counts_restarts(config: OperatorConfig) -> None:
    failed = observed_children(
        trainer_job=make_trainer_job(failed=4, conditions=[job_condition("Failed", "BackoffLimitExceeded")]),
        pods=[make_pod(phase="Failed", terminated=terminated(1))],
    )
    _, outcome = chain(make_job(), [CREATED, failed], config)
    assert outcome.status.restarts == 3
    assert outcome.status.completion_time == ts(500)
    assert all(e.type == "Warning" for e in outcome.events)


def test_a_failed_runs_last_summary_sets_progress_and_metrics(config: OperatorConfig) -> None:
    scraped = observed_children(
        trainer_job=make_trainer_job(active=1),
        pods=[RUNNING_POD],
        sample=TRAINING_SAMPLE,
    )
    last_words = contract.TerminationSummary(
        outcome="Failed",
        reason="StorageError",
        message="throttled",
        progress={"step": 120, "totalSteps": 400},
        metrics={"trainLoss": 1.4},
    ).to_json()
    failed = observed_children(
        trainer_job=make_trainer_job(failed=4, conditions=[job_condition("Failed", "BackoffLimitExceeded")]),
        pods=[make_pod(phase="Failed", terminated=terminated(1, last_words))],
    )
    _, outcome = chain(make_job(), [CREATED, scraped, failed], config)
    progress, metrics = outcome.status.progress, outcome.status.metrics
    assert progress is not None and metrics is not None
    assert (progress.step, progress.total_steps, progress.percent) == (120, 400, 30.0)
    assert progress.epoch == 0.75  # not in the summary: the last scraped value stays
    assert metrics.train_loss == 1.4


def test_finished_job_whose_trainer_job_was_removed_by_ttl_keeps_its_record(config: OperatorConfig) -> None:
    done = observed_children(
        trainer_job=make_trainer_job(
            succeeded=1, conditions=[job_condition("Complete")], completion_time=ts(400)
        ),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
    )
    body, finished = chain(make_job(ttlSecondsAfterFinished=60), [CREATED, done], config)
    _, after_ttl = chain(body, [observed(now=900)], config)  # Job, pods and ConfigMap gone
    assert after_ttl.create == () and after_ttl.set_suspend is None and after_ttl.events == ()
    assert after_ttl.status == finished.status
    assert after_ttl.status.adapter is not None


def test_reapplying_a_finished_job_never_retrains(config: OperatorConfig) -> None:
    failed = observed_children(
        trainer_job=make_trainer_job(failed=1, conditions=[job_condition("Failed", "DeadlineExceeded")]),
    )
    body, _ = chain(make_job(), [CREATED, failed], config)
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    _, outcome = chain(body, [observed()], config)
    assert outcome.create == () and outcome.set_suspend is None
    assert outcome.status.phase == "Failed"
    assert outcome.status.observed_generation == 2


def test_same_inputs_twice_change_nothing(config: OperatorConfig) -> None:
    body, first = chain(make_job(), [CREATED, RUNNING], config)
    _, second = chain(body, [RUNNING], config)
    assert second.events == () and second.create == ()
    assert second.status == first.status


def test_operator_restart_with_lost_status_adopts_existing_children(config: OperatorConfig) -> None:
    _, outcome = chain(make_job(), [RUNNING], config)
    assert outcome.create == ()
    assert outcome.status.trainer_job == "a-trainer"
    assert conds(outcome.status)["Running"] == (T, "TrainerStarting")


def test_missing_config_map_is_recreated_but_not_the_job(config: OperatorConfig) -> None:
    body, _ = chain(make_job(), [CREATED], config)
    _, outcome = chain(body, [observed(trainer_job=make_trainer_job(active=1))], config)
    assert [o["kind"] for o in outcome.create] == ["ConfigMap"]


def test_config_map_is_rewritten_when_the_spec_changes_before_the_job_exists(config: OperatorConfig) -> None:
    stale = {**config_map(), "data": {"config.json": "{}"}}
    _, outcome = chain(make_job(), [observed(config_map=stale)], config)
    assert [o["kind"] for o in outcome.replace] == ["ConfigMap"]
    assert [o["kind"] for o in outcome.create] == ["Job"]


FOREIGN = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d-1", "controller": True}


@pytest.mark.parametrize(
    ("kind", "owners", "words"),
    [
        ("ConfigMap", [], "its controller is nothing"),
        ("ConfigMap", [FOREIGN], "its controller is Deployment web"),
        ("Job", [], "its controller is nothing"),
        ("Job", [owner_reference(uid="uid-of-the-deleted-a")], "an earlier FineTuneJob of the same name"),
    ],
)
def test_a_child_name_held_by_an_object_not_ours_is_never_used(
    kind: str, owners: list[Obj], words: str, config: OperatorConfig
) -> None:
    """Another tenant's object, or the previous run's Job of a FineTuneJob deleted and re-applied under the
    same name (orphaned or still being deleted): never patched, replaced or adopted, and its result is not
    this run's."""
    done = make_trainer_job(succeeded=1, conditions=[job_condition("Complete")])
    cm = config_map()
    foreign = cm if kind == "ConfigMap" else done
    foreign["metadata"]["ownerReferences"] = owners
    seen = observed(
        config_map={**cm, "data": {"config.json": "{}"}},
        trainer_job=done,
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, success_summary()))],
    )
    body, outcome = chain(make_job(), [seen], config)
    status = outcome.status
    assert conds(status)["Failed"] == conds(status)["Stalled"] == (T, "ChildConflict")
    assert "Succeeded" not in conds(status) and status.adapter is None
    assert (outcome.create, outcome.replace, outcome.set_suspend) == ((), (), None)
    assert outcome.job_spec_patch == {}
    name = "a-config" if kind == "ConfigMap" else "a-trainer"
    assert f"{kind} ml/{name}" in (status.message or "") and words in (status.message or "")

    # Once the object in the way is gone, the job starts as if it had never been there.
    _, after = chain(body, [observed()], config)
    assert "Failed" not in conds(after.status)
    assert [o["kind"] for o in after.create] == ["ConfigMap", "Job"]


def test_rejected_child_fails_with_the_servers_reason(config: OperatorConfig) -> None:
    rejected = observed(
        rejected='Job a-trainer: spec.template.spec.tolerations[0].operator: Unsupported value: "Eq"'
    )
    _, outcome = chain(make_job(), [rejected], config)
    assert conds(outcome.status)["Failed"] == (T, "ChildRejected")
    assert outcome.create == ()
    assert "Unsupported value" in (outcome.status.message or "")


def test_fixing_an_invalid_spec_before_start_lets_the_job_run(config: OperatorConfig) -> None:
    bad = make_job(hyperparameters={"epochs": 1, "maxSteps": 10})
    body, failed = chain(bad, [CREATED], config)
    assert failed.status.phase == "Failed" and failed.create == ()
    body["spec"]["hyperparameters"] = {"epochs": 1}
    body["metadata"]["generation"] = 2
    _, fixed = chain(body, [CREATED], config)
    assert "Failed" not in conds(fixed.status) and "Stalled" in conds(fixed.status)
    assert conds(fixed.status)["Stalled"] == (F, "Progressing")
    assert [o["kind"] for o in fixed.create] == ["ConfigMap", "Job"]
    assert fixed.status.phase == "Pending"


def test_unparseable_spec_names_the_field(config: OperatorConfig) -> None:
    body = make_job()
    del body["spec"]["dataset"]["train"]
    _, outcome = chain(body, [CREATED], config)
    assert outcome.status.phase == "Failed"
    assert "spec.dataset.train" in (outcome.status.message or "")


def test_long_messages_keep_their_end(config: OperatorConfig) -> None:
    tail = "x" * 3000 + " the real error"
    failed = observed_children(
        trainer_job=make_trainer_job(failed=1, conditions=[job_condition("Failed", "PodFailurePolicy")]),
        pods=[make_pod(phase="Failed", terminated=terminated(2, tail))],
    )
    _, outcome = chain(make_job(), [CREATED, failed], config)
    message = outcome.status.message or ""
    assert len(message) <= 1024 and message.endswith("the real error")


def test_status_is_parseable_back(config: OperatorConfig) -> None:
    body, outcome = chain(make_job(), [CREATED, RUNNING], config)
    assert FineTuneJob.from_body(body).status == outcome.status


def test_suspend_then_resume_emits_suspended_then_resumed(config: OperatorConfig) -> None:
    body, _ = chain(make_job(), [CREATED, RUNNING], config)
    body["spec"]["suspend"] = True
    body, suspended = chain(body, [RUNNING], config)
    assert suspended.set_suspend is True
    assert [e.reason for e in suspended.events] == ["Suspended"]
    body["spec"]["suspend"] = False
    paused = observed_children(trainer_job=make_trainer_job(suspend=True))
    _, resumed = chain(body, [paused], config)
    assert resumed.set_suspend is False
    assert conds(resumed.status)["Suspended"] == (F, "Resumed")
    assert "Resumed" in [e.reason for e in resumed.events]
    assert resumed.status.phase == "Pending"


def test_unparseable_spec_during_a_run_touches_nothing(config: OperatorConfig) -> None:
    body, _ = chain(make_job(), [CREATED, RUNNING], config)
    body["spec"]["resources"] = {"gpus": "two"}
    _, outcome = chain(body, [RUNNING], config)
    assert outcome.create == () and outcome.set_suspend is None
    assert conds(outcome.status)["Validated"] == (F, "InvalidSpec")
    assert conds(outcome.status)["Stalled"] == (T, "InvalidSpec")
    assert "Failed" not in conds(outcome.status)
    assert "spec.resources.gpus" in next(
        c.message for c in outcome.status.conditions if c.type == "Validated"
    )


def test_an_older_checkpoint_never_replaces_a_newer_one(config: OperatorConfig) -> None:
    body, _ = chain(
        make_job(),
        [
            CREATED,
            observed_children(trainer_job=make_trainer_job(active=1), pods=[stopped_pod()]),
        ],
        config,
    )
    newer = contract.TerminationSummary(
        outcome="Failed",
        reason=contract.TrainerReason.INTERRUPTED,
        checkpoint={"uri": "s3://adapters/support-bot/checkpoints/step-300/", "step": 300},
    ).to_json()
    second = make_pod(phase="Failed", created=200, terminated=terminated(143, newer))
    body, outcome = chain(
        body,
        [observed_children(trainer_job=make_trainer_job(active=1), pods=[stopped_pod(), second])],
        config,
    )
    assert outcome.status.checkpoint is not None and outcome.status.checkpoint.step == 300
    # The first pod's summary (step 120) is read again on a later pass: the record stays at 300.
    _, again = chain(
        body,
        [observed_children(trainer_job=make_trainer_job(active=1), pods=[stopped_pod()])],
        config,
    )
    assert again.status.checkpoint is not None and again.status.checkpoint.step == 300


def test_interruptions_do_not_count_as_restarts_or_failures(config: OperatorConfig) -> None:
    seen = observed_children(
        trainer_job=make_trainer_job(active=1),
        pods=[stopped_pod(), stopped_pod(created=100), make_pod(created=300)],
    )
    _, outcome = chain(make_job(), [CREATED, RUNNING, seen], config)
    assert outcome.status.restarts == 0
    assert "Failed" not in conds(outcome.status)


# --- spec edits while the trainer Job exists ---------------------------------------------------------------


def built_trainer_job(body: Obj, config: OperatorConfig, **state: Any) -> Obj:
    """The trainer Job the operator built from ``body``, in the state ``make_trainer_job(**state)`` gives."""
    built = build_trainer_job(parse(body), config)
    job = make_trainer_job(**state)
    job["metadata"]["annotations"] = built["metadata"]["annotations"]
    job["spec"] = {**built["spec"], "suspend": job["spec"]["suspend"]}
    return job


def running_then_edited(config: OperatorConfig, **edits: Any) -> tuple[Obj, Observed]:
    """A job whose trainer runs, with ``edits`` (camelCase spec keys) applied as generation 2."""
    original = make_job()
    trainer = built_trainer_job(original, config, active=1)
    seen = observed_children(trainer_job=trainer, pods=[RUNNING_POD])
    body, _ = chain(original, [CREATED, seen], config)
    body["spec"].update(edits)
    body["metadata"]["generation"] = 2
    return body, seen


def test_removing_a_deadline_removes_it_from_the_trainer_job(config: OperatorConfig) -> None:
    original = make_job(activeDeadlineSeconds=3600)
    seen = observed_children(trainer_job=built_trainer_job(original, config, active=1), pods=[RUNNING_POD])
    body, _ = chain(original, [CREATED, seen], config)
    del body["spec"]["activeDeadlineSeconds"]
    _, outcome = chain(body, [seen], config)
    assert outcome.job_spec_patch == {"activeDeadlineSeconds": None}
    updated = next(e for e in outcome.events if e.reason == "TrainerJobUpdated")
    assert updated.type == "Normal"
    assert updated.message == "trainer Job a-trainer updated: spec.activeDeadlineSeconds 3600 -> unset"


def test_an_applied_edit_is_not_patched_again(config: OperatorConfig) -> None:
    body, seen = running_then_edited(config, backoffLimit=6)
    body, first = chain(body, [seen], config)
    assert first.job_spec_patch == {"backoffLimit": 6}
    seen.trainer_job["spec"]["backoffLimit"] = 6  # type: ignore[index]
    _, second = chain(body, [seen], config)
    assert second.job_spec_patch == {} and second.events == ()


@pytest.mark.parametrize(
    ("edits", "fields"),
    [
        ({"resources": {"gpus": 2, "memory": "64Gi"}}, "spec.resources"),
        ({"trainer": {"image": "registry.example/trainer:v2"}}, "spec.trainer.image"),
        ({"trainer": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}}, "spec.trainer.env"),
        ({"queueName": "gpu-queue"}, "spec.queueName"),
        ({"s3": {"endpoint": "http://other-store:9000"}}, "spec.s3"),
        ({"checkpointing": {"everySteps": 25, "keep": 5}}, "spec.checkpointing"),
        (
            {"resources": {"gpus": 4}, "trainer": {"image": "registry.example/trainer:v2"}},
            "spec.resources, spec.trainer.image",
        ),
    ],
)
def test_edits_the_trainer_job_cannot_take_warn_once_per_generation(
    config: OperatorConfig, edits: Obj, fields: str
) -> None:
    body, seen = running_then_edited(config, **edits)
    body, first = chain(body, [seen], config)
    warnings = [e for e in first.events if e.reason == "SpecChangeNotApplied"]
    assert len(warnings) == 1 and warnings[0].type == "Warning"
    assert warnings[0].message.startswith(f"{fields} changed after trainer Job a-trainer was created")
    assert "delete and re-create the FineTuneJob to apply them" in warnings[0].message
    assert first.job_spec_patch == {}
    assert first.replace == () and first.create == ()  # the running trainer's config is never re-rendered
    _, again = chain(body, [seen], config)
    assert again.events == ()
    # A later edit of another field is a new generation: the fields still not applied are named again.
    body["spec"]["backoffLimit"] = 4
    body["metadata"]["generation"] = 3
    _, third = chain(body, [seen], config)
    assert [e.reason for e in third.events] == ["TrainerJobUpdated", "SpecChangeNotApplied"]
    assert third.job_spec_patch == {"backoffLimit": 4}


def test_an_edit_reverted_before_the_next_pass_warns_of_nothing(config: OperatorConfig) -> None:
    body, seen = running_then_edited(config, resources={"gpus": 1})
    _, outcome = chain(body, [seen], config)
    assert outcome.events == () and outcome.job_spec_patch == {}


def test_the_warning_survives_a_restart_and_needs_the_builders_record(config: OperatorConfig) -> None:
    body, seen = running_then_edited(config, resources={"gpus": 2})
    body.pop("status")  # the operator restarted and its status was lost: judged from the Job alone
    _, outcome = chain(body, [seen], config)
    assert "SpecChangeNotApplied" in [e.reason for e in outcome.events]
    unrecorded = make_trainer_job(active=1)  # built by a version that wrote no record: nothing to compare
    _, quiet = chain(body, [observed_children(trainer_job=unrecorded, pods=[RUNNING_POD])], config)
    assert "SpecChangeNotApplied" not in [e.reason for e in quiet.events]


def running(now: float, step: int | None = None, pod: Obj | None = None) -> Observed:
    sample = TrainerSample(step=step, total_steps=100) if step is not None else None
    return observed_children(
        trainer_job=make_trainer_job(active=1), pods=[pod or RUNNING_POD], now=now, sample=sample
    )


def test_watchdog_restarts_a_trainer_whose_step_stops_moving(config: OperatorConfig) -> None:
    body = make_job(progressDeadlineSeconds=600)
    body, outcome = chain(body, [CREATED, running(100, step=5), running(400, step=5)], config)
    assert outcome.delete_pod is None and conds(outcome.status)["Running"] == (T, "Training")
    assert outcome.status.progress is not None and outcome.status.progress.last_progress_time == ts(100)
    _, stuck = chain(body, [running(701, step=5)], config)
    assert stuck.delete_pod is RUNNING_POD
    assert conds(stuck.status)["Running"] == (F, "NoProgress")
    assert "made no training step for 601s (spec.progressDeadlineSeconds=600) after step 5" in (
        stuck.status.message or ""
    )
    assert (stuck.status.restarts, stuck.status.no_progress_restarts) == (1, 1)
    assert [(e.type, e.reason) for e in stuck.events] == [("Warning", "NoProgress")]
    assert "Failed" not in conds(stuck.status) and stuck.set_suspend is None


def test_watchdog_gives_a_new_attempt_the_startup_allowance(config: OperatorConfig) -> None:
    """The last step was seen in an earlier attempt: the new pod (started at 2000) is judged by
    startupDeadlineSeconds from its own start, not by the old step's time."""
    pod = make_pod(phase="Running", ip="10.0.0.8", running_since=ts(2000), created=1990)
    body = make_job(progressDeadlineSeconds=600, startupDeadlineSeconds=900)
    body, _ = chain(body, [CREATED, running(100, step=5)], config)
    _, waiting = chain(body, [running(2800, step=5, pod=pod)], config)
    assert waiting.delete_pod is None
    _, unread = chain(body, [running(2901, pod=pod)], config)
    assert unread.delete_pod is None  # no scrape, no verdict: the silence may be the operator's own
    _, late = chain(body, [running(2901, step=5, pod=pod)], config)
    assert late.delete_pod is pod
    assert "no training step within 901s of starting (spec.startupDeadlineSeconds=900)" in (
        late.status.message or ""
    )


def test_watchdog_judges_a_preparing_or_resuming_trainer_by_the_startup_deadline(
    config: OperatorConfig,
) -> None:
    """Step 0 while the trainer prepares (tokenizing, loading the model), and a resumed attempt reporting 0
    and then its checkpoint's step, are not steps: only the startup deadline applies until a new step."""
    body = make_job(progressDeadlineSeconds=10, startupDeadlineSeconds=900)
    body, preparing = chain(body, [CREATED, running(20, step=0), running(60, step=0)], config)
    assert preparing.delete_pod is None
    body, _ = chain(body, [running(100, step=5)], config)
    pod = make_pod(phase="Running", ip="10.0.0.8", running_since=ts(200), created=190)
    body, resumed = chain(body, [running(210, step=0, pod=pod), running(230, step=5, pod=pod)], config)
    _, later = chain(body, [running(260, step=5, pod=pod)], config)
    assert resumed.delete_pod is None and later.delete_pod is None


def test_watchdog_fails_the_job_past_the_backoff_limit_and_frees_the_gpus(config: OperatorConfig) -> None:
    body = make_job(progressDeadlineSeconds=60, backoffLimit=1)
    body, first = chain(body, [CREATED, running(100, step=3), running(161, step=3)], config)
    assert first.delete_pod is not None
    again = make_pod(phase="Running", running_since=ts(165))
    body, _ = chain(body, [running(170, step=4, pod=again)], config)
    _, second = chain(body, [running(231, step=4, pod=again)], config)
    assert conds(second.status)["Failed"] == (T, "NoProgress")
    assert second.delete_pod is None and second.set_suspend is True
    assert second.status.no_progress_restarts == 2 and second.status.phase == "Failed"
    assert "more than backoffLimit 1" in (second.status.message or "")


PLAN = {
    "strategy": "FSDP",
    "worldSize": 8,
    "activationCheckpointing": True,
    "microStepTokens": 8192,
    "gpuGiB": 79.1,
    "perGpuGiB": {"weights": 1.9, "gradients": 3.7, "optimizer": 7.5, "activations": 12.0, "workspace": 2.1,
                  "total": 27.2},
}  # fmt: skip


@pytest.mark.parametrize(
    ("reported", "recorded"),
    [
        (PLAN, True),
        ({**PLAN, "strategy": "Mega"}, False),
        ({**PLAN, "worldSize": 0}, False),
        ({**PLAN, "perGpuGiB": {"total": -1}}, False),
        ({**PLAN, "gpuGiB": "lots"}, False),
    ],
    ids=["plan", "unknown strategy", "no processes", "negative", "not a number"],
)
def test_the_trainers_memory_plan_reaches_status_when_it_has_the_shape(
    reported: Any, recorded: bool, config: OperatorConfig
) -> None:
    summary = json.loads(success_summary())
    summary["plan"] = reported
    done = observed_children(
        trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, json.dumps(summary)))],
    )
    _, outcome = chain(make_job(), [CREATED, done], config)
    assert conds(outcome.status)["Succeeded"] == (T, "Completed")  # a bad plan costs nothing else
    plan = outcome.status.to_dict().get("plan")
    assert (plan == PLAN) if recorded else plan is None
