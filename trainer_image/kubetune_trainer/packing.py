"""Padding-free batching: group examples into micro-steps by a token budget and flatten them.

Label convention (the same one transformers uses): ``labels`` are aligned with ``input_ids`` and the model's
prediction at position ``t`` is scored against ``labels[t + 1]``. The collators below set the label of the
first token of every example to -100 (nothing predicts it anyway), so shifting the flattened stream by one
position never scores a prediction against the next example's first token.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized training example; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def pack(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group example indices into micro-steps of at most ``token_budget`` tokens (best-fit decreasing).

    - Deterministic: the same ``lengths`` always give the same groups (ties broken by example index).
    - An example longer than the budget gets a micro-step of its own.
    - Indices inside a group are ascending, and groups are ordered by their first index, so the data order
      survives as far as bin packing allows.
    """
    if token_budget < 1:
        raise ValueError(f"pack: token_budget must be >= 1, got {token_budget}")
    for index, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"pack: example {index} has length {length}; every example needs >= 1 token")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    # Open bins sorted by (remaining capacity, bin number): the best fit is the first bin whose remaining
    # capacity is at least the example's length.
    open_bins: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        if length >= token_budget:
            groups.append([index])
            continue
        position = bisect.bisect_left(open_bins, (length, -1))
        if position < len(open_bins):
            remaining, bin_number = open_bins.pop(position)
            groups[bin_number].append(index)
            remaining -= length
        else:
            bin_number = len(groups)
            groups.append([index])
            remaining = token_budget - length
        if remaining > 0:
            bisect.insort(open_bins, (remaining, bin_number))
    for group in groups:
        group.sort()
    groups.sort(key=lambda group: group[0])
    return groups


@dataclass
class PackedBatch:
    """Examples flattened into one row of ``num_tokens`` tokens, with the boundaries varlen attention needs.

    ``labels`` follow the module's convention (unshifted, first token of each example ignored).
    ``seq_lengths`` and ``max_seqlen`` are plain Python values so no device sync is needed to read them.
    """

    input_ids: torch.Tensor  # long [1, T]
    labels: torch.Tensor  # long [1, T]
    position_ids: torch.Tensor  # long [1, T], restarting at 0 for every example
    cu_seqlens: torch.Tensor  # int32 [n + 1]: example boundaries, cu_seqlens[0] == 0, cu_seqlens[-1] == T
    max_seqlen: int
    num_tokens: int
    num_label_tokens: int
    seq_lengths: tuple[int, ...]
    # Flat positions whose *next* token carries a label, and those labels: what the loss gathers, computed
    # here on the CPU so the training step needs no device sync to find them.
    prediction_positions: torch.Tensor  # long [num_label_tokens]
    prediction_targets: torch.Tensor  # long [num_label_tokens]

    def model_inputs(self) -> dict[str, torch.Tensor | int]:
        """The keyword arguments a transformers decoder takes for this row: the example boundaries in the
        names its flash/varlen attention path reads (see ``fastpath.kubetune_attention``)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            max_seqlen=self.max_seqlen,
            num_tokens=self.num_tokens,
            num_label_tokens=self.num_label_tokens,
            seq_lengths=self.seq_lengths,
            prediction_positions=self.prediction_positions.to(device, non_blocking=True),
            prediction_targets=self.prediction_targets.to(device, non_blocking=True),
        )


@dataclass
class PaddedBatch:
    """Examples right-padded to the longest one; ``num_tokens`` counts real (non-pad) tokens."""

    input_ids: torch.Tensor  # long [B, S]
    labels: torch.Tensor  # long [B, S], IGNORE_INDEX at pads and at each row's first token
    attention_mask: torch.Tensor  # long [B, S], 1 for real tokens
    num_tokens: int
    num_label_tokens: int
    prediction_positions: torch.Tensor  # long [num_label_tokens], flat indices into [B * S]
    prediction_targets: torch.Tensor  # long [num_label_tokens]

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            num_tokens=self.num_tokens,
            num_label_tokens=self.num_label_tokens,
            prediction_positions=self.prediction_positions.to(device, non_blocking=True),
            prediction_targets=self.prediction_targets.to(device, non_blocking=True),
        )


def _check_examples(examples: Sequence[Example], caller: str) -> None:
    if not examples:
        raise ValueError(f"{caller}: got no examples; a micro-step needs at least one")
    for index, example in enumerate(examples):
        if not example.input_ids:
            raise ValueError(f"{caller}: example {index} has no tokens")
        if len(example.input_ids) != len(example.labels):
            raise ValueError(
                f"{caller}: example {index} has {len(example.input_ids)} input_ids but "
                f"{len(example.labels)} labels; they must be the same length"
            )


def _predictions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the positions whose next token carries a label, and those labels ([B, S] input)."""
    following = labels[:, 1:]
    rows, columns = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + columns, following[rows, columns]


def collate_packed(examples: Sequence[Example]) -> PackedBatch:
    """Flatten ``examples`` into one padding-free row (see the module docstring for the label convention)."""
    _check_examples(examples, "collate_packed")
    seq_lengths = tuple(len(example.input_ids) for example in examples)
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu_seqlens = [0]
    num_label_tokens = 0
    for example, length in zip(examples, seq_lengths, strict=True):
        input_ids.extend(example.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:])
        positions.extend(range(length))
        cu_seqlens.append(cu_seqlens[-1] + length)
        num_label_tokens += sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
    label_tensor = torch.tensor([labels], dtype=torch.long)
    positions_of_predictions, targets = _predictions(label_tensor)
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        labels=label_tensor,
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_seqlen=max(seq_lengths),
        num_tokens=cu_seqlens[-1],
        num_label_tokens=num_label_tokens,
        seq_lengths=seq_lengths,
        prediction_positions=positions_of_predictions,
        prediction_targets=targets,
    )


def collate_padded(examples: Sequence[Example], pad_id: int) -> PaddedBatch:
    """Right-pad ``examples`` to the longest one (the layout the plain transformers loop uses)."""
    _check_examples(examples, "collate_padded")
    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    num_tokens = 0
    num_label_tokens = 0
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, 1:length] = torch.tensor(example.labels[1:], dtype=torch.long)
        attention_mask[row, :length] = 1
        num_tokens += length
        num_label_tokens += sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
    positions_of_predictions, targets = _predictions(labels)
    return PaddedBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        num_tokens=num_tokens,
        num_label_tokens=num_label_tokens,
        prediction_positions=positions_of_predictions,
        prediction_targets=targets,
    )
