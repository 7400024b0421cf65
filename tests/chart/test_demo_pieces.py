"""The pure parts of `make demo` (e2e/demo.py): its dataset is one the trainer accepts, its manifest one the
CRD accepts, and its terminal chart draws the curve it is given."""

from __future__ import annotations

from e2e import demo
from tests.operator.crd_helpers import check

from kubetune_trainer.data import parse_records


def test_demo_dataset_parses_as_chat_with_no_problems() -> None:
    rows = demo.instruction_dataset(60)
    result = parse_records([("train.jsonl", demo.to_jsonl(rows))])
    assert result.format == "Messages"
    assert not result.problems
    questions = {r["messages"][1]["content"] for r in rows}
    assert len(questions) > 20, "the examples should vary"
    assert demo.instruction_dataset(5, offset=10_000) != demo.instruction_dataset(5)


def test_demo_finetunejob_passes_the_crd_schema_and_rules() -> None:
    bucket = f"s3://{demo.BUCKET}"
    uris = {
        "model": f"{bucket}/models/tiny/",
        "train": f"{bucket}/datasets/demo/train.jsonl",
        "validation": f"{bucket}/datasets/demo/validation.jsonl",
        "output": f"{bucket}/adapters/run-1/",
    }
    manifest = demo.finetunejob(uris, "http://127.0.0.1:9000", steps=40)
    verdict = check(manifest)
    assert verdict.ok, verdict.messages()
    assert manifest["spec"]["resources"]["gpus"] == 0
    assert len(manifest["metadata"]["name"]) <= 55


def test_sparkline_follows_the_values() -> None:
    assert demo.sparkline([3.0, 2.0, 1.0, 0.0]) == "█▆▃▁"
    assert demo.sparkline([1.0, 1.0]) == "▁▁"
    assert len(demo.sparkline([float(i) for i in range(500)], width=60)) == 60
    assert demo.sparkline([]) == ""


def test_watch_line_shows_progress_only_once_training_steps() -> None:
    starting = {
        "metadata": {"name": "demo-lora"},
        "status": {
            "phase": "Running",
            "progress": {"step": 0, "totalSteps": 0, "tokensPerSecond": 0.0},
            "metrics": {"trainLoss": 0.0},
            "message": "preparing data and model",
        },
    }
    assert demo.watch_line(starting).split()[:5] == ["demo-lora", "Running", "-", "-", "-"]
    training = {
        "metadata": {"name": "demo-lora"},
        "status": {
            "phase": "Running",
            "progress": {"step": 7, "totalSteps": 40, "tokensPerSecond": 1234.4},
            "metrics": {"trainLoss": 6.05142},
            "message": "training",
        },
    }
    assert demo.watch_line(training).split()[:5] == ["demo-lora", "Running", "7/40", "6.0514", "1234"]
    assert demo.watch_line({"metadata": {"name": "demo-lora"}}).split()[:3] == ["demo-lora", "Pending", "-"]
