"""Data formats, Auto detection, columnMap, chat templates and label masks, checked at exact positions."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_devtools.tiny import build_tiny_tokenizer
from kubetune_trainer.data import (
    DEFAULT_CHAT_TEMPLATE,
    Record,
    Tokenize,
    Turn,
    parse_records,
    split_validation,
    tokenize_records,
)
from kubetune_trainer.packing import IGNORE_INDEX

IM_END = "<|im_end|>"


def parse_one(record: dict[str, Any], fmt: str = "Auto", column_map: dict[str, str] | None = None) -> Record:
    result = parse_records([("d.jsonl", (json.dumps(record) + "\n").encode())], fmt, column_map)
    assert result.problems == []
    assert len(result.records) == 1
    return result.records[0]


def labelled_spans(input_ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of positions that carry a label."""
    spans: list[tuple[int, int]] = []
    for position, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        assert label == input_ids[position], "a label must be the token at its own position"
        if spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    return spans


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok() -> Any:
    return build_tiny_tokenizer(chat_template=False)


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}{IM_END}\n" for role, content in turns)


def test_messages_label_only_the_assistant_turn_and_its_end_marker(tok: Any) -> None:
    record = parse_one(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Four."},
            ]
        }
    )
    example = Tokenize(tok, 512, train_on_all=False)(record)
    prompt = chatml(("system", "Be brief."), ("user", "What is two plus two?")) + "<|im_start|>assistant\n"
    start = n_tokens(tok, prompt)
    assert example.input_ids == tok(prompt + "Four." + IM_END + "\n", add_special_tokens=False)["input_ids"]
    assert labelled_spans(example.input_ids, example.labels) == [(start, len(example.input_ids))]
    assert tok.decode(example.input_ids[start:]) == "Four." + IM_END + "\n"


def test_multi_turn_conversation_labels_each_assistant_turn(tok: Any) -> None:
    turns = [("user", "hello"), ("assistant", "hello there"), ("user", "red or blue?"), ("assistant", "blue")]
    record = parse_one({"messages": [{"role": r, "content": c} for r, c in turns]})
    example = Tokenize(tok, 512, train_on_all=False)(record)
    first_start = n_tokens(tok, chatml(turns[0]) + "<|im_start|>assistant\n")
    first_end = n_tokens(tok, chatml(*turns[:2]))
    second_start = n_tokens(tok, chatml(*turns[:3]) + "<|im_start|>assistant\n")
    assert labelled_spans(example.input_ids, example.labels) == [
        (first_start, first_end),
        (second_start, len(example.input_ids)),
    ]
    assert tok.decode(example.input_ids[first_start:first_end]) == "hello there" + IM_END + "\n"
    assert tok.decode(example.input_ids[second_start:]) == "blue" + IM_END + "\n"


def test_train_on_all_labels_every_token(tok: Any) -> None:
    record = parse_one(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    )
    example = Tokenize(tok, 512, train_on_all=True)(record)
    assert example.labels == example.input_ids


def test_prompt_completion_strings_label_the_completion_and_eos(tok: Any) -> None:
    record = parse_one({"prompt": "The color of the sky is", "completion": " blue"})
    example = Tokenize(tok, 512, train_on_all=False)(record)
    prompt_len = n_tokens(tok, "The color of the sky is")
    assert example.input_ids[-1] == tok.eos_token_id
    assert labelled_spans(example.input_ids, example.labels) == [(prompt_len, len(example.input_ids))]
    assert tok.decode(example.input_ids[prompt_len:]) == " blue</s>"


def test_prompt_completion_message_lists_label_only_the_completion(tok: Any) -> None:
    record = parse_one(
        {
            "prompt": [{"role": "user", "content": "yes or no?"}],
            "completion": [{"role": "assistant", "content": "no"}],
        }
    )
    example = Tokenize(tok, 512, train_on_all=False)(record)
    start = n_tokens(tok, chatml(("user", "yes or no?")) + "<|im_start|>assistant\n")
    assert labelled_spans(example.input_ids, example.labels) == [(start, len(example.input_ids))]
    assert tok.decode(example.input_ids[start:]) == "no" + IM_END + "\n"


def test_sharegpt_maps_human_and_gpt_to_user_and_assistant(tok: Any) -> None:
    record = parse_one(
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        }
    )
    assert [(t.role, t.train) for t in record.turns] == [
        ("system", False),
        ("user", False),
        ("assistant", True),
    ]
    example = Tokenize(tok, 512, train_on_all=False)(record)
    start = n_tokens(tok, chatml(("system", "sys"), ("user", "q")) + "<|im_start|>assistant\n")
    assert labelled_spans(example.input_ids, example.labels) == [(start, len(example.input_ids))]


def test_alpaca_joins_instruction_and_input_into_the_user_turn(tok: Any) -> None:
    record = parse_one({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert record.turns == (Turn("user", "Add the numbers.\n\n2 and 3", False), Turn("assistant", "5", True))
    no_input = parse_one({"instruction": "Say yes.", "input": "", "output": "yes"})
    assert no_input.turns[0] == Turn("user", "Say yes.", False)
    example = Tokenize(tok, 512, train_on_all=False)(record)
    start = n_tokens(tok, chatml(("user", "Add the numbers.\n\n2 and 3")) + "<|im_start|>assistant\n")
    assert tok.decode(example.input_ids[start:]) == "5" + IM_END + "\n"
    assert labelled_spans(example.input_ids, example.labels) == [(start, len(example.input_ids))]


def test_text_labels_everything_and_ends_with_eos(tok: Any) -> None:
    record = parse_one({"text": "the cat and the dog"})
    example = Tokenize(tok, 512, train_on_all=False)(record)
    assert example.input_ids == tok("the cat and the dog", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert example.labels == example.input_ids


def test_default_template_applies_when_the_tokenizer_has_none(plain_tok: Any) -> None:
    assert not plain_tok.chat_template
    record = parse_one(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    )
    tokenize = Tokenize(plain_tok, 512, train_on_all=False)
    assert tokenize.template == DEFAULT_CHAT_TEMPLATE
    example = tokenize(record)
    prompt = "user:\nhi</s>\nassistant:\n"
    start = n_tokens(plain_tok, prompt)
    assert plain_tok.decode(example.input_ids) == prompt + "yes</s>\n"
    assert labelled_spans(example.input_ids, example.labels) == [(start, len(example.input_ids))]
    assert plain_tok.decode(example.input_ids[start:]) == "yes</s>\n"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [], "prompt": "x", "completion": "y"}, "Messages"),
        ({"prompt": "x", "completion": "y", "text": "z"}, "PromptCompletion"),
        ({"conversations": [{"from": "gpt", "value": "x"}]}, "ShareGPT"),
        ({"instruction": "x", "output": "y", "text": "z"}, "Alpaca"),
        ({"text": "x"}, "Text"),
    ],
)
def test_auto_detection_follows_the_documented_key_order(record: dict[str, Any], expected: str) -> None:
    result = parse_records([("d.jsonl", (json.dumps(record) + "\n").encode())])
    assert result.format == expected


def test_column_map_renames_dataset_keys_to_ours() -> None:
    record = parse_one(
        {"question": "q?", "answer": "a."}, column_map={"prompt": "question", "completion": "answer"}
    )
    assert record.segments == (("q?", False), ("a.", True))
    nested = parse_one(
        {"dialog": [{"speaker": "user", "text_": "hi"}, {"speaker": "assistant", "text_": "yo"}]},
        fmt="Messages",
        column_map={"messages": "dialog", "role": "speaker", "content": "text_"},
    )
    assert [t.content for t in nested.turns] == ["hi", "yo"]


def test_json_array_and_parquet_files_are_read() -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    result = parse_records([("x.json", json.dumps(rows).encode()), ("y.parquet", buffer.getvalue())])
    assert result.problems == []
    assert [r.where for r in result.records] == [
        "x.json[0]",
        "x.json[1]",
        "y.parquet:row 1",
        "y.parquet:row 2",
    ]


def test_truncation_is_counted_and_examples_left_without_labels_are_dropped(tok: Any) -> None:
    long_prompt = "one two three " * 40
    records = [
        parse_one({"prompt": "short", "completion": " answer " * 30}),  # truncated, keeps labels
        parse_one({"prompt": long_prompt, "completion": " x"}),  # truncated inside the prompt: no labels left
        parse_one({"prompt": "a", "completion": " b"}),
    ]
    examples, stats = tokenize_records(records, Tokenize(tok, 32, train_on_all=False), "s3://b/d.jsonl")
    assert stats.truncated == 2
    assert stats.dropped_no_labels == 1
    assert len(examples) == 2 and all(len(e.input_ids) <= 32 for e in examples)
    assert len(examples[0].input_ids) == 32


def test_validation_split_is_deterministic_and_disjoint() -> None:
    train, held = split_validation(100, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(100))
    assert split_validation(100, 0.1, seed=3) == (train, held)
    assert split_validation(100, 0.1, seed=4) != (train, held)
