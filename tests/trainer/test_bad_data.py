"""The bad-data corpus: every kind of malformed input fails with its own reason, naming file:line and the
count, before any model is loaded."""

from __future__ import annotations

import json

import pytest

from conftest import Workspace, chat_records, jsonl
from kubetune_trainer.contract import TrainerReason
from kubetune_trainer.data import parse_records
from kubetune_trainer.errors import EXIT_PERMANENT

GOOD_MESSAGES = json.dumps(chat_records(1)[0]).encode()
GOOD_PC = json.dumps({"prompt": "a", "completion": "b"}).encode()


def msgs(*messages: object) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


# kind -> (first good line, bad line, text the problem must contain)
CORPUS: dict[str, tuple[bytes, bytes, str]] = {
    "invalid JSON": (GOOD_MESSAGES, b'{"messages": [', "invalid JSON"),
    "not an object": (GOOD_MESSAGES, b"[1, 2]", "must be a JSON object, got list"),
    "missing messages key": (
        GOOD_MESSAGES,
        b'{"text": "hello"}',
        "missing key 'messages'; it looks like Text",
    ),
    "messages not a list": (
        GOOD_MESSAGES,
        b'{"messages": "hi"}',
        "'messages' must be a list of messages, got str",
    ),
    "empty messages": (GOOD_MESSAGES, b'{"messages": []}', "'messages' is an empty list"),
    "message not an object": (GOOD_MESSAGES, b'{"messages": ["hi"]}', "messages[0] must be an object"),
    "unknown role": (GOOD_MESSAGES, msgs({"role": "bot", "content": "x"}), "unknown role 'bot'"),
    "missing role": (GOOD_MESSAGES, msgs({"content": "x"}), "messages[0] has no 'role'"),
    "missing content": (GOOD_MESSAGES, msgs({"role": "user"}), "messages[0] has no 'content'"),
    "content not a string": (
        GOOD_MESSAGES,
        msgs({"role": "assistant", "content": 42}),
        "messages[0].content must be a string, got int",
    ),
    "null content": (GOOD_MESSAGES, msgs({"role": "assistant", "content": None}), "got null"),
    "no assistant turn": (GOOD_MESSAGES, msgs({"role": "user", "content": "x"}), "no assistant message"),
    "invalid UTF-8": (GOOD_MESSAGES, b'{"messages": "\xff\xfe"}', "not UTF-8"),
    "empty completion": (GOOD_PC, b'{"prompt": "a", "completion": "  "}', "'completion' is empty"),
    "mixed prompt/completion types": (
        GOOD_PC,
        b'{"prompt": "a", "completion": [{"role": "assistant"}]}',
        "must both be strings or both be message lists",
    ),
    "sharegpt unknown speaker": (
        b'{"conversations": [{"from": "gpt", "value": "x"}]}',
        b'{"conversations": [{"from": "robot", "value": "x"}]}',
        "unknown from 'robot'",
    ),
    "alpaca instruction not a string": (
        b'{"instruction": "a", "output": "b"}',
        b'{"instruction": 3, "output": "b"}',
        "'instruction' must be a string",
    ),
    "text empty": (b'{"text": "x"}', b'{"text": ""}', "'text' is empty"),
}


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_each_kind_of_malformed_record_is_named_with_its_line(kind: str) -> None:
    good, bad, expected = CORPUS[kind]
    data = b"\n".join([good, b"", bad, good]) + b"\n"  # the bad record is on line 3
    result = parse_records([("train.jsonl", data)])
    wheres = [where for where, _ in result.problems]
    assert "train.jsonl:3" in wheres, result.problems
    message = dict(result.problems)["train.jsonl:3"]
    assert expected in message
    assert "train.jsonl:1" not in wheres and "train.jsonl:4" not in wheres


def test_records_of_no_known_format_are_each_reported() -> None:
    result = parse_records([("train.jsonl", b'{"foo": 1}\n{"bar": 2}\n')])
    assert [where for where, _ in result.problems] == ["train.jsonl:1", "train.jsonl:2"]
    assert "keys (bar) match no known format" in result.problems[1][1]


def test_unreadable_parquet_and_non_list_json_are_reported() -> None:
    result = parse_records([("a.parquet", b"PAR1 this is not parquet"), ("b.json", b'"just a string"')])
    problems = dict(result.problems)
    assert "not a readable Parquet file" in problems["a.parquet"]
    assert "must hold a list of records" in problems["b.json:1"]


def _corpus_file() -> tuple[bytes, list[int]]:
    """A Messages file with every Messages-kind bad record interleaved with good ones."""
    lines = [GOOD_MESSAGES]
    bad_lines = []
    for kind in sorted(CORPUS):
        good, bad, _ = CORPUS[kind]
        if good is GOOD_MESSAGES:
            lines.append(bad)
            bad_lines.append(len(lines))
            lines.append(GOOD_MESSAGES)
    return b"\n".join(lines) + b"\n", bad_lines


def test_a_run_on_malformed_data_fails_before_the_model_is_fetched(ws: Workspace, monkeypatch) -> None:
    data, bad_lines = _corpus_file()
    train = ws.put("data/train.jsonl", data)
    # The base model does not exist: if data were not validated first, the reason would be ModelNotFound.
    config = ws.config(train, base_model=f"s3://{ws.bucket}/no-such-model/")
    result = ws.run(config, monkeypatch)
    assert result.code == EXIT_PERMANENT
    assert result.summary.outcome == "Failed"
    assert result.summary.reason == TrainerReason.INVALID_DATASET
    message = result.summary.message
    assert f"{len(bad_lines)} malformed record(s) in {train}" in message
    for line in bad_lines[:5]:
        assert f"train.jsonl:{line}:" in message
    assert f"train.jsonl:{bad_lines[5]}:" not in message
    assert f"(and {len(bad_lines) - 5} more)" in message


@pytest.mark.parametrize(
    ("objects", "uri_key", "reason"),
    [
        ({"data/train.jsonl": b""}, "data/train.jsonl", TrainerReason.EMPTY_DATASET),
        ({"data/train.jsonl": b"\n  \n\n"}, "data/train.jsonl", TrainerReason.EMPTY_DATASET),
        ({}, "data/missing.jsonl", TrainerReason.DATASET_NOT_FOUND),
        ({"data/readme.txt": b"hello"}, "data/", TrainerReason.DATASET_NOT_FOUND),
        ({"data/train.csv": b"a,b"}, "data/train.csv", TrainerReason.INVALID_DATASET),
    ],
    ids=["empty-file", "blank-lines", "missing-object", "prefix-without-data", "unsupported-type"],
)
def test_dataset_level_failures_have_their_own_reasons(
    ws: Workspace, monkeypatch, objects: dict[str, bytes], uri_key: str, reason: str
) -> None:
    for key, body in objects.items():
        ws.put(key, body)
    result = ws.run(ws.config(f"s3://{ws.bucket}/{uri_key}"), monkeypatch)
    assert result.summary.reason == reason, result.summary.message
    assert result.code == EXIT_PERMANENT
    assert f"s3://{ws.bucket}/{uri_key}" in result.summary.message


def test_a_prefix_reads_every_data_object_under_it(ws: Workspace, monkeypatch) -> None:
    ws.put("data/part-1.jsonl", jsonl(chat_records(3, seed=1)))
    ws.put("data/sub/part-2.jsonl", b'{"messages": 5}\n')
    ws.put("data/notes.txt", b"ignored")
    result = ws.run(ws.config(f"s3://{ws.bucket}/data/"), monkeypatch)
    assert result.summary.reason == TrainerReason.INVALID_DATASET
    assert "sub/part-2.jsonl:1" in result.summary.message


def test_wrong_credentials_fail_with_access_denied(ws: Workspace, monkeypatch) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(3)))
    result = ws.run(ws.config(train), monkeypatch, AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert result.summary.reason == TrainerReason.ACCESS_DENIED
    assert result.code == EXIT_PERMANENT
    assert "credentials" in result.summary.message


def test_an_invalid_config_lists_every_problem(ws: Workspace, monkeypatch) -> None:
    from dataclasses import replace

    config = ws.config("not-s3")
    config = replace(
        config, method="Prefix", hyperparameters=replace(config.hyperparameters, learning_rate=0, epochs=1)
    )
    result = ws.run(config, monkeypatch)
    assert result.summary.reason == TrainerReason.INVALID_CONFIG
    for expected in (
        "method 'Prefix'",
        "dataset.train 'not-s3'",
        "learningRate must be > 0",
        "exactly one of epochs and maxSteps",
    ):
        assert expected in result.summary.message
