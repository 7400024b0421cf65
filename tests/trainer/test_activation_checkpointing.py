"""Activation checkpointing: the same gradients with and without it, far fewer bytes kept for backward
(counted tensor by tensor as autograd saves them), the setting's decisions, and the trainer applying it
when the memory plan needs it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from conftest import Workspace, chat_records, jsonl
from kubetune_devtools.tiny import build_tiny_model
from kubetune_trainer import parallel
from kubetune_trainer.contract import LoraConfig, TrainerReason
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.fastpath import loss_sum, prepare_model
from kubetune_trainer.memory_plan import USABLE_FRACTION, Request, choose, estimate, model_shape
from kubetune_trainer.model import apply_method
from kubetune_trainer.packing import IGNORE_INDEX, Example, collate_packed
from kubetune_trainer.parallel import SINGLE
from kubetune_trainer.preparation import (
    checkpointed_layers,
    enable_activation_checkpointing,
    use_activation_checkpointing,
)


@contextmanager
def saved_bytes(exclude: Callable[[torch.Tensor], bool] = lambda t: False) -> Iterator[list[int]]:
    """Counts the bytes autograd saves for backward inside the block (each storage once), leaving out the
    tensors ``exclude`` names. Checkpointed regions install their own hooks, so what they drop never
    reaches this one: the count is what the graph really holds."""
    seen: set[int] = set()
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not exclude(tensor) and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def packed_batch(tokens: int = 1024) -> Any:
    generator = torch.Generator().manual_seed(3)
    examples = []
    for length in (tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4):
        ids = torch.randint(5, 500, (length,), generator=generator).tolist()
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * 8 + ids[8:]))
    return collate_packed(examples)


def step_gradients(model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int, float]:
    """Gradients of one micro-step of the trainer's fast path, the bytes it saved for backward (the
    model's own parameters left out: they are held anyway) and its loss."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    torch.manual_seed(11)  # the same dropout masks in both runs
    with saved_bytes(lambda t: t.untyped_storage().data_ptr() in parameters) as total:
        summed, count = loss_sum(model, batch)
        loss = summed / count
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, total[0], loss.item()


@pytest.mark.parametrize(
    ("method", "dropout"),
    [("LoRA", 0.0), ("LoRA", 0.1), ("Full", 0.0)],
    ids=["lora", "lora-dropout", "full"],
)
def test_activation_checkpointing_gives_identical_gradients_and_keeps_a_third_of_the_bytes(
    method: str, dropout: float
) -> None:
    base, _ = build_tiny_model(seed=0)
    prepare_model(base, "cpu")
    torch.manual_seed(0)
    model = apply_method(base, method, LoraConfig(r=8, alpha=16, dropout=dropout))
    if method != "Full":  # B = 0 at initialisation would leave most adapter gradients zero
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
    model.train()
    checkpointed = copy.deepcopy(model)
    layers = enable_activation_checkpointing(checkpointed)
    assert layers == 2  # every decoder layer of the tiny model

    batch = packed_batch()
    plain_grads, plain_bytes, plain_loss = step_gradients(model, batch)
    ckpt_grads, ckpt_bytes, ckpt_loss = step_gradients(checkpointed, batch)

    assert ckpt_loss == plain_loss
    assert plain_grads.keys() == ckpt_grads.keys()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(plain_grads) == trainable
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0, msg=name)
    ratio = plain_bytes / ckpt_bytes
    print(
        f"activation checkpointing, tiny model, {method} dropout={dropout}: saved for backward "
        f"{plain_bytes / 2**20:.2f} MiB without, {ckpt_bytes / 2**20:.2f} MiB with ({ratio:.1f}x less)"
    )
    assert ratio >= 3


def test_activation_checkpointing_keeps_parameter_names_and_eval_untouched() -> None:
    base, _ = build_tiny_model(seed=0)
    prepare_model(base, "cpu")
    model = apply_method(base, "LoRA", LoraConfig(r=4, alpha=8, dropout=0.0))
    names = [name for name, _ in model.named_parameters()]
    enable_activation_checkpointing(model)
    assert [name for name, _ in model.named_parameters()] == names
    assert all(layer.gradient_checkpointing for layer in checkpointed_layers(model))
    # Without gradients nothing is recomputed later, so nothing is checkpointed.
    model.eval()
    with torch.no_grad(), saved_bytes() as total:
        loss_sum(model, packed_batch(64))
    assert total[0] == 0


@pytest.mark.parametrize(
    ("setting", "plan", "expected"),
    [
        ("Auto", True, True),
        ("Auto", False, False),
        ("Auto", None, False),
        ("Always", False, True),
        ("Always", None, True),
        ("Never", True, False),
    ],
)
def test_activation_checkpointing_setting_decides_or_follows_the_plan(
    setting: str, plan: bool | None, expected: bool
) -> None:
    assert use_activation_checkpointing(setting, plan) is expected


def test_activation_checkpointing_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="Auto, Always, Never"):
        use_activation_checkpointing("Sometimes", None)


LLAMA_3_1_8B_SHAPE = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_activation_checkpointing_setting_in_the_memory_plan() -> None:
    shape = model_shape(LLAMA_3_1_8B_SHAPE)
    request = Request(method="LoRA", processes=1, micro_tokens=2048, capacity=24 * 2**30)
    assert choose(shape, request).activation_checkpointing  # Auto: only with it does 8B LoRA fit 24 GiB
    roomy = replace(request, capacity=80 * 2**30)
    assert not choose(shape, roomy).activation_checkpointing
    assert choose(shape, replace(roomy, activation_checkpointing="Always")).activation_checkpointing
    with pytest.raises(TrainerError) as refused:
        choose(shape, replace(request, activation_checkpointing="Never"))
    assert refused.value.reason == TrainerReason.INSUFFICIENT_GPU_MEMORY
    assert "hyperparameters.activationCheckpointing Auto" in refused.value.message


@contextmanager
def trainer_saved_bytes() -> Iterator[list[int]]:
    """Bytes autograd saved for backward over a whole in-process trainer run, as the saves happen."""
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def test_activation_checkpointing_auto_is_applied_by_the_trainer_when_the_plan_needs_it(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(24)))
    config = ws.config(train)
    config = replace(config, hyperparameters=replace(config.hyperparameters, max_steps=3))
    # A device just too small for the tiny model's step unless its activations are checkpointed.
    model_config = build_tiny_model(seed=0)[0].config.to_dict()
    shape = model_shape(model_config)
    request = Request(
        method="LoRA", processes=1, micro_tokens=512, device_type="cpu", lora_r=4, lora_dropout=0.0
    )
    with_ckpt = estimate(shape, request, SINGLE, True).total
    without = estimate(shape, request, SINGLE, False).total
    assert with_ckpt < without
    capacity = int((with_ckpt + without) / 2 / USABLE_FRACTION)
    monkeypatch.setattr(parallel, "device_capacity", lambda device: capacity)

    runs: dict[str, Any] = {}
    for setting in ("Auto", "Never"):
        job = replace(
            config, hyperparameters=replace(config.hyperparameters, activation_checkpointing=setting)
        )
        if setting == "Never":
            monkeypatch.setattr(parallel, "device_capacity", lambda device: None)
        with trainer_saved_bytes() as total:
            result = ws.run(
                replace(job, output=replace(job.output, uri=f"s3://{ws.bucket}/{setting}/")), monkeypatch
            )
        assert result.code == 0, result.summary.message
        runs[setting] = (result.summary, total[0])
    auto, auto_bytes = runs["Auto"]
    never, never_bytes = runs["Never"]
    assert auto.plan is not None and auto.plan["activationCheckpointing"] is True
    assert never.plan is not None and never.plan["activationCheckpointing"] is False
    assert auto.provenance is not None and auto.provenance["resolved"]["activationCheckpointing"] is True
    # The same training, with far less kept for backward.
    assert auto.metrics is not None and never.metrics is not None
    assert auto.metrics["trainLoss"] == pytest.approx(never.metrics["trainLoss"], rel=1e-6)
    assert auto.adapter is not None and never.adapter is not None
    assert auto.adapter.sha256 == never.adapter.sha256  # bit for bit the same adapter
    print(
        f"trainer run: saved for backward {never_bytes / 2**20:.1f} MiB without, "
        f"{auto_bytes / 2**20:.1f} MiB with"
    )
    assert never_bytes > 2 * auto_bytes
