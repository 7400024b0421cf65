"""Reading the trainer's Prometheus text exposition (metric names from the shared contract)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer import contract


@dataclass(frozen=True)
class TrainerSample:
    """One scrape of the trainer pod; a field is None when the trainer did not report it (yet)."""

    step: float | None = None
    total_steps: float | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: float | None = None
    eta_seconds: float | None = None
    eval_token_accuracy: float | None = None
    reward_margin: float | None = None
    preference_accuracy: float | None = None
    chosen_logps: float | None = None
    rejected_logps: float | None = None
    eval_reward_margin: float | None = None
    eval_preference_accuracy: float | None = None


_METRIC_FIELDS: dict[str, str] = {
    contract.METRIC_STEP: "step",
    contract.METRIC_TOTAL_STEPS: "total_steps",
    contract.METRIC_EPOCH: "epoch",
    contract.METRIC_TRAIN_LOSS: "train_loss",
    contract.METRIC_EVAL_LOSS: "eval_loss",
    contract.METRIC_BEST_EVAL_LOSS: "best_eval_loss",
    contract.METRIC_BEST_STEP: "best_step",
    contract.METRIC_LEARNING_RATE: "learning_rate",
    contract.METRIC_GRAD_NORM: "grad_norm",
    contract.METRIC_TOKENS_PER_SECOND: "tokens_per_second",
    contract.METRIC_TRAINED_TOKENS: "trained_tokens",
    contract.METRIC_ETA_SECONDS: "eta_seconds",
    contract.METRIC_EVAL_TOKEN_ACCURACY: "eval_token_accuracy",
    contract.METRIC_REWARD_MARGIN: "reward_margin",
    contract.METRIC_PREFERENCE_ACCURACY: "preference_accuracy",
    contract.METRIC_CHOSEN_LOGPS: "chosen_logps",
    contract.METRIC_REJECTED_LOGPS: "rejected_logps",
    contract.METRIC_EVAL_REWARD_MARGIN: "eval_reward_margin",
    contract.METRIC_EVAL_PREFERENCE_ACCURACY: "eval_preference_accuracy",
}
assert set(_METRIC_FIELDS.values()) == {f.name for f in fields(TrainerSample)}


class MetricsParseError(ValueError):
    """The trainer's /metrics answer is not Prometheus text. The message never quotes the answer: it comes
    from a tenant's pod and ends up in the operator's log."""


def parse_trainer_metrics(text: str) -> TrainerSample:
    """Pick the contract's gauges out of a /metrics page. Other metrics are ignored; NaN and infinite
    values (e.g. an eval loss before the first evaluation) count as not reported."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                field_name = _METRIC_FIELDS.get(sample.name)
                if field_name is not None and math.isfinite(sample.value):
                    values[field_name] = float(sample.value)
    except (ValueError, IndexError, KeyError, TypeError):
        # The parser's own messages quote the offending line; say where instead.
        raise MetricsParseError(
            f"the trainer's /metrics answer ({len(text)} characters) is not Prometheus text exposition "
            "format; the pod must serve the metrics kubetune's trainer defines"
        ) from None
    return TrainerSample(**values)
