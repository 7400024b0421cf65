"""Correctness of the fast step on the CPU in float32: packed == padded, no attention across examples."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kubetune_devtools.tiny import build_tiny_model
from kubetune_trainer import fastpath
from kubetune_trainer.packing import IGNORE_INDEX, Example, collate_packed, collate_padded

LENGTHS = (5, 23, 1, 40, 12)


def make_examples(seed: int = 1, lengths: tuple[int, ...] = LENGTHS, vocab: int = 500) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        prompt = length // 3
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    model, tokenizer = build_tiny_model(seed=0)
    model.float()
    return model, tokenizer


def reference_and_fast(tiny: tuple[Any, Any], lora: bool) -> tuple[nn.Module, nn.Module]:
    """Two identical models: the plain transformers one (sdpa) and one prepared for the fast path."""
    model, _ = tiny
    reference = copy.deepcopy(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False
        )  # random B, so every adapter weight gets a gradient
        reference = get_peft_model(reference, config)
    reference.train()
    fast = copy.deepcopy(reference)
    fastpath.causal_lm(reference).set_attn_implementation("sdpa")
    fastpath.prepare_model(fast, "cpu")
    return reference, fast


def reference_loss_sum(model: nn.Module, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """The usual transformers loss (mean over label tokens) on a padded batch, scaled back to a sum."""
    batch = collate_padded(examples, pad_id=pad_id)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss * batch.num_label_tokens, batch.num_label_tokens


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_loss_and_gradients_match_the_padded_transformers_loop(
    tiny: tuple[Any, Any], lora: bool
) -> None:
    reference, fast = reference_and_fast(tiny, lora)
    examples = make_examples()
    pad_id = tiny[1].pad_token_id

    expected, expected_count = reference_loss_sum(reference, examples, pad_id)
    expected.backward()
    packed_loss, count = fastpath.loss_sum(fast, collate_packed(examples))
    packed_loss.backward()

    assert count == expected_count == sum(len(e.labels) - len(e.labels) // 3 for e in examples) - 1
    # Mean loss per label token within 1e-5 (float32 summation order differs between the two paths).
    assert packed_loss.item() / count == pytest.approx(expected.item() / count, abs=1e-5)
    assert packed_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    want, got = trainable_grads(reference), trainable_grads(fast)
    assert want.keys() == got.keys() and len(want) > 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_padded_batches_take_the_fast_loss_too(tiny: tuple[Any, Any]) -> None:
    reference, fast = reference_and_fast(tiny, lora=False)
    examples = make_examples(seed=2)
    pad_id = tiny[1].pad_token_id
    expected, _ = reference_loss_sum(reference, examples, pad_id)
    padded_loss, count = fastpath.loss_sum(fast, collate_padded(examples, pad_id=pad_id))
    assert count == collate_packed(examples).num_label_tokens
    assert padded_loss.item() / count == pytest.approx(expected.item() / count, abs=1e-5)


def packed_hidden(model: nn.Module, examples: list[Example]) -> torch.Tensor:
    batch = collate_packed(examples)
    decoder = model.get_decoder()
    with torch.no_grad():
        out = decoder(**batch.model_inputs())
    return out.last_hidden_state[0]


def test_attention_never_crosses_packed_examples(tiny: tuple[Any, Any]) -> None:
    _, fast = reference_and_fast(tiny, lora=False)
    fast.eval()
    examples = make_examples(seed=3, lengths=(9, 14, 11))
    before = packed_hidden(fast, examples)
    changed = list(examples)
    changed[1] = Example(
        input_ids=[(t * 7 + 1) % 400 + 3 for t in examples[1].input_ids], labels=examples[1].labels
    )
    after = packed_hidden(fast, changed)
    first, second = slice(0, 9), slice(9, 23)
    third = slice(23, 34)
    torch.testing.assert_close(after[first], before[first], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[third], before[third], rtol=0, atol=1e-6)
    assert (after[second] - before[second]).abs().max() > 1e-2


def test_each_packed_example_sees_what_it_would_see_alone(tiny: tuple[Any, Any]) -> None:
    """Positions restart per example: the packed hidden states equal each example run on its own."""
    _, fast = reference_and_fast(tiny, lora=False)
    fast.eval()
    examples = make_examples(seed=4, lengths=(6, 17, 8))
    packed = packed_hidden(fast, examples)
    start = 0
    for example in examples:
        alone = packed_hidden(fast, [example])
        torch.testing.assert_close(
            packed[start : start + len(example.input_ids)], alone, rtol=1e-5, atol=1e-5
        )
        start += len(example.input_ids)


class ScaledHead(nn.Module):
    """Not a plain nn.Linear, so the chunked loss takes its recompute-in-backward path."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 0.5


@pytest.mark.parametrize("wrap", [False, True], ids=["fused", "recompute"])
def test_chunked_cross_entropy_equals_plain_cross_entropy(wrap: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 37, bias=True)
    head: nn.Module = ScaledHead(linear) if wrap else linear
    hidden = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 37, (50,))

    expected = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    expected.backward()
    want = (hidden.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone())  # type: ignore[union-attr]
    hidden.grad = linear.weight.grad = linear.bias.grad = None

    got = fastpath.chunked_cross_entropy_sum(hidden, targets, head, chunk_rows=7)
    (got * 2.0).backward()  # a non-unit upstream gradient must scale every gradient
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    for name, g, w in zip(
        ("hidden", "weight", "bias"), (hidden.grad, linear.weight.grad, linear.bias.grad), want, strict=True
    ):
        torch.testing.assert_close(g, 2.0 * w, rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_cross_entropy_without_grad_and_empty() -> None:
    head = nn.Linear(8, 11)
    hidden = torch.randn(5, 8)
    targets = torch.randint(0, 11, (5,))
    with torch.no_grad():
        got = fastpath.chunked_cross_entropy_sum(hidden, targets, head, chunk_rows=2)
        expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    torch.testing.assert_close(got, expected)
    assert fastpath.chunked_cross_entropy_sum(hidden[:0], targets[:0], head).item() == 0.0


def test_flops_per_token_matches_the_llama_1b_worked_example() -> None:
    hidden, layers, heads, kv_heads, head_dim, ffn, vocab, rank = 2048, 16, 32, 8, 64, 8192, 128256, 16
    kv = kv_heads * head_dim
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * ffn
    matmul = layers * per_layer + hidden * vocab
    lora = layers * rank * ((hidden + hidden) * 2 + (hidden + kv) * 2 + 3 * (hidden + ffn))
    flops = fastpath.flops_per_token(matmul, lora, layers, heads, head_dim, effective_context=1024)
    assert flops == 4 * matmul + 6 * lora + 12 * layers * heads * head_dim * 1024
    assert flops == pytest.approx(5.41e9, rel=5e-3)
    full = fastpath.flops_per_token(matmul, 0, layers, heads, head_dim, 1024, full_finetune=True)
    assert full == pytest.approx(7.82e9, rel=5e-3)
    with pytest.raises(ValueError, match="num_layers"):
        fastpath.flops_per_token(matmul, lora, -1, heads, head_dim, 1024)


def test_effective_context_and_param_counts(tiny: tuple[Any, Any]) -> None:
    assert fastpath.effective_context([1, 3]) == pytest.approx((1 + 9) / 4)
    reference, _ = reference_and_fast(tiny, lora=True)
    config = fastpath.causal_lm(reference).config
    d, ff, v, layers = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    matmul, lora = fastpath.matmul_param_counts(reference)
    assert matmul == layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * v
    assert lora == layers * 4 * (4 * d + 2 * (d + kv) + 3 * (d + ff))


def test_budget_from_memory_arithmetic() -> None:
    gib = 1 << 30
    # 20 GiB usable * 0.85 headroom - 2 GiB fixed = 15 GiB at 1 MiB per token -> 15360 tokens.
    assert fastpath.budget_from_memory(20 * gib, 2 * gib, float(1 << 20), 2048) == 15360
    assert fastpath.budget_from_memory(1000 * gib, 0, 1.0, 2048) == 65536
    assert (
        fastpath.budget_from_memory(gib, 2 * gib, 1.0, 2048) == 256
    )  # nothing fits: smallest budget, warned


def test_choose_token_budget_on_cpu(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    assert fastpath.choose_token_budget(model, "cpu", requested=3000, max_seq_length=2048) == 3000
    assert fastpath.choose_token_budget(model, "cpu", requested=None, max_seq_length=10000) >= 10000
    with pytest.raises(ValueError, match="token budget"):
        fastpath.choose_token_budget(model, "cpu", requested=0, max_seq_length=2048)


def test_choose_token_budget_on_a_gpu_fits_the_probed_memory(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU sizing, with the two device measurements replaced by a known linear memory model."""
    model, _ = tiny
    per_token, fixed = 600 * 1024, 300 * (1 << 20)
    probed: list[int] = []

    def fake_probe(_model: nn.Module, _device: torch.device, tokens: int, _vocab: int) -> int:
        probed.append(tokens)
        return fixed + per_token * tokens

    monkeypatch.setattr(fastpath, "_probe_peak_bytes", fake_probe)
    monkeypatch.setattr(fastpath, "usable_device_bytes", lambda _device: 24 * (1 << 30))
    budget = fastpath.choose_token_budget(model, "cuda", requested=None, max_seq_length=2048)
    assert probed == [1024, 2048]
    state = fastpath._trainable_state_bytes(model)
    assert budget % 256 == 0
    assert fixed + state + per_token * budget <= 0.85 * 24 * (1 << 30)
    assert fixed + state + per_token * (budget + 256) > 0.85 * 24 * (1 << 30)


@pytest.mark.parametrize(
    ("weight_dtype", "autocast_dtype", "expected"),
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),  # Full on a GPU: fp32 master weights, bf16 compute
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # LoRA on a GPU: a bf16 base under autocast
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float32, None, torch.float32),  # CPU: float32 throughout
    ],
)
def test_fused_loss_head_compute_dtype(
    weight_dtype: torch.dtype, autocast_dtype: torch.dtype | None, expected: torch.dtype
) -> None:
    assert fastpath.head_compute_dtype(weight_dtype, autocast_dtype) == expected


def test_fused_loss_backward_matmuls_run_in_the_autocast_dtype_over_fp32_weights() -> None:
    """Under bf16 autocast (what a GPU step runs in) with float32 master weights, every matmul of the fused
    loss, including the gradients against the hidden states and the head, multiplies bf16 operands; the
    gradients come back in the parameters' own dtype and agree with a bf16 reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, torch.dtype]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.seen.extend((str(func), a.dtype) for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    head = nn.Linear(32, 53, bias=False)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 53, (40,))
    recorder = MatmulDtypes()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastpath.chunked_cross_entropy_sum(hidden, targets, head, chunk_rows=16)
    # Three chunks: logits, grad of hidden and grad of the weight each take one matmul per chunk.
    assert len(recorder.seen) >= 3 * 3 * 2
    assert {dtype for _, dtype in recorder.seen} == {torch.bfloat16}, recorder.seen
    loss.backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32

    reference_hidden = hidden.detach().bfloat16().float().requires_grad_(True)
    reference_weight = head.weight.detach().bfloat16().float().requires_grad_(True)
    expected = F.cross_entropy(reference_hidden @ reference_weight.t(), targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(head.weight.grad, reference_weight.grad, rtol=5e-2, atol=5e-2)
