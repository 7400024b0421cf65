"""How long a job should take: tokens per second per GPU from a table per GPU product and model size, and the
estimate the validation pod reports before any GPU is reserved.

The table's source (also in the README, "Estimates"):

- ``measured`` rows come from the project's own benchmark (``make bench``, ``python -m
  kubetune_devtools.bench``): the kubetune arm's non-pad tokens/s, on the hardware and model named in the row.
- every other row is ``estimated``: tokens/s = MFU x the product's dense bf16 peak (vendor datasheet) / FLOPs
  per token, at the 30% MFU the project targets (DESIGN.md section 6). FLOPs per token: 6 N for Full (forward,
  input gradients, weight gradients), 4 N for LoRA (the frozen base computes no weight gradients), QLoRA at
  70% of LoRA's rate for dequantizing the 4-bit weights. N is the model's parameter count, at least 100M
  (a smaller model does not run faster than that on a GPU: kernel launches bound it, not FLOPs).

An estimate is labelled so in ``status.plan.estimate.basis``; nothing decides anything from it.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_MFU = 0.30
QLORA_SLOWDOWN = 0.70
MULTI_GPU_EFFICIENCY = 0.90
"""Share of N GPUs' summed rate a data-parallel job keeps (gradient all-reduce, stragglers)."""
MIN_GPU_PARAMETERS = 100_000_000
"""Below this size a GPU is bound by kernel launches and the input pipeline, not by FLOPs: smaller models get
this size's rate, not a faster one."""
CPU = "cpu"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""The node label NVIDIA's GPU feature discovery sets; a job's nodeSelector on it names the product."""


@dataclass(frozen=True)
class GpuProduct:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak


GPU_PRODUCTS: dict[str, GpuProduct] = {
    p.name: p
    for p in (
        GpuProduct("NVIDIA-H200", 141, 989),
        GpuProduct("NVIDIA-H100-80GB-HBM3", 80, 989),
        GpuProduct("NVIDIA-H100-PCIe", 80, 756),
        GpuProduct("NVIDIA-A100-SXM4-80GB", 80, 312),
        GpuProduct("NVIDIA-A100-SXM4-40GB", 40, 312),
        GpuProduct("NVIDIA-L40S", 48, 362),
        GpuProduct("NVIDIA-A10G", 24, 125),
        GpuProduct("NVIDIA-L4", 24, 121),
    )
}


@dataclass(frozen=True)
class Measured:
    product: str
    max_parameters: int  # the row covers models up to this size (and above the previous row's)
    method: str
    tokens_per_second: float
    source: str


MEASURED: tuple[Measured, ...] = (
    # make bench, kubetune arm, tiny model (about 0.3M parameters), one CPU thread, README "Performance":
    # 13,098 (low-variance lengths) and 16,387 (high variance) tokens/s; the lower one is kept.
    Measured(CPU, 10_000_000, "LoRA", 13_098.0, "make bench (tiny model, 1 CPU thread)"),
)


@dataclass(frozen=True)
class Rate:
    tokens_per_second: float  # per GPU (or per CPU process)
    basis: str  # measured | estimated
    source: str


def size_class(parameters: int) -> str:
    """A short name for the size row of the table (0.3M, 1.2B, ...)."""
    if parameters >= 1_000_000_000:
        return f"{parameters / 1e9:.1f}B"
    return f"{parameters / 1e6:.1f}M"


def rate(product: str, parameters: int, method: str) -> Rate | None:
    """Tokens per second per device for ``method`` on a model of ``parameters`` on ``product``; None for a
    product the table does not know."""
    family = "LoRA" if method in ("LoRA", "QLoRA") else method
    for row in MEASURED:
        if row.product == product and row.method == family and parameters <= row.max_parameters:
            speed = row.tokens_per_second * (QLORA_SLOWDOWN if method == "QLoRA" else 1.0)
            return Rate(speed, "measured", row.source)
    gpu = GPU_PRODUCTS.get(product)
    if gpu is None:
        return None
    flops_per_token = (6 if method == "Full" else 4) * max(parameters, MIN_GPU_PARAMETERS)
    speed = TARGET_MFU * gpu.bf16_tflops * 1e12 / flops_per_token
    if method == "QLoRA":
        speed *= QLORA_SLOWDOWN
    return Rate(
        speed,
        "estimated",
        f"{TARGET_MFU:.0%} MFU of {gpu.bf16_tflops:g} bf16 TFLOPS, "
        f"{6 if method == 'Full' else 4}N FLOPs per token",
    )


def estimate(
    product: str, parameters: int, method: str, devices: int, tokens: int
) -> dict[str, object] | None:
    """status.plan.estimate: seconds and GPU-hours to train ``tokens`` tokens on ``devices`` devices."""
    found = rate(product, parameters, method)
    if found is None or tokens <= 0:
        return None
    devices = max(devices, 1)
    efficiency = MULTI_GPU_EFFICIENCY if devices > 1 else 1.0
    seconds = tokens / (found.tokens_per_second * devices * efficiency)
    gpu_hours = seconds * devices / 3600 if product != CPU else 0.0
    return {
        "seconds": _significant(seconds),
        "gpuHours": _significant(gpu_hours),
        "tokensPerSecond": _significant(found.tokens_per_second * devices * efficiency),
        "gpuProduct": product,
        "modelSize": size_class(parameters),
        "basis": found.basis,
        "source": found.source,
    }


def _significant(value: float) -> float:
    """Three significant digits: an estimate claims no more."""
    return float(f"{value:.3g}")
