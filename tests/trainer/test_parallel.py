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
