"""Where the base model comes from, the failures each source can produce, and a restart after success."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from conftest import Workspace, chat_records, jsonl
from kubetune_devtools.tiny import save_tiny_model
from kubetune_trainer.contract import PVC_ROOT_ENV, JobRef, TrainerReason
from kubetune_trainer.errors import EXIT_PERMANENT, TrainerError
from kubetune_trainer.model import fetch_base_model


def test_local_and_pvc_paths_are_used_in_place(tmp_path: Path, monkeypatch) -> None:
    model_dir = save_tiny_model(tmp_path / "claims" / "models" / "tiny")
    path, provenance = fetch_base_model(str(model_dir), None, tmp_path / "work")
    assert path == model_dir and provenance["uri"] == str(model_dir)
    monkeypatch.setenv(PVC_ROOT_ENV, str(tmp_path / "claims"))
    path, _ = fetch_base_model("pvc://models/tiny", None, tmp_path / "work")
    assert path == model_dir
    with pytest.raises(TrainerError) as missing:
        fetch_base_model("pvc://models/absent", None, tmp_path / "work")
    assert missing.value.reason == TrainerReason.MODEL_NOT_FOUND
    assert str(tmp_path / "claims" / "models" / "absent") in missing.value.message


@pytest.mark.parametrize(
    ("objects", "reason"),
    [({}, TrainerReason.MODEL_NOT_FOUND), ({"model/README.md": b"hi"}, TrainerReason.INVALID_MODEL)],
    ids=["empty-prefix", "no-config-json"],
)
def test_a_missing_or_incomplete_s3_model_fails_with_its_reason(
    ws: Workspace, monkeypatch, objects: dict[str, bytes], reason: str
) -> None:
    for key, body in objects.items():
        ws.put(key, body)
    train = ws.put("data/train.jsonl", jsonl(chat_records(4)))
    result = ws.run(ws.config(train, base_model=f"s3://{ws.bucket}/model/"), monkeypatch)
    assert result.summary.reason == reason, result.summary.message
    assert result.code == EXIT_PERMANENT
    assert f"s3://{ws.bucket}/model/" in result.summary.message


def test_a_restart_after_success_reports_the_published_result_without_training(
    ws: Workspace, monkeypatch, capsys
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(8)))
    config = ws.config(train, job=JobRef(name="j", namespace="ns", uid="uid-1"))
    first = ws.run(config, monkeypatch)
    assert first.code == 0
    capsys.readouterr()
    # The dataset is gone now: a second run that tried to train would fail with DatasetNotFound.
    ws.s3.client().delete_object(Bucket=ws.bucket, Key="data/train.jsonl")
    second = ws.run(config, monkeypatch)
    assert second.code == 0, second.summary.message
    assert '"event": "already_published"' in capsys.readouterr().out
    assert second.summary.adapter == first.summary.adapter
    assert second.summary.metrics == first.summary.metrics
    # Another job (another UID) writing to the same prefix trains for itself.
    other = ws.run(replace(config, job=JobRef(name="j", namespace="ns", uid="uid-2")), monkeypatch)
    assert other.summary.reason == TrainerReason.DATASET_NOT_FOUND
