"""The operator/trainer contract: the termination summary's size budget and typed parsing."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer.contract import (
    TERMINATION_MESSAGE_LIMIT,
    AdapterRecord,
    ContractError,
    TerminationSummary,
    TrainerConfig,
)

KUBERNETES_TERMINATION_MESSAGE_BYTES = 4096


def big_success(files: int, message_chars: int) -> TerminationSummary:
    return TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message="x" * message_chars,
        adapter=AdapterRecord(
            uri="s3://models/" + "deep/" * 40 + "out/",
            files=[f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(files)],
            size_bytes=140_000_000_000,
            sha256="0123456789abcdef" * 4,
            base_model="s3://models/" + "base/" * 40,
        ),
        metrics={f"metric{i}": 1.0 / (i + 1) for i in range(60)},
        progress={"step": 1000, "totalSteps": 1000, "epoch": 3.0, "trainedTokens": 123456789},
        checkpoint={"uri": "s3://models/out/checkpoints/step-1000/", "step": 1000},
        provenance={
            "dataset": {"train": [{"uri": f"s3://d/{i}.jsonl", "sha256": "ab" * 32} for i in range(50)]}
        },
    )


@pytest.mark.parametrize(
    ("files", "message_chars"), [(3, 20_000), (2_000, 10), (2_000, 20_000), (10, 10)], ids=str
)
def test_the_result_record_always_survives_the_size_budget(files: int, message_chars: int) -> None:
    original = big_success(files, message_chars)
    text = original.to_json()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT < KUBERNETES_TERMINATION_MESSAGE_BYTES
    back = TerminationSummary.from_json(text)
    assert back.outcome == "Succeeded" and back.reason == "Completed"
    assert back.adapter is not None and original.adapter is not None
    record = back.adapter
    assert (record.uri, record.sha256, record.size_bytes, record.base_model) == (
        original.adapter.uri,
        original.adapter.sha256,
        original.adapter.size_bytes,
        original.adapter.base_model,
    )
    assert record.missing() == []
    # The files kept are the head of the list, and the count of the rest is exact.
    assert record.files == original.adapter.files[: len(record.files)]
    assert len(record.files) + (record.files_omitted or 0) == files


def test_optional_parts_give_way_before_the_record() -> None:
    """Provenance goes first; the message is shortened before metrics are dropped; the file list is cut only
    when everything else optional is gone."""
    small = big_success(files=3, message_chars=10)
    back = TerminationSummary.from_json(small.to_json())
    assert back.provenance is None
    assert back.metrics is not None and back.progress is not None and back.message == "x" * 10

    long_message = TerminationSummary.from_json(big_success(files=3, message_chars=20_000).to_json())
    assert long_message.message.endswith("...(truncated)") and long_message.metrics is not None

    many_files = TerminationSummary.from_json(big_success(files=2_000, message_chars=10).to_json())
    assert many_files.metrics is None and many_files.progress is None
    assert many_files.adapter is not None and many_files.adapter.files_omitted


def test_a_summary_that_fits_is_left_whole() -> None:
    summary = big_success(files=2, message_chars=10)
    summary = TerminationSummary(outcome=summary.outcome, reason=summary.reason, adapter=summary.adapter)
    assert TerminationSummary.from_json(summary.to_json()) == summary


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"outcome": 1}, "summary.outcome: expected a string, got a number"),
        ({"outcome": "Done"}, "summary.outcome: expected one of Succeeded, Failed, got 'Done'"),
        ({"adapter": []}, "summary.adapter: expected an object, got a list"),
        (
            {"adapter": {"uri": "s3://a/", "sizeBytes": True}},
            "summary.adapter.sizeBytes: expected an integer",
        ),
        ({"adapter": {"files": ["a", 3]}}, "summary.adapter.files[1]: expected a string, got a number"),
        ({"metrics": {"trainLoss": "low"}}, "summary.metrics.trainLoss: expected a number, got a string"),
        ({"adapter": {"uri": "s3://a/", "extra": 1}}, "summary.adapter: unknown field(s) extra"),
        ({"version": 2}, "summary.version: 2 is not 1"),
    ],
)
def test_a_summary_of_the_wrong_shape_is_refused_with_the_field_named(change: dict, error: str) -> None:
    data = {"version": 1, "outcome": "Succeeded", "reason": "Completed", **change}
    with pytest.raises(ContractError) as caught:
        TerminationSummary.from_json(json.dumps(data))
    assert error in str(caught.value)


def test_oversized_or_non_json_messages_are_refused_before_parsing() -> None:
    with pytest.raises(ContractError, match="over 16384"):
        TerminationSummary.from_json('{"outcome": "Failed", "message": "' + "a" * 20_000 + '"}')
    with pytest.raises(ContractError, match="not JSON"):
        TerminationSummary.from_json("Traceback (most recent call last): ...")


def test_the_config_is_typed_too() -> None:
    text = TrainerConfig().to_json()
    data = json.loads(text)
    data["hyperparameters"]["learningRate"] = "fast"
    with pytest.raises(ContractError, match=r"config\.hyperparameters\.learningRate: expected a number"):
        TrainerConfig.from_json(json.dumps(data))
    assert TrainerConfig.from_json(text) == TrainerConfig()
