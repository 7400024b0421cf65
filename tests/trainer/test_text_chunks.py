"""dataset.textMode Chunk: a Text record longer than maxSeqLength becomes windows that together train on every
token of the record once, and no window spans two records. Checked by counting tokens: each token position
of each record, looked up through the windows, is a prediction target exactly once."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from kubetune_devtools.tiny import build_tiny_tokenizer
from kubetune_trainer.data import Record, Tokenize, parse_records, text_windows, tokenize_records
from kubetune_trainer.packing import IGNORE_INDEX, collate_packed

MAX = 32


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


def text_records(*texts: str) -> list[Record]:
    files = [("d.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())]
    parsed = parse_records(files, "Text")
    assert not parsed.problems
    return parsed.records


def whole(tok: Any, record: Record) -> list[int]:
    """The record's tokens as one sequence (no length limit): the reference the windows must cover."""
    return Tokenize(tok, 10**6, train_on_all=False)(record).input_ids


def locate(windows: list[list[int]], sequences: list[list[int]]) -> list[tuple[int, int]]:
    """For each window, the (record, start) at which it is a contiguous slice of one record, in order:
    windows come out record by record, each starting at or after the previous one."""
    placed = []
    record, start = 0, 0
    for window in windows:
        while True:
            sequence = sequences[record]
            found = next(
                (s for s in range(start, len(sequence)) if sequence[s : s + len(window)] == window), None
            )
            if found is not None:
                placed.append((record, found))
                start = found
                break
            record, start = record + 1, 0
            assert record < len(sequences), f"window {window[:5]}... is a slice of no single record"
    return placed


def test_windows_tile_the_targets_of_a_sequence_once() -> None:
    for length in (1, 2, MAX - 1, MAX, MAX + 1, 2 * MAX, 5 * MAX + 7, 1000):
        spans = text_windows(length, MAX)
        assert all(0 < end - start <= MAX for start, end in spans)
        assert spans[0][0] == 0 and spans[-1][1] == length
        # Targets of a window are its positions after the first; every position but 0 is one exactly once.
        targets = Counter(p for start, end in spans for p in range(start + 1, end))
        assert sorted(targets) == list(range(1, length)) and set(targets.values()) <= {1}


def test_long_text_records_train_on_every_token_once_and_windows_stay_inside_a_record(tok: Any) -> None:
    long_a = " ".join(f"alpha{i}" for i in range(90))
    long_b = " ".join(f"beta{i} gamma" for i in range(70))
    records = text_records(long_a, "a short one", long_b)
    sequences = [whole(tok, r) for r in records]
    assert len(sequences[0]) > 3 * MAX and len(sequences[2]) > 3 * MAX and len(sequences[1]) < MAX

    examples, stats = tokenize_records(records, Tokenize(tok, MAX, train_on_all=False), "s3://b/d", True)

    assert all(len(e.input_ids) <= MAX for e in examples)
    assert stats.chunked == 2 and stats.truncated == 0 and stats.examples == len(examples)
    placed = locate([e.input_ids for e in examples], sequences)
    # Count, per (record, token position), how often it is a loss target once the examples are collated
    # (the collator never scores an example's first token).
    batch = collate_packed(examples)
    trained: Counter[tuple[int, int]] = Counter()
    offset = 0
    for example, (record, start) in zip(examples, placed, strict=True):
        labels = batch.labels[0, offset : offset + len(example.input_ids)].tolist()
        trained.update((record, start + i) for i, label in enumerate(labels) if label != IGNORE_INDEX)
        offset += len(example.input_ids)
    expected = {(r, p) for r, sequence in enumerate(sequences) for p in range(1, len(sequence))}
    assert set(trained) == expected
    assert set(trained.values()) == {1}
    assert batch.num_label_tokens == stats.label_tokens == sum(len(s) - 1 for s in sequences)


def test_truncate_keeps_only_the_head_of_a_long_text_record(tok: Any) -> None:
    records = text_records(" ".join(f"alpha{i}" for i in range(90)))
    examples, stats = tokenize_records(records, Tokenize(tok, MAX, train_on_all=False), "s3://b/d", False)
    assert len(examples) == 1 and stats.truncated == 1 and stats.chunked == 0
    assert examples[0].input_ids == whole(tok, records[0])[:MAX]
