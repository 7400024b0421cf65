"""``python -m kubetune_trainer.gpu_check``: its decisions (what it trains where, what counts as the fast
path, when a resumed loss matches) unit-tested, the kernel counter checked against real calls, and the whole
check run on the CPU as CI does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO
from kubetune_devtools import gpu_check
from kubetune_devtools.tiny import build_tiny_model
from kubetune_trainer import fastpath
from kubetune_trainer.packing import Example, collate_packed


def test_gpu_check_profiles() -> None:
    gpu, cpu = gpu_check.profile_for(cpu=False), gpu_check.profile_for(cpu=True)
    assert (gpu.device_type, gpu.dtype, gpu.steps) == ("cuda", "bfloat16", 20)
    assert gpu.resume_methods == gpu_check.METHODS
    # The varlen kernels take head dims that are multiples of 8 up to 256.
    head_dim = gpu.model["hidden_size"] // gpu.model["num_attention_heads"]
    assert head_dim % 8 == 0 and head_dim <= 256
    assert (cpu.device_type, cpu.dtype) == ("cpu", "float32")
    assert cpu.steps < gpu.steps and cpu.batch_tokens < gpu.batch_tokens
    assert 0 < cpu.stop_after < cpu.steps and 0 < gpu.stop_after < gpu.steps


@pytest.mark.parametrize(
    ("device_type", "calls", "varlen", "fused"),
    [
        ("cuda", {"varlen_attention": 16, "loss": 2, "fused_loss": 2}, "passed", "passed"),
        (
            "cuda",
            {"varlen_attention": 16, "per_example_attention": 4, "loss": 2, "fused_loss": 2},
            "failed",
            "passed",
        ),
        ("cuda", {"per_example_attention": 16, "loss": 2, "fused_loss": 2}, "failed", "passed"),
        ("cuda", {"varlen_attention": 16, "loss": 2, "fused_loss": 1}, "passed", "failed"),
        ("cpu", {"per_example_attention": 16, "loss": 2, "fused_loss": 2}, "skipped", "passed"),
        ("cpu", {"per_example_attention": 16}, "skipped", "failed"),
    ],
)
def test_gpu_check_fast_path_verdicts(device_type: str, calls: dict, varlen: str, fused: str) -> None:
    results = gpu_check.fast_path_results(device_type, Counter(calls))
    assert results["varlen_attention"].split(":")[0] == varlen
    assert results["fused_loss"] == fused


def test_gpu_check_resume_tolerance() -> None:
    assert gpu_check.same_final_loss(2.0, 2.0 * (1 + 5e-6), "cpu")
    assert not gpu_check.same_final_loss(2.0, 2.0 * (1 + 5e-5), "cpu")
    assert gpu_check.same_final_loss(2.0, 2.0 * (1 + 5e-3), "cuda")
    assert not gpu_check.same_final_loss(2.0, 2.1, "cuda")


def test_gpu_check_counts_the_kernels_the_loss_really_calls() -> None:
    """Two packed examples through the tiny model (2 layers): per-example attention runs 2 x 2 times on the
    CPU, and the one loss takes the fused path; the trainer's functions are back in place afterwards."""
    model, _ = build_tiny_model(seed=0)
    fastpath.prepare_model(model, "cpu")
    batch = collate_packed(
        [Example(input_ids=[5, 6, 7, 8], labels=[5, 6, 7, 8]), Example([9, 10, 11], [9, 10, 11])]
    )
    originals = (fastpath._sdpa, fastpath._LinearCrossEntropySum, fastpath.chunked_cross_entropy_sum)
    with gpu_check.counted_kernels() as calls:
        loss, _ = fastpath.loss_sum(model, batch)
        loss.backward()
    assert calls == Counter({"per_example_attention": 4, "loss": 1, "fused_loss": 1})
    assert (fastpath._sdpa, fastpath._LinearCrossEntropySum, fastpath.chunked_cross_entropy_sum) == originals
    assert torch.isfinite(loss)


def test_gpu_check_runs_on_cpu() -> None:
    """The whole check as ``make gpu-check`` runs it, on the CPU: every method trains its steps through the
    fused loss, a LoRA run stopped by SIGTERM and resumed ends at the uninterrupted loss, and what needs CUDA
    says skipped."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), str(REPO)])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.gpu_check", "--cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"check"')]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    methods = {line["method"]: line for line in lines if line["check"] == "method"}
    assert set(methods) == {"LoRA", "QLoRA", "Full"}
    for line in methods.values():
        assert line["outcome"] == "Succeeded" and line["steps"] == 6 and line["dtype"] == "float32"
        assert line["fused_loss"] == "passed" and line["kernel_calls"]["fused_loss"] >= 6
        assert line["varlen_attention"].startswith("skipped")
        assert str(line["peak_gib"]).startswith("skipped")
        assert line["tokens_per_s"] > 0 and 0 < line["final_loss"] < 10
    (resume,) = [line for line in lines if line["check"] == "resume"]
    assert (
        resume["result"] == "passed" and resume["checkpoints"] == [3] and resume["stopped_exit_code"] == 143
    )
    assert resume["final_loss"] == pytest.approx(methods["LoRA"]["final_loss"], rel=1e-5)
    assert lines[-1]["check"] == "summary" and lines[-1]["ok"] is True
