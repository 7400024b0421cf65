"""The trainer on this machine's GPU, checked end to end in a few minutes (``make gpu-check``):

    python -m kubetune_trainer.gpu_check          # one GPU: bf16, a small Llama-shaped model, 20 steps each
    python -m kubetune_trainer.gpu_check --cpu    # the same checks on the CPU (fp32, the tiny model)

For LoRA, QLoRA and Full it runs the trainer's own recipe (``recipe.main``) against a local S3 server on a
randomly initialised model built here (no downloads), and checks that

- packed batches took varlen attention, never the per-example fallback (CUDA only: the CPU has no varlen
  kernel, so there the check says ``skipped``), and every loss went through the fused LM-head loss;
- a run stopped by SIGTERM half-way (a real ``python -m kubetune_trainer`` process) and then resumed ends at
  the final loss of the uninterrupted run.

It prints one JSON line per method (tokens/s, peak GiB of GPU memory, final loss, each check's result), one
per resume, and a summary line; it exits 0 only when every check that ran passed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_devtools.tiny import build_tiny_model  # the development helpers' one entry point here

METHODS = ("LoRA", "QLoRA", "Full")
PASSED, FAILED = "passed", "failed"
GIB = 1 << 30
# How closely a resumed run's final loss must match the uninterrupted one (relative). The CPU runs
# deterministic kernels; on a GPU the varlen attention backward accumulates in a nondeterministic order.
RESUME_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-2}


@dataclass(frozen=True)
class Profile:
    """What one check run trains: the model's shape, the steps, and how the batches are sized."""

    device_type: str  # "cuda" or "cpu"
    model: dict[str, int]  # build_tiny_model's shape arguments
    steps: int
    batch_tokens: int
    max_seq_length: int
    records: int
    turns: int  # question/answer pairs per record: longer examples, fewer records
    resume_methods: tuple[str, ...]

    @property
    def dtype(self) -> str:
        """The compute dtype the trainer picks on this device (bf16 on GPUs, fp32 on CPU)."""
        return "bfloat16" if self.device_type == "cuda" else "float32"

    @property
    def stop_after(self) -> int:
        return self.steps // 2


def profile_for(cpu: bool) -> Profile:
    """GPU: a ~100M-parameter Llama shape (head dim 64, grouped-query attention), 20 steps of 8k tokens per
    method, every method resumed. CPU: the tiny model, 6 steps, LoRA resumed; a few minutes on two cores."""
    if cpu:
        return Profile("cpu", {}, 6, 512, 128, 48, 1, ("LoRA",))
    model = {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    }
    return Profile("cuda", model, 20, 8192, 1024, 1200, 6, METHODS)


def learning_rate(method: str) -> float:
    return 2e-4 if method == "Full" else 2e-3


def fast_path_results(device_type: str, calls: Counter[str]) -> dict[str, str]:
    """Each fast-path check's outcome from the kernel calls counted during a run: varlen attention (CUDA
    only) must have run and the per-example SDPA fallback never; every loss must have taken the fused
    LM-head path."""
    results: dict[str, str] = {}
    if device_type == "cuda":
        used = calls["varlen_attention"] > 0 and calls["per_example_attention"] == 0
        results["varlen_attention"] = PASSED if used else FAILED
    else:
        results["varlen_attention"] = "skipped: no varlen attention kernel on the CPU"
    fused = calls["loss"] > 0 and calls["fused_loss"] == calls["loss"]
    results["fused_loss"] = PASSED if fused else FAILED
    return results


def same_final_loss(uninterrupted: float, resumed: float, device_type: str) -> bool:
    tolerance = RESUME_TOLERANCE["cuda" if device_type == "cuda" else "cpu"]
    return abs(resumed - uninterrupted) <= tolerance * max(abs(uninterrupted), 1e-12)


def synthetic_records(count: int, turns: int, seed: int = 0) -> list[dict[str, Any]]:
    """Messages records of small sums, answered the same way every time (a loss that can fall)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": "You add numbers."}]
        for _ in range(turns):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            messages.append({"role": "user", "content": f"What is {a} + {b}?"})
            messages.append({"role": "assistant", "content": f"{a} + {b} = {a + b}. The result is {a + b}."})
        records.append({"messages": messages})
    return records


# ----------------------------------------------------------------------------------------------------
# Counting the kernels a run takes
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def counted_kernels() -> Iterator[Counter[str]]:
    """Counts, while open, calls of the varlen attention kernel, of the per-example SDPA fallback, of the
    loss and of the fused LM-head loss in ``fastpath`` (wrapping the functions the trainer calls)."""
    from kubetune_trainer import fastpath

    calls: Counter[str] = Counter()
    saved = {
        name: getattr(fastpath, name)
        for name in ("_torch_varlen_attn", "_sdpa", "chunked_cross_entropy_sum", "_LinearCrossEntropySum")
    }

    def counting(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    fused = saved["_LinearCrossEntropySum"]

    class CountedFusedLoss(fused):  # type: ignore[misc, valid-type]
        @staticmethod
        def forward(ctx: Any, *args: Any) -> Any:  # type: ignore[override]
            calls["fused_loss"] += 1
            return fused.forward(ctx, *args)

    if saved["_torch_varlen_attn"] is not None:
        fastpath._torch_varlen_attn = counting("varlen_attention", saved["_torch_varlen_attn"])
    fastpath._sdpa = counting("per_example_attention", saved["_sdpa"])
    fastpath.chunked_cross_entropy_sum = counting("loss", saved["chunked_cross_entropy_sum"])
    fastpath._LinearCrossEntropySum = CountedFusedLoss
    try:
        yield calls
    finally:
        for name, value in saved.items():
            setattr(fastpath, name, value)


# ----------------------------------------------------------------------------------------------------
# A local S3 server
# ----------------------------------------------------------------------------------------------------


@dataclass
class LocalS3:
    endpoint: str
    env: dict[str, str]

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )


@contextlib.contextmanager
def local_s3() -> Iterator[LocalS3]:
    """versitygw where it is built (``make test`` builds it), else moto's server, on 127.0.0.1."""
    from e2e.cluster.procs import bin_dir, free_port

    if os.access(bin_dir() / "versitygw", os.X_OK):
        from e2e.cluster.s3 import S3Server

        with S3Server() as server:
            yield LocalS3(server.endpoint, server.env())
        return
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {
            "AWS_ACCESS_KEY_ID": "kubetune-check",
            "AWS_SECRET_ACCESS_KEY": "kubetune-check-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield LocalS3(f"http://127.0.0.1:{port}", env)
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One check session: the S3 server, its bucket, the model and data in it, and scratch space."""

    profile: Profile
    s3: LocalS3
    tmp: Path
    bucket: str = "check"

    def setup(self) -> None:
        from e2e.cluster.s3 import upload_directory

        client = self.s3.client()
        client.create_bucket(Bucket=self.bucket)
        model, tokenizer = build_tiny_model(seed=0, **self.profile.model)
        local = self.tmp / "base"
        model.save_pretrained(local, safe_serialization=True)  # fp32, as a freshly initialised model is
        tokenizer.save_pretrained(local)
        upload_directory(client, local, self.bucket, "base/")
        records = synthetic_records(self.profile.records, self.profile.turns)
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        client.put_object(Bucket=self.bucket, Key="train.jsonl", Body=body)

    def config(self, method: str, output: str) -> Any:
        from kubetune_trainer.contract import (
            CheckpointConfig,
            DatasetConfig,
            Hyperparameters,
            JobRef,
            LoraConfig,
            OutputConfig,
            S3Config,
            TrainerConfig,
        )

        profile = self.profile
        return TrainerConfig(
            job=JobRef(name=f"gpu-check-{method.lower()}", namespace="default", uid=""),
            base_model=f"s3://{self.bucket}/base/",
            method=method,
            lora=None if method == "Full" else LoraConfig(r=16, alpha=32, dropout=0.0),
            dataset=DatasetConfig(
                train=f"s3://{self.bucket}/train.jsonl", max_seq_length=profile.max_seq_length
            ),
            hyperparameters=Hyperparameters(
                max_steps=profile.steps,
                learning_rate=learning_rate(method),
                batch_tokens=profile.batch_tokens,
                warmup_ratio=0.1,
                seed=7,
            ),
            output=OutputConfig(uri=f"s3://{self.bucket}/{output}/"),
            s3=S3Config(endpoint=self.s3.endpoint, region="us-east-1", force_path_style=True),
            checkpointing=CheckpointConfig(every_steps=None, every_minutes=None, keep=2),
            gpus=1 if profile.device_type == "cuda" else 0,
            metrics_port=0,
        )

    def environment(self, config: Any, name: str) -> dict[str, str]:
        from kubetune_trainer.contract import CONFIG_PATH_ENV, TERMINATION_LOG_ENV, WORK_DIR_ENV

        run_dir = self.tmp / name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json())
        return {
            **self.s3.env,
            CONFIG_PATH_ENV: str(run_dir / "config.json"),
            TERMINATION_LOG_ENV: str(run_dir / "termination-log"),
            WORK_DIR_ENV: str(run_dir / "scratch"),
        }

    def checkpoint_steps(self, output: str) -> list[int]:
        """The steps of the complete checkpoints (manifest written) under ``output``."""
        prefix = f"{output}/checkpoints/"
        listed = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        names = [item["Key"][len(prefix) :] for item in listed]
        return sorted(
            int(n.split("/")[0].removeprefix("step-")) for n in names if n.endswith("/manifest.json")
        )

    def run_here(self, config: Any, name: str) -> tuple[int, Any, Counter[str], float | None]:
        """The recipe in this process; (exit code, termination summary, kernel calls, peak GiB on the GPU)."""
        import torch

        from kubetune_trainer.contract import TERMINATION_LOG_ENV, TerminationSummary
        from kubetune_trainer.recipe import main as run_recipe

        env = self.environment(config, name)
        os.environ.update(env)
        on_gpu = self.profile.device_type == "cuda"
        if on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with counted_kernels() as calls:
            code = run_recipe()
        peak = torch.cuda.max_memory_allocated() / GIB if on_gpu else None
        summary = TerminationSummary.from_json(Path(env[TERMINATION_LOG_ENV]).read_text())
        return code, summary, calls, peak

    def run_stopped(self, config: Any, name: str, step: int, timeout: float = 600) -> int:
        """``python -m kubetune_trainer`` as a pod runs it, sent SIGTERM once it has finished ``step``
        steps; returns its exit code."""
        from kubetune_trainer.train import TEST_HANG_ENV

        env = {**os.environ, **self.environment(config, name), TEST_HANG_ENV: str(step)}
        env.pop("WORLD_SIZE", None)
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        timer = threading.Timer(timeout, process.kill)  # a run that never reaches the step
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:  # read to the end: a closed pipe would fail the trainer's logging
                if line.startswith("{") and json.loads(line).get("event") == "test_hang":
                    process.send_signal(signal.SIGTERM)
            return process.wait()
        finally:
            timer.cancel()


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def check_method(check: Check, method: str) -> tuple[bool, float | None]:
    """One uninterrupted run of ``method``; prints its line. Returns (passed, final loss)."""
    code, summary, calls, peak = check.run_here(check.config(method, method.lower()), method.lower())
    results = fast_path_results(check.profile.device_type, calls)
    loss = (summary.metrics or {}).get("trainLoss")
    completed = code == 0 and (summary.progress or {}).get("step") == check.profile.steps
    emit(
        {
            "check": "method",
            "method": method,
            "device": check.profile.device_type,
            "dtype": check.profile.dtype,
            "outcome": summary.outcome,
            "message": summary.message if code != 0 else None,
            "steps": (summary.progress or {}).get("step"),
            "final_loss": loss,
            "tokens_per_s": (summary.progress or {}).get("tokensPerSecond"),
            "peak_gib": round(peak, 3) if peak is not None else "skipped: no GPU memory counter on the CPU",
            "kernel_calls": dict(calls),
            **results,
        }
    )
    return completed and FAILED not in results.values(), loss


def check_resume(check: Check, method: str, uninterrupted: float | None) -> bool:
    """Stopped by SIGTERM half-way, then resumed: the same final loss as ``uninterrupted``."""
    from kubetune_trainer.errors import EXIT_INTERRUPTED

    config = check.config(method, f"{method.lower()}-resumed")
    step = check.profile.stop_after
    stopped_code = check.run_stopped(config, f"{method.lower()}-stopped", step)
    checkpoint = check.checkpoint_steps(f"{method.lower()}-resumed")
    code, summary, _, _ = check.run_here(config, f"{method.lower()}-resumed")
    resumed = (summary.metrics or {}).get("trainLoss")
    passed = (
        stopped_code == EXIT_INTERRUPTED
        and checkpoint == [step]
        and code == 0
        and uninterrupted is not None
        and resumed is not None
        and same_final_loss(uninterrupted, resumed, check.profile.device_type)
    )
    emit(
        {
            "check": "resume",
            "method": method,
            "stopped_after_step": step,
            "stopped_exit_code": stopped_code,
            "checkpoints": checkpoint,
            "resumed_exit_code": code,
            "final_loss": resumed,
            "uninterrupted_final_loss": uninterrupted,
            "result": PASSED if passed else FAILED,
        }
    )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.gpu_check", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (fp32, the tiny model)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    args = parser.parse_args(argv)
    import torch

    profile = profile_for(args.cpu)
    if profile.device_type == "cuda" and not torch.cuda.is_available():
        emit({"check": "summary", "ok": False, "message": "no CUDA GPU here; use --cpu"})
        return 2
    methods = [m for m in args.methods.split(",") if m]
    started = time.monotonic()
    outcomes: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as tmp, local_s3() as s3:
        check = Check(profile, s3, Path(tmp))
        check.setup()
        if profile.device_type == "cuda":
            from kubetune_trainer import fastpath

            # Its one-off self test calls both attention kernels; run it before anything is counted.
            fastpath.attention_backend(torch.device("cuda", 0), torch.bfloat16)
        for method in methods:
            passed, loss = check_method(check, method)
            outcomes.append(passed)
            if method in profile.resume_methods:
                outcomes.append(check_resume(check, method, loss))
    ok = bool(outcomes) and all(outcomes)
    emit(
        {
            "check": "summary",
            "ok": ok,
            "device": profile.device_type,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
