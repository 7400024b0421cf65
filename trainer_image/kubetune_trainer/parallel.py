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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype every step computes in under autocast: bf16 on GPUs, for one process and FSDP alike, None
    (plain float32) on CPU. Fully fine-tuned weights load in float32 (``preparation.load_dtype``), so with one
    process autocast multiplies bf16 copies of them in forward and backward while the float32 weights stay
    the master copy the optimizer (float32 moments too) updates: what FSDP's ``MixedPrecisionPolicy`` does
    with several (``sharding_precision``)."""
    return torch.bfloat16 if device_type == "cuda" else None


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


# ----------------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------------

# Overrides the memory plan's strategy for a job of several processes ("DDP" or "FSDP"). It exists so that
# tests and diagnostics can run FSDP on models small enough to fit each device; jobs leave it unset.
FORCE_STRATEGY_ENV = "KUBETUNE_FORCE_STRATEGY"


def run_strategy(planned: str | None, world_size: int, forced: str | None) -> str:
    """How the processes hold the model: the memory plan's choice (DDP where there is no plan), the forced
    one where set, and always Single for one process (FSDP over one process would only add copies)."""
    if world_size == 1:
        return SINGLE
    if forced:
        if forced not in (DDP, FSDP):
            raise ValueError(f"{FORCE_STRATEGY_ENV}={forced!r}: use {DDP} or {FSDP}, or leave it unset")
        return forced
    if planned in (DDP, FSDP):
        return planned
    return DDP


def sharding_precision(device_type: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(dtype the gathered weights compute in, dtype gradients are reduced in) under FSDP. GPUs gather
    bf16 copies of the float32 shards (which stay the master weights the optimizer updates) and reduce
    gradients in float32; the CPU keeps float32 throughout (None: no cast)."""
    if device_type == "cuda":
        return torch.bfloat16, torch.float32
    return None, None


class LossModel(torch.nn.Module):
    """The model together with the step's loss, as one module: FSDP gathers the weights outside the decoder
    layers (embeddings, final norm, output head) when a module's forward runs, and the loss reads the head's
    weight directly, so the loss must run inside the outermost sharded forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: object, evaluate: bool = False) -> tuple[torch.Tensor | int, ...]:
        """(summed loss, label tokens) of an SFT batch, with ``evaluate`` also the label tokens predicted
        exactly (``fastpath.eval_sums``, without gradients); (per-pair summed log-probabilities [pairs, 2],
        pairs) of a preference batch (``dpo.PairBatch``)."""
        from kubetune_trainer.dpo import PairBatch, sequence_logps
        from kubetune_trainer.fastpath import eval_sums, loss_sum

        if isinstance(batch, PairBatch):
            return sequence_logps(self.model, batch), batch.num_pairs
        if evaluate:
            return eval_sums(self.model, batch)  # type: ignore[arg-type]
        return loss_sum(self.model, batch)  # type: ignore[arg-type]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder layers of a transformers causal LM (under an optional PEFT wrapper)."""
    from kubetune_trainer.fastpath import _decoder

    layers = getattr(_decoder(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{type(model).__name__} has no decoder layers to shard (expected model.layers)")
    return list(layers)


def shard(model: torch.nn.Module, device_type: str, world_size: int) -> LossModel:
    """``model`` sharded over every process (FSDP2): each decoder layer is one unit, gathered for its
    forward and backward and freed after; the rest (embeddings, norm, head) forms the root unit. Parameters,
    gradients and the optimizer state built on the parameters afterwards hold 1/world of each tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute, reduce = sharding_precision(device_type)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce)
    # The processes' own device type, not the machine's accelerator: CPU workers on a GPU node stay on CPU.
    mesh = init_device_mesh(device_type, (world_size,))
    units = [fully_shard(layer, mesh=mesh, mp_policy=policy) for layer in decoder_layers(model)]
    root = fully_shard(LossModel(model), mesh=mesh, mp_policy=policy)
    for unit in [*units, root]:
        # The step's loss is already divided by the label tokens of all processes: gradients add up.
        # Each micro-batch's backward reduce-scatters its gradients, so no process ever holds a whole
        # layer's gradients for longer than that layer's backward.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    return root


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every process calls it; rank 0 gets ``model``'s whole state on the CPU (the others an empty dict),
    gathered one tensor at a time. For publishing the result, never for checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of parameters, bytes of optimizer state) this process holds: its local shards under FSDP."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        to_local = getattr(tensor, "to_local", None)
        return to_local() if callable(to_local) else tensor

    def size(tensor: torch.Tensor) -> int:
        return local(tensor).numel() * tensor.element_size()

    parameters = sum(size(p) for p in model.parameters())
    state = sum(
        size(value)
        for per_parameter in optimizer.state.values()
        for value in per_parameter.values()
        if isinstance(value, torch.Tensor) and value.ndim > 0
    )
    return parameters, state
