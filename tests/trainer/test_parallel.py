"""Where a training process runs: the device is always an indexed GPU when GPUs are there (checked here with
CUDA reported present, on a machine without one), the CPU otherwise."""

from __future__ import annotations

import pytest
import torch

from kubetune_trainer.parallel import process_device, select_device
from kubetune_trainer.train import setup_runtime


def gpus_present(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    """Make torch report ``count`` GPUs; returns the list ``torch.cuda.set_device`` calls are recorded in."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_device_of_a_single_gpu_job_without_a_launcher_is_cuda_0(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = gpus_present(monkeypatch, 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    runtime = setup_runtime(gpus=1, seed=0)

    assert runtime.device == torch.device("cuda", 0)
    assert runtime.device.index == 0  # a bare "cuda" would make torch.cuda.set_device raise
    assert chosen == [torch.device("cuda", 0)]
    assert (runtime.rank, runtime.world_size, runtime.autocast_dtype) == (0, 1, torch.bfloat16)


@pytest.mark.parametrize(("local_rank", "expected"), [(None, 0), ("0", 0), ("3", 3)])
def test_device_follows_the_launchers_local_rank(
    monkeypatch: pytest.MonkeyPatch, local_rank: str | None, expected: int
) -> None:
    gpus_present(monkeypatch, 4)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert process_device(want_gpu=True) == torch.device("cuda", expected)


def test_device_index_beyond_the_visible_gpus_is_refused_with_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus_present(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but this pod sees 2 GPU\(s\)"):
        process_device(want_gpu=True)


def test_device_is_the_cpu_without_gpus_or_when_the_job_asks_for_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert select_device(cuda_available=False, device_count=0, local_rank=None) == torch.device("cpu")
    assert select_device(cuda_available=True, device_count=0, local_rank=0) == torch.device("cpu")
    gpus_present(monkeypatch, 2)
    assert process_device(want_gpu=False) == torch.device("cpu")


@pytest.mark.parametrize(
    ("strategy", "method", "device", "place"),
    [
        ("FSDP", "Full", "cuda:1", "cpu"),  # loads on the host; fully_shard moves each 1/N shard to cuda:1
        ("FSDP", "LoRA", "cuda:0", "cpu"),
        ("FSDP", "QLoRA", "cuda:0", "cuda:0"),  # bitsandbytes quantizes on the GPU it trains on
        ("DDP", "Full", "cuda:0", "cuda:0"),
        ("Single", "LoRA", "cuda:0", "cuda:0"),
        ("FSDP", "Full", "cpu", "cpu"),
    ],
)
def test_fsdp_base_models_load_on_the_host_so_one_larger_than_a_gpu_still_loads(
    strategy: str, method: str, device: str, place: str
) -> None:
    from kubetune_trainer.preparation import load_dtype, load_place

    assert load_place(strategy, method, torch.device(device)) == torch.device(place)
    # The dtype follows the device that computes, not where the weights wait to be sharded.
    assert load_dtype(method, torch.device(device).type) == (
        torch.bfloat16 if device.startswith("cuda") and method != "Full" else torch.float32
    )


def test_autocast_dtype_is_bf16_on_gpus_only() -> None:
    from kubetune_trainer.parallel import autocast_dtype

    assert autocast_dtype("cuda") == torch.bfloat16
    assert autocast_dtype("cpu") is None


def test_full_fine_tuning_in_one_process_computes_in_bf16_over_fp32_master_weights() -> None:
    """One GPU process of Full fine-tuning, as the trainer sets it up (float32 weights from ``load_dtype``,
    the step under the runtime's autocast), run here with CPU autocast: every matmul of the forward and
    the backward (the fused loss's included) multiplies bf16 operands, while the weights, their gradients and
    AdamW's moments are float32, and the step moves the float32 weights by less than one bf16 ulp can."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kubetune_devtools.tiny import build_tiny_model
    from kubetune_trainer.fastpath import prepare_model
    from kubetune_trainer.model import apply_method
    from kubetune_trainer.packing import Example, collate_packed
    from kubetune_trainer.parallel import LossModel, autocast_dtype
    from kubetune_trainer.preparation import load_dtype
    from kubetune_trainer.train import Runtime, make_optimizer

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: list[torch.dtype] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.dtypes.extend(a.dtype for a in args[:3] if isinstance(a, torch.Tensor) and a.ndim >= 2)
            return func(*args, **(kwargs or {}))

    model, _ = build_tiny_model(seed=0)
    model = apply_method(model.to(load_dtype("Full", "cuda")), "Full", None)
    prepare_model(model, "cpu")
    runtime = Runtime(torch.device("cpu"), 0, 1, autocast_dtype("cuda"))
    optimizer = make_optimizer(model, 1e-6, 0.0)
    ids = list(range(5, 45))
    batch = collate_packed([Example(input_ids=ids, labels=ids), Example(ids[:17], ids[:17])])
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    recorder = MatmulDtypes()
    with recorder:
        with runtime.autocast():
            loss, _ = LossModel(model)(batch)
        loss.backward()
    # forward, and backward's two matmuls per Linear: 7 per layer, 2 layers, plus the head.
    assert len(recorder.dtypes) >= 3 * (7 * 2 + 1)
    assert set(recorder.dtypes) == {torch.bfloat16}
    optimizer.step()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k.startswith("exp_avg")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    after = model.model.layers[0].mlp.up_proj.weight.detach()
    # AdamW's first step moves each weight by about the learning rate, far below bf16's resolution there:
    # bf16 weights would mostly not move at all; the float32 master weights all do.
    assert (after != before).float().mean() > 0.9
    assert (after.bfloat16() != before.bfloat16()).float().mean() < 0.05
