"""The base model made ready for its method, before adapters go on: the dtype its weights load in, the 4-bit
NF4 base of QLoRA (bitsandbytes), and activation checkpointing of the decoder layers.

The decisions are small pure functions of plain values (method, device type, the job's setting, the memory
plan), so a machine without a GPU tests the choices a GPU pod makes; the loading and wrapping around them is
the same code on both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune_trainer.contract import ACTIVATION_CHECKPOINTING_SETTINGS, TrainerReason
from kubetune_trainer.errors import TrainerError

# NF4 (normal-float 4-bit) blocks of 64 weights, their scales quantized once more ("double quantization").
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True


# ----------------------------------------------------------------------------------------------------
# Precision of the loaded base
# ----------------------------------------------------------------------------------------------------


def load_dtype(method: str, device_type: str) -> torch.dtype:
    """The dtype the base model's weights load in: bf16 on GPUs under a frozen base (LoRA; QLoRA's layers
    that stay unquantized), float32 for Full (its master weights) and everything on CPU."""
    if device_type == "cuda" and method in ("LoRA", "QLoRA"):
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class Quantization:
    """How the base's Linear layers are stored and computed with (QLoRA)."""

    quant_type: str  # nf4
    double_quant: bool  # the block scales quantized too
    compute_dtype: torch.dtype  # what the 4-bit weights are dequantized to for each matmul


def quantization_for(method: str, device_type: str) -> Quantization | None:
    """QLoRA: NF4 with double quantization, computing in bf16 on GPUs and float32 on CPU; None otherwise."""
    if method != "QLoRA":
        return None
    compute = torch.bfloat16 if device_type == "cuda" else torch.float32
    return Quantization(QUANT_TYPE, DOUBLE_QUANT, compute)


def check_quantizable(model_config: Mapping[str, Any], uri: str) -> None:
    """Refuse, before any weights are fetched, a QLoRA base that bitsandbytes cannot quantize: one whose
    config.json says it is stored quantized already (GPTQ, AWQ, FP8, ...), or any base when bitsandbytes is
    missing from the image."""
    existing = model_config.get("quantization_config")
    if existing is not None:
        method = existing.get("quant_method", "unknown") if isinstance(existing, Mapping) else "unknown"
        raise TrainerError(
            TrainerReason.QUANTIZATION_UNSUPPORTED,
            f"baseModel {uri} is stored already quantized ({method}); method QLoRA quantizes a base model to "
            "4-bit NF4 itself and needs its unquantized (bf16, fp16 or fp32) weights: point baseModel.uri at "
            "those, or use method LoRA on this model",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise TrainerError(
            TrainerReason.QUANTIZATION_UNSUPPORTED,
            f"method QLoRA needs bitsandbytes, which this trainer image lacks ({err}); use the project's "
            "trainer image or set trainer.image to one with bitsandbytes, or use method LoRA",
        ) from err


def load_place(strategy: str, method: str, device: torch.device) -> torch.device:
    """Where the base's weights are first put. Under FSDP that is host memory: ``fully_shard`` then moves
    each process's 1/N shard to its own GPU, so a base larger than one GPU still loads. QLoRA quantizes as
    it loads, on the device it trains on. Otherwise straight onto the training device."""
    from kubetune_trainer.parallel import FSDP

    if strategy == FSDP and method != "QLoRA":
        return torch.device("cpu")
    return device


def load_base_model(
    path: Path, uri: str, method: str, device: torch.device, place: torch.device | None = None
) -> Any:
    """The base model for training on ``device``, put on ``place`` (default ``device``; see load_place):
    quantized to NF4 for QLoRA, else in the dtype ``device`` computes with (``load_dtype``)."""
    from kubetune_trainer.model import load_model

    dtype = load_dtype(method, device.type)
    quantization = quantization_for(method, device.type)
    if quantization is None:
        return load_model(path, uri, dtype).to(place or device)
    from transformers import BitsAndBytesConfig

    settings = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=quantization.compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    try:
        model = load_model(path, uri, dtype, quantization_config=settings, device_map={"": device})
    except TrainerError as err:
        raise TrainerError(
            TrainerReason.QUANTIZATION_UNSUPPORTED,
            f"{err.message}; bitsandbytes could not load it as a 4-bit NF4 base: use method LoRA on this "
            "model",
        ) from err
    if quantized_layers(model) == 0:
        raise TrainerError(
            TrainerReason.QUANTIZATION_UNSUPPORTED,
            f"baseModel {uri}: bitsandbytes quantized none of its layers ({type(model).__name__} has no "
            "Linear layers it can convert); use method LoRA on this model",
        )
    return model


def quantized_layers(model: nn.Module) -> int:
    """How many of the model's layers hold 4-bit weights."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    return sum(isinstance(module, Linear4bit) for module in model.modules())


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------


def use_activation_checkpointing(setting: str, plan_checkpoints: bool | None) -> bool:
    """``Always`` and ``Never`` decide; ``Auto`` follows the memory plan (on only where activations do not fit
    otherwise; off when there is no plan, as on CPU, where memory is not limited)."""
    if setting not in ACTIVATION_CHECKPOINTING_SETTINGS:
        raise ValueError(
            f"activationCheckpointing {setting!r} must be one of "
            + ", ".join(ACTIVATION_CHECKPOINTING_SETTINGS)
        )
    if setting == "Auto":
        return bool(plan_checkpoints)
    return setting == "Always"


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer: forward keeps only each layer's input, and backward recomputes the
    layer before differentiating it. The layers stay the same modules (parameter names, FSDP units and
    adapters are untouched). Returns how many layers are checkpointed."""
    from kubetune_trainer.fastpath import causal_lm

    lm = causal_lm(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise TrainerError(
            TrainerReason.INVALID_CONFIG,
            f"{type(lm).__name__} does not support activation checkpointing; set "
            "hyperparameters.activationCheckpointing to Never",
        )
    # Non-reentrant checkpointing differentiates through a layer whose inputs need no gradient (a frozen
    # embedding's output), so the inputs are not forced to require one.
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.disable_input_require_grads()
    return sum(bool(getattr(module, "gradient_checkpointing", False)) for module in checkpointed_layers(lm))


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers that take activation checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
