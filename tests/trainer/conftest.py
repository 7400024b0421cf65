"""Shared fixtures for the trainer tests: a real S3 server (versitygw) on 127.0.0.1, the tiny model uploaded
to it, datasets written as JSON Lines, and a way to run the trainer in-process or as a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from e2e.cluster.s3 import S3Server, upload_directory

from kubetune_devtools.tiny import build_tiny_tokenizer, save_tiny_model
from kubetune_trainer.contract import (
    CONFIG_PATH_ENV,
    TERMINATION_LOG_ENV,
    WORK_DIR_ENV,
    CheckpointConfig,
    DatasetConfig,
    Hyperparameters,
    JobRef,
    LoraConfig,
    OutputConfig,
    S3Config,
    TerminationSummary,
    TrainerConfig,
)

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def models_bucket(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bucket holding the tiny model (with and without a chat template) under tiny/ and tiny-plain/."""
    client = s3.client()
    client.create_bucket(Bucket="models")
    for prefix, chat in (("tiny/", True), ("tiny-plain/", False)):
        local = save_tiny_model(tmp_path_factory.mktemp(prefix.strip("/")), seed=0, chat_template=chat)
        upload_directory(client, local, "models", prefix)
    return "models"


def jsonl(records: Sequence[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@dataclass
class Workspace:
    """A fresh bucket per test, and what a trainer run there needs."""

    s3: S3Server
    bucket: str
    tmp: Path
    models_bucket: str

    def put(self, key: str, body: bytes) -> str:
        self.s3.client().put_object(Bucket=self.bucket, Key=key, Body=body)
        return f"s3://{self.bucket}/{key}"

    def config(self, train: str, **overrides: Any) -> TrainerConfig:
        """A small LoRA job on the tiny model; keyword overrides replace top-level fields."""
        config = TrainerConfig(
            job=JobRef(name="t", namespace="default", uid=""),
            base_model=f"s3://{self.models_bucket}/tiny/",
            method="LoRA",
            lora=LoraConfig(r=4, alpha=8, dropout=0.0),
            dataset=DatasetConfig(train=train, max_seq_length=128),
            hyperparameters=Hyperparameters(
                max_steps=6, learning_rate=3e-3, batch_tokens=512, warmup_ratio=0.1, seed=7
            ),
            output=OutputConfig(uri=f"s3://{self.bucket}/out/"),
            s3=S3Config(endpoint=self.s3.endpoint, region=self.s3.region, force_path_style=True),
            checkpointing=CheckpointConfig(every_steps=None, every_minutes=None, keep=2),
            gpus=0,
            metrics_port=0,
        )
        return replace(config, **overrides)

    def env(self, config: TrainerConfig, name: str = "run") -> dict[str, str]:
        run_dir = self.tmp / f"{name}-{next(_counter)}"
        run_dir.mkdir(parents=True)
        config_file = run_dir / "config.json"
        config_file.write_text(config.to_json())
        return {
            **self.s3.env(),
            CONFIG_PATH_ENV: str(config_file),
            TERMINATION_LOG_ENV: str(run_dir / "termination-log"),
            WORK_DIR_ENV: str(run_dir / "scratch"),
        }

    def run(self, config: TrainerConfig, monkeypatch: pytest.MonkeyPatch, **env_overrides: str) -> RunResult:
        """The trainer's ``main()`` in this process (fast: no second torch import)."""
        from kubetune_trainer.recipe import main

        env = {**self.env(config), **env_overrides}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code = main()
        return RunResult(code, TerminationSummary.from_json(Path(env[TERMINATION_LOG_ENV]).read_text()))

    def subprocess(
        self, config: TrainerConfig, name: str = "sub", **env_overrides: str
    ) -> tuple[subprocess.Popen[str], Path]:
        """``python -m kubetune_trainer`` as the pod runs it; returns the process (stdout and stderr in one
        text pipe) and the path of its termination log."""
        env = {**os.environ, **self.env(config, name), **env_overrides}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "trainer_image"), str(REPO)])
        env.pop("WORLD_SIZE", None)  # the pod's main process is never one of several workers
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return process, Path(env[TERMINATION_LOG_ENV])

    def read_json(self, key: str) -> Any:
        """The JSON object stored at ``key`` in this workspace's bucket."""
        return json.loads(self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())


@dataclass
class RunResult:
    code: int
    summary: TerminationSummary


@pytest.fixture
def ws(s3: S3Server, models_bucket: str, tmp_path: Path) -> Workspace:
    bucket = f"t{next(_counter)}-{os.getpid()}"
    s3.client().create_bucket(Bucket=bucket)
    return Workspace(s3, bucket, tmp_path, models_bucket)


def log_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The trainer's JSON log lines among ``lines`` (its stdout), parsed."""
    return [json.loads(line) for line in lines if line.startswith("{")]


def chat_records(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Learnable Messages records: small sums, always answered the same way."""
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        records.append(
            {
                "messages": [
                    {"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}. The result is {a + b}."},
                ]
            }
        )
    return records
