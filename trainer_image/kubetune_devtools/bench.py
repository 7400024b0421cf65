"""Trainer throughput: the trainer's own optimizer step against what a transformers + peft user runs today.

    python -m kubetune_devtools.bench --model tiny                  # CPU, what `make bench` runs
    python -m kubetune_devtools.bench --model llama-1b --out bench_results/h100.jsonl

Every arm starts from the same random weights (and the same LoRA initialisation), sees the same synthetic
examples in the same optimizer steps, 16 examples per step, and takes AdamW steps (the recipe's optimizer,
gradients clipped to norm 1). Arms:

- ``padded``: right-padded micro-batches of ``--baseline-micro-batch`` examples, ``sdpa`` attention, the
  model's own cross-entropy with ``num_items_in_batch`` (the step's label tokens, as the transformers Trainer
  passes it).
- ``flattening``: the same micro-batches through transformers' ``DataCollatorWithFlattening`` (one row, no
  padding, position ids restarting per example): the one flag a TRL user sets for padding-free training.
- ``kubetune``: ``train.Trainer.optimizer_step``, the very call the trainer's loop makes: micro-batches packed
  by token budget, varlen attention, chunked fused cross-entropy over label positions only.
- ``kubetune-cap24`` (GPU only): ``kubetune`` with the process capped to 24 GiB; it picks its own budget.

One JSON line per arm and data set, each with its losses compared to the first arm's; then the tokens/s
ratios of each kubetune arm over each baseline. MFU counts non-pad tokens only. The exit code is 1 when an
arm's losses differ from the first arm's.
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
from torch import nn

from kubetune_trainer import fastpath
from kubetune_trainer.metrics import Metrics
from kubetune_trainer.packing import IGNORE_INDEX, Example, collate_padded
from kubetune_trainer.parallel import LossModel
from kubetune_trainer.schedule import Batching, Plan
from kubetune_trainer.train import (
    MAX_GRAD_NORM,
    LoopSettings,
    Runtime,
    StopFlag,
    Trainer,
    TrainState,
    make_optimizer,
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
# Arms: one optimizer step each, over the same examples
# ----------------------------------------------------------------------------------------------------

ARM_NAMES = ("padded", "flattening", "kubetune", "kubetune-cap24")
BASELINES = ("padded", "flattening")
StepFn = Callable[[int], tuple[float, float]]  # step index -> (step loss, grad norm before clipping)


@dataclass(frozen=True)
class StepCounts:
    """Tokens of one optimizer step, known before it runs."""

    label_tokens: int
    real_tokens: int
    computed_tokens: int  # tokens the model runs, padding included
    micro_steps: int


def label_count(example: Example) -> int:
    """Positions whose next token carries a label (the first token is never predicted)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def step_counts(examples: Sequence[Example], micro_batches: list[list[int]], padded: bool) -> StepCounts:
    lengths = [[len(examples[i].input_ids) for i in micro] for micro in micro_batches]
    real = sum(sum(micro) for micro in lengths)
    return StepCounts(
        label_tokens=sum(label_count(examples[i]) for micro in micro_batches for i in micro),
        real_tokens=real,
        computed_tokens=sum(len(micro) * max(micro) for micro in lengths) if padded else real,
        micro_steps=len(micro_batches),
    )


def cut_steps(cfg: BenchConfig, examples: Sequence[Example], batching: Batching) -> list[list[list[int]]]:
    """Every arm's steps hold the same examples (``examples_per_step`` consecutive ones); ``batching`` cuts
    each step into micro-batches (by example count for the baselines, by token budget for kubetune)."""
    lengths = [len(e.input_ids) for e in examples]
    per_step = cfg.examples_per_step
    return [
        batching.micro_batches(lengths, range(start, start + per_step))
        for start in range(0, len(examples), per_step)
    ]


def baseline_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    examples: Sequence[Example],
    steps: list[list[list[int]]],
    collate: Callable[[list[Example]], dict[str, torch.Tensor]],
) -> StepFn:
    """The loop a transformers user writes (or the Trainer runs): collate each micro-batch, the model's own
    loss with ``num_items_in_batch`` (the step's label tokens, as the Trainer passes it), clip to 1, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(index: int) -> tuple[float, float]:
        micro_batches = steps[index]
        label_tokens = sum(label_count(examples[i]) for micro in micro_batches for i in micro)
        step_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for micro in micro_batches:
            inputs = {k: v.to(runtime.device) for k, v in collate([examples[i] for i in micro]).items()}
            with runtime.autocast():
                loss = model(**inputs, num_items_in_batch=label_tokens, use_cache=False).loss
            loss.backward()
            step_loss += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(step_loss), float(grad_norm)

    return step


def padded_collator(pad_id: int) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        batch = collate_padded(examples, pad_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}

    return collate


def flattening_collator() -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """transformers' ``DataCollatorWithFlattening``: the micro-batch as one row, position ids restarting at
    each example, the first label of each example masked."""
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_position_ids=True)

    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        return dict(collator(features))

    return collate


def flattening_attention(device: torch.device) -> str:
    """What the padding-free transformers path uses: flash-attention 2 where it is installed (it reads the
    example boundaries from the position ids), else sdpa with a block-diagonal mask built from them."""
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def kubetune_step(
    model: nn.Module,
    runtime: Runtime,
    examples: Sequence[Example],
    steps: list[list[list[int]]],
    batching: Batching,
    cfg: BenchConfig,
    pad_id: int,
) -> StepFn:
    """``train.Trainer.optimizer_step``, the call the trainer's loop makes once per step, on a Trainer set
    up as the recipe sets it up (the model and its loss as one module, the recipe's optimizer)."""
    plan = Plan(steps, [0] * len(steps), len(steps), batching)
    settings = LoopSettings(
        learning_rate=cfg.lr,
        scheduler="Constant",
        warmup_ratio=0.0,
        packing=True,
        pad_id=pad_id,
        eval_every_steps=None,
        checkpoint_every_steps=None,
        checkpoint_every_minutes=None,
    )
    trainer = Trainer(
        LossModel(model),
        make_optimizer(model, cfg.lr, weight_decay=0.0),
        plan,
        examples,
        [],
        [],
        settings,
        runtime,
        None,
        Metrics(),
        StopFlag(),
        TrainState(),
    )

    def step(index: int) -> tuple[float, float]:
        loss, _tokens, grad_norm = trainer.optimizer_step(plan.steps[index])
        return loss, grad_norm

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(
    model: nn.Module, step: StepFn, counts: list[StepCounts], cfg: BenchConfig
) -> dict[str, Any]:
    """Every step of one arm, the first ``warmup`` untimed; throughput over the rest."""
    lora_b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    model.train()
    losses: list[float] = []
    grad_norms: list[float] = []
    step_seconds: list[float] = []
    measured_start = 0.0
    for index in range(len(counts)):
        if index == cfg.warmup:
            synchronize(cfg.device)
            if cfg.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(cfg.device)
            measured_start = time.perf_counter()
        started = time.perf_counter()
        loss, grad_norm = step(index)  # both are Python floats: one sync per step, as a logging trainer has
        losses.append(loss)
        grad_norms.append(grad_norm)
        step_seconds.append(time.perf_counter() - started)
    synchronize(cfg.device)
    elapsed = time.perf_counter() - measured_start
    measured = counts[cfg.warmup :]
    moved = all(
        not torch.equal(p.detach(), lora_b_before[n]) for n, p in model.named_parameters() if "lora_B" in n
    )
    timed = step_seconds[cfg.warmup :]
    return {
        "steps_measured": len(measured),
        "seconds": round(elapsed, 3),
        "tokens_nonpad_per_s": sum(c.real_tokens for c in measured) / elapsed,
        "label_tokens_per_s": sum(c.label_tokens for c in measured) / elapsed,
        "computed_tokens_per_s": sum(c.computed_tokens for c in measured) / elapsed,
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
    """Model FLOPs per non-pad token (forward and backward) at the examples' effective context: the same
    figure for every arm, so MFU counts the useful work and never the padding a loop chose to compute."""
    config = fastpath.causal_lm(model).config
    matmul, lora = fastpath.matmul_param_counts(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    t_eff = fastpath.effective_context(lengths)
    flops = fastpath.flops_per_token(
        matmul, lora, config.num_hidden_layers, config.num_attention_heads, head_dim, t_eff
    )
    return flops, t_eff


def loss_tolerance(device: torch.device) -> float:
    """Mean relative loss difference allowed between arms: float32 on the CPU only reorders sums; bf16 on a
    GPU rounds differently in each kernel."""
    return 1e-4 if device.type != "cuda" else 2e-2


def run_dataset(
    cfg: BenchConfig, pristine: nn.Module, pad_id: int, dataset: str, emit: Callable[[dict[str, Any]], None]
) -> bool:
    """Every arm on one synthetic data set: one line per arm, then the throughput ratios of each kubetune
    arm over each baseline. False when an arm's losses differ from the first arm's."""
    vocab = int(fastpath.causal_lm(pristine).config.vocab_size)
    examples = synthetic_examples(cfg.steps * cfg.examples_per_step, DATASETS[dataset], vocab, cfg.seed)
    lengths = [len(e.input_ids) for e in examples[cfg.warmup * cfg.examples_per_step :]]
    runtime = Runtime(cfg.device, 0, 1, torch.bfloat16 if cfg.device.type == "cuda" else None)
    by_count = Batching(None, cfg.baseline_micro_batch, 1)
    results: dict[str, dict[str, Any]] = {}
    losses_match = True
    for arm in cfg.arms:
        if arm == "kubetune-cap24" and cfg.device.type != "cuda":
            continue
        # The pristine weights wait on the CPU so they never count against a memory cap.
        model = apply_lora(copy.deepcopy(pristine).to(cfg.device), cfg.seed)
        cap = None
        budget = None
        if arm in BASELINES:
            attention = "sdpa" if arm == "padded" else flattening_attention(cfg.device)
            fastpath.causal_lm(model).set_attn_implementation(attention)
            steps = cut_steps(cfg, examples, by_count)
            collate = padded_collator(pad_id) if arm == "padded" else flattening_collator()
            optimizer = make_optimizer(model, cfg.lr, weight_decay=0.0)
            step = baseline_step(model, optimizer, runtime, examples, steps, collate)
            attn_impl = f"{attention}_padded" if arm == "padded" else f"{attention}_position_ids"
            ce_impl = "transformers"
        else:
            if arm == "kubetune-cap24":
                total = torch.cuda.get_device_properties(cfg.device).total_memory
                cap = 24 * GIB
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), cfg.device)
            fastpath.prepare_model(model, cfg.device)
            requested = None if arm == "kubetune-cap24" else cfg.token_budget
            budget = fastpath.choose_token_budget(model, cfg.device, requested, max_seq_length=2048)
            batching = Batching(budget, None, 1)
            steps = cut_steps(cfg, examples, batching)
            step = kubetune_step(model, runtime, examples, steps, batching, cfg, pad_id)
            attn_impl = fastpath.attention_backend(cfg.device, cfg.dtype)
            ce_impl = "chunked_fused"
        counts = [step_counts(examples, micro, padded=arm == "padded") for micro in steps]
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            result = run_arm(model, step, counts, cfg)
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
            "micro_batch": cfg.baseline_micro_batch if arm in BASELINES else None,
            "token_budget": budget,
            "memory_cap_gib": cap / GIB if cap else None,
            "tokens_per_step": statistics.mean(c.real_tokens for c in counts),
            "label_tokens_per_step": statistics.mean(c.label_tokens for c in counts),
            "computed_tokens_per_step": statistics.mean(c.computed_tokens for c in counts),
            "micro_steps_per_step": statistics.mean(c.micro_steps for c in counts),
            "attn_impl": attn_impl,
            "ce_impl": ce_impl,
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
            # Non-pad tokens only: a padded loop's extra work is waste, not utilisation.
            line["mfu"] = (
                result["tokens_nonpad_per_s"] * flops / PEAK_BF16_FLOPS if cfg.device.type == "cuda" else None
            )
        reference = next(iter(results.values()), None)
        if reference and "losses" in reference and "losses" in result:
            pairs = list(zip(reference["losses"], result["losses"], strict=True))
            line["loss_reference"] = reference["arm"]
            line["loss_delta_mean_abs"] = statistics.mean(abs(a - b) for a, b in pairs)
            line["loss_delta_mean_rel"] = statistics.mean(abs(a - b) / abs(a) for a, b in pairs)
            line["losses_match"] = line["loss_delta_mean_rel"] <= loss_tolerance(cfg.device)
            losses_match = losses_match and line["losses_match"]
        results[arm] = line
        emit(line)
        del model, step
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    ours = [arm for arm in results if arm not in BASELINES]
    for numerator, denominator in [(arm, base) for arm in ours for base in BASELINES] + [
        ("flattening", "padded"),
        ("kubetune-cap24", "kubetune"),
    ]:
        top, bottom = results.get(numerator, {}), results.get(denominator, {})
        if "tokens_nonpad_per_s" in top and "tokens_nonpad_per_s" in bottom:
            emit(
                {
                    "ratio": f"{numerator}/{denominator}",
                    "dataset": dataset,
                    "model": cfg.model,
                    "device": top["device"],
                    "tokens_nonpad_per_s": top["tokens_nonpad_per_s"] / bottom["tokens_nonpad_per_s"],
                }
            )
    return losses_match


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, str | None]:
    """The run's settings, and the file to append the JSON lines to (``--out``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_devtools.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="tiny", choices=["tiny", *MODEL_CONFIGS])
    parser.add_argument(
        "--arms",
        default=None,
        help=f"comma-separated, from {', '.join(ARM_NAMES)}; losses are compared with the first one "
        "(default: padded,flattening,kubetune, plus kubetune-cap24 on a GPU)",
    )
    parser.add_argument("--datasets", default="high-variance,low-variance", help=", ".join(DATASETS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm, warm-up included")
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing")
    parser.add_argument("--examples-per-step", type=int, default=16)
    parser.add_argument(
        "--baseline-micro-batch",
        type=int,
        default=None,
        help="examples per micro-batch of the baselines (default: 4 on a GPU, 16 on the CPU)",
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
    arms = tuple(a for a in (args.arms or "padded,flattening,kubetune").split(",") if a)
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
    losses_match = True
    for dataset in cfg.datasets:
        losses_match = run_dataset(cfg, pristine, pad_id, dataset, emit) and losses_match
    print(f"bench finished in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if out_file:
        out_file.close()
    if not losses_match:
        print("the arms' losses differ on the same batches (see losses_match above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
