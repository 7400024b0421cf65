"""A couple of benchmark steps on the tiny model: the JSON lines carry what the benchmark promises (no timing
assertions: the speed targets are met by `make bench`, not here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kubetune_devtools import bench
from kubetune_trainer.train import Trainer


def test_bench_runs_the_three_arms_on_the_same_batches_and_reports_both_ratios(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kubetune arm must be the trainer's own step: record what that method returns while the bench runs.
    trainer_losses: list[float] = []
    optimizer_step = Trainer.optimizer_step

    def recorded(self: Trainer, micro_batches: list[list[int]]) -> tuple[float, int, float]:
        result = optimizer_step(self, micro_batches)
        trainer_losses.append(result[0])
        return result

    monkeypatch.setattr(Trainer, "optimizer_step", recorded)
    argv = ["--model", "tiny", "--steps", "3", "--warmup", "1", "--examples-per-step", "4"]
    assert bench.main([*argv, "--datasets", "high-variance"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    arms = {line["arm"]: line for line in lines if "arm" in line}
    assert list(arms) == ["padded", "flattening", "kubetune"]
    padded, flattening, kubetune = arms["padded"], arms["flattening"], arms["kubetune"]
    assert trainer_losses == kubetune["losses"]
    for line in arms.values():
        assert line["device"].startswith("cpu") and line["model"] == "tiny"
        assert line["steps_measured"] == 2 and len(line["losses"]) == 3
        assert line["tokens_nonpad_per_s"] > 0 and line["label_tokens_per_s"] > 0
        assert line["grad_norm_nonzero"] and line["lora_b_moved"]
        assert line["flops_per_token"] == padded["flops_per_token"] > 0 and line["T_eff"] > 0
        # Same examples in every step: the same real and label tokens, whatever the layout.
        assert line["tokens_per_step"] == padded["tokens_per_step"]
        assert line["label_tokens_per_step"] == padded["label_tokens_per_step"]
    assert flattening["attn_impl"] == "sdpa_position_ids" and kubetune["ce_impl"] == "chunked_fused"
    # Only the padded loop computes padding; the padding-free layouts compute exactly the real tokens.
    assert padded["computed_tokens_per_step"] > padded["tokens_per_step"]
    assert flattening["computed_tokens_per_step"] == kubetune["computed_tokens_per_step"]
    assert kubetune["computed_tokens_per_step"] == kubetune["tokens_per_step"]
    # The same losses on the same batches (float32 on the CPU: equal up to summation order).
    for line in (flattening, kubetune):
        assert line["loss_reference"] == "padded" and line["losses_match"]
        assert line["loss_delta_mean_rel"] < 1e-5
    ratios = {line["ratio"]: line["tokens_nonpad_per_s"] for line in lines if "ratio" in line}
    assert {"kubetune/padded", "kubetune/flattening"} <= set(ratios)
    for baseline in ("padded", "flattening"):
        assert ratios[f"kubetune/{baseline}"] == pytest.approx(
            kubetune["tokens_nonpad_per_s"] / arms[baseline]["tokens_nonpad_per_s"]
        )


def test_bench_fails_when_an_arm_loses_the_same_losses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    optimizer_step = Trainer.optimizer_step

    def off_by_a_tenth(self: Trainer, micro_batches: list[list[int]]) -> tuple[float, int, float]:
        loss, tokens, grad_norm = optimizer_step(self, micro_batches)
        return loss * 1.1, tokens, grad_norm

    monkeypatch.setattr(Trainer, "optimizer_step", off_by_a_tenth)
    argv = ["--steps", "2", "--warmup", "1", "--examples-per-step", "2", "--datasets", "low-variance"]
    assert bench.main([*argv, "--arms", "padded,kubetune"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["losses_match"] for line in lines if line.get("arm") == "kubetune"] == [False]


def test_synthetic_examples_follow_the_spec() -> None:
    examples = bench.synthetic_examples(400, sigma=0.8, vocab_size=1000, seed=0)
    lengths = sorted(len(e.input_ids) for e in examples)
    assert lengths[0] >= 32 and lengths[-1] <= 2048
    assert 250 < lengths[len(lengths) // 2] < 450  # median near 350
    for example in examples:
        masked = sum(1 for label in example.labels if label == -100)
        assert 0.19 <= masked / len(example.labels) <= 0.61
        assert all(3 <= t < 1000 for t in example.input_ids)
    assert examples == bench.synthetic_examples(400, sigma=0.8, vocab_size=1000, seed=0)  # deterministic
    low = bench.synthetic_examples(400, sigma=0.3, vocab_size=1000, seed=0)
    spread = lambda xs: max(xs) / min(xs)  # noqa: E731
    assert spread([len(e.input_ids) for e in low]) < spread(lengths)


def test_unknown_arm_is_rejected() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--arms", "padded,fastest"])


def test_the_runtime_package_ships_no_dev_tools() -> None:
    root = Path(__file__).resolve().parents[2] / "trainer_image"
    runtime = root / "kubetune_trainer"
    assert not (runtime / "bench.py").exists() and not (runtime / "tiny.py").exists()
    for module in runtime.glob("*.py"):
        source = module.read_text(encoding="utf-8")
        if module.name == "gpu_check.py":
            # The documented `python -m kubetune_trainer.gpu_check` only hands over to the check, which needs
            # a checkout: it imports it inside main and says so when it is missing, as in the image.
            assert not re.search(r"^(from|import) kubetune_devtools", source, re.MULTILINE)
            continue
        assert not re.search(r"^\s*(from|import) kubetune_devtools", source, re.MULTILINE), module.name
    dockerfile = (root / "Dockerfile").read_text(encoding="utf-8").splitlines()
    copied = [line.split()[1] for line in dockerfile if line.startswith("COPY")]
    assert "trainer_image/kubetune_trainer/" in copied
    assert not any("kubetune_devtools" in path or path.rstrip("/") == "trainer_image" for path in copied)
