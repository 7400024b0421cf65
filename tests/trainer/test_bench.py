"""A couple of benchmark steps on the tiny model: the JSON lines carry what the benchmark promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_devtools import bench


def test_bench_smoke_reports_each_arm_and_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        bench.main(
            [
                "--model",
                "tiny",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--examples-per-step",
                "4",
                "--datasets",
                "high-variance",
                "--arms",
                "baseline,kubetune",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    arms = {line["arm"]: line for line in lines if "arm" in line}
    assert set(arms) == {"baseline", "kubetune"}
    baseline, kubetune = arms["baseline"], arms["kubetune"]
    for line in (baseline, kubetune):
        assert line["device"].startswith("cpu") and line["model"] == "tiny"
        assert line["steps_measured"] == 2 and len(line["losses"]) == 3
        assert line["tokens_nonpad_per_s"] > 0 and line["label_tokens_per_s"] > 0
        assert line["grad_norm_nonzero"] and line["lora_b_moved"]
        assert line["flops_per_token"] > 0 and line["T_eff"] > 0
    # Same examples, same weights: identical real-token counts, and the padded arm computes more tokens.
    assert kubetune["tokens_per_step"] == baseline["tokens_per_step"]
    assert baseline["computed_tokens_per_step"] > kubetune["computed_tokens_per_step"]
    assert kubetune["loss_delta_vs_baseline_mean_abs"] < 1e-4
    ratio = [line for line in lines if "ratio" in line]
    assert ratio and ratio[0]["ratio"] == "kubetune/baseline"
    assert ratio[0]["tokens_nonpad_per_s"] == pytest.approx(
        kubetune["tokens_nonpad_per_s"] / baseline["tokens_nonpad_per_s"]
    )


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
        bench.main(["--arms", "baseline,fastest"])


def test_the_runtime_package_ships_no_dev_tools() -> None:
    root = Path(__file__).resolve().parents[2] / "trainer_image"
    runtime = root / "kubetune_trainer"
    assert not (runtime / "bench.py").exists() and not (runtime / "tiny.py").exists()
    for module in runtime.glob("*.py"):
        assert "kubetune_devtools" not in module.read_text(encoding="utf-8"), module.name
    dockerfile = (root / "Dockerfile").read_text(encoding="utf-8").splitlines()
    copied = [line.split()[1] for line in dockerfile if line.startswith("COPY")]
    assert "trainer_image/kubetune_trainer/" in copied
    assert not any("kubetune_devtools" in path or path.rstrip("/") == "trainer_image" for path in copied)
