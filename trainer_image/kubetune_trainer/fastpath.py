"""The trainer's fast step: attention that never crosses packed examples, and a loss that never builds
logits for positions without a label.

- ``prepare_model`` switches the model's attention to ``kubetune``: varlen flash attention from torch itself
  (``torch.nn.attention.varlen``) on a GPU, one causal SDPA call per example elsewhere. Padded batches still
  work: they take the ordinary SDPA path with a padding mask.
- ``loss_sum`` runs the decoder, gathers the hidden states of the positions that carry a label, and computes
  the summed cross-entropy chunk by chunk. When the LM head is a plain frozen or trainable ``nn.Linear`` the
  gradient is produced during the forward pass (no [tokens, vocab] logits survive past one chunk); otherwise
  each chunk is recomputed in backward.
- ``choose_token_budget`` sizes a micro-step from the memory the device has left.
- ``flops_per_token`` is the model-FLOPs convention the benchmark and the trainer's MFU metric use.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubetune_trainer.packing import Example, PackedBatch, PaddedBatch, collate_packed

log = logging.getLogger(__name__)

ATTENTION_NAME = "kubetune"
# Budget for one chunk of float32 logits and their gradient; a chunk holds about 1.5 copies of [chunk, vocab].
_CE_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}
_CPU_TOKEN_BUDGET = 8192
_MAX_TOKEN_BUDGET = 65536

try:  # torch >= 2.10 ships FlashAttention varlen kernels
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - depends on the installed torch
    _torch_varlen_attn = None


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None,
    is_causal: bool,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA on [B, H, S, D] tensors; key/value may have fewer heads (grouped-query attention)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )


# Set by prepare_model after checking, on the device, that varlen attention runs forward and backward and
# agrees with SDPA; None until checked.
_varlen_checked: dict[str, bool] = {}


def _varlen_works(device: torch.device) -> bool:
    if _torch_varlen_attn is None or device.type != "cuda":
        return False
    key = str(device)
    if key not in _varlen_checked:
        try:
            generator = torch.Generator(device=device).manual_seed(0)
            # Examples longer than 128 tokens, so the backend chosen is the one real micro-steps get.
            shape_q, shape_kv = (1, 4, 350, 64), (1, 2, 350, 64)
            query = torch.randn(shape_q, device=device, dtype=torch.bfloat16, generator=generator)
            query.requires_grad_(True)
            key_ = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=generator)
            value = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=generator)
            cu_seqlens = torch.tensor([0, 150, 350], dtype=torch.int32, device=device)
            _varlen_checked[key] = True
            got = _packed_attention(query, key_, value, cu_seqlens, 200, None)
            got.float().sum().backward()
            _varlen_checked[key] = False
            want = _packed_attention(query, key_, value, cu_seqlens, 200, None)
            torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
            _varlen_checked[key] = bool(query.grad is not None and torch.isfinite(query.grad).all())
        except Exception as error:  # any failure means: use the per-example fallback
            log.warning("torch varlen attention unusable on %s (%s); using per-example SDPA", device, error)
            _varlen_checked[key] = False
    return _varlen_checked[key]


def _varlen_supported(query: torch.Tensor) -> bool:
    return (
        _torch_varlen_attn is not None
        and query.is_cuda
        and _varlen_checked.get(str(query.device), False)
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
    )


def _packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention inside each packed example; inputs [1, H, T, D], output [1, T, H, D]."""
    if query.is_cuda and query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # Under autocast SDPA would run in the autocast dtype anyway; doing the same here lets the varlen
        # kernels (half precision only) take float32 activations of fully fine-tuned models.
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if _varlen_supported(query):
        assert _torch_varlen_attn is not None
        out = _torch_varlen_attn(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            scale=scale,
            window_size=(-1, 0),
            enable_gqa=key.shape[1] != query.shape[1],
        )
        assert isinstance(out, torch.Tensor)
        return out.unsqueeze(0)
    boundaries = cu_seqlens.tolist()
    pieces = [
        _sdpa(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            scale=scale,
            is_causal=True,
        )
        for start, end in itertools.pairwise(boundaries)
    ]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2)


def _padded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention over right-padded rows; inputs [B, H, S, D], output [B, S, H, D]."""
    if attention_mask is None:
        return _sdpa(query, key, value, scale=scale, is_causal=True).transpose(1, 2)
    if attention_mask.dim() == 4:  # an already prepared mask: True or 0.0 where attention is allowed
        mask = attention_mask
    else:
        length = query.shape[2]
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        # A query at a pad position attends to nothing; let it see itself so softmax stays finite.
        mask = mask | torch.eye(length, dtype=torch.bool, device=query.device)[None, None]
    return _sdpa(query, key, value, scale=scale, is_causal=False, attn_mask=mask).transpose(1, 2)


def kubetune_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``kubetune`` entry of transformers' attention interface (same signature as its ``sdpa``)."""
    if dropout:
        raise ValueError("kubetune attention does not implement attention dropout; set attention_dropout=0")
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        if query.shape[0] != 1:
            raise ValueError("packed batches must be a single row of shape [1, T]")
        return _packed_attention(query, key, value, cu_seqlens, int(kwargs["max_length_q"]), scaling), None
    return _padded_attention(query, key, value, attention_mask, scaling), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kubetune_attention)


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module under an optional PEFT wrapper."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _decoder(model: nn.Module) -> nn.Module:
    lm = causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(lm, "model", None)
    if not isinstance(decoder, nn.Module):
        raise TypeError(
            f"{type(lm).__name__} has no decoder body (expected a transformers *ForCausalLM model)"
        )
    return decoder


def prepare_model(model: nn.Module, device: torch.device | str) -> None:
    """Route the model's attention through ``kubetune_attention``; the model stays where it is."""
    _register_attention()
    lm = causal_lm(model)
    config = lm.config
    if getattr(config, "attention_dropout", 0.0):
        log.info(
            "attention_dropout=%s is not supported by the packed path; setting it to 0",
            config.attention_dropout,
        )
        config.attention_dropout = 0.0
    set_attn = getattr(lm, "set_attn_implementation", None)
    if callable(set_attn):
        set_attn(ATTENTION_NAME)
    else:  # pragma: no cover - older transformers
        config._attn_implementation = ATTENTION_NAME
    config.use_cache = False
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    log.info("attention for packed batches on %s: %s", device, attention_backend(device, torch.bfloat16))


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel packed batches use on ``device`` with ``dtype`` (for logs and the benchmark)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype in (torch.float16, torch.bfloat16) and _varlen_works(device):
        return "torch_varlen"
    return "sdpa_per_example"


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------


def loss_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Label positions per chunk of logits: the chunk's float32 logits and their gradient stay in budget."""
    budget = _CE_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(64, budget // (6 * vocab_size))


def head_compute_dtype(
    weight_dtype: torch.dtype, autocast_dtype: torch.dtype | None
) -> torch.dtype:
    """The dtype the fused loss multiplies in, forward and backward (logits, their gradient against the
    hidden states and against the head's weight): the autocast dtype when autocast is on (bf16 compute over
    float32 master weights, as in Full fine-tuning on a GPU), else the head weight's own dtype. Softmax and
    the loss itself are always float32."""
    return autocast_dtype if autocast_dtype is not None else weight_dtype


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i), with the gradient computed chunk by chunk during forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_rows: int,
        needs_grad: bool,
    ) -> torch.Tensor:
        compute = head_compute_dtype(weight.dtype, _autocast_dtype(hidden.device))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad and ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if needs_grad and ctx.needs_input_grad[1]
            else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if needs_grad and bias is not None and ctx.needs_input_grad[2]
            else None
        )
        # One cast of the head for all chunks; the matmuls below run in ``compute`` whatever autocast does.
        weight_c = weight.to(compute)
        bias_c = bias.to(compute) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = hidden[start : start + chunk_rows].to(compute)
                target = targets[start : start + chunk_rows]
                logits = F.linear(rows, weight_c, bias_c).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if not needs_grad:
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(target.shape[0], device=probs.device), target] -= 1.0
                grad_logits = probs.to(compute)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_rows] = torch.mm(grad_logits, weight_c)
                if grad_weight is not None:
                    grad_weight += torch.mm(grad_logits.t(), rows)
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        has_hidden, has_weight, has_bias = ctx.has_grads
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (saved[0] * grad_output.to(hidden_dtype)) if has_hidden else None
        grad_weight = (saved[1] * grad_output).to(weight_dtype) if has_weight else None
        grad_bias = (saved[2] * grad_output).to(weight_dtype) if has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _head_is_plain_linear(head: nn.Module, config: Any) -> bool:
    return type(head) is nn.Linear and getattr(config, "final_logit_softcapping", None) is None


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    config: Any = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Summed CE of ``head(hidden)`` against ``targets`` ([N, d], [N]); never holds all [N, vocab] logits."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if chunk_rows is None:
        vocab = getattr(config, "vocab_size", None) or getattr(head, "out_features", 32768)
        chunk_rows = loss_chunk_rows(int(vocab), hidden.device)
    if isinstance(head, nn.Linear) and _head_is_plain_linear(head, config):
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad
            or head.weight.requires_grad
            or (head.bias is not None and head.bias.requires_grad)
        )
        result = _LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets, chunk_rows, needs_grad)
        assert isinstance(result, torch.Tensor)
        return result
    softcap = getattr(config, "final_logit_softcapping", None)

    def chunk_loss(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = head(rows).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, target, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows, target = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, rows, target, use_reentrant=False)
        else:
            total = total + chunk_loss(rows, target)
    return total


def loss_sum(model: nn.Module, batch: PackedBatch | PaddedBatch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's label tokens (float32 scalar) and how many there are.

    Divide by the label-token count of the whole optimizer step, not of the micro-step, so every label
    token weighs the same however the examples were grouped.
    """
    selected, head, config = _label_hidden_states(model, batch)
    return chunked_cross_entropy_sum(
        selected, batch.prediction_targets, head, config
    ), batch.num_label_tokens


@torch.no_grad()
def eval_sums(model: nn.Module, batch: PackedBatch | PaddedBatch) -> tuple[torch.Tensor, int, torch.Tensor]:
    """For evaluation: the summed cross-entropy over the batch's label tokens (as ``loss_sum``), how many
    there are, and how many of them the model predicts exactly (the arg-max of its logits at the position
    before each one). Chunked like the loss, so all [N, vocab] logits never exist at once."""
    hidden, head, config = _label_hidden_states(model, batch)
    targets = batch.prediction_targets
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    vocab = getattr(config, "vocab_size", None) or getattr(head, "out_features", 32768)
    chunk_rows = loss_chunk_rows(int(vocab), hidden.device)
    softcap = getattr(config, "final_logit_softcapping", None)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows, target = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if isinstance(head, nn.Linear) and _head_is_plain_linear(head, config):
            # The same products as the fused training loss (``_LinearCrossEntropySum``).
            compute = head_compute_dtype(head.weight.dtype, _autocast_dtype(hidden.device))
            bias = head.bias.to(compute) if head.bias is not None else None
            with torch.autocast(hidden.device.type, enabled=False):
                logits = F.linear(rows.to(compute), head.weight.to(compute), bias).float()
        else:
            logits = head(rows).float()
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=-1) == target).sum()
    return total, batch.num_label_tokens, correct


def _label_hidden_states(
    model: nn.Module, batch: PackedBatch | PaddedBatch
) -> tuple[torch.Tensor, nn.Module, Any]:
    """The decoder's last hidden states at the positions whose next token carries a label ([N, d], in the
    order of ``batch.prediction_targets``), the output head and the model config."""
    decoder = _decoder(model)
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if isinstance(batch, PackedBatch):
        outputs = decoder(**batch.model_inputs(), use_cache=False)
    elif isinstance(batch, PaddedBatch):
        outputs = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    else:
        raise TypeError(f"loss_sum expects a PackedBatch or PaddedBatch, got {type(batch).__name__}")
    hidden = outputs.last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.prediction_positions)
    return selected, head, lm.config


def prediction_hidden(
    model: nn.Module, batch: PackedBatch | PaddedBatch
) -> tuple[torch.Tensor, nn.Module, Any]:
    """The decoder's last hidden states at the batch's prediction positions ([num_label_tokens, d]), the LM
    head that turns them into logits, and the model's config (what ``loss_sum`` runs before its loss)."""
    decoder = _decoder(model)
    lm = causal_lm(model)
    if isinstance(batch, PackedBatch):
        outputs = decoder(**batch.model_inputs(), use_cache=False)
    elif isinstance(batch, PaddedBatch):
        outputs = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    else:
        raise TypeError(f"expected a PackedBatch or PaddedBatch, got {type(batch).__name__}")
    hidden = outputs.last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.prediction_positions)
    return selected, lm.get_output_embeddings(), lm.config


# ----------------------------------------------------------------------------------------------------
# Micro-step size
# ----------------------------------------------------------------------------------------------------


def _trainable_state_bytes(model: nn.Module) -> int:
    """Gradients plus AdamW's two float32 moments for every trainable parameter."""
    return sum(p.numel() * (p.element_size() + 8) for p in model.parameters() if p.requires_grad)


def _probe_peak_bytes(model: nn.Module, device: torch.device, tokens: int, vocab_size: int) -> int:
    """Peak memory above the current allocation for one forward+backward of a packed micro-step."""
    generator = torch.Generator().manual_seed(0)
    half = max(1, tokens // 2)
    examples = []
    for length in (half, tokens - half):
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        examples.append(Example(input_ids=ids, labels=ids))
    batch = collate_packed(examples).to(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss, _ = loss_sum(model, batch)
    if loss.requires_grad:
        loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for parameter in model.parameters():
        parameter.grad = None
    return int(peak)


def usable_device_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on ``device``, honouring a per-process memory fraction cap."""
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    by_device = free + reserved - allocated
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    by_cap = int(total * fraction) - allocated
    return max(0, min(by_device, by_cap))


def budget_from_memory(
    usable_bytes: int, fixed_bytes: int, bytes_per_token: float, max_seq_length: int, headroom: float = 0.85
) -> int:
    """The largest token budget (a multiple of 256) whose estimated peak fits ``headroom * usable_bytes``."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    tokens = int((usable_bytes * headroom - fixed_bytes) / bytes_per_token)
    tokens = min(tokens, _MAX_TOKEN_BUDGET)
    tokens -= tokens % 256
    if tokens < max_seq_length:
        log.warning(
            "only about %d tokens fit per micro-step, fewer than max_seq_length=%d; the longest examples "
            "may not fit (enable gradient checkpointing or lower maxSeqLength)",
            max(tokens, 0),
            max_seq_length,
        )
    return max(tokens, 256)


def choose_token_budget(
    model: nn.Module, device: torch.device | str, requested: int | None, max_seq_length: int
) -> int:
    """Tokens per micro-step: ``requested`` when given; on a GPU, sized from a two-point memory probe.

    An example longer than the budget still gets a micro-step of its own (see ``packing.pack``).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"token budget must be >= 1, got {requested}")
        return int(requested)
    device = torch.device(device)
    if device.type != "cuda":
        return max(_CPU_TOKEN_BUDGET, max_seq_length)
    vocab = int(causal_lm(model).config.vocab_size)
    small = min(1024, max(64, max_seq_length // 2))
    large = 2 * small
    peak_small = _probe_peak_bytes(model, device, small, vocab)
    peak_large = _probe_peak_bytes(model, device, large, vocab)
    per_token = max(1.0, (peak_large - peak_small) / (large - small))
    fixed = max(0.0, peak_small - per_token * small) + _trainable_state_bytes(model)
    torch.cuda.empty_cache()
    usable = usable_device_bytes(device)
    budget = budget_from_memory(usable, int(fixed), per_token, max_seq_length)
    log.info(
        "token budget %d (%.0f KiB/token, %.2f GiB usable on %s)",
        budget,
        per_token / 1024,
        usable / 2**30,
        device,
    )
    return budget


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------


def flops_per_token(
    matmul_params: int,
    lora_params: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    effective_context: float,
    full_finetune: bool = False,
) -> float:
    """Model FLOPs per trained token (PaLM convention: non-causal attention, no recomputation).

    LoRA: ``4N + 6 N_lora + 12 L H Q T_eff``; full fine-tuning: ``6N + 12 L H Q T_eff``. ``N`` counts the
    weights used in matmuls (the LM head included, the embedding lookup not); ``T_eff`` is the token-weighted
    mean example length ``sum(l^2) / sum(l)``.
    """
    for name, value in (
        ("matmul_params", matmul_params),
        ("lora_params", lora_params),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("head_dim", head_dim),
        ("effective_context", effective_context),
    ):
        if value < 0 or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"flops_per_token: {name} must be >= 0, got {value}")
    attention = 12.0 * num_layers * num_heads * head_dim * effective_context
    if full_finetune:
        return 6.0 * matmul_params + attention
    return 4.0 * matmul_params + 6.0 * lora_params + attention


def effective_context(lengths: list[int] | tuple[int, ...]) -> float:
    """Token-weighted mean example length, the attention context a packed token really sees."""
    total = sum(lengths)
    return sum(length * length for length in lengths) / total if total else 0.0


def matmul_param_counts(model: nn.Module) -> tuple[int, int]:
    """(N, N_lora): frozen-or-trained weights used in matmuls (LM head included), and LoRA adapter weights."""
    lm = causal_lm(model)
    lora = 0
    matmul = 0
    for name, module in lm.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if ".lora_" in f".{name}" or "lora_A" in name or "lora_B" in name:
            lora += module.weight.numel()
        else:
            matmul += module.weight.numel()
    return matmul, lora
