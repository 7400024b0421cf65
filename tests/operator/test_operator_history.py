"""status.history: a bounded, evenly downsampled loss curve, checked against plain loops over the raw run."""

from __future__ import annotations

import functools
import json
import math

from operator_factories import (
    job_condition,
    make_job,
    make_pod,
    make_trainer_job,
    observed,
    owner_reference,
    success_summary,
    terminated,
    ts,
)

from kubetune_operator.config import OperatorConfig
from kubetune_operator.history import MAX_POINTS, add_sample, bucket_width
from kubetune_operator.models import FineTuneJob, History
from kubetune_operator.reconcile import reconcile
from kubetune_operator.trainer_metrics import TrainerSample

STEPS = 10_000
EVAL_EVERY = 500


def raw_train_loss(step: int) -> float:
    return 0.8 + 2.5 * math.exp(-step / 3000) + 0.05 * math.sin(step / 7)


def raw_learning_rate(step: int) -> float:
    return 2e-4 * 0.5 * (1 + math.cos(math.pi * step / STEPS))


def eval_loss_at(step: int) -> float | None:
    """The eval-loss gauge as the trainer serves it: the latest evaluation's value, unset before the first."""
    last_eval = step - step % EVAL_EVERY
    return 0.9 + 2.4 * math.exp(-last_eval / 3000) if last_eval else None


def run(steps: list[int]) -> list[History]:
    """Feed one sample per step in ``steps`` and return the history after each."""
    history: History | None = None
    seen = []
    for step in steps:
        history = add_sample(history, step, raw_train_loss(step), eval_loss_at(step), raw_learning_rate(step))
        assert history is not None
        seen.append(history)
    return seen


@functools.cache
def every_step_run() -> tuple[History, ...]:
    """The 10,000-step run sampled at every step (computed once; the tests only read it)."""
    return tuple(run(list(range(1, STEPS + 1))))


def spans(history: History) -> list[int]:
    previous, out = 0, []
    for step in history.step:
        out.append(step - previous)
        previous = step
    return out


def test_a_10000_step_run_stays_within_120_points_and_a_few_kilobytes() -> None:
    histories = every_step_run()
    assert max(len(h.step) for h in histories) == MAX_POINTS
    assert max(len(h.eval_step) for h in histories) <= MAX_POINTS
    final = histories[-1]
    assert len(final.step) == len(final.train_loss) == len(final.learning_rate)
    assert len(final.eval_step) == len(final.eval_loss)
    assert final.step[-1] == STEPS
    stored = json.dumps(final.model_dump(by_alias=True, mode="json"), separators=(",", ":"))
    assert len(stored) < 4096, len(stored)


def test_each_point_is_the_mean_of_the_raw_curve_over_the_steps_it_covers() -> None:
    final = every_step_run()[-1]
    previous = 0
    for step, train, lr in zip(final.step, final.train_loss, final.learning_rate, strict=True):
        covered = range(previous + 1, step + 1)
        mean_loss = sum(raw_train_loss(s) for s in covered) / len(covered)
        mean_lr = sum(raw_learning_rate(s) for s in covered) / len(covered)
        assert math.isclose(train, mean_loss, rel_tol=1e-3), (step, train, mean_loss)
        assert math.isclose(lr, mean_lr, rel_tol=1e-3, abs_tol=1e-9), (step, lr, mean_lr)
        previous = step


def test_points_stay_evenly_spread_as_the_run_grows() -> None:
    histories = every_step_run()
    # Early on, nothing is merged: one point per sample.
    assert histories[MAX_POINTS - 1].step == tuple(range(1, MAX_POINTS + 1))
    for last_step, history in enumerate(histories, start=1):
        widths = spans(history)
        # Every point but the newest (the bucket still filling) covers the same number of steps, and the
        # curve never shrinks below half its budget once it has filled it.
        assert len(set(widths[:-1])) <= 1, (last_step, widths)
        assert widths[-1] <= widths[0]
        if last_step > MAX_POINTS:
            assert MAX_POINTS // 2 <= len(widths) <= MAX_POINTS, (last_step, len(widths))
    assert spans(histories[-1])[0] == bucket_width(STEPS) == 128  # 10,000 steps in 79 points of 128


def test_eval_points_are_where_evaluations_happened() -> None:
    final = every_step_run()[-1]
    evaluations = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert final.eval_step == tuple(evaluations)
    for step, loss in zip(final.eval_step, final.eval_loss, strict=True):
        assert math.isclose(loss, eval_loss_at(step) or 0.0, rel_tol=1e-5)


def test_eval_points_merge_to_the_later_evaluation_when_they_share_a_bucket() -> None:
    history = None
    for step in range(1, 1001):
        history = add_sample(history, step, 2.0, 3.0 - step / 1000 if step % 2 == 0 else None, 1e-4, limit=10)
    # 1,000 steps in at most 10 buckets: 128 steps each; each keeps the last (even) step's evaluation.
    assert history is not None and bucket_width(1000, 10) == 128
    expected_steps = (128, 256, 384, 512, 640, 768, 896, 1000)
    assert history.eval_step == expected_steps
    assert history.eval_loss == tuple(round(3.0 - s / 1000, 6) for s in expected_steps)


def test_irregular_scrapes_keep_the_bound_and_the_ends() -> None:
    steps = sorted({(i * 7919) % STEPS + 1 for i in range(3000)} | {STEPS})
    histories = run(steps)
    assert max(len(h.step) for h in histories) <= MAX_POINTS
    final = histories[-1]
    assert final.step[-1] == STEPS
    assert list(final.step) == sorted(set(final.step))


def test_a_repeated_step_updates_the_point_and_a_replayed_step_drops_the_later_ones() -> None:
    history = None
    for step in (10, 20, 30):
        history = add_sample(history, step, 2.0 - step / 100, 3.0 - step / 100, 1e-4)
    history = add_sample(history, 30, 1.5, 2.7, 1e-4)
    assert history is not None and history.step == (10, 20, 30) and history.train_loss[-1] == 1.5
    # A restarted trainer resumes from its step-20 checkpoint and reports step 20 again.
    history = add_sample(history, 20, 1.75, 2.8, None)
    assert history is not None
    assert (history.step, history.train_loss, history.learning_rate) == ((10, 20), (1.9, 1.75), (1e-4, 1e-4))
    assert (history.eval_step, history.eval_loss) == ((10, 20), (2.9, 2.8))


def test_samples_without_a_step_or_a_loss_change_nothing() -> None:
    # The trainer's gauges read 0 before its first step (and after a restart, until its next one).
    assert add_sample(None, 0, 0.0, 0.0, 0.0) is None
    history = add_sample(None, 5, 2.0, None, None)
    assert history is not None and history.learning_rate == (0.0,)
    assert add_sample(history, 5, 0.0, 0.0, 1e-4) is history
    assert add_sample(history, None, 1.0, 1.0, 1.0) is history
    assert add_sample(history, 6, None, math.nan, 1e-3) is history
    assert add_sample(history, 6, math.inf, None, 1e-3) is history


def test_a_stored_history_is_cut_where_it_stops_making_sense() -> None:
    unequal = History(step=(10, 20, 30), train_loss=(3.0, 2.0), learning_rate=(1e-4, 1e-4, 1e-4))
    after = add_sample(unequal, 50, 1.0, None, 1e-4)
    assert after is not None and after.step == (10, 20, 50)
    unordered = History(step=(10, 20, 15), train_loss=(3.0, 2.0, 1.0), learning_rate=(1e-4,) * 3)
    after = add_sample(unordered, 50, 1.0, None, 1e-4)
    assert after is not None and after.step == (10, 20, 50)


def test_reconcile_fills_the_history_from_scrapes_and_the_final_summary(config: OperatorConfig) -> None:
    body = make_job()
    pod = make_pod(phase="Running", ip="10.0.0.7", running_since=ts(30))
    cm = {"kind": "ConfigMap", "metadata": {"name": "a-config", "ownerReferences": [owner_reference()]}}
    passes = [observed()]
    for step in (10, 20, 30):
        sample = TrainerSample(step=step, total_steps=40, train_loss=3.0 - step / 20, learning_rate=1e-4)
        passes.append(
            observed(config_map=cm, trainer_job=make_trainer_job(active=1), pods=[pod], sample=sample)
        )
    finished = make_trainer_job(succeeded=1, conditions=[job_condition("Complete")])
    done_pod = make_pod(phase="Succeeded", terminated=terminated(0, message=success_summary()))
    passes.append(observed(config_map=cm, trainer_job=finished, pods=[done_pod]))
    status = None
    for seen in passes:
        job = FineTuneJob.from_body(body)
        status = reconcile(job, seen, config).status
        body = {**body, "status": status.to_dict()}
    assert status is not None and status.history is not None
    summary = json.loads(success_summary())
    final_step = summary["progress"]["step"]
    assert status.history.step == (10, 20, 30, final_step)
    assert status.history.train_loss == (2.5, 2.0, 1.5, summary["metrics"]["trainLoss"])
    assert (status.history.eval_step, status.history.eval_loss) == ((final_step,), (1.35,))
    assert body["status"]["history"]["trainLoss"][:3] == [2.5, 2.0, 1.5]
