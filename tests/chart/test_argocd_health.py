"""The Argo CD health check (gitops/argocd/health.lua) run with Lua 5.1, the dialect Argo CD embeds,
against FineTuneJob objects in each stage of their life."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "gitops" / "argocd" / "health.lua"
CM_PATCH = ROOT / "gitops" / "argocd" / "argocd-cm-patch.yaml"
ARGO_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"


def argo_health(obj: dict[str, Any]) -> dict[str, str]:
    """Evaluate the health script the way Argo CD does: `obj` is a global, the chunk returns a table."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return {str(k): str(v) for k, v in result.items()}


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason or type_,
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
        "observedGeneration": 1,
    }


def make_ftj(
    *, generation: int = 1, status: dict[str, Any] | None = None, suspend: bool = False
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support-bot", "namespace": "ml", "generation": generation},
        "spec": {"method": "LoRA", "suspend": suspend},
    }
    if status is not None:
        obj["status"] = status
    return obj


def test_no_status_yet_is_progressing() -> None:
    health = argo_health(make_ftj())
    assert health["status"] == "Progressing"
    assert "operator" in health["message"]


def test_running_is_progressing_with_step_and_loss() -> None:
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "phase": "Running",
                "conditions": [
                    cond("Validated"),
                    cond("Running", reason="Training"),
                    cond("Reconciling", reason="Training"),
                    cond("Succeeded", "False"),
                    cond("Failed", "False"),
                    cond("Suspended", "False"),
                ],
                "progress": {"step": 40, "totalSteps": 420},
                "metrics": {"trainLoss": 1.23456},
            }
        )
    )
    assert health == {"status": "Progressing", "message": "Training: step 40/420, loss 1.235"}


def test_succeeded_is_healthy_and_names_the_adapter() -> None:
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "phase": "Succeeded",
                "conditions": [
                    cond("Running", "False"),
                    cond("Succeeded", reason="Completed"),
                    cond("Failed", "False"),
                ],
                "adapter": {"uri": "s3://adapters/support-bot/", "sha256": "ab" * 32},
            }
        )
    )
    assert health == {"status": "Healthy", "message": "Fine-tuned: s3://adapters/support-bot/"}


def test_full_fine_tune_reports_the_model_uri() -> None:
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "conditions": [cond("Succeeded", reason="Completed")],
                "model": {"uri": "s3://models/full/"},
            }
        )
    )
    assert health == {"status": "Healthy", "message": "Fine-tuned: s3://models/full/"}


def test_failed_is_degraded_with_the_reason_message() -> None:
    message = "dataset s3://datasets/x.jsonl: lines 3, 9 are not valid JSON"
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "phase": "Failed",
                "conditions": [
                    cond("Failed", reason="InvalidDataset", message=message),
                    cond("Stalled", reason="InvalidDataset"),
                    cond("Succeeded", "False"),
                    cond("Running", "False"),
                ],
            }
        )
    )
    assert health == {"status": "Degraded", "message": message}


def test_stalled_without_failed_is_degraded() -> None:
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "conditions": [cond("Stalled", reason="InvalidSpec", message="bad base model URI")],
            }
        )
    )
    assert health == {"status": "Degraded", "message": "bad base model URI"}


def test_suspended_is_suspended() -> None:
    health = argo_health(
        make_ftj(
            suspend=True,
            status={
                "observedGeneration": 1,
                "phase": "Suspended",
                "conditions": [
                    cond("Suspended", reason="JobSuspended", message="spec.suspend is true"),
                    cond("Running", "False"),
                ],
            },
        )
    )
    assert health == {"status": "Suspended", "message": "spec.suspend is true"}


def test_queued_by_kueue_is_suspended() -> None:
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "phase": "Suspended",
                "conditions": [
                    cond("Suspended", reason="Queued", message="waiting for Kueue to admit the Job")
                ],
            }
        )
    )
    assert health["status"] == "Suspended"
    assert "Kueue" in health["message"]


def test_status_for_an_older_generation_is_progressing_even_if_it_said_succeeded() -> None:
    health = argo_health(
        make_ftj(
            generation=2,
            status={
                "observedGeneration": 1,
                "conditions": [cond("Succeeded", reason="Completed")],
            },
        )
    )
    assert health["status"] == "Progressing"
    assert "generation 2" in health["message"]


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("Succeeded", "Healthy"),
        ("Failed", "Degraded"),
        ("Suspended", "Suspended"),
        ("Running", "Progressing"),
        ("Pending", "Progressing"),
    ],
)
def test_phase_is_the_fallback_when_no_condition_decides(phase: str, expected: str) -> None:
    health = argo_health(make_ftj(status={"observedGeneration": 1, "phase": phase}))
    assert health["status"] == expected


def test_failed_wins_over_a_stale_succeeded() -> None:
    health = argo_health(
        make_ftj(
            status={
                "observedGeneration": 1,
                "conditions": [cond("Succeeded"), cond("Failed", reason="UploadFailed")],
            }
        )
    )
    assert health["status"] == "Degraded"


def test_argocd_cm_patch_embeds_the_same_script() -> None:
    patch = yaml.safe_load(CM_PATCH.read_text())
    assert patch["data"][ARGO_KEY] == HEALTH_LUA.read_text()
