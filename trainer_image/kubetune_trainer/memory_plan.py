"""The memory plan: what one GPU must hold to train a job, computed from the model's ``config.json`` alone
(the model is built on the meta device: shapes, no storage), before any weights are downloaded; and the way
of running that fits.

Bytes per GPU:

    weights      the base model (bf16; NF4 for QLoRA; fp32 on CPU) and the trainable weights
    gradients    float32, one per trainable weight
    optimizer    AdamW's two float32 moments, and a float32 master copy of weights that train in bf16; under
                 FSDP with output.select BestEval also the shard of the best evaluation's weights (one
                 process holding the model whole keeps that copy in host memory)
    activations  what autograd keeps for backward at the planned tokens per micro-step
    workspace    the larger transient: the loss's chunk of logits, or the optimizer step's temporaries

FSDP divides weights, gradients and optimizer state by the number of processes and adds the decoder layers
gathered for compute; DDP adds the flat buffer its gradient all-reduce fills. Activation checkpointing keeps
only each decoder layer's input and recomputes one layer at a time in backward.

The activation count follows what the trainer's own step saves for backward in a Llama-style decoder layer
(RMSNorm, rotary attention, SwiGLU MLP), tensor by tensor; ``tests/trainer/test_memory_plan.py`` holds it
against a measured training step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from kubetune_trainer.contract import TrainerReason
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.parallel import (
    ADAMW_STATE,
    ADAPTER,
    DDP,
    FP32,
    FSDP,
    GRADIENT,
    SINGLE,
    Precision,
    precision_for,
)

GIB = 1 << 30
# Share of a GPU's memory the plan fills: the CUDA context, NCCL buffers and the caching allocator's
# fragmentation take the rest.
USABLE_FRACTION = 0.90
# FSDP holds the layer it computes and the one it prefetches, unsharded.
FSDP_GATHERED_LAYERS = 2
# How far "more GPUs" advice looks.
MAX_ADVISED_GPUS = 64
# Shortest micro-step the "shorter maxSeqLength" advice offers.
MIN_ADVISED_TOKENS = 256

# Which Linear layers of a decoder layer read the same input tensor: their shared input is saved once.
_INPUT_OF = {
    "q_proj": "attention_in",
    "k_proj": "attention_in",
    "v_proj": "attention_in",
    "o_proj": "attention_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_mid",
}


# ----------------------------------------------------------------------------------------------------
# The model, from config.json
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model; ``model_shape`` reads it from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int  # all of them, tied weights once
    layer_linear_parameters: int  # the decoder layers' Linear weights and biases: what NF4 quantizes
    largest_layer_parameters: int  # one decoder layer, the unit FSDP gathers
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of each Linear in one decoder layer

    def lora_parameters(self, r: int, targets: tuple[str, ...] | None) -> int:
        """Adapter weights of rank ``r`` on the targeted Linear layers of every decoder layer."""
        return self.layers * sum(r * (fan_in + fan_out) for _, fan_in, fan_out in self.targeted(targets))

    def targeted(self, targets: tuple[str, ...] | None) -> list[tuple[str, int, int]]:
        if targets is None:
            return list(self.linears)
        return [linear for linear in self.linears if linear[0].rsplit(".", 1)[-1] in targets]


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The shape of the causal LM ``config`` (a parsed config.json) describes; ValueError if transformers
    cannot build it."""
    return _model_shape(json.dumps(dict(config), sort_keys=True))


@lru_cache(maxsize=16)
def _model_shape(config_json: str) -> ModelShape:
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError("config.json has no model_type")
    hf_config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")

    def linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [(name, module) for name, module in layer.named_modules() if isinstance(module, nn.Linear)]

    heads = int(hf_config.num_attention_heads)
    return ModelShape(
        hidden=int(hf_config.hidden_size),
        intermediate=int(hf_config.intermediate_size),
        layers=len(layers),
        heads=heads,
        kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads),
        vocab=int(hf_config.vocab_size),
        parameters=sum(p.numel() for p in model.parameters()),
        layer_linear_parameters=sum(
            sum(p.numel() for p in module.parameters()) for layer in layers for _, module in linears(layer)
        ),
        largest_layer_parameters=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        linears=tuple((name, m.in_features, m.out_features) for name, m in linears(layers[0])),
    )


# ----------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """The job, as far as memory is concerned."""

    method: str  # LoRA | QLoRA | Full
    processes: int  # training processes (one per GPU)
    micro_tokens: int  # tokens per micro-step
    device_type: str = "cuda"  # cuda | cpu
    capacity: int | None = None  # bytes of one GPU; None: unlimited (CPU)
    lora_r: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # None: every Linear of the decoder layers
    activation_checkpointing: str = "Auto"  # Auto: only where needed to fit | Always | Never
    keep_best: bool = False  # output.select BestEval: a copy of the trainable weights is kept


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU for one way of running a job."""

    strategy: str  # Single | DDP | FSDP
    world_size: int
    activation_checkpointing: bool
    micro_tokens: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int
    capacity: int | None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * USABLE_FRACTION)

    @property
    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable

    def summary(self) -> dict[str, Any]:
        """The plan for logs and the termination message (GiB, two decimals)."""

        def gib(value: int) -> float:
            return round(value / GIB, 2)

        per_gpu = {
            "weights": gib(self.weights),
            "gradients": gib(self.gradients),
            "optimizer": gib(self.optimizer),
            "activations": gib(self.activations),
            "workspace": gib(self.workspace),
            "total": gib(self.total),
        }
        summary: dict[str, Any] = {
            "strategy": self.strategy,
            "worldSize": self.world_size,
            "activationCheckpointing": self.activation_checkpointing,
            "microStepTokens": self.micro_tokens,
            "perGpuGiB": per_gpu,
        }
        if self.capacity is not None:
            summary["gpuGiB"] = gib(self.capacity)
        return summary

    def describe(self) -> str:
        checkpointing = ", activation checkpointing" if self.activation_checkpointing else ""
        return (
            f"{self.total / GIB:.1f} GiB per GPU with {self.strategy} on {self.world_size} GPU(s)"
            f"{checkpointing} (weights {self.weights / GIB:.1f}, gradients {self.gradients / GIB:.1f}, "
            f"optimizer {self.optimizer / GIB:.1f}, activations {self.activations / GIB:.1f} at "
            f"{self.micro_tokens} tokens per micro-step, workspace {self.workspace / GIB:.1f})"
        )


def estimate(shape: ModelShape, request: Request, strategy: str, checkpointing: bool) -> MemoryPlan:
    """Bytes per GPU for ``request`` run with ``strategy``, activation checkpointing on or off."""
    precision = precision_for(request.method, request.device_type)
    full = request.method == "Full"
    if full:
        trainable = shape.parameters
        weights = shape.parameters * precision.compute
        optimizer = trainable * (ADAMW_STATE + precision.master)
    else:
        trainable = shape.lora_parameters(request.lora_r, request.lora_targets)
        base = (
            shape.layer_linear_parameters * precision.base_linear
            + (shape.parameters - shape.layer_linear_parameters) * precision.base_other
        )
        weights = int(base) + trainable * ADAPTER
        optimizer = trainable * ADAMW_STATE
    gradients = trainable * GRADIENT
    optimizer_temporaries = trainable * FP32 if request.device_type == "cuda" else 0  # foreach AdamW

    if strategy == FSDP:
        shards = request.processes
        gathered = shape.largest_layer_parameters * (precision.compute if full else precision.base_linear)
        weights = weights // shards + int(FSDP_GATHERED_LAYERS * gathered)
        # A layer's gradients exist whole (in the compute dtype) until they are reduce-scattered.
        gradients = gradients // shards + (shape.largest_layer_parameters * precision.compute if full else 0)
        optimizer //= shards
        optimizer_temporaries //= shards
        if request.keep_best:  # each process keeps its shard of the best weights beside its own
            optimizer += trainable * FP32 // shards
    elif strategy == DDP:
        gradients *= 2  # the flat buffer the all-reduce sums into

    tokens = request.micro_tokens
    held, recomputed = activation_bytes(shape, request, precision, tokens, checkpointing)
    activations = held + recomputed
    # The transients on top of the activations at the worst moment: the loss's chunk at the end of forward
    # (no layer is being recomputed then), or the optimizer step's temporaries (activations are gone).
    loss = loss_bytes(shape, request, precision, tokens)
    workspace = max(held + max(loss, recomputed), optimizer_temporaries) - activations
    return MemoryPlan(
        strategy=strategy,
        world_size=request.processes,
        activation_checkpointing=checkpointing,
        micro_tokens=tokens,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        workspace=workspace,
        capacity=request.capacity,
    )


def layer_activation_bytes(shape: ModelShape, request: Request, precision: Precision) -> int:
    """Bytes one decoder layer saves for backward, per token."""
    c = precision.compute
    h, i = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    on_gpu = request.device_type == "cuda"
    full = request.method == "Full"

    # RMSNorm (x2): the float32 input its variance came from and the inverse RMS; with a trainable scale
    # also the normalized input.
    saved = 2 * (FP32 * h + FP32) + (2 * c * h if full else 0)
    # Attention: queries, keys and values, the output and the log-sum-exp per head. The GPU's varlen kernel
    # takes grouped keys and values as they are; the per-example CPU path repeats them for every head and
    # copies the output once more for the output projection.
    kv = shape.kv_heads * shape.head_dim if on_gpu else q
    saved += c * (q + 2 * kv + q) + FP32 * shape.heads
    attention_out_copy = 0 if on_gpu else q
    # SwiGLU: the gate projection, its SiLU and the up projection.
    saved += 3 * c * i

    # Inputs of the Linear layers whose weights (or adapters) need them for their gradient.
    widths = {"attention_in": h, "attention_out": q, "mlp_in": h, "mlp_mid": i}
    if full:
        widths["attention_out"] = attention_out_copy
        return saved + c * sum(widths.values())
    targeted = shape.targeted(request.lora_targets)
    if request.lora_dropout > 0:
        # Each adapter keeps its dropped-out input and the dropout's mask: a bool on the GPU's fused kernel,
        # the scaled noise (float32) on CPU.
        kept, mask = (c, 1) if precision.autocast else (ADAPTER, ADAPTER)
        saved += sum((kept + mask) * fan_in for _, fan_in, _ in targeted)
    elif precision.autocast:
        # Under autocast each float32 adapter casts its input to the compute dtype anew.
        saved += sum(c * fan_in for _, fan_in, _ in targeted)
    else:
        # Adapters in the model's dtype read the shared input tensors (unknown layer names: one each).
        inputs: dict[str, int] = {}
        for name, fan_in, _ in targeted:
            inputs[_INPUT_OF.get(name.rsplit(".", 1)[-1], name)] = fan_in
        if "attention_out" in inputs:
            inputs["attention_out"] = attention_out_copy
        saved += ADAPTER * sum(inputs.values())
    # Each adapter's rank-r activation, the input of its second matrix.
    adapter_dtype = c if precision.autocast else ADAPTER
    return saved + len(targeted) * request.lora_r * adapter_dtype


def activation_bytes(
    shape: ModelShape, request: Request, precision: Precision, tokens: int, checkpointing: bool
) -> tuple[int, int]:
    """Bytes saved for backward over a micro-step of ``tokens`` tokens: (held from the end of forward on,
    recomputed: with activation checkpointing, those of the one layer backward recomputes at a time, with
    the gradients flowing through its MLP and into its input)."""
    c, h = precision.compute, shape.hidden
    full = request.method == "Full"
    per_layer = layer_activation_bytes(shape, request, precision)
    recomputed = 0
    if checkpointing:
        # Each layer keeps only its input.
        layers = shape.layers * c * h
        recomputed = tokens * (per_layer + c * (shape.intermediate + h))
    else:
        layers = shape.layers * per_layer
        if not full:
            # The frozen embedding's output needs no gradient: the first norm saves nothing.
            layers -= FP32 * h + FP32
    # Outside the layers: the final norm, the rotary tables, the positions that carry a label and the loss's
    # gradient with respect to the hidden states (computed in forward, kept for backward).
    rest = (FP32 * h + FP32 + (c * h if full else 0)) + 2 * c * shape.head_dim + 8 + c * h
    fixed = 0
    if full:
        rest += 8  # the embedding's token ids
        fixed = FP32 * shape.vocab * h  # the output head's float32 gradient, computed with the loss
    return tokens * (layers + rest) + fixed, recomputed


def loss_bytes(shape: ModelShape, request: Request, precision: Precision, tokens: int) -> int:
    """The loss's transient, at its peak inside one chunk: the chunk's float32 logits and logsumexp's
    temporary of the same size (in half precision a trainable head adds the logits' half-precision
    gradient), beside the decoder's output and its rows at the labelled positions."""
    from kubetune_trainer.fastpath import loss_chunk_rows

    c = precision.compute
    rows = min(tokens, loss_chunk_rows(shape.vocab, torch.device(request.device_type)))
    per_logit = 2 * FP32 + (c if request.method == "Full" and c < FP32 else 0)
    return rows * shape.vocab * per_logit + tokens * 2 * c * shape.hidden


# ----------------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------------


def candidates(processes: int) -> list[tuple[str, bool]]:
    """(strategy, activation checkpointing) in the order they are tried: cheapest in time first."""
    if processes == 1:
        return [(SINGLE, False), (SINGLE, True)]
    return [(DDP, False), (FSDP, False), (FSDP, True)]


def best_plan(shape: ModelShape, request: Request) -> MemoryPlan:
    """The first candidate that fits, else the one needing the least memory; the job's activation
    checkpointing setting, where not Auto, keeps only the candidates with that setting."""
    allowed = {"Always": (True,), "Never": (False,)}.get(request.activation_checkpointing, (False, True))
    plans = [
        estimate(shape, request, strategy, ckpt)
        for strategy, ckpt in candidates(request.processes)
        if ckpt in allowed
    ]
    fitting = [plan for plan in plans if plan.fits]
    return fitting[0] if fitting else min(plans, key=lambda plan: plan.total)


def choose(shape: ModelShape, request: Request, model: str = "the model") -> MemoryPlan:
    """The plan to run; fails with ``InsufficientGPUMemory`` saying what would fit when nothing does."""
    plan = best_plan(shape, request)
    if plan.fits:
        return plan
    assert request.capacity is not None
    advice = what_would_fit(shape, request)
    raise TrainerError(
        TrainerReason.INSUFFICIENT_GPU_MEMORY,
        f"{model} with method {request.method} does not fit on {request.processes} GPU(s) of "
        f"{request.capacity / GIB:.1f} GiB ({plan.usable / GIB if plan.usable else 0:.1f} GiB usable each): "
        f"the smallest plan needs {plan.describe()}; what would fit: "
        + ("; ".join(advice) if advice else "nothing close to these settings, use GPUs with more memory"),
    )


def what_would_fit(shape: ModelShape, request: Request) -> list[str]:
    """Changes to the request that make it fit, each with its plan."""
    advice = []
    if request.activation_checkpointing == "Never":
        plan = best_plan(shape, replace(request, activation_checkpointing="Auto"))
        if plan.fits:
            advice.append(f"hyperparameters.activationCheckpointing Auto ({plan.describe()})")
    for method in {"Full": ("LoRA", "QLoRA"), "LoRA": ("QLoRA",)}.get(request.method, ()):
        plan = best_plan(shape, replace(request, method=method))
        if plan.fits:
            advice.append(f"method {method} ({plan.describe()})")
    for processes in range(request.processes + 1, MAX_ADVISED_GPUS + 1):
        plan = best_plan(shape, replace(request, processes=processes))
        if plan.fits:
            advice.append(f"{processes} GPUs ({plan.describe()})")
            break
    tokens = request.micro_tokens // 2
    while tokens >= MIN_ADVISED_TOKENS:
        plan = best_plan(shape, replace(request, micro_tokens=tokens))
        if plan.fits:
            advice.append(
                f"dataset.maxSeqLength {tokens}, micro-steps of {tokens} tokens ({plan.describe()})"
            )
            break
        tokens //= 2
    return advice
