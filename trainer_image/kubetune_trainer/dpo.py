"""Preference tuning (DPO): the math, as small pure helpers the training loop calls.

A preference pair is two examples sharing a prompt: the answer people preferred (chosen) and the other one
(rejected). A micro-batch holds whole pairs, both sides flattened into one padding-free row (or padded rows
with ``packing: false``), so one forward pass scores both.

DPO (Rafailov et al., 2023) trains the policy pi against a frozen reference model ref with

    margin = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss   = -(1 - eps) * log sigmoid(margin) - eps * log sigmoid(-margin)

where log pi(y) sums the log-probabilities of the answer's tokens (the labelled ones), beta sets how far the
policy may move from the reference, and eps (``labelSmoothing``) is the assumed share of pairs labelled the
wrong way round. ``beta * (log pi(y) - log ref(y))`` is y's implicit reward: ``rewardMargin`` is the chosen
reward minus the rejected one, ``preferenceAccuracy`` the share of pairs whose margin is positive (a tie,
as every pair is before the first step, counts one half).

The reference is the model before its first step (the base for fresh adapters, the starting adapter, or the
initial weights for Full). Its log-probabilities are computed once, before training, in evaluation mode, so
no second copy of the model is ever held; a checkpoint carries them so a resumed run keeps the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kubetune_trainer.packing import Example, PackedBatch, PaddedBatch, collate_packed, collate_padded

CHOSEN, REJECTED = 0, 1


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized preference pair."""

    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        """Tokens the pair takes in a micro-batch (both sides)."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class PairBatch:
    """Pairs flattened into one batch, chosen then rejected for each pair: sequence ``2 * i`` is pair i's
    chosen side and ``2 * i + 1`` its rejected one. ``sequence_of_prediction`` says which sequence each of
    the batch's prediction positions belongs to."""

    batch: PackedBatch | PaddedBatch
    pairs: torch.Tensor  # long [P]: the pairs' indices in their dataset (where their reference values are)
    sequence_of_prediction: torch.Tensor  # long [num_label_tokens], values in [0, 2P)
    num_pairs: int

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    @property
    def num_label_tokens(self) -> int:
        return self.batch.num_label_tokens

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            self.batch.to(device),
            self.pairs.to(device, non_blocking=True),
            self.sequence_of_prediction.to(device, non_blocking=True),
            self.num_pairs,
        )


def collate_pairs(
    pairs: Sequence[PreferenceExample], indices: Sequence[int], packing: bool, pad_id: int
) -> PairBatch:
    """The pairs ``pairs`` (dataset indices ``indices``) as one batch: packed by default, padded rows
    otherwise."""
    if len(pairs) != len(indices):
        raise ValueError(f"collate_pairs: {len(pairs)} pairs but {len(indices)} indices")
    sequences = [side for pair in pairs for side in (pair.chosen, pair.rejected)]
    batch: PackedBatch | PaddedBatch
    if packing:
        batch = collate_packed(sequences)
        # A prediction at flat position t belongs to the sequence whose span [start, end) holds t.
        ends = batch.cu_seqlens[1:].long()
        sequence = torch.bucketize(batch.prediction_positions, ends, right=True)
    else:
        batch = collate_padded(sequences, pad_id)
        sequence = torch.div(batch.prediction_positions, batch.input_ids.shape[1], rounding_mode="floor")
    return PairBatch(batch, torch.tensor(list(indices), dtype=torch.long), sequence, len(pairs))


def token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    config: object = None,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """log p(target_i | position i) for each row of ``hidden`` ([N, d] -> float32 [N]), chunk by chunk: only
    one chunk's [rows, vocab] logits exist at a time, and under autograd each chunk is recomputed in
    backward rather than kept."""
    softcap = getattr(config, "final_logit_softcapping", None)

    def chunk(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = head(rows).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    pieces = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows, target = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and rows.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(chunk, rows, target, use_reentrant=False))
        else:
            pieces.append(chunk(rows, target))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def sum_by_sequence(values: torch.Tensor, sequence: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Per-token values summed per sequence, as [pairs, 2] (column 0 chosen, column 1 rejected)."""
    totals = torch.zeros(2 * num_pairs, dtype=values.dtype, device=values.device)
    return totals.index_add(0, sequence, values).view(num_pairs, 2)


def sequence_logps(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Summed log-probabilities of each side's labelled tokens under ``model``: float32 [pairs, 2]."""
    from kubetune_trainer.fastpath import loss_chunk_rows, prediction_hidden

    hidden, head, config = prediction_hidden(model, batch.batch)
    vocab = int(getattr(config, "vocab_size", None) or getattr(head, "out_features", 32768))
    rows = loss_chunk_rows(vocab, hidden.device)
    logps = token_logps(hidden, batch.batch.prediction_targets, head, config, rows)
    return sum_by_sequence(logps, batch.sequence_of_prediction, batch.num_pairs)


@dataclass(frozen=True)
class PairScores:
    """Per pair: the DPO loss and the implicit rewards of both sides."""

    losses: torch.Tensor  # [P]
    chosen_rewards: torch.Tensor  # [P]
    rejected_rewards: torch.Tensor  # [P]


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> PairScores:
    """The DPO loss of each pair from [pairs, 2] summed log-probabilities (chosen, rejected) of the policy
    and the reference (see the module docstring)."""
    if policy.shape != reference.shape or policy.ndim != 2 or policy.shape[1] != 2:
        raise ValueError(
            f"dpo_loss: policy {tuple(policy.shape)} and reference {tuple(reference.shape)} must both be "
            "[pairs, 2]"
        )
    rewards = beta * (policy - reference.to(policy.dtype))
    margin = rewards[:, CHOSEN] - rewards[:, REJECTED]
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return PairScores(losses, rewards[:, CHOSEN].detach(), rewards[:, REJECTED].detach())


# What a step (or an evaluation) sums over its pairs; divided by the pair count they are its metrics.
STAT_FIELDS = ("loss", "reward_margin", "preference_accuracy", "chosen_logps", "rejected_logps")


def pair_stats(scores: PairScores, policy: torch.Tensor) -> torch.Tensor:
    """float64 [len(STAT_FIELDS)] sums over the pairs: loss, reward margin, preferred pairs (a tie counts one
    half), and the policy's chosen and rejected log-probabilities."""
    margin = (scores.chosen_rewards - scores.rejected_rewards).double()
    preferred = (margin > 0).double() + 0.5 * (margin == 0).double()
    detached = policy.detach().double()
    return torch.stack(
        [
            scores.losses.detach().double().sum(),
            margin.sum(),
            preferred.sum(),
            detached[:, CHOSEN].sum(),
            detached[:, REJECTED].sum(),
        ]
    )


def stats_as_means(totals: Sequence[float], pairs: float) -> dict[str, float]:
    """The summed statistics as means per pair, by field name."""
    return {name: float(value) / max(1.0, pairs) for name, value in zip(STAT_FIELDS, totals, strict=True)}
