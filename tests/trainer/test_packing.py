"""Unit tests for micro-step packing and the two collators."""

from __future__ import annotations

import random

import pytest
import torch

from kubetune_trainer.packing import IGNORE_INDEX, Example, collate_packed, collate_padded, pack


def make_example(length: int, prompt: int = 0, start: int = 1) -> Example:
    ids = list(range(start, start + length))
    return Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])


def test_pack_uses_every_index_once_and_respects_the_budget() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    groups = pack(lengths, token_budget=1000)
    flat = sorted(index for group in groups for index in group)
    assert flat == list(range(500))
    for group in groups:
        assert sum(lengths[i] for i in group) <= 1000
    # Best-fit decreasing wastes little: total tokens / (groups * budget) is high.
    assert sum(lengths) / (len(groups) * 1000) > 0.95


def test_pack_gives_an_oversized_example_its_own_micro_step() -> None:
    groups = pack([10, 5000, 20, 1000], token_budget=1000)
    assert [1] in groups
    assert [3] in groups
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]


def test_pack_is_deterministic_and_orders_groups_by_first_index() -> None:
    lengths = [7, 3, 9, 3, 3, 8, 1, 2, 9, 4]
    first = pack(lengths, token_budget=10)
    assert first == pack(list(lengths), token_budget=10)
    assert [g[0] for g in first] == sorted(g[0] for g in first)
    for group in first:
        assert group == sorted(group)


def test_pack_fills_bins_best_fit() -> None:
    # Placing long examples first pairs 4+6 twice; filling in input order (4+4, 6, 6) would need three bins.
    assert pack([4, 4, 6, 6], token_budget=10) == [[0, 2], [1, 3]]
    # Best fit: the 2 goes to the bin with exactly 2 left (after 8), not to the one holding 5.
    assert pack([5, 8, 2], token_budget=10) == [[0], [1, 2]]


@pytest.mark.parametrize(
    ("lengths", "budget", "message"), [([3, 0], 10, "example 1"), ([3], 0, "token_budget")]
)
def test_pack_rejects_bad_input(lengths: list[int], budget: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack(lengths, budget)


def test_collate_packed_flattens_with_restarting_positions_and_boundaries() -> None:
    batch = collate_packed([make_example(3, prompt=1), make_example(4, prompt=2, start=50), make_example(2)])
    assert batch.input_ids.tolist() == [[1, 2, 3, 50, 51, 52, 53, 1, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 9]
    assert batch.max_seqlen == 4
    assert batch.num_tokens == 9
    # Each example's first label is ignored: no prediction is scored against the next example's first token.
    assert batch.labels.tolist() == [[-100, 2, 3, -100, -100, 52, 53, -100, 2]]
    assert batch.num_label_tokens == 5
    assert batch.seq_lengths == (3, 4, 2)
    # The loss reads the prediction at position t against the label at t + 1, never across a boundary.
    assert batch.prediction_positions.tolist() == [0, 1, 4, 5, 7]
    assert batch.prediction_targets.tolist() == [2, 3, 52, 53, 2]


def test_collate_padded_pads_right_and_counts_real_tokens() -> None:
    batch = collate_padded([make_example(3, prompt=1), make_example(1)], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch.num_tokens == 4
    assert batch.num_label_tokens == 2
    assert batch.padded_tokens == 6
    assert batch.prediction_positions.tolist() == [0, 1]
    assert batch.prediction_targets.tolist() == [2, 3]


def test_batches_move_with_to() -> None:
    packed = collate_packed([make_example(3)]).to("cpu")
    padded = collate_padded([make_example(3)], pad_id=0).to("meta")
    assert packed.input_ids.device.type == "cpu"
    assert padded.input_ids.device.type == "meta" and padded.num_tokens == 3


@pytest.mark.parametrize("collate", [collate_packed, lambda e: collate_padded(e, pad_id=0)])
def test_collators_reject_bad_examples(collate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no examples"):
        collate([])
    with pytest.raises(ValueError, match="example 1 has 2 input_ids but 1 labels"):
        collate([make_example(2), Example(input_ids=[1, 2], labels=[1])])
