"""QLoRA: LoRA adapters trained on a 4-bit NF4 base (bitsandbytes, double quantization), end to end through
the trainer on the CPU; the published adapter loads with PEFT onto the unquantized base. Also the
precision decisions a GPU pod makes, and the bases bitsandbytes cannot quantize."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training import VALIDATION, base_model, download, eval_loss

from conftest import Workspace, chat_records, jsonl
from kubetune_trainer.contract import DatasetConfig, OutputConfig, TrainerReason
from kubetune_trainer.errors import EXIT_PERMANENT
from kubetune_trainer.fastpath import prepare_model
from kubetune_trainer.preparation import load_dtype, quantization_for, quantized_layers

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def qlora_config(ws: Workspace, train: str, val: str) -> Any:
    config = ws.config(train, method="QLoRA")
    return replace(
        config,
        dataset=DatasetConfig(train=train, validation=val, max_seq_length=128),
        hyperparameters=replace(
            config.hyperparameters, max_steps=16, learning_rate=1e-2, eval_every_steps=16
        ),
        output=OutputConfig(uri=f"s3://{ws.bucket}/adapter/"),
    )


def nf4_base(local: Path) -> Any:
    """The tiny base quantized here, independently of the trainer: NF4, double quantization, float32
    compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        local, quantization_config=settings, dtype=torch.float32, device_map="cpu"
    )
    prepare_model(model, "cpu")
    return model.eval()


def test_qlora_run_learns_on_an_nf4_base_and_its_adapter_loads_onto_the_unquantized_base(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from peft import PeftModel

    train = ws.put("data/train.jsonl", jsonl(chat_records(48)))
    val = ws.put("data/val.jsonl", jsonl(VALIDATION))
    result = ws.run(qlora_config(ws, train, val), monkeypatch)
    summary = result.summary
    assert result.code == 0, summary.message
    assert summary.outcome == "Succeeded"
    assert summary.adapter is not None and summary.adapter.uri == f"s3://{ws.bucket}/adapter/"

    out = tmp_path / "out"
    names = download(ws, "adapter/", out)
    assert {"adapter_config.json", "adapter_model.safetensors", "training_summary.json"} <= set(names)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert {name.rpartition(".")[2] for name in adapter_config["target_modules"]} == LINEARS
    assert adapter_config["base_model_name_or_path"] == f"s3://{ws.models_bucket}/tiny/"

    # It learned.
    losses = json.loads((out / "training_summary.json").read_text())["losses"]
    print(f"QLoRA on the tiny model: loss {losses[0]:.3f} at step 1, {losses[-1]:.3f} at step {len(losses)}")
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses

    # It trained on an NF4 base: the adapter on a base quantized here reproduces the eval loss the trainer
    # reported, which the same adapter on the unquantized base does not quite.
    assert summary.metrics is not None
    base, tokenizer = base_model(ws, tmp_path)
    local = tmp_path / "base"
    quantized = nf4_base(local)
    assert quantized_layers(quantized) == 2 * len(LINEARS)
    on_nf4 = eval_loss(PeftModel.from_pretrained(quantized, out).eval(), tokenizer, VALIDATION)
    reported = summary.metrics["evalLoss"]

    # The published adapter loads with PEFT onto the unquantized base and carries what was learned.
    base_loss = eval_loss(base, tokenizer, VALIDATION)
    adapted = PeftModel.from_pretrained(base, out).eval()
    adapted_loss = eval_loss(adapted, tokenizer, VALIDATION)
    print(
        f"eval loss: base {base_loss:.6f}, adapter on NF4 {on_nf4:.6f} (trainer: {reported:.6f}), "
        f"on the unquantized base {adapted_loss:.6f}"
    )
    # (On this random-weight model NF4 moves the loss by about 2e-4; the trainer matches NF4 far closer.)
    assert abs(on_nf4 - reported) < 1e-5 and abs(adapted_loss - reported) > 1e-4
    assert adapted_loss < base_loss - 0.5


def test_qlora_base_stored_quantized_already_is_refused_before_fetching_weights(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local = tmp_path / "tiny"
    download(ws, "tiny/", local, bucket=ws.models_bucket)
    config = json.loads((local / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    # Only config.json is there: a trainer that went on would fail on the missing weights instead.
    ws.put("gptq/config.json", json.dumps(config).encode())
    train = ws.put("data/train.jsonl", jsonl(chat_records(4)))
    result = ws.run(ws.config(train, method="QLoRA", base_model=f"s3://{ws.bucket}/gptq/"), monkeypatch)
    assert result.code == EXIT_PERMANENT
    assert result.summary.reason == TrainerReason.QUANTIZATION_UNSUPPORTED
    assert "gptq" in result.summary.message and "method LoRA" in result.summary.message


def test_qlora_base_without_linear_layers_is_refused(tmp_path: Path) -> None:
    """A model in which bitsandbytes converted no layer ends with the named reason, not a run that trains
    a full-precision base as if it were 4-bit (here the converted layers are taken out after loading)."""
    from torch import nn

    from kubetune_devtools.tiny import save_tiny_model
    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.preparation import load_base_model

    local = save_tiny_model(tmp_path / "tiny", seed=0)
    from transformers import AutoModelForCausalLM

    def no_linears(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        for module in model.modules():
            for name, child in list(module.named_children()):
                if type(child).__name__ == "Linear4bit":
                    setattr(module, name, nn.Identity())
        return model

    original = AutoModelForCausalLM.from_pretrained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", no_linears)
        with pytest.raises(TrainerError) as refused:
            load_base_model(local, "s3://models/odd/", "QLoRA", torch.device("cpu"))
    assert refused.value.reason == TrainerReason.QUANTIZATION_UNSUPPORTED
    assert "use method LoRA" in refused.value.message


@pytest.mark.parametrize(
    ("method", "device", "dtype", "compute"),
    [
        ("QLoRA", "cuda", torch.bfloat16, torch.bfloat16),
        ("QLoRA", "cpu", torch.float32, torch.float32),
        ("LoRA", "cuda", torch.bfloat16, None),
        ("LoRA", "cpu", torch.float32, None),
        ("Full", "cuda", torch.float32, None),
    ],
)
def test_qlora_precision_decisions(method: str, device: str, dtype: torch.dtype, compute: Any) -> None:
    """The base loads in bf16 on GPUs under adapters (QLoRA's unquantized layers too) and computes its 4-bit
    matmuls in bf16; float32 on CPU."""
    assert load_dtype(method, device) == dtype
    quantization = quantization_for(method, device)
    if compute is None:
        assert quantization is None
    else:
        assert quantization is not None
        assert (quantization.quant_type, quantization.double_quant) == ("nf4", True)
        assert quantization.compute_dtype == compute
