"""The operator's side of evaluation: token accuracy in status.metrics (scraped and final), which step's
weights the result holds (status.adapter.selected / status.model.selected), an early stop in the Succeeded
message, the new spec fields rendered for the trainer, and the cross-field checks repeated from the CRD."""

from __future__ import annotations

from typing import Any

from operator_factories import (
    job_condition,
    make_job,
    make_pod,
    make_trainer_job,
    metrics_text,
    observed,
    owner_reference,
    parse,
    terminated,
    ts,
    with_status,
)

from kubetune_operator.builders.config_map import render_trainer_config
from kubetune_operator.config import OperatorConfig
from kubetune_operator.observed import Observed
from kubetune_operator.reconcile import Outcome, reconcile
from kubetune_operator.trainer_metrics import parse_trainer_metrics
from kubetune_operator.validation import validate
from kubetune_trainer import contract

Obj = dict[str, Any]


def _children(**kwargs: Any) -> Observed:
    """What a pass observes once the ConfigMap exists."""
    metadata = {"name": "a-config", "ownerReferences": [owner_reference()]}
    return observed(config_map={"kind": "ConfigMap", "metadata": metadata, "data": {}}, **kwargs)


def _summary(selected: contract.Selection, **fields: Any) -> str:
    """A successful trainer's termination message whose adapter record names ``selected``."""
    adapter = contract.AdapterRecord(
        uri="s3://adapters/support-bot/",
        files=["adapter_config.json", "adapter_model.safetensors"],
        size_bytes=1000,
        sha256="ab" * 32,
        base_model="s3://models/llama-3.2-1b/",
        selected=selected,
    )
    return contract.TerminationSummary(
        outcome="Succeeded", reason="Completed", message="done", adapter=adapter, **fields
    ).to_json()


def _finish(body: Obj, summary: str, config: OperatorConfig) -> Outcome:
    done = _children(
        trainer_job=make_trainer_job(succeeded=1, conditions=[job_condition("Complete")]),
        pods=[make_pod(phase="Succeeded", terminated=terminated(0, summary))],
    )
    outcome = None
    for seen in (observed(), done):
        outcome = reconcile(parse(body), seen, config)
        body = with_status(body, outcome.status)
    assert outcome is not None
    return outcome


def test_the_scrape_carries_eval_token_accuracy_into_status(config: OperatorConfig) -> None:
    text = metrics_text(
        **{
            contract.METRIC_STEP: 40,
            contract.METRIC_EVAL_LOSS: 1.25,
            contract.METRIC_EVAL_TOKEN_ACCURACY: 0.6875,
        }
    )
    sample = parse_trainer_metrics(text)
    assert sample.eval_token_accuracy == 0.6875
    running = _children(
        trainer_job=make_trainer_job(active=1),
        pods=[make_pod(phase="Running", ip="10.0.0.7", running_since=ts(30))],
        sample=sample,
    )
    body = make_job()
    outcome = reconcile(parse(body), observed(), config)
    outcome = reconcile(parse(with_status(body, outcome.status)), running, config)
    assert outcome.status.metrics is not None
    assert outcome.status.metrics.eval_token_accuracy == 0.6875
    assert outcome.status.to_dict()["metrics"]["evalTokenAccuracy"] == 0.6875


def test_best_eval_selection_and_early_stop_land_in_status_and_message(config: OperatorConfig) -> None:
    summary = _summary(
        contract.Selection(select="BestEval", step=28, eval_loss=1.234567),
        metrics={"evalLoss": 1.4, "bestEvalLoss": 1.234567, "bestStep": 28, "evalTokenAccuracy": 0.5},
        early_stop=contract.EarlyStop(
            step=40, total_steps=200, patience=3, best_step=28, best_eval_loss=1.234567
        ),
    )
    body = make_job(
        dataset={"train": "s3://d/train.jsonl", "validation": "s3://d/val.jsonl"},
        output={"uri": "s3://adapters/support-bot/", "select": "BestEval"},
    )
    status = _finish(body, summary, config).status
    assert status.adapter is not None
    assert status.to_dict()["adapter"]["selected"] == {"select": "BestEval", "step": 28, "evalLoss": 1.2346}
    assert status.metrics is not None and status.metrics.eval_token_accuracy == 0.5
    succeeded = next(c for c in status.conditions if c.type == "Succeeded")
    assert (succeeded.status, succeeded.reason) == ("True", "Completed")
    assert "stopped early after step 40 of 200" in succeeded.message
    assert "did not improve in 3 evaluations (best 1.235 at step 28)" in succeeded.message
    assert "holds the weights of step 28 (output.select BestEval, validation loss 1.235)" in succeeded.message


def test_a_last_step_result_reads_as_before(config: OperatorConfig) -> None:
    summary = _summary(contract.Selection(select="Last", step=420, eval_loss=None))
    status = _finish(make_job(), summary, config).status
    assert status.message == "adapter written to s3://adapters/support-bot/"
    assert status.to_dict()["adapter"]["selected"] == {"select": "Last", "step": 420}


def test_a_selection_with_values_status_cannot_hold_is_left_out(config: OperatorConfig) -> None:
    summary = _summary(contract.Selection(select="Whatever", step=-3))
    status = _finish(make_job(), summary, config).status
    assert status.adapter is not None and status.adapter.selected is None
    assert status.adapter.sha256 == "ab" * 32


def test_new_spec_fields_are_rendered_for_the_trainer(config: OperatorConfig) -> None:
    job = parse(
        make_job(
            dataset={
                "train": "s3://d/train.jsonl",
                "validationSplit": 0.1,
                "format": "Text",
                "textMode": "Truncate",
            },
            hyperparameters={"maxSteps": 100, "earlyStoppingPatience": 4},
            output={"uri": "s3://adapters/x/", "select": "BestEval"},
        )
    )
    rendered = render_trainer_config(job, config)
    assert rendered.dataset.text_mode == "Truncate"
    assert rendered.hyperparameters.early_stopping_patience == 4
    assert rendered.output.select == "BestEval"
    defaults = render_trainer_config(parse(make_job()), config)
    assert (defaults.dataset.text_mode, defaults.output.select) == ("Chunk", "Last")
    assert defaults.hyperparameters.early_stopping_patience is None


def test_best_eval_and_early_stopping_without_a_validation_set_are_refused() -> None:
    job = parse(
        make_job(
            hyperparameters={"maxSteps": 100, "earlyStoppingPatience": 2},
            output={"uri": "s3://adapters/x/", "select": "BestEval"},
        )
    )
    problems = validate(job)
    assert any(p.startswith("spec.output.select: BestEval needs a validation set") for p in problems)
    assert any(
        p.startswith("spec.hyperparameters.earlyStoppingPatience: needs a validation set") for p in problems
    )
    with_split = parse(
        make_job(
            dataset={"train": "s3://d/train.jsonl", "validationSplit": 0.2},
            hyperparameters={"maxSteps": 100, "earlyStoppingPatience": 2},
            output={"uri": "s3://adapters/x/", "select": "BestEval"},
        )
    )
    assert validate(with_split) == []


def test_an_accuracy_outside_0_to_1_is_not_written(config: OperatorConfig) -> None:
    body = make_job()
    outcome = reconcile(parse(body), observed(), config)
    for reported, kept in ((0.75, 0.75), (1.5, 0.75), (-0.1, 0.75), (1.0, 1.0)):
        text = metrics_text(**{contract.METRIC_STEP: 10, contract.METRIC_EVAL_TOKEN_ACCURACY: reported})
        running = _children(
            trainer_job=make_trainer_job(active=1),
            pods=[make_pod(phase="Running", ip="10.0.0.7", running_since=ts(30))],
            sample=parse_trainer_metrics(text),
        )
        body = with_status(body, outcome.status)
        outcome = reconcile(parse(body), running, config)
        assert outcome.status.metrics is not None
        assert outcome.status.metrics.eval_token_accuracy == kept, reported
