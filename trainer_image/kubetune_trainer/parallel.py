"""Where a training process runs and in which precision: the device it owns, the ways several processes can
share a model, and the bytes each kind of tensor takes.

Every decision here is a small pure function of plain values, so machines without a GPU test the choices a
GPU pod makes; the trainer (``train.setup_runtime``) and the memory plan take them from here and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Set by the launcher for each worker: which of the pod's GPUs is this process's.
LOCAL_RANK_ENV = "LOCAL_RANK"

# How the processes of a job hold the model.
SINGLE = "Single"  # one process, the whole model on its device
DDP = "DDP"  # every process holds a full replica; gradients are summed over processes
FSDP = "FSDP"  # parameters, gradients and optimizer state sharded over processes, gathered per layer
STRATEGIES = (SINGLE, DDP, FSDP)


def select_device(cuda_available: bool, device_count: int, local_rank: int | None) -> torch.device:
    """The device a process trains on: ``cuda:<local rank>`` (``cuda:0`` when no launcher set one) where
    GPUs are usable, else the CPU. A GPU device always carries its index: ``torch.cuda.set_device`` and
    NCCL need to know which GPU, and a bare ``cuda`` means "whichever is current", which differs per
    process."""
    if not cuda_available or device_count < 1:
        return torch.device("cpu")
    index = 0 if local_rank is None else local_rank
    if not 0 <= index < device_count:
        raise ValueError(
            f"{LOCAL_RANK_ENV}={index} but this pod sees {device_count} GPU(s) "
            f"(cuda:0..cuda:{device_count - 1}); start at most one training process per visible GPU"
        )
    return torch.device("cuda", index)


def process_device(want_gpu: bool) -> torch.device:
    """This process's device: ``select_device`` fed from torch and the launcher's ``LOCAL_RANK``."""
    if not want_gpu:
        return torch.device("cpu")
    raw = os.environ.get(LOCAL_RANK_ENV, "").strip()
    if raw and not raw.isdigit():
        raise ValueError(f"{LOCAL_RANK_ENV}={raw!r} is not a GPU index")
    available = torch.cuda.is_available()
    return select_device(available, torch.cuda.device_count() if available else 0, int(raw) if raw else None)


def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory on ``device``; None on the CPU, which the memory plan does not limit."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


# ----------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------

# bitsandbytes NF4 with double quantization: 4 bits a weight, one 8-bit scale per block of 64 weights, and
# one float32 scale (plus offset) per 256 of those scales.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 8 / (64 * 256)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor, for one method on one kind of device."""

    compute: int  # activations and the weights a forward pass reads: bf16 on GPUs, fp32 on CPU
    base_linear: float  # a decoder layer's Linear weight of the base model (4-bit NF4 for QLoRA)
    base_other: int  # the rest of the base model: embeddings, norms, the output head
    master: int  # an fp32 master copy kept beside a lower-precision trainable weight (0: none)
    autocast: bool  # the fp32 adapters run under autocast, so each adapter saves its own compute-dtype input


FP32 = 4
BF16 = 2
ADAPTER = FP32  # LoRA adapters, their gradients and AdamW's two moments are float32 everywhere
GRADIENT = FP32  # gradients of trainable weights are accumulated (and reduced) in float32
ADAMW_STATE = 2 * FP32  # exp_avg and exp_avg_sq


def precision_for(method: str, device_type: str) -> Precision:
    """GPUs: bf16 compute; LoRA on a bf16 base, QLoRA on an NF4 base, Full with bf16 weights and fp32
    master weights. CPU: everything in float32 (CPU kernels gain little from bf16 and the tests compare
    losses)."""
    if device_type != "cuda":
        return Precision(compute=FP32, base_linear=FP32, base_other=FP32, master=0, autocast=False)
    if method == "QLoRA":
        nf4 = NF4_BYTES_PER_WEIGHT
        return Precision(compute=BF16, base_linear=nf4, base_other=BF16, master=0, autocast=True)
    if method == "Full":
        return Precision(compute=BF16, base_linear=BF16, base_other=BF16, master=FP32, autocast=True)
    return Precision(compute=BF16, base_linear=BF16, base_other=BF16, master=0, autocast=True)
