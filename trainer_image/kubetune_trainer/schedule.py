"""What each optimizer step sees and at which learning rate: pure functions, computed up front, so the total
step count is known before training and a resumed run replays exactly the same batches."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.packing import pack

Step = list[list[int]]  # micro-batches (lists of example indices) of one optimizer step


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return min(total_steps, math.ceil(total_steps * warmup_ratio))


def lr_at(step: int, total_steps: int, peak_lr: float, warmup: int, scheduler: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak_lr`` over ``warmup`` steps,
    then Cosine (to 0), Linear (to 0) or Constant."""
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    if scheduler == "Constant":
        return peak_lr
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if scheduler == "Linear":
        return peak_lr * (1.0 - progress)
    if scheduler == "Cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {scheduler!r}")


@dataclass(frozen=True)
class Batching:
    """How examples become micro-batches: by a token budget (packing) or by a fixed example count."""

    token_budget: int | None  # tokens per micro-batch; None: use examples_per_micro
    examples_per_micro: int | None
    accumulation: int  # micro-batches per optimizer step

    def micro_batches(self, lengths: Sequence[int], order: Sequence[int]) -> list[list[int]]:
        """Micro-batches of example indices for one pass over ``order``."""
        if self.token_budget is not None:
            groups = pack([lengths[i] for i in order], self.token_budget)
            return [[order[j] for j in group] for group in groups]
        size = self.examples_per_micro or 1
        return [list(order[start : start + size]) for start in range(0, len(order), size)]


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    epoch_of_step: list[int]  # the (0-based) epoch each step belongs to
    steps_per_epoch: int
    batching: Batching | None = None  # how it was cut; the validation set is cut the same way

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: a checkpoint carries it, so a restart (on any device, any number of them) replays
        these steps rather than planning anew from its own memory size."""
        batching = self.batching
        return {
            "steps": self.steps,
            "epochOfStep": self.epoch_of_step,
            "stepsPerEpoch": self.steps_per_epoch,
            "batching": None
            if batching is None
            else {
                "tokenBudget": batching.token_budget,
                "examplesPerMicro": batching.examples_per_micro,
                "accumulation": batching.accumulation,
            },
        }

    @classmethod
    def from_dict(cls, data: Any, examples: int) -> Plan:
        """The plan ``as_dict`` wrote, checked against a dataset of ``examples`` examples; ValueError when
        it is malformed or names examples the dataset does not have."""

        def whole(value: Any, low: int = 0) -> int:
            if type(value) is not int or value < low:
                raise ValueError(f"{value!r} is not a whole number >= {low}")
            return value

        def optional(value: Any) -> int | None:
            return None if value is None else whole(value, 1)

        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ValueError("not a step plan")
        steps = []
        for step in data["steps"]:
            if not isinstance(step, list) or not all(isinstance(micro, list) for micro in step):
                raise ValueError("a step is not a list of micro-batches")
            steps.append([[whole(i) for i in micro] for micro in step])
        if any(i >= examples for step in steps for micro in step for i in micro):
            raise ValueError(f"it names examples beyond the {examples} of this dataset")
        epochs = data.get("epochOfStep")
        if not isinstance(epochs, list) or len(epochs) != len(steps):
            raise ValueError("epochOfStep does not match the steps")
        raw = data.get("batching")
        batching = None
        if raw is not None:
            if not isinstance(raw, dict):
                raise ValueError("batching is not an object")
            batching = Batching(
                optional(raw.get("tokenBudget")),
                optional(raw.get("examplesPerMicro")),
                whole(raw.get("accumulation"), 1),
            )
        return cls(steps, [whole(e) for e in epochs], whole(data.get("stepsPerEpoch")), batching)


def build_plan(
    lengths: Sequence[int],
    batching: Batching,
    seed: int,
    epochs: float | None = None,
    max_steps: int | None = None,
) -> Plan:
    """Every optimizer step of the run. ``epochs`` may be fractional; ``max_steps`` cycles epochs as
    needed."""
    if (epochs is None) == (max_steps is None):
        raise ValueError("build_plan: give exactly one of epochs and max_steps")
    steps: list[Step] = []
    epoch_of_step: list[int] = []
    steps_per_epoch = 0
    epoch = 0
    while True:
        micro = batching.micro_batches(lengths, epoch_order(len(lengths), seed, epoch))
        if epochs is not None:
            remaining = epochs - epoch
            if remaining <= 0:
                break
            if remaining < 1:
                micro = micro[: max(1, math.ceil(len(micro) * remaining))]
        chunks = [micro[i : i + batching.accumulation] for i in range(0, len(micro), batching.accumulation)]
        if epoch == 0:
            steps_per_epoch = len(chunks)
        for chunk in chunks:
            if max_steps is not None and len(steps) >= max_steps:
                break
            steps.append(chunk)
            epoch_of_step.append(epoch)
        epoch += 1
        if max_steps is not None and len(steps) >= max_steps:
            break
    return Plan(steps, epoch_of_step, steps_per_epoch, batching)
