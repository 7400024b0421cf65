"""The estimate table: measured rows win, estimated rows follow the GPU's peak, and the figures agree with the
project's own targets."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kubetune_trainer import __version__, throughput

LLAMA_1B = 1_235_814_400  # Llama-3.2-1B's parameter count


def test_the_cpu_row_is_the_benchmarks_measured_figure_for_the_tiny_model() -> None:
    rate = throughput.rate(throughput.CPU, 300_000, "LoRA")
    assert rate is not None and rate.basis == "measured" and rate.tokens_per_second == 13_098.0
    assert throughput.rate(throughput.CPU, LLAMA_1B, "LoRA") is None  # nothing measured, no guess on CPU


def test_an_h100_estimate_for_1b_lora_sits_at_the_projects_throughput_target() -> None:
    """DESIGN.md section 6 targets >= 55,000 non-pad tokens/s (about 30% MFU) for this very case."""
    rate = throughput.rate("NVIDIA-H100-80GB-HBM3", LLAMA_1B, "LoRA")
    assert rate is not None and rate.basis == "estimated"
    assert 55_000 <= rate.tokens_per_second <= 70_000


def test_method_and_size_order_the_rates_and_unknown_products_get_none() -> None:
    lora = throughput.rate("NVIDIA-A100-SXM4-80GB", LLAMA_1B, "LoRA")
    full = throughput.rate("NVIDIA-A100-SXM4-80GB", LLAMA_1B, "Full")
    qlora = throughput.rate("NVIDIA-A100-SXM4-80GB", LLAMA_1B, "QLoRA")
    bigger = throughput.rate("NVIDIA-A100-SXM4-80GB", 8 * LLAMA_1B, "LoRA")
    assert lora and full and qlora and bigger
    assert full.tokens_per_second < qlora.tokens_per_second < lora.tokens_per_second
    assert abs(bigger.tokens_per_second * 8 - lora.tokens_per_second) < 1
    assert throughput.rate("Some-Future-GPU", LLAMA_1B, "LoRA") is None
    tiny = throughput.rate("NVIDIA-A100-SXM4-80GB", 300_000, "LoRA")
    at_floor = throughput.rate("NVIDIA-A100-SXM4-80GB", throughput.MIN_GPU_PARAMETERS, "LoRA")
    assert tiny and at_floor and tiny.tokens_per_second == at_floor.tokens_per_second


def test_an_estimate_is_time_for_the_tokens_over_every_gpu_and_labelled() -> None:
    one = throughput.estimate("NVIDIA-H100-80GB-HBM3", LLAMA_1B, "LoRA", 1, 60_000_000)
    eight = throughput.estimate("NVIDIA-H100-80GB-HBM3", LLAMA_1B, "LoRA", 8, 60_000_000)
    assert one is not None and eight is not None
    assert 800 < float(one["seconds"]) < 1100  # 60M tokens at about 60k tokens/s
    assert float(eight["seconds"]) < float(one["seconds"]) / 7  # 8 GPUs at 90% each
    assert float(eight["gpuHours"]) > float(one["gpuHours"])  # paying for the all-reduce
    assert one["basis"] == "estimated" and one["modelSize"] == "1.2B"
    assert throughput.estimate("NVIDIA-H100-80GB-HBM3", LLAMA_1B, "LoRA", 1, 0) is None


def test_the_trainer_version_the_cache_is_keyed_on_is_the_projects() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
