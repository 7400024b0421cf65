"""metav1.Condition semantics, documented reasons and the derived phase."""

from __future__ import annotations

import ast
import inspect
import itertools
import re

import pytest

from kubetune_operator import conditions
from kubetune_operator.conditions import Reason, derive_phase, remove_condition, set_condition
from kubetune_operator.models import Condition
from kubetune_trainer.contract import TrainerReason

REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")  # metav1.Condition.reason


def cond(type_: str, status: str, reason: str = "R", when: str = "2026-01-01T00:00:00Z") -> Condition:
    return Condition(
        type=type_, status=status, reason=reason, message="", last_transition_time=when, observed_generation=1
    )


def test_new_condition_is_appended_with_now_and_generation() -> None:
    result = set_condition(
        (cond("Validated", "True"),),
        "Running",
        "False",
        "Created",
        "made",
        generation=3,
        now="2026-01-02T00:00:00Z",
    )
    assert [c.type for c in result] == ["Validated", "Running"]
    assert result[1] == Condition(
        type="Running",
        status="False",
        reason="Created",
        message="made",
        last_transition_time="2026-01-02T00:00:00Z",
        observed_generation=3,
    )


def test_same_status_keeps_transition_time_but_takes_new_reason_and_message() -> None:
    result = set_condition(
        (cond("Running", "False", "Created"),),
        "Running",
        "False",
        "Unschedulable",
        "no GPU",
        generation=2,
        now="2026-01-05T00:00:00Z",
    )
    assert result[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert (result[0].reason, result[0].message, result[0].observed_generation) == (
        "Unschedulable",
        "no GPU",
        2,
    )


def test_status_flip_moves_transition_time() -> None:
    result = set_condition(
        (cond("Running", "False"),),
        "Running",
        "True",
        "Training",
        "",
        generation=1,
        now="2026-01-05T00:00:00Z",
    )
    assert result[0].last_transition_time == "2026-01-05T00:00:00Z"


def test_order_is_stable_and_remove_drops_only_one_type() -> None:
    existing = (cond("Validated", "True"), cond("Running", "False"), cond("Failed", "True"))
    updated = set_condition(existing, "Running", "True", "Training", "", generation=1, now="x")
    assert [c.type for c in updated] == ["Validated", "Running", "Failed"]
    assert [c.type for c in remove_condition(updated, "Failed")] == ["Validated", "Running"]


@pytest.mark.parametrize(
    ("true_types", "phase"),
    [
        ((), "Pending"),
        (("Validated",), "Pending"),
        (("Validated", "Running"), "Running"),
        (("Validated", "Suspended"), "Suspended"),
        (("Validated", "Succeeded"), "Succeeded"),
        (("Validated", "Failed"), "Failed"),
        (("Suspended", "Failed"), "Failed"),
    ],
)
def test_phase_is_derived_from_conditions(true_types: tuple[str, ...], phase: str) -> None:
    all_types = ("Validated", "Running", "Suspended", "Succeeded", "Failed")
    conds = tuple(cond(t, "True" if t in true_types else "False") for t in all_types)
    assert derive_phase(conds) == phase


def _reason_constants() -> dict[str, str]:
    return {k: v for k, v in vars(Reason).items() if k.isupper()}


def test_every_reason_is_camel_case_and_valid_for_metav1() -> None:
    reasons = _reason_constants()
    assert len(reasons) >= 20
    for value in [*reasons.values(), *conditions.TRAINER_REASONS]:
        assert REASON_PATTERN.match(value) and value[0].isupper(), value


def test_every_reason_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(Reason))
    body = tree.body[0].body  # type: ignore[attr-defined]
    documented = set()
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.Assign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            documented.add(node.targets[0].id)  # type: ignore[attr-defined]
    assert documented == set(_reason_constants())


def test_lifecycle_reasons_named_by_the_api_exist() -> None:
    values = set(_reason_constants().values())
    assert {
        "BackoffLimitExceeded",
        "DeadlineExceeded",
        "Preempted",
        "Completed",
        "Suspended",
        "Queued",
        "Created",
        "TrainerStarting",
        "Training",
        "InvalidSpec",
    } <= values


def test_trainer_reasons_come_from_the_contract() -> None:
    assert TrainerReason.INVALID_DATASET in conditions.TRAINER_REASONS
    assert TrainerReason.ACCESS_DENIED in conditions.TRAINER_REASONS
    assert TrainerReason.INSUFFICIENT_GPU_MEMORY in conditions.TRAINER_REASONS
    assert TrainerReason.QUANTIZATION_UNSUPPORTED in conditions.TRAINER_REASONS
    assert len(conditions.TRAINER_REASONS) == 15  # PeerLost (multi-node) included
