"""Preference tuning (DPO): the trainer's loss against a straightforward reference implementation, the pair
batches, and the preference data formats with their validation."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kubetune_devtools.tiny import build_tiny_model
from kubetune_trainer.contract import LoraConfig, TrainerReason
from kubetune_trainer.data import Tokenize, parse_records, tokenize_pairs
from kubetune_trainer.dpo import PreferenceExample, collate_pairs, dpo_loss, sequence_logps
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.fastpath import prepare_model
from kubetune_trainer.metrics import Metrics
from kubetune_trainer.model import apply_method
from kubetune_trainer.packing import IGNORE_INDEX
from kubetune_trainer.parallel import LossModel
from kubetune_trainer.schedule import Batching, Plan
from kubetune_trainer.train import LoopSettings, Runtime, StopFlag, Trainer, TrainState, make_optimizer


def jsonl(records: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


PAIRS = [
    {"prompt": "What is two plus two?", "chosen": " four", "rejected": " seven, or maybe nine"},
    {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "The number ten."}],
    },
    {
        "input": {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        },
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away, I am busy with the cluster."}],
    },
    {"prompt": "Which pod failed?", "chosen": " the trainer pod", "rejected": " none"},
    {
        "chosen": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "No, never."}],
    },
]


def tokenized_pairs(records: list[Any], tokenizer: Any) -> list[PreferenceExample]:
    parsed = parse_records([("pairs.jsonl", jsonl(records))])
    assert not parsed.problems and parsed.format == "Preference"
    pairs, _ = tokenize_pairs(parsed.pairs, Tokenize(tokenizer, 256, train_on_all=False), "pairs.jsonl")
    return pairs


def reference_sequence_logp(model: Any, input_ids: list[int], labels: list[int]) -> torch.Tensor:
    """Sum over t of log softmax(model(input_ids))[t - 1, input_ids[t]] where labels[t] is set: one
    sequence, one plain forward, the whole logits tensor."""
    logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    total = torch.zeros(())
    for t in range(1, len(input_ids)):
        if labels[t] != IGNORE_INDEX:
            total = total + logprobs[t - 1, input_ids[t]]
    return total


def reference_dpo_loss(
    policy: Any, reference: Any, pairs: list[PreferenceExample], beta: float, smoothing: float
) -> float:
    """The DPO objective written out: mean over pairs of
    -(1-eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h),
    h = log-ratio(chosen) - log-ratio(rejected)."""
    losses = []
    with torch.no_grad():
        for pair in pairs:
            ratios = []
            for side in (pair.chosen, pair.rejected):
                ratios.append(
                    reference_sequence_logp(policy, side.input_ids, side.labels)
                    - reference_sequence_logp(reference, side.input_ids, side.labels)
                )
            h = ratios[0] - ratios[1]
            loss = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
            losses.append(float(loss))
    return sum(losses) / len(losses)


def perturb_adapters(model: Any, seed: int) -> None:
    """LoRA B starts at zero (the adapted model equals its base); give it values so policy != reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_trainer_dpo_loss_equals_the_reference_implementation(packing: bool, smoothing: float) -> None:
    base, tokenizer = build_tiny_model(seed=3)
    plain_base = copy.deepcopy(base)  # eager attention, no adapters: the reference model written out
    pairs = tokenized_pairs(PAIRS, tokenizer)
    assert len(pairs) == 5

    prepare_model(base, "cpu")
    torch.manual_seed(0)
    policy = apply_method(base, "LoRA", LoraConfig(r=4, alpha=8, dropout=0.0))
    beta = 0.5
    micro_batches = [[0, 3], [1], [2, 4]]
    plan = Plan([micro_batches], [0], 1, Batching(64, None, 3))
    trainer = Trainer(
        LossModel(policy),
        make_optimizer(policy, 1e-3, 0.0),
        plan,
        pairs,
        [],
        [],
        LoopSettings(
            1e-3,
            "Constant",
            0.0,
            packing,
            tokenizer.pad_token_id,
            None,
            None,
            None,
            dpo_beta=beta,
            dpo_label_smoothing=smoothing,
        ),
        Runtime(torch.device("cpu"), 0, 1, None),
        None,
        Metrics(),
        StopFlag(),
        TrainState(),
    )
    # The reference: the model before its first step (fresh adapters: the base itself).
    trainer._prepare_reference()
    perturb_adapters(policy, seed=1)
    # The weights the loss is computed with (the optimizer step moves them afterwards).
    adapters = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}

    loss, tokens, _ = trainer.optimizer_step(micro_batches)

    plain_policy = apply_method(copy.deepcopy(plain_base), "LoRA", LoraConfig(r=4, alpha=8, dropout=0.0))
    assert not plain_policy.load_state_dict(adapters, strict=False).unexpected_keys
    want = reference_dpo_loss(plain_policy.eval(), plain_base.eval(), pairs, beta, smoothing)
    assert loss == pytest.approx(want, abs=1e-5)
    assert abs(want - (1 - smoothing) * math.log(2) - smoothing * math.log(2)) > 1e-3  # not the tie value
    assert tokens == sum(p.length for p in pairs)
    # The metrics of the step are means over its five pairs.
    assert trainer.state.preference_accuracy is not None and 0 <= trainer.state.preference_accuracy <= 1
    assert trainer.state.chosen_logps is not None and trainer.state.chosen_logps < 0


def test_packed_and_padded_pair_batches_give_the_same_log_probabilities() -> None:
    model, tokenizer = build_tiny_model(seed=5)
    prepare_model(model, "cpu")
    pairs = tokenized_pairs(PAIRS, tokenizer)
    indices = list(range(len(pairs)))
    with torch.no_grad():
        packed = sequence_logps(model, collate_pairs(pairs, indices, True, tokenizer.pad_token_id))
        padded = sequence_logps(model, collate_pairs(pairs, indices, False, tokenizer.pad_token_id))
        plain = torch.tensor(
            [
                [float(reference_sequence_logp(model, s.input_ids, s.labels)) for s in (p.chosen, p.rejected)]
                for p in pairs
            ]
        )
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(padded, plain, atol=1e-4, rtol=1e-5)


def test_dpo_loss_of_a_tie_is_log_two_and_rewards_follow_the_log_ratios() -> None:
    policy = torch.tensor([[-3.0, -5.0], [-2.0, -2.0]])
    reference = torch.tensor([[-4.0, -4.0], [-2.0, -2.0]])
    scores = dpo_loss(policy, reference, beta=0.1)
    # Pair 0: chosen gained 1 nat, rejected lost 1: margin 0.2. Pair 1: a tie.
    assert scores.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert scores.rejected_rewards.tolist() == pytest.approx([-0.1, 0.0])
    assert scores.losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.2)), math.log(2)])
    with pytest.raises(ValueError, match=r"\[pairs, 2\]"):
        dpo_loss(policy[:, :1], reference[:, :1], beta=0.1)


def test_pair_batches_keep_each_prediction_with_its_own_sequence() -> None:
    _, tokenizer = build_tiny_model(seed=0)
    pairs = tokenized_pairs(PAIRS[:2], tokenizer)
    for packing in (True, False):
        batch = collate_pairs(pairs, [7, 9], packing, tokenizer.pad_token_id)
        assert batch.pairs.tolist() == [7, 9] and batch.num_pairs == 2
        counted = torch.bincount(batch.sequence_of_prediction, minlength=4).tolist()
        sides = [s for p in pairs for s in (p.chosen, p.rejected)]
        assert counted == [sum(1 for label in s.labels[1:] if label != IGNORE_INDEX) for s in sides]


# ----------------------------------------------------------------------------------------------------
# Data formats
# ----------------------------------------------------------------------------------------------------


def test_preference_formats_share_the_prompt_and_train_only_the_answers() -> None:
    parsed = parse_records([("pairs.jsonl", jsonl(PAIRS))])
    assert parsed.format == "Preference" and not parsed.problems and not parsed.records
    assert [p.where for p in parsed.pairs] == [f"pairs.jsonl:{i}" for i in range(1, 6)]
    strings = parsed.pairs[0]
    assert strings.chosen.segments == (("What is two plus two?", False), (" four", True))
    assert strings.rejected.segments == (("What is two plus two?", False), (" seven, or maybe nine", True))
    openai = parsed.pairs[2]
    assert [(t.role, t.train) for t in openai.chosen.turns] == [
        ("system", False),
        ("user", False),
        ("assistant", True),
    ]
    assert openai.rejected.turns[-1].content.startswith("Go away")
    implicit = parsed.pairs[4]  # no prompt key: the shared prefix is the prompt
    assert [(t.content, t.train) for t in implicit.chosen.turns] == [("Say yes.", False), ("Yes.", True)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Q", "chosen": " same", "rejected": " same"}, "identical"),
        ({"prompt": "Q", "chosen": " ", "rejected": " no"}, "'chosen' is empty"),
        (
            {
                "prompt": [{"role": "user", "content": "A?"}],
                "chosen": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "assistant", "content": "c"}],
            },
            "'prompt' is not a prefix of 'chosen'",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "Hi"}]},
                "preferred_output": [{"role": "assistant", "content": "Hello"}],
                "non_preferred_output": [],
            },
            "'non_preferred_output' is an empty list",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "y"}],
                "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "y"}],
            },
            "no assistant answer after the prompt",
        ),
    ],
)
def test_bad_pairs_fail_with_their_line_number(record: dict[str, Any], message: str) -> None:
    good = PAIRS[0]
    parsed = parse_records([("pairs.jsonl", jsonl([good, good, record, good]))])
    assert [where for where, _ in parsed.problems] == ["pairs.jsonl:3"]
    assert message in parsed.problems[0][1]


def test_a_bad_pair_fails_the_job_with_invalid_dataset(ws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from kubetune_trainer.contract import DpoConfig

    train = ws.put("data/pairs.jsonl", jsonl([*PAIRS, {"prompt": "Q", "chosen": " a", "rejected": " a"}]))
    config = replace(ws.config(train), method="DPO", dpo=DpoConfig())
    result = ws.run(config, monkeypatch)
    assert result.code == 2
    assert result.summary.reason == TrainerReason.INVALID_DATASET
    assert "pairs.jsonl:6: 'chosen' and 'rejected' are identical" in result.summary.message
    assert "1 malformed record(s)" in result.summary.message


def test_sft_on_preference_data_and_dpo_on_sft_data_are_refused(
    ws: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from kubetune_trainer.contract import DpoConfig

    pairs = ws.put("data/pairs.jsonl", jsonl(PAIRS))
    sft = ws.put("data/sft.jsonl", jsonl([{"prompt": "Q", "completion": " A"}]))
    refused = ws.run(ws.config(pairs), monkeypatch)
    assert refused.summary.reason == TrainerReason.INVALID_DATASET
    assert "only method DPO trains on" in refused.summary.message
    refused = ws.run(replace(ws.config(sft), method="DPO", dpo=DpoConfig()), monkeypatch)
    assert refused.summary.reason == TrainerReason.INVALID_DATASET
    assert "holds PromptCompletion records; method DPO trains on preference pairs" in refused.summary.message


def test_truncation_drops_a_pair_left_without_an_answer() -> None:
    _, tokenizer = build_tiny_model(seed=0)
    long_prompt = "tokens " * 80
    parsed = parse_records(
        [("p.jsonl", jsonl([{"prompt": long_prompt, "chosen": " a", "rejected": " b"}, PAIRS[0]]))]
    )
    pairs, stats = tokenize_pairs(parsed.pairs, Tokenize(tokenizer, 32, train_on_all=False), "p.jsonl")
    assert len(pairs) == 1 and stats.dropped_no_labels == 1 and stats.truncated == 1
    with pytest.raises(TrainerError) as err:
        tokenize_pairs(parsed.pairs[:1], Tokenize(tokenizer, 32, train_on_all=False), "p.jsonl")
    assert err.value.reason == TrainerReason.EMPTY_DATASET


def test_reference_values_of_the_wrong_shape_are_refused_with_what_to_do() -> None:
    model, tokenizer = build_tiny_model(seed=0)
    pairs = tokenized_pairs(PAIRS, tokenizer)
    settings = LoopSettings(
        1e-3, "Constant", 0.0, True, tokenizer.pad_token_id, None, None, None, dpo_beta=0.1
    )
    trainer = Trainer(
        LossModel(model),
        make_optimizer(model, 1e-3, 0.0),
        Plan([[[0, 1]]], [0], 1, Batching(64, None, 1)),
        pairs,
        [],
        [],
        settings,
        Runtime(torch.device("cpu"), 0, 1, None),
        None,
        Metrics(),
        StopFlag(),
        TrainState(reference=[[-1.0, -2.0]] * 4),  # a checkpoint of a dataset with 4 pairs, not 5
    )
    with pytest.raises(TrainerError) as err:
        trainer._prepare_reference()
    assert err.value.reason == TrainerReason.INVALID_CONFIG
    assert "5 preference pairs" in err.value.message and "delete the job's checkpoints" in err.value.message
    trainer.state.reference = [[-1.0, float("nan")]] * 5
    with pytest.raises(TrainerError):
        trainer._prepare_reference()


def test_a_micro_step_is_planned_to_hold_a_whole_pair() -> None:
    from dataclasses import replace

    from kubetune_trainer.contract import DatasetConfig, DpoConfig, Hyperparameters, TrainerConfig
    from kubetune_trainer.recipe import plan_memory

    model, _ = build_tiny_model(seed=0)
    model_config = model.config.to_dict()
    sft = TrainerConfig(
        method="LoRA",
        dataset=DatasetConfig(train="s3://d/t.jsonl", max_seq_length=128),
        hyperparameters=Hyperparameters(max_steps=1, batch_tokens=200),
    )
    dpo = replace(sft, method="DPO", dpo=DpoConfig())
    # A step of 200 tokens: an SFT micro-step takes 200 of them; one pair may be 2 x 128 tokens long.
    on_cpu = {"device_type": "cpu", "processes": 1, "capacity": None}
    assert plan_memory(sft, model_config, **on_cpu).summary()["microStepTokens"] == 200
    assert plan_memory(dpo, model_config, **on_cpu).summary()["microStepTokens"] == 256
