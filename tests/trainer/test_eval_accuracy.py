"""Evaluation's token accuracy (status.metrics.evalTokenAccuracy) against a plain loop over the logits of the
unmodified transformers model: per example, the arg-max at position t against the label of token t + 1,
counted over the tokens whose labels count in the loss."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kubetune_devtools.tiny import build_tiny_model
from kubetune_trainer import fastpath
from kubetune_trainer.packing import IGNORE_INDEX, Example, collate_packed, collate_padded


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any, Any]:
    model, tokenizer = build_tiny_model(seed=0)
    model.float().eval()
    fast = copy.deepcopy(model)
    fastpath.prepare_model(fast, "cpu")
    fastpath.causal_lm(model).set_attn_implementation("sdpa")
    return model, fast, tokenizer


def reference(model: Any, examples: list[Example]) -> tuple[float, int, int]:
    """(summed CE, label tokens, label tokens predicted exactly), one example at a time."""
    loss, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].float()
            for t in range(len(example.input_ids) - 1):
                target = example.labels[t + 1]
                if target == IGNORE_INDEX:
                    continue
                count += 1
                correct += int(int(logits[t].argmax()) == target)
                loss += float(F.cross_entropy(logits[t][None], torch.tensor([target])))
    return loss, count, correct


def examples_half_predictable(model: Any, vocab: int, seed: int = 3) -> list[Example]:
    """Random token sequences whose labels (the prompt third masked) are, at every other position, the token
    the model predicts there, and a different token elsewhere, so about half of them are hits."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in (7, 30, 2, 45, 16):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        with torch.no_grad():
            predicted = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        labels = [IGNORE_INDEX] * length
        for t in range(length // 3, length - 1):
            hit = t % 2 == 0
            labels[t + 1] = predicted[t] if hit else (predicted[t] + 1) % vocab
        examples.append(Example(input_ids=ids, labels=labels))
    return examples


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_eval_sums_match_a_plain_loop_over_logits_and_labels(
    models: tuple[Any, Any, Any], layout: str
) -> None:
    model, fast, tokenizer = models
    examples = examples_half_predictable(model, fastpath.causal_lm(model).config.vocab_size)
    want_loss, want_count, want_correct = reference(model, examples)
    assert 0 < want_correct < want_count  # neither all hits nor none: the count itself is checked

    batch = (
        collate_packed(examples) if layout == "packed" else collate_padded(examples, tokenizer.pad_token_id)
    )
    loss, count, correct = fastpath.eval_sums(fast, batch)

    assert count == want_count
    assert int(correct) == want_correct
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    # The evaluation's loss is the training loss's: the same sum the step computes.
    with torch.no_grad():
        train_loss, _ = fastpath.loss_sum(fast, batch)
    assert float(loss) == pytest.approx(float(train_loss), rel=1e-6)
