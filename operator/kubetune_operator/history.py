"""The run's loss curve in status: a bounded, evenly downsampled history of the trainer's samples.

Two series share one grid. Train points (``step``, ``trainLoss``, ``learningRate``) each stand for the steps
after the previous train point up to and including their own step. Eval points (``evalStep``,
``evalLoss``) are where an evaluation changed the eval loss. The grid's buckets are ``width`` steps wide (a
power of two: the smallest that fits the run so far into ``MAX_POINTS`` buckets) and each bucket holds at
most one point of each series. As the run grows past the grid the width doubles and neighbouring buckets
merge pairwise, so older points are merged evenly and every train point but the newest covers ``width``
steps. The newest train point is the bucket still filling: it moves with each sample.

A merged train point keeps the later step and the mean train loss and learning rate over the steps it
covers (each part weighted by its span, so merging twice gives what merging once would). A merged eval
point keeps the later evaluation: an evaluation is a measurement at a step, not an average over steps.

Pure: the curve lives only in ``status.history``, so an operator restart carries on from what it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kubetune_operator.models import History

MAX_POINTS = 120
"""At most this many points in each series: about 4 KB of status."""
SIGNIFICANT_DIGITS = 6
"""The newest train point is re-averaged (and rounded) once per sample; six digits keep the drift that
adds up over a bucket's samples below 0.1%."""


@dataclass(frozen=True)
class _TrainPoint:
    step: int
    loss: float
    learning_rate: float


@dataclass(frozen=True)
class _EvalPoint:
    step: int
    loss: float


_P = TypeVar("_P", _TrainPoint, _EvalPoint)


def add_sample(
    history: History | None,
    step: int | None,
    train_loss: float | None,
    eval_loss: float | None,
    learning_rate: float | None,
    *,
    limit: int = MAX_POINTS,
) -> History | None:
    """The history with one more sample of the trainer's gauges.

    A sample at the newest step replaces that step's values; one at an earlier step (a restarted trainer
    replaying from its checkpoint) drops the points after it first. A train point needs a train loss; a
    missing learning rate repeats the previous one (0 before any). A loss of 0 counts as not reported: the
    trainer's gauges read 0 until it measures one (at its start, and after a restart until its first step),
    and a cross-entropy is never exactly 0. The eval-loss gauge keeps its value
    between evaluations, so an eval loss equal to the last one recorded is not recorded again. A sample
    without a step, or with nothing new, leaves the history as it is.
    """
    train, evaluation, lr = _loss(train_loss), _loss(eval_loss), _finite(learning_rate)
    if step is None or step < 0 or (train is None and evaluation is None):
        return history
    old_train, old_evals = _stored(history)
    kept_train = [p for p in old_train if p.step < step]
    kept_evals = [p for p in old_evals if p.step < step]
    if train is not None:
        if lr is None:
            lr = kept_train[-1].learning_rate if kept_train else 0.0
        kept_train.append(_TrainPoint(step, train, lr))
    else:
        kept_train += [p for p in old_train if p.step == step]
    if evaluation is None:
        kept_evals += [p for p in old_evals if p.step == step]
    elif not kept_evals or kept_evals[-1].loss != evaluation:
        kept_evals.append(_EvalPoint(step, evaluation))
    width = bucket_width(step, limit)
    merged_train = _merge_buckets(kept_train, width, _merge_train)
    merged_evals = _merge_buckets(kept_evals, width, lambda group, _: group[-1])
    return History(
        step=tuple(p.step for p in merged_train),
        train_loss=tuple(p.loss for p in merged_train),
        learning_rate=tuple(p.learning_rate for p in merged_train),
        eval_step=tuple(p.step for p in merged_evals),
        eval_loss=tuple(p.loss for p in merged_evals),
    )


def bucket_width(last_step: int, limit: int = MAX_POINTS) -> int:
    """Steps per point: the smallest power of two that fits steps 1..last_step into ``limit`` buckets."""
    width = 1
    while math.ceil(last_step / width) > max(limit, 1):
        width *= 2
    return width


def _merge_buckets(points: list[_P], width: int, merge: Callable[[list[_P], int], _P]) -> list[_P]:
    """One point per bucket; ``merge(group, step before the group)`` folds a bucket's points into one."""
    merged: list[_P] = []
    group: list[_P] = []
    previous_step = 0
    for point in points:
        if group and _bucket(point.step, width) != _bucket(group[0].step, width):
            merged.append(merge(group, previous_step) if len(group) > 1 else group[0])
            previous_step = group[-1].step
            group = []
        group.append(point)
    if group:
        merged.append(merge(group, previous_step) if len(group) > 1 else group[0])
    return merged


def _bucket(step: int, width: int) -> int:
    return (max(step, 1) - 1) // width


def _merge_train(group: list[_TrainPoint], previous_step: int) -> _TrainPoint:
    spans, start = [], previous_step
    for point in group:
        spans.append(max(1, point.step - start))
        start = point.step
    total = sum(spans)
    return _TrainPoint(
        step=group[-1].step,
        loss=_round(sum(p.loss * w for p, w in zip(group, spans, strict=True)) / total),
        learning_rate=_round(sum(p.learning_rate * w for p, w in zip(group, spans, strict=True)) / total),
    )


def _stored(history: History | None) -> tuple[list[_TrainPoint], list[_EvalPoint]]:
    """The stored points, trusting nothing: columns of unequal length are cut to the shortest, values that
    are not finite numbers end a series there, and so does a step that does not increase."""
    if history is None:
        return [], []
    train: list[_TrainPoint] = []
    for step, loss, lr in zip(history.step, history.train_loss, history.learning_rate, strict=False):
        loss_value, lr_value = _finite(loss), _finite(lr)
        if loss_value is None or lr_value is None or (train and step <= train[-1].step):
            break
        train.append(_TrainPoint(step, loss_value, lr_value))
    evals: list[_EvalPoint] = []
    for step, loss in zip(history.eval_step, history.eval_loss, strict=False):
        loss_value = _finite(loss)
        if loss_value is None or (evals and step <= evals[-1].step):
            break
        evals.append(_EvalPoint(step, loss_value))
    return train, evals


def _loss(value: float | None) -> float | None:
    number = _finite(value)
    return number if number is not None and number > 0 else None


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return _round(value)


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
