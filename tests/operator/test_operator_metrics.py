"""Parsing the trainer's /metrics, and the operator's own metrics."""

from __future__ import annotations

import math

import pytest
from operator_factories import at, metrics_text, ts
from prometheus_client import generate_latest

from kubetune_operator.models import FineTuneJobStatus, Progress, TrainingMetrics
from kubetune_operator.operator_metrics import OperatorMetrics
from kubetune_operator.trainer_metrics import MetricsParseError, TrainerSample, parse_trainer_metrics
from kubetune_trainer import contract


def test_contract_gauges_are_read_from_prometheus_text() -> None:
    text = metrics_text(
        **{
            contract.METRIC_STEP: 120,
            contract.METRIC_TOTAL_STEPS: 420,
            contract.METRIC_EPOCH: 0.86,
            contract.METRIC_TRAIN_LOSS: 1.42,
            contract.METRIC_LEARNING_RATE: 1.9e-4,
            contract.METRIC_TOKENS_PER_SECOND: 51234,
            contract.METRIC_TRAINED_TOKENS: 1966080,
            contract.METRIC_ETA_SECONDS: 300,
            "python_gc_objects_collected": 7,
        }
    )
    sample = parse_trainer_metrics(text)
    assert sample == TrainerSample(
        step=120,
        total_steps=420,
        epoch=0.86,
        train_loss=1.42,
        learning_rate=1.9e-4,
        tokens_per_second=51234,
        trained_tokens=1966080,
        eta_seconds=300,
    )


def test_dpo_gauges_are_read_from_prometheus_text() -> None:
    text = metrics_text(
        **{
            contract.METRIC_STEP: 12,
            contract.METRIC_REWARD_MARGIN: 0.75,
            contract.METRIC_PREFERENCE_ACCURACY: 0.875,
            contract.METRIC_CHOSEN_LOGPS: -10.5,
            contract.METRIC_REJECTED_LOGPS: -14.25,
            contract.METRIC_EVAL_REWARD_MARGIN: 0.5,
            contract.METRIC_EVAL_PREFERENCE_ACCURACY: 0.8125,
        }
    )
    assert parse_trainer_metrics(text) == TrainerSample(
        step=12,
        reward_margin=0.75,
        preference_accuracy=0.875,
        chosen_logps=-10.5,
        rejected_logps=-14.25,
        eval_reward_margin=0.5,
        eval_preference_accuracy=0.8125,
    )


def test_the_trainers_gauges_are_the_ones_the_operator_reads() -> None:
    from kubetune_trainer.metrics import GAUGES, Metrics

    trainer = Metrics()
    trainer.set(**{key: index + 1.5 for index, key in enumerate(GAUGES)})
    sample = parse_trainer_metrics(generate_latest(trainer.registry).decode())
    expected = {key: index + 1.5 for index, key in enumerate(GAUGES)}
    assert {key: getattr(sample, key) for key in GAUGES} == expected


def test_nan_means_not_reported() -> None:
    text = metrics_text(**{contract.METRIC_EVAL_LOSS: math.nan, contract.METRIC_STEP: 3})
    sample = parse_trainer_metrics(text)
    assert sample.eval_loss is None and sample.step == 3


def test_non_prometheus_text_is_an_error() -> None:
    with pytest.raises(MetricsParseError):
        parse_trainer_metrics("kubetune_trainer_step{broken 1\n")


def _value(metrics: OperatorMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def status(
    phase: str, start: str | None = None, done: str | None = None, step: int | None = None
) -> FineTuneJobStatus:
    return FineTuneJobStatus(
        phase=phase,
        start_time=start,
        completion_time=done,
        progress=Progress(step=step, tokens_per_second=1000.0) if step is not None else None,
        metrics=TrainingMetrics(train_loss=1.5) if step is not None else None,
    )


def test_jobs_by_phase_and_per_job_gauges_and_forget() -> None:
    metrics = OperatorMetrics()
    metrics.record("ml", "a", ts(0), FineTuneJobStatus(), status("Running", ts(30), step=40))
    metrics.record("ml", "b", ts(0), FineTuneJobStatus(), status("Pending"))
    assert _value(metrics, "kubetune_operator_finetunejobs", {"phase": "Running"}) == 1
    assert _value(metrics, "kubetune_operator_finetunejobs", {"phase": "Pending"}) == 1
    assert _value(metrics, "kubetune_finetunejob_step", {"namespace": "ml", "name": "a"}) == 40
    assert _value(metrics, "kubetune_finetunejob_train_loss", {"namespace": "ml", "name": "a"}) == 1.5
    assert _value(metrics, "kubetune_finetunejob_tokens_per_second", {"namespace": "ml", "name": "a"}) == 1000
    metrics.forget("ml", "a")
    assert _value(metrics, "kubetune_finetunejob_step", {"namespace": "ml", "name": "a"}) is None
    assert _value(metrics, "kubetune_operator_finetunejobs", {"phase": "Running"}) == 0
    assert b'kubetune_finetunejob_step{name="a"' not in generate_latest(metrics.registry)


def test_start_and_duration_are_observed_once_at_their_transition() -> None:
    metrics = OperatorMetrics()
    running = status("Running", ts(30), step=1)
    metrics.record("ml", "a", ts(0), FineTuneJobStatus(), running)
    metrics.record("ml", "a", ts(0), running, running)  # a later pass: nothing new
    assert _value(metrics, "kubetune_operator_time_to_trainer_start_seconds_count") == 1
    assert _value(metrics, "kubetune_operator_time_to_trainer_start_seconds_sum") == 30
    done = status("Succeeded", ts(30), ts(600), step=10)
    metrics.record("ml", "a", ts(0), running, done)
    metrics.record("ml", "a", ts(0), done, done)
    assert _value(metrics, "kubetune_operator_job_duration_seconds_count", {"outcome": "Succeeded"}) == 1
    assert _value(metrics, "kubetune_operator_job_duration_seconds_sum", {"outcome": "Succeeded"}) == 600


def test_the_parse_error_never_quotes_the_answer() -> None:
    with pytest.raises(MetricsParseError) as caught:
        parse_trainer_metrics('kubetune_trainer_step{token="s3cr3t-value" 1\n')
    assert "s3cr3t" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_finished_jobs_series_go_after_the_retention_period() -> None:
    """Retention counts from the completion time in status, so an operator restart (which records every
    finished job again) does not bring back the series of jobs that finished long ago."""
    clock = [at(600).timestamp()]
    metrics = OperatorMetrics(retention_seconds=300, clock=lambda: clock[0])
    job = {"namespace": "ml", "name": "a"}
    running = status("Running", ts(30), step=10)
    metrics.record("ml", "a", ts(0), FineTuneJobStatus(), running)
    metrics.record("ml", "a", ts(0), running, status("Succeeded", ts(30), ts(600), step=20))
    metrics.record("ml", "b", ts(0), FineTuneJobStatus(), status("Running", ts(30), step=5))
    clock[0] = at(899).timestamp()
    assert _value(metrics, "kubetune_finetunejob_step", job) == 20
    clock[0] = at(900).timestamp()
    assert _value(metrics, "kubetune_finetunejob_step", job) is None
    assert _value(metrics, "kubetune_finetunejob_train_loss", job) is None
    assert _value(metrics, "kubetune_finetunejob_step", {"namespace": "ml", "name": "b"}) == 5  # running
    assert _value(metrics, "kubetune_operator_finetunejobs", {"phase": "Succeeded"}) == 1  # still counted
    restarted = OperatorMetrics(retention_seconds=300, clock=lambda: clock[0])
    done = status("Succeeded", ts(30), ts(600), step=20)
    restarted.record("ml", "a", ts(0), done, done)
    assert _value(restarted, "kubetune_finetunejob_step", job) is None


def test_queue_depth_and_scrape_rounds_are_exposed() -> None:
    metrics = OperatorMetrics()
    waiting = [3]
    metrics.watch_queue_depth(lambda: waiting[0])
    assert _value(metrics, "kubetune_operator_workqueue_depth") == 3
    waiting[0] = 0
    assert _value(metrics, "kubetune_operator_workqueue_depth") == 0
    metrics.scrape_round_duration.observe(12.5)
    assert _value(metrics, "kubetune_operator_scrape_round_duration_seconds_count") == 1
    assert _value(metrics, "kubetune_operator_scrape_round_duration_seconds_bucket", {"le": "15.0"}) == 1
    assert _value(metrics, "kubetune_operator_scrape_round_duration_seconds_bucket", {"le": "10.0"}) == 0


def test_metric_names_follow_prometheus_conventions() -> None:
    """Counters end in _total; every metric of time is in seconds."""
    metrics = OperatorMetrics()
    metrics.reconcile_errors.labels(error="ApiException").inc()
    for family in metrics.registry.collect():
        exposed = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert all(name.endswith(("_total", "_created")) for name in exposed), exposed
        if any(word in family.name for word in ("duration", "time", "latency", "age")):
            assert family.name.endswith("_seconds"), family.name
