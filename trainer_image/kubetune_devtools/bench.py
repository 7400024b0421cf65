"""Trainer throughput: the kubetune step against the plain padded transformers + peft loop.

    python -m kubetune_devtools.bench --model tiny                  # CPU, what `make bench` runs
    python -m kubetune_devtools.bench --model llama-1b --out bench_results/h100.jsonl

Every arm starts from the same random weights (and the same LoRA initialisation), sees the same synthetic
examples in the same order, 16 examples per optimizer step, and takes AdamW steps. Arms:

- ``baseline``: right-padded micro-batches, ``sdpa`` attention, the model's own cross-entropy (with
  ``num_items_in_batch`` so the loss is the mean over the step's label tokens, as the transformers Trainer
  does).
- ``kubetune``: the trainer's data path and step: ``packing.pack`` by token budget, ``collate_packed``,
  ``fastpath.loss_sum`` (varlen attention, chunked fused cross-entropy over label positions only).
- ``kubetune-plain-ce`` (ablation): packed, but full logits and ``F.cross_entropy`` at every position.
- ``kubetune-cap24`` (GPU only): ``kubetune`` with the process capped to 24 GiB; it picks its own budget.

One JSON line per arm and data set, then one line with the ratio kubetune/baseline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kubetune_trainer import fastpath
from kubetune_trainer.packing import (
    IGNORE_INDEX,
    Example,
    PackedBatch,
    PaddedBatch,
    collate_packed,
    collate_padded,
    pack,
)

PEAK_BF16_FLOPS = 989e12  # H100 SXM and H200 SXM, dense
LOSS_WINDOW = 20
GIB = 1 << 30

# Hard-coded shapes; weights are random (no downloads).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-1b": {
        "family": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
    },
    "qwen-0.5b": {
        "family": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
    },
}
DATASETS = {"high-variance": 0.8, "low-variance": 0.3}


@dataclass(frozen=True)
class BenchConfig:
    model: str
    arms: tuple[str, ...]
    datasets: tuple[str, ...]
    steps: int  # optimizer steps per arm, warm-up included
    warmup: int
    examples_per_step: int
    baseline_micro_batch: int
    token_budget: int | None
    lr: float
    seed: int
    device: torch.device
    dtype: torch.dtype


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[nn.Module, int]:
    """A randomly initialised causal LM and its pad id."""
    if name == "tiny":
        from kubetune_devtools.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(seed=seed)
        return model.to(device=device, dtype=dtype), int(tokenizer.pad_token_id)
    if name not in MODEL_CONFIGS:
        raise SystemExit(f"unknown --model {name!r}; choose tiny, {', '.join(MODEL_CONFIGS)}")
    config_values = dict(MODEL_CONFIGS[name])
    family = config_values.pop("family")
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_cls(pad_token_id=0, bos_token_id=1, eos_token_id=2, **config_values)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model, 0


def synthetic_examples(count: int, sigma: float, vocab_size: int, seed: int) -> list[Example]:
    """Chat-like examples: lognormal lengths (median 350, clipped 32..2048), 20-60% prompt masked, Zipf
    token ids."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(350), sigma, count)), 32, 2048).astype(int)
    ranks = np.arange(1, vocab_size - 2)
    weights = 1.0 / ranks.astype(np.float64) ** 1.1
    weights /= weights.sum()
    token_of_rank = rng.permutation(np.arange(3, vocab_size))  # keep pad/bos/eos out of the body
    examples = []
    for length in lengths:
        ids = token_of_rank[rng.choice(len(ranks), size=int(length), p=weights)].tolist()
        prompt = int(length * rng.uniform(0.2, 0.6))
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def apply_lora(model: nn.Module, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # same adapter initialisation for every arm
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepPlan:
    """One optimizer step: its micro-batches (already collated, on the device) and token counts."""

    micro_batches: list[Any]
    label_tokens: int
    real_tokens: int
    computed_tokens: int  # tokens the model actually runs (padding included)


def plan_padded(
    steps: Sequence[Sequence[Example]], micro_batch: int, pad_id: int, device: torch.device
) -> list[StepPlan]:
    plans = []
    for step in steps:
        batches = [
            collate_padded(step[i : i + micro_batch], pad_id).to(device)
            for i in range(0, len(step), micro_batch)
        ]
        plans.append(
            StepPlan(
                batches,
                sum(b.num_label_tokens for b in batches),
                sum(b.num_tokens for b in batches),
                sum(b.padded_tokens for b in batches),
            )
        )
    return plans


def plan_packed(
    steps: Sequence[Sequence[Example]], token_budget: int, device: torch.device
) -> list[StepPlan]:
    plans = []
    for step in steps:
        groups = pack([len(e.input_ids) for e in step], token_budget)
        batches = [collate_packed([step[i] for i in group]).to(device) for group in groups]
        tokens = sum(b.num_tokens for b in batches)
        plans.append(StepPlan(batches, sum(b.num_label_tokens for b in batches), tokens, tokens))
    return plans


def baseline_micro_loss(model: nn.Module, batch: PaddedBatch, step_label_tokens: int) -> torch.Tensor:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        num_items_in_batch=step_label_tokens,
    )
    loss: torch.Tensor = out.loss
    return loss


def kubetune_micro_loss(model: nn.Module, batch: PackedBatch, step_label_tokens: int) -> torch.Tensor:
    summed, _ = fastpath.loss_sum(model, batch)
    return summed / step_label_tokens


def plain_ce_micro_loss(model: nn.Module, batch: PackedBatch, step_label_tokens: int) -> torch.Tensor:
    out = model(**batch.model_inputs())
    logits = out.logits[0, :-1].float()
    return (
        F.cross_entropy(logits, batch.labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
        / step_label_tokens
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(
    model: nn.Module,
    plans: list[StepPlan],
    micro_loss: Callable[[nn.Module, Any, int], torch.Tensor],
    cfg: BenchConfig,
) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, fused=cfg.device.type == "cuda")
    model.train()
    losses: list[float] = []
    grad_norms: list[float] = []
    step_seconds: list[float] = []
    measured_start = 0.0
    for index, plan in enumerate(plans):
        if index == cfg.warmup:
            synchronize(cfg.device)
            if cfg.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(cfg.device)
            measured_start = time.perf_counter()
        started = time.perf_counter()
        step_loss = torch.zeros((), device=cfg.device)
        for batch in plan.micro_batches:
            loss = micro_loss(model, batch, plan.label_tokens)
            loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step_loss))  # one sync per step, as a trainer logging its loss does
        grad_norms.append(float(grad_norm))
        step_seconds.append(time.perf_counter() - started)
    synchronize(cfg.device)
    elapsed = time.perf_counter() - measured_start
    measured = plans[cfg.warmup :]
    moved = all(
        not torch.equal(p.detach(), lora_b_before[n]) for n, p in model.named_parameters() if "lora_B" in n
    )
    timed = step_seconds[cfg.warmup :]
    return {
        "steps_measured": len(measured),
        "seconds": round(elapsed, 3),
        "tokens_nonpad_per_s": sum(p.real_tokens for p in measured) / elapsed,
        "label_tokens_per_s": sum(p.label_tokens for p in measured) / elapsed,
        "computed_tokens_per_s": sum(p.computed_tokens for p in measured) / elapsed,
        "step_time_p50_s": round(statistics.median(timed), 4),
        "step_time_p90_s": round(float(np.percentile(timed, 90)), 4),
        "losses": losses[:LOSS_WINDOW],
        "grad_norm_min": min(grad_norms),
        "grad_norm_nonzero": min(grad_norms) > 0,
        "lora_b_moved": bool(lora_b_before) and moved,
    }


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_gib(device: torch.device) -> tuple[float | None, float | None]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None, rss_kib / (1 << 20)


def arm_flops_per_token(model: nn.Module, lengths: list[int]) -> tuple[float, float]:
    config = fastpath.causal_lm(model).config
    matmul, lora = fastpath.matmul_param_counts(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    t_eff = fastpath.effective_context(lengths)
    flops = fastpath.flops_per_token(
        matmul, lora, config.num_hidden_layers, config.num_attention_heads, head_dim, t_eff
    )
    return flops, t_eff


ARM_NAMES = ("baseline", "kubetune", "kubetune-plain-ce", "kubetune-cap24")


def run_dataset(
    cfg: BenchConfig, pristine: nn.Module, pad_id: int, dataset: str, emit: Callable[[dict[str, Any]], None]
) -> None:
    """Every arm on one synthetic data set: one line per arm, then the throughput ratios."""
    vocab = int(fastpath.causal_lm(pristine).config.vocab_size)
    examples = synthetic_examples(cfg.steps * cfg.examples_per_step, DATASETS[dataset], vocab, cfg.seed)
    steps = [examples[i : i + cfg.examples_per_step] for i in range(0, len(examples), cfg.examples_per_step)]
    lengths = [len(e.input_ids) for e in examples[cfg.warmup * cfg.examples_per_step :]]
    results: dict[str, dict[str, Any]] = {}
    for arm in cfg.arms:
        if arm == "kubetune-cap24" and cfg.device.type != "cuda":
            continue
        # The pristine weights wait on the CPU so they never count against a memory cap.
        model = apply_lora(copy.deepcopy(pristine).to(cfg.device), cfg.seed)
        cap = None
        if arm == "baseline":
            fastpath.causal_lm(model).set_attn_implementation("sdpa")
            plans = plan_padded(steps, cfg.baseline_micro_batch, pad_id, cfg.device)
            micro_loss: Callable[[nn.Module, Any, int], torch.Tensor] = baseline_micro_loss
            budget = None
        else:
            if arm == "kubetune-cap24":
                total = torch.cuda.get_device_properties(cfg.device).total_memory
                cap = 24 * GIB
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), cfg.device)
            fastpath.prepare_model(model, cfg.device)
            requested = None if arm == "kubetune-cap24" else cfg.token_budget
            budget = fastpath.choose_token_budget(model, cfg.device, requested, max_seq_length=2048)
            plans = plan_packed(steps, budget, cfg.device)
            micro_loss = plain_ce_micro_loss if arm == "kubetune-plain-ce" else kubetune_micro_loss
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            result = run_arm(model, plans, micro_loss, cfg)
        except torch.OutOfMemoryError as error:
            result = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        finally:
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, cfg.device)
        flops, t_eff = arm_flops_per_token(model, lengths)
        alloc, reserved = peak_memory_gib(cfg.device)
        line: dict[str, Any] = {
            "arm": arm,
            "dataset": dataset,
            "device": device_name(cfg.device),
            "model": cfg.model,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "lora_r": 16,
            "examples_per_step": cfg.examples_per_step,
            "micro_batch": cfg.baseline_micro_batch if arm == "baseline" else None,
            "token_budget": budget,
            "memory_cap_gib": cap / GIB if cap else None,
            "tokens_per_step": statistics.mean(p.real_tokens for p in plans),
            "computed_tokens_per_step": statistics.mean(p.computed_tokens for p in plans),
            "micro_steps_per_step": statistics.mean(len(p.micro_batches) for p in plans),
            "attn_impl": "sdpa_padded"
            if arm == "baseline"
            else fastpath.attention_backend(cfg.device, cfg.dtype),
            "ce_impl": "chunked_fused" if arm in ("kubetune", "kubetune-cap24") else "plain",
            "grad_ckpt": False,
            "flops_per_token": flops,
            "T_eff": round(t_eff, 1),
            **result,
            "peak_mem_alloc_gib": None if alloc is None else round(alloc, 2),
            "peak_mem_reserved_gib" if cfg.device.type == "cuda" else "peak_rss_gib": round(
                reserved or 0.0, 2
            ),
        }
        if "tokens_nonpad_per_s" in result:
            line["mfu"] = (
                result["tokens_nonpad_per_s"] * flops / PEAK_BF16_FLOPS if cfg.device.type == "cuda" else None
            )
        baseline = results.get("baseline")
        if baseline and "losses" in baseline and "losses" in result:
            pairs = list(zip(baseline["losses"], result["losses"], strict=False))
            line["loss_delta_vs_baseline_mean_abs"] = statistics.mean(abs(a - b) for a, b in pairs)
            line["loss_delta_vs_baseline_mean_rel"] = statistics.mean(abs(a - b) / abs(a) for a, b in pairs)
        results[arm] = line
        emit(line)
        del model, plans
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    if "baseline" in results and "tokens_nonpad_per_s" in results["baseline"]:
        for arm, line in results.items():
            if arm != "baseline" and "tokens_nonpad_per_s" in line:
                emit(
                    {
                        "ratio": f"{arm}/baseline",
                        "dataset": dataset,
                        "model": cfg.model,
                        "device": line["device"],
                        "tokens_nonpad_per_s": line["tokens_nonpad_per_s"]
                        / results["baseline"]["tokens_nonpad_per_s"],
                    }
                )
    capped, uncapped = results.get("kubetune-cap24", {}), results.get("kubetune", {})
    if "tokens_nonpad_per_s" in capped and "tokens_nonpad_per_s" in uncapped:
        emit(
            {
                "ratio": "kubetune-cap24/kubetune",
                "dataset": dataset,
                "model": cfg.model,
                "device": capped["device"],
                "tokens_nonpad_per_s": capped["tokens_nonpad_per_s"] / uncapped["tokens_nonpad_per_s"],
            }
        )


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, str | None]:
    """The run's settings, and the file to append the JSON lines to (``--out``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_devtools.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="tiny", choices=["tiny", *MODEL_CONFIGS])
    parser.add_argument(
        "--arms",
        default=None,
        help=f"comma-separated, from {', '.join(ARM_NAMES)}; baseline first for the loss deltas "
        "(default: baseline,kubetune, plus kubetune-cap24 on a GPU)",
    )
    parser.add_argument("--datasets", default="high-variance,low-variance", help=", ".join(DATASETS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm, warm-up included")
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing")
    parser.add_argument("--examples-per-step", type=int, default=16)
    parser.add_argument(
        "--baseline-micro-batch",
        type=int,
        default=None,
        help="examples per padded micro-batch (default: 4 on a GPU, 16 on the CPU)",
    )
    parser.add_argument(
        "--token-budget", type=int, default=None, help="tokens per packed micro-step (default: chosen)"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU intra-op threads (default on the CPU: 1)"
    )
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    arms = tuple(a for a in (args.arms or "baseline,kubetune").split(",") if a)
    if args.arms is None and on_gpu:
        arms += ("kubetune-cap24",)
    datasets = tuple(d for d in args.datasets.split(",") if d)
    for arm in arms:
        if arm not in ARM_NAMES:
            parser.error(f"unknown arm {arm!r}; choose from {', '.join(ARM_NAMES)}")
    for dataset in datasets:
        if dataset not in DATASETS:
            parser.error(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
    steps = args.steps if args.steps is not None else (40 if on_gpu else LOSS_WINDOW)
    warmup = args.warmup if args.warmup is not None else (8 if on_gpu else 2)
    if not on_gpu:
        # One intra-op thread by default: on a shared CPU, a second OpenMP thread waiting at barriers behind
        # other processes makes step times swing by several x, and the comparison is per-thread anyway.
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if steps <= warmup:
        parser.error(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    if args.model != "tiny" and not on_gpu:
        print(f"warning: {args.model} on the CPU will be very slow", file=sys.stderr)
    cfg = BenchConfig(
        model=args.model,
        arms=arms,
        datasets=datasets,
        steps=steps,
        warmup=warmup,
        examples_per_step=args.examples_per_step,
        baseline_micro_batch=args.baseline_micro_batch or (4 if on_gpu else 16),
        token_budget=args.token_budget,
        lr=args.lr,
        seed=args.seed,
        device=device,
        dtype=torch.bfloat16 if on_gpu else torch.float32,
    )
    return cfg, args.out


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    threads = torch.get_num_threads()
    try:
        return _run(argv)
    finally:
        torch.set_num_threads(threads)


def _run(argv: Sequence[str] | None) -> int:
    cfg, out_path = parse_args(argv)
    out_file = open(out_path, "a", encoding="utf-8") if out_path else None  # noqa: SIM115

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line, default=float)
        print(text, flush=True)
        if out_file:
            out_file.write(text + "\n")
            out_file.flush()

    started = time.perf_counter()
    pristine, pad_id = build_model(cfg.model, cfg.device, cfg.dtype, cfg.seed)
    pristine.to("cpu")
    for dataset in cfg.datasets:
        run_dataset(cfg, pristine, pad_id, dataset, emit)
    print(f"bench finished in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if out_file:
        out_file.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
