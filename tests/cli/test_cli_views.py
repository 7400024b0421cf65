"""The pure parts of `kubectl finetune`: the terminal chart, the list and describe views, argument parsing.
The commands themselves run against a real API server in e2e/tests/test_plugin.py."""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune_cli import chart, job_view
from kubetune_cli.logs import _of_rank
from kubetune_cli.main import parse_duration

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def glyph_rows(lines: list[str], glyph: str) -> dict[int, int]:
    """column -> the topmost row holding ``glyph``, in the plot area (left of the axis labels removed)."""
    found: dict[int, int] = {}
    for row, line in enumerate(lines):
        for col, char in enumerate(line[chart.AXIS_LABEL_WIDTH :]):
            if char == glyph and col not in found:
                found[col] = row
    return found


def make_job(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "a", "namespace": "ml", "creationTimestamp": "2026-01-02T02:04:05Z"},
        "spec": {
            "method": "LoRA",
            "baseModel": {"uri": "s3://models/llama-3.2-1b/"},
            "dataset": {"train": "s3://d/t.jsonl"},
            "output": {"uri": "s3://adapters/a/"},
        },
        "status": status,
    }


def test_the_chart_draws_a_falling_train_line_and_the_eval_points() -> None:
    steps = list(range(0, 400, 4))
    train = [0.8 + 2.5 * math.exp(-s / 100) for s in steps]
    train_series = chart.Series("train loss", steps, train, "*", chart.BLUE)
    alone = chart.render([train_series], width=70, height=10)
    train_rows = glyph_rows(alone[:10], "*")
    # The line spans the width and falls, top-left to bottom-right, with no column missing between.
    assert sorted(train_rows) == list(range(70 - chart.AXIS_LABEL_WIDTH - 1))
    assert train_rows[0] == 0 and train_rows[max(train_rows)] == 9
    assert all(a <= b for a, b in zip(train_rows.values(), list(train_rows.values())[1:], strict=False))
    lines = chart.render(
        [train_series, chart.Series("eval loss", [100, 200, 300], [1.9, 1.3, 1.1], "o", chart.RED)],
        width=70,
        height=10,
    )
    plot_rows = lines[:10]
    assert sum(line.count("o") for line in plot_rows) >= 3
    assert "* train loss" in lines[-1] and "o eval loss" in lines[-1]
    assert "3.3" in lines[0] and "step 0" in lines[-2] and "396" in lines[-2]


def test_the_chart_colours_only_when_asked() -> None:
    series = [chart.Series("train loss", [1, 2], [2.0, 1.0], "*", chart.BLUE)]
    assert "\x1b[" not in "".join(chart.render(series))
    assert "\x1b[34m*\x1b[0m" in "".join(chart.render(series, color=True))


def test_list_rows_show_phase_method_model_progress_eta_and_loss() -> None:
    running = make_job(
        phase="Running",
        progress={"step": 100, "totalSteps": 400, "percent": 25.0, "etaSeconds": 192},
        metrics={"trainLoss": 1.52341, "evalLoss": 1.6},
    )
    rows = job_view.list_rows([running], NOW, with_namespace=True)
    assert rows[0] == ["NAMESPACE", "NAME", "PHASE", "METHOD", "MODEL", "PROGRESS", "ETA", "LOSS", "AGE"]
    assert rows[1] == [
        "ml",
        "a",
        "Running",
        "LoRA",
        "llama-3.2-1b",
        "100/400 25%",
        "3m12s",
        "1.523 eval 1.6",
        "1h",
    ]


def test_describe_shows_conditions_adapter_and_the_loss_chart() -> None:
    job = make_job(
        phase="Succeeded",
        conditions=[
            {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "adapter written",
             "lastTransitionTime": "2026-01-02T03:00:05Z"}
        ],
        adapter={"uri": "s3://adapters/a/", "files": ["adapter_model.safetensors"], "sizeBytes": 2048,
                 "sha256": "ab" * 32, "selected": {"select": "BestEval", "step": 20, "evalLoss": 2.2}},
        metrics={"evalLoss": 2.5, "evalTokenAccuracy": 0.4375, "bestEvalLoss": 2.2, "bestStep": 20},
        history={"step": [10, 20, 30], "trainLoss": [3.0, 2.0, 1.5], "learningRate": [1e-4] * 3,
                 "evalStep": [20, 30], "evalLoss": [2.5, 2.2]},
    )  # fmt: skip
    text = job_view.describe(job, NOW, width=80)
    assert "Succeeded   True     Completed   4m    adapter written" in text
    assert "SHA-256:    " + "ab" * 32 in text
    assert "Size:       2.0 KiB" in text
    assert "Weights:    step 20 (BestEval, eval loss 2.2)" in text
    assert "eval token accuracy 0.4375" in text and "best eval 2.2 at step 20" in text
    assert "* train loss   o eval loss" in text


def test_describe_shows_the_preference_metrics_of_a_dpo_job_only() -> None:
    dpo = make_job(
        metrics={"trainLoss": 0.41, "rewardMargin": 1.25, "preferenceAccuracy": 0.9, "evalRewardMargin": 1.1,
                 "evalPreferenceAccuracy": 0.875, "chosenLogps": -12.5, "rejectedLogps": -20.25}
    )  # fmt: skip
    text = job_view.describe(dpo, NOW)
    assert (
        "Preferences:  reward margin 1.25, accuracy 0.9, eval margin 1.1, eval accuracy 0.875, "
        "logp chosen -12.5, rejected -20.25"
    ) in text
    assert "Preferences:" not in job_view.describe(make_job(metrics={"trainLoss": 1.0}), NOW)


@pytest.mark.parametrize(
    "status",
    [
        {"history": {"step": "many", "trainLoss": [1.0]}},
        {"history": {"step": [1, 2, 3], "trainLoss": [1.0, "x", 3.0], "evalStep": [None], "evalLoss": 7}},
        {"conditions": "broken", "progress": {"step": "4"}, "metrics": [], "adapter": "s3://x"},
        {"phase": 7, "history": None, "checkpoint": {"uri": 3}},
    ],
)
def test_a_malformed_status_shows_as_missing_values_not_a_crash(status: dict[str, Any]) -> None:
    job = make_job(**status)
    text = job_view.describe(job, NOW)
    assert "Name:         a" in text
    job_view.list_rows([job], NOW, with_namespace=False)
    json.dumps(job_view.Curves.from_job(job).__dict__)


def test_a_history_with_a_bad_value_is_cut_there() -> None:
    job = make_job(history={"step": [1, 2, 3], "trainLoss": [1.0, "x", 3.0]})
    curves = job_view.Curves.from_job(job)
    assert (curves.train_steps, curves.train_loss) == ([1.0], [1.0])


def test_durations() -> None:
    assert [parse_duration(t) for t in ("30", "90s", "10m", "2h", "1h30m")] == [30, 90, 600, 7200, 5400]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")
    assert [job_view.duration(s) for s in (5, 192, 3600, 7320, 90000)] == [
        "5s",
        "3m12s",
        "1h",
        "2h2m",
        "1d1h",
    ]


def test_rank_filter_keeps_a_ranks_json_lines_and_every_plain_line() -> None:
    rank0 = json.dumps({"event": "step", "step": 1})
    rank1 = json.dumps({"event": "ready", "rank": 1})
    assert [_of_rank(line, 0) for line in (rank0, rank1, "Traceback ...")] == [True, False, True]
    assert [_of_rank(line, 1) for line in (rank0, rank1, "Traceback ...")] == [False, True, True]
