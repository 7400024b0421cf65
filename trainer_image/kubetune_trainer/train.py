"""The training loop, in plain sight: for each planned step, run its micro-batches, normalise the summed loss
by the step's label tokens, clip, step the optimizer; evaluate, log and checkpoint at intervals; keep the
weights of the best evaluation and stop when evaluations stop improving, where the job asks for it; stop
cleanly on SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch

from kubetune_trainer.checkpoint import Checkpointer, capture_rng
from kubetune_trainer.contract import TrainerReason
from kubetune_trainer.dpo import (
    STAT_FIELDS,
    PairBatch,
    PreferenceExample,
    collate_pairs,
    dpo_loss,
    pair_stats,
    stats_as_means,
)
from kubetune_trainer.errors import Interrupted, TrainerError
from kubetune_trainer.group import step_collective_timeout, worker_peer_timeout
from kubetune_trainer.metrics import Metrics, log_event
from kubetune_trainer.model import trainable_parameters
from kubetune_trainer.packing import Example, PackedBatch, PaddedBatch, collate_packed, collate_padded
from kubetune_trainer.parallel import LossModel, autocast_dtype, held_bytes, is_sharded, process_device
from kubetune_trainer.schedule import Plan, lr_at, warmup_steps

MAX_GRAD_NORM = 1.0
COLLECTIVE_TIMEOUT = timedelta(hours=1)
LOG_LINES_PER_RUN = 100  # about this many JSON progress lines over a whole run, and at least one a minute
EVALS_PER_RUN = 10


# ----------------------------------------------------------------------------------------------------
# Where it runs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    autocast_dtype: torch.dtype | None  # bf16 on GPUs; None (fp32) on CPU
    local_rank: int = 0  # this process's index in its pod
    # The training loop's collectives (all_reduce) run in this group, whose timeout follows the peer timeout
    # of a multi-pod group (None: the default group). Setup, checkpoints and publishing use the default.
    step_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` combined over ranks in place ("sum", "max" or "min")."""
        if self.world_size > 1:
            import torch.distributed as dist

            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op], group=self.step_group)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any of them (so all ranks take the same branch)."""
        if self.world_size == 1:
            return flag
        return bool(self.all_reduce(torch.tensor([float(flag)], device=self.device), op="max").item())

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def from_local_main(self, value: Any) -> Any:
        """The ``value`` of this pod's first process (local rank 0) on every process of the pod (a picklable
        object): what each pod fetched for itself, such as a local path."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, value)
        return everyone[self.rank - self.local_rank]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def setup_runtime(gpus: int, seed: int) -> Runtime:
    """GPU(s) when the config asks for them and they exist, else CPU with deterministic kernels. Under a
    launcher (``WORLD_SIZE`` > 1: one process per GPU, or several on CPU) it joins the process group: NCCL on
    GPUs, gloo on CPU."""
    torch.manual_seed(seed)
    device = process_device(gpus > 0)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.use_deterministic_algorithms(True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        # The launcher's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT say where to meet. The timeout
        # covers ranks waiting while rank 0 uploads a checkpoint of a large model.
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device if on_gpu else None,
        )
        rank, world_size = dist.get_rank(), dist.get_world_size()
        step_group = None
        peer_timeout = worker_peer_timeout(os.environ)
        if peer_timeout is not None:
            step_group = dist.new_group(timeout=step_collective_timeout(peer_timeout))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return Runtime(device, rank, world_size, autocast_dtype(device.type), local_rank, step_group)
    return Runtime(device, 0, 1, autocast_dtype(device.type))


class StopFlag:
    """Set by SIGTERM; the loop checks it between micro-batches and stops at the last completed step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_time: float | None = None

    def install(self) -> StopFlag:
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_time = time.monotonic()


TEST_HANG_ENV = "KUBETUNE_TEST_HANG_AT_STEP"
"""Set only by tests of the operator's progress watchdog: see hang_for_tests."""


def hang_for_tests(step: int, start_step: int, stop: StopFlag) -> None:
    """With KUBETUNE_TEST_HANG_AT_STEP=N, a run that started from scratch stops making steps after step N,
    as one stuck in a collective would, while still serving metrics and answering SIGTERM (which then
    checkpoints and exits as usual). A resumed run never hangs, so the restarted attempt can finish."""
    if start_step != 0 or os.environ.get(TEST_HANG_ENV) != str(step):
        return
    log_event("test_hang", step=step)
    while not stop.requested:
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint carries besides weights, optimizer and RNG. ``step`` is also the data position."""

    step: int = 0
    trained_tokens: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    losses: list[float] = field(default_factory=list)  # per step, for the summary and the tests
    eval_token_accuracy: float | None = None  # share of the label tokens predicted exactly, last evaluation
    evals_without_improvement: int = 0  # evaluations in a row since the best one
    stopped_early: bool = False  # earlyStoppingPatience ended the run before its planned steps
    # The step whose trainable weights the checkpoint keeps besides the current ones (output.select
    # BestEval); None: it keeps none.
    best_weights_step: int | None = None
    # Preference tuning (DPO) only: the last step's means per pair, and the last evaluation's.
    reward_margin: float | None = None
    preference_accuracy: float | None = None
    chosen_logps: float | None = None
    rejected_logps: float | None = None
    eval_reward_margin: float | None = None
    eval_preference_accuracy: float | None = None
    # The reference model's summed log-probabilities of every pair, [chosen, rejected], computed before the
    # first step; a resumed run reads them back instead of recomputing them from trained weights.
    reference: list[list[float]] | None = None
    eval_reference: list[list[float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LoopSettings:
    learning_rate: float
    scheduler: str
    warmup_ratio: float
    packing: bool
    pad_id: int
    eval_every_steps: int | None
    checkpoint_every_steps: int | None
    checkpoint_every_minutes: float | None
    keep_best: bool = False  # output.select BestEval: hold a copy of the weights of the best evaluation
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    dpo_beta: float | None = None  # set: preference tuning (the examples are PreferenceExamples)
    dpo_label_smoothing: float = 0.0


def make_optimizer(
    model: torch.nn.Module, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)


# ----------------------------------------------------------------------------------------------------
# The best weights (output.select BestEval)
# ----------------------------------------------------------------------------------------------------


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by the names a model state dict gives them (DTensors under FSDP)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights: in host memory where a parameter is a whole tensor; a sharded
    parameter (FSDP) keeps its 1/N shard on its device, as a DTensor, so a checkpoint saves and reshards it
    like the weights themselves."""
    copies = {}
    for name, param in trainable_tensors(model).items():
        value = param.detach()
        copies[name] = value.clone() if hasattr(value, "device_mesh") else value.to("cpu", copy=True)
    return copies


def update_snapshot(snapshot: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Overwrite ``snapshot`` (from ``snapshot_weights``) with the model's current trainable weights."""
    for name, param in trainable_tensors(model).items():
        snapshot[name].copy_(param.detach())


@torch.no_grad()
def load_snapshot(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put the weights of ``snapshot`` back into the model's trainable parameters."""
    params = trainable_tensors(model)
    if set(params) != set(snapshot):
        raise ValueError(
            f"the kept weights name {len(snapshot)} tensors, the model trains {len(params)}: they differ"
        )
    for name, param in params.items():
        param.copy_(snapshot[name].to(param.device) if not hasattr(param, "device_mesh") else snapshot[name])


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` (the model and its loss as one module, sharded over the processes under FSDP) with
    ``optimizer`` through the steps of ``plan``."""

    def __init__(
        self,
        model: LossModel,
        optimizer: torch.optim.Optimizer,
        plan: Plan,
        examples: Sequence[Example] | Sequence[PreferenceExample],
        eval_batches: Sequence[list[int]],
        eval_examples: Sequence[Example] | Sequence[PreferenceExample],
        settings: LoopSettings,
        runtime: Runtime,
        checkpointer: Checkpointer | None,
        metrics: Metrics,
        stop: StopFlag,
        state: TrainState,
        best_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.sharded = is_sharded(model)
        self.optimizer = optimizer
        self.plan = plan
        self.examples = examples
        self.eval_batches = eval_batches
        self.eval_examples = eval_examples
        self.settings = settings
        self.runtime = runtime
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.stop = stop
        self.state = state
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.total = plan.total_steps
        self.warmup = warmup_steps(self.total, settings.warmup_ratio)
        self.eval_every = settings.eval_every_steps or max(1, self.total // EVALS_PER_RUN)
        self.log_every = max(1, self.total // LOG_LINES_PER_RUN)
        self.last_checkpoint_step = state.step
        self.last_checkpoint_time = time.monotonic()
        # The RNG state at the start of the step being run: a stop between its micro-batches checkpoints
        # the step before it, so the restart must draw that step's random numbers (dropout) again.
        self.step_rng: dict[str, Any] | None = None
        # With keep_best: the trainable weights after step state.best_weights_step (restored with a
        # checkpoint, or taken at the first evaluation).
        self.best_weights = best_weights
        self.preference = settings.dpo_beta is not None
        # The reference log-probabilities as tensors [pairs, 2] on the device (preference tuning).
        self.reference: torch.Tensor | None = None
        self.eval_reference: torch.Tensor | None = None

    def collate(self, indices: Sequence[int], pool: Sequence[Any]) -> PackedBatch | PaddedBatch | PairBatch:
        chosen = [pool[i] for i in indices]
        if self.preference:
            return collate_pairs(chosen, indices, self.settings.packing, self.settings.pad_id).to(
                self.runtime.device
            )
        if self.settings.packing:
            return collate_packed(chosen).to(self.runtime.device)
        return collate_padded(chosen, self.settings.pad_id).to(self.runtime.device)

    def run(self) -> TrainState:
        self.metrics.set(
            total_steps=self.total, step=self.state.step, trained_tokens=self.state.trained_tokens
        )
        run_start = window_start = time.monotonic()
        window_tokens = 0
        start_step = self.state.step
        if self.preference:
            self._prepare_reference()
        self.model.train()
        for step in range(self.state.step, self.total):
            self._stop_if_requested()
            self.step_rng = capture_rng()
            lr = lr_at(step, self.total, self.settings.learning_rate, self.warmup, self.settings.scheduler)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, tokens, grad_norm = self.optimizer_step(self.plan.steps[step])
            self.step_rng = None
            self.state.step = step + 1
            self.state.trained_tokens += tokens
            self.state.train_loss, self.state.learning_rate, self.state.grad_norm = loss, lr, grad_norm
            self.state.losses.append(loss)
            window_tokens += tokens

            if self.eval_batches and (
                self.state.step % self.eval_every == 0 or self.state.step == self.total
            ):
                self._evaluate()
            patience = self.settings.early_stopping_patience
            if (
                patience is not None
                and self.state.evals_without_improvement >= patience
                and self.state.step < self.total
            ):
                self.state.stopped_early = True
            now = time.monotonic()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            eta = (self.total - self.state.step) * (now - run_start) / (self.state.step - start_step)
            self.metrics.set(
                reward_margin=self.state.reward_margin,
                preference_accuracy=self.state.preference_accuracy,
                chosen_logps=self.state.chosen_logps,
                rejected_logps=self.state.rejected_logps,
            )
            self.metrics.set(
                step=self.state.step,
                epoch=self.epoch(),
                train_loss=loss,
                learning_rate=lr,
                grad_norm=grad_norm,
                trained_tokens=self.state.trained_tokens,
                tokens_per_second=tokens_per_s,
                eta_seconds=eta,
            )
            last = self.state.step == self.total or self.state.stopped_early
            if self.state.step % self.log_every == 0 or last or now - window_start > 60:
                self._log_progress(tokens_per_s, eta)
                window_start, window_tokens = now, 0
            if self.state.stopped_early:
                self._log_early_stop()
                break
            if self._checkpoint_due():
                self.save_checkpoint()
            hang_for_tests(self.state.step, start_step, self.stop)
        self._log_held_bytes()
        self.runtime.barrier()
        return self.state

    def _log_held_bytes(self) -> None:
        """What each process holds of the parameters and the optimizer state (1/N each under FSDP)."""
        held = torch.zeros(self.runtime.world_size, 2, dtype=torch.float64, device=self.runtime.device)
        held[self.runtime.rank] = torch.tensor(held_bytes(self.model, self.optimizer), dtype=torch.float64)
        per_rank = self.runtime.all_reduce(held).tolist()
        if self.runtime.is_main:
            log_event(
                "held_bytes",
                parameters=[int(p) for p, _ in per_rank],
                optimizer=[int(o) for _, o in per_rank],
            )

    def optimizer_step(self, micro_batches: list[list[int]]) -> tuple[float, int, float]:
        """One optimizer step over ``micro_batches`` (lists of indices into the training examples); returns
        (mean loss over the step's label tokens, tokens, grad norm). ``run`` calls it once per planned step;
        the benchmark (``kubetune_devtools.bench``) times this same call. Preference tuning: the mean DPO
        loss over the step's pairs, each pair weighing the same."""
        mine = micro_batches[self.runtime.rank :: self.runtime.world_size]
        batches = [self.collate(indices, self.examples) for indices in mine]
        counts = torch.tensor(
            [sum(self._loss_units(b) for b in batches), sum(b.num_tokens for b in batches)],
            dtype=torch.float64,
            device=self.runtime.device,
        )
        label_tokens, tokens = (int(v) for v in self.runtime.all_reduce(counts).tolist())
        # Sharded, every process runs as many forwards as the busiest one (each gathers weights from all);
        # the extra ones count zero.
        weights = [1.0] * len(batches) + [0.0] * (self._forwards(len(micro_batches)) - len(batches))
        batches += [self.collate(micro_batches[0], self.examples)] * (len(weights) - len(batches))
        loss_total = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        pair_totals = torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=self.runtime.device)
        for batch, weight in zip(batches, weights, strict=True):
            if self.stop.requested and self.runtime.world_size == 1:
                # Drop the half-accumulated step; the checkpoint is of the last completed one.
                self.optimizer.zero_grad(set_to_none=True)
                self._stop_if_requested()
            with self.runtime.autocast():
                output, _ = self.model(batch)
            if isinstance(batch, PairBatch):
                scores = self._dpo(output, batch, self.reference)
                summed = scores.losses.sum()
                pair_totals += weight * pair_stats(scores, output)
            else:
                summed = output
            (summed * (weight / max(1, label_tokens))).backward()
            loss_total += weight * summed.detach().double()
        if not self.sharded:  # FSDP reduced each micro-batch's gradients in its backward
            self._all_reduce_gradients()
        loss = float(self.runtime.all_reduce(loss_total).item()) / max(1, label_tokens)
        if self.preference:
            means = stats_as_means(self.runtime.all_reduce(pair_totals).tolist(), label_tokens)
            self.state.reward_margin = means["reward_margin"]
            self.state.preference_accuracy = means["preference_accuracy"]
            self.state.chosen_logps = means["chosen_logps"]
            self.state.rejected_logps = means["rejected_logps"]
        if not math.isfinite(loss):
            raise TrainerError(
                TrainerReason.TRAINING_DIVERGED,
                f"the loss became {loss} at step {self.state.step + 1}; lower hyperparameters.learningRate",
            )
        norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, tokens, grad_norm

    def _loss_units(self, batch: PackedBatch | PaddedBatch | PairBatch) -> int:
        """What a step's loss is averaged over: label tokens, or pairs for preference tuning."""
        return batch.num_pairs if isinstance(batch, PairBatch) else batch.num_label_tokens

    def _dpo(self, policy: torch.Tensor, batch: PairBatch, reference: torch.Tensor | None) -> Any:
        if reference is None or self.settings.dpo_beta is None:
            raise RuntimeError("preference tuning needs the reference log-probabilities first")
        reference_pairs = reference.index_select(0, batch.pairs)
        return dpo_loss(policy, reference_pairs, self.settings.dpo_beta, self.settings.dpo_label_smoothing)

    def _each_forward(
        self, batches: Sequence[list[int]], pool: Sequence[PreferenceExample]
    ) -> Iterator[tuple[torch.Tensor, PairBatch]]:
        """(output, batch) of a forward pass (no gradient) over this process's share of ``batches``; under
        FSDP every process runs as many forwards as the busiest one, and the extra ones are not yielded."""
        mine = batches[self.runtime.rank :: self.runtime.world_size]
        for position in range(self._forwards(len(batches))):
            counted = position < len(mine)
            batch = self.collate(mine[position] if counted else batches[0], pool)
            with torch.no_grad(), self.runtime.autocast():
                output, _ = self.model(batch)
            if counted and isinstance(batch, PairBatch):
                yield output, batch
        if self.sharded:
            self.model.reshard()  # type: ignore[operator]

    def _reference_logps(self, pool: Sequence[PreferenceExample]) -> list[list[float]]:
        """The current model's summed log-probabilities of every pair in ``pool`` (evaluation mode): the
        reference, when taken before the first step."""
        lengths = [pair.length for pair in pool]
        batching = self.plan.batching
        batches = (
            batching.micro_batches(lengths, range(len(pool))) if batching else [[i] for i in range(len(pool))]
        )
        values = torch.zeros(len(pool), 2, dtype=torch.float64, device=self.runtime.device)
        self.model.eval()
        for output, batch in self._each_forward(batches, pool):
            values.index_copy_(0, batch.pairs, output.double())
        self.model.train()
        return [[float(a), float(b)] for a, b in self.runtime.all_reduce(values).tolist()]

    def _prepare_reference(self) -> None:
        """Reference log-probabilities of the training and validation pairs: computed now from the model
        before its first step, or those a checkpoint carried."""
        started = time.monotonic()
        computed = self.state.reference is None
        if self.state.reference is None:
            self.state.reference = self._reference_logps(self.examples)  # type: ignore[arg-type]
        if self.state.eval_reference is None and self.eval_examples:
            self.state.eval_reference = self._reference_logps(self.eval_examples)  # type: ignore[arg-type]
        self.reference = self._reference_tensor(self.state.reference, len(self.examples))
        if self.state.eval_reference is not None:
            self.eval_reference = self._reference_tensor(self.state.eval_reference, len(self.eval_examples))
        if self.runtime.is_main:
            means = self.reference.double().mean(0).tolist()
            log_event(
                "reference",
                pairs=len(self.examples),
                eval_pairs=len(self.eval_examples),
                chosen_logps=round(means[0], 6),
                rejected_logps=round(means[1], 6),
                computed=computed,
                seconds=round(time.monotonic() - started, 3),
            )

    def _reference_tensor(self, values: Any, pairs: int) -> torch.Tensor:
        """Reference values (computed, or read back from a checkpoint's state) as a [pairs, 2] tensor;
        anything else is refused, naming what would fix it."""
        try:
            tensor = torch.tensor(values, dtype=torch.float32, device=self.runtime.device)
        except (TypeError, ValueError, RuntimeError):
            tensor = torch.zeros(0)
        if tensor.shape != (pairs, 2) or not bool(torch.isfinite(tensor).all()):
            raise TrainerError(
                TrainerReason.INVALID_CONFIG,
                f"the checkpoint's reference log-probabilities do not fit the {pairs} preference pairs of "
                "this dataset (it changed since the checkpoint was written); delete the job's checkpoints "
                "under output.uri to start over",
            )
        return tensor

    def evaluate_preferences(self) -> dict[str, float]:
        """Means per validation pair: DPO loss, reward margin, preference accuracy, log-probabilities."""
        self.model.eval()
        fields = len(STAT_FIELDS)
        totals = torch.zeros(fields + 1, dtype=torch.float64, device=self.runtime.device)
        for output, batch in self._each_forward(self.eval_batches, self.eval_examples):  # type: ignore[arg-type]
            scores = self._dpo(output, batch, self.eval_reference)
            totals[:fields] += pair_stats(scores, output)
            totals[fields] += batch.num_pairs
        self.model.train()
        *summed, pairs = self.runtime.all_reduce(totals).tolist()
        return stats_as_means(summed, pairs)

    def _forwards(self, micro_batches: int) -> int:
        """Forward passes each process runs for a step of ``micro_batches``: its share, or under FSDP the
        largest share (at least one), since every forward is a collective."""
        if not self.sharded:
            return len(range(self.runtime.rank, micro_batches, self.runtime.world_size))
        return max(1, math.ceil(micro_batches / self.runtime.world_size))

    def _all_reduce_gradients(self) -> None:
        """Sum gradients over ranks (each rank ran a disjoint share of the step's micro-batches, already
        divided by the whole step's label tokens)."""
        if self.runtime.world_size == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.runtime.all_reduce(_flatten_dense_tensors(grads))
        for param, reduced in zip(self.params, _unflatten_dense_tensors(flat, grads), strict=True):
            param.grad = reduced

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Over every label token of the validation set: the mean loss, and the share of those tokens the
        model predicts exactly (token accuracy)."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)
        mine = self.eval_batches[self.runtime.rank :: self.runtime.world_size]
        for position in range(self._forwards(len(self.eval_batches))):
            counted = position < len(mine)
            batch = self.collate(mine[position] if counted else self.eval_batches[0], self.eval_examples)
            with self.runtime.autocast():
                summed, count, correct = self.model(batch, evaluate=True)
            if counted:
                totals[0] += summed.double()
                totals[1] += count
                totals[2] += correct.double()
        if self.sharded:
            # The root unit stays gathered after a forward (its backward would need it): free it, as no
            # backward follows.
            self.model.reshard()  # type: ignore[operator]
        self.model.train()
        summed_all, count_all, correct_all = self.runtime.all_reduce(totals).tolist()
        return summed_all / max(1.0, count_all), correct_all / max(1.0, count_all)

    def _evaluate(self) -> None:
        accuracy: float | None = None
        if self.preference:
            means = self.evaluate_preferences()
            loss = means["loss"]
            self.state.eval_reward_margin = means["reward_margin"]
            self.state.eval_preference_accuracy = means["preference_accuracy"]
            self.metrics.set(
                eval_reward_margin=self.state.eval_reward_margin,
                eval_preference_accuracy=self.state.eval_preference_accuracy,
            )
        else:
            loss, accuracy = self.evaluate()
        self.state.eval_loss, self.state.eval_token_accuracy = loss, accuracy
        if self.state.best_eval_loss is None or loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = loss, self.state.step
            self.state.evals_without_improvement = 0
            if self.settings.keep_best:
                self._keep_best_weights()
        else:
            self.state.evals_without_improvement += 1
        self.metrics.set(
            eval_loss=loss,
            eval_token_accuracy=accuracy,
            best_eval_loss=self.state.best_eval_loss,
            best_step=self.state.best_step,
        )
        if self.runtime.is_main:
            log_event(
                "eval",
                step=self.state.step,
                eval_loss=round(loss, 6),
                eval_token_accuracy=None if accuracy is None else round(accuracy, 6),
                best_eval_loss=round(self.state.best_eval_loss, 6),
                best_step=self.state.best_step,
                **self._preference_fields("eval_reward_margin", "eval_preference_accuracy"),
            )

    def _keep_best_weights(self) -> None:
        trainable = self.model.model
        if self.best_weights is None:
            self.best_weights = snapshot_weights(trainable)
        else:
            update_snapshot(self.best_weights, trainable)
        self.state.best_weights_step = self.state.step

    def _log_early_stop(self) -> None:
        if self.runtime.is_main:
            log_event(
                "early_stop",
                step=self.state.step,
                total_steps=self.total,
                patience=self.settings.early_stopping_patience,
                best_step=self.state.best_step,
                best_eval_loss=self.state.best_eval_loss,
            )

    def epoch(self) -> float:
        """Epochs completed, fractional."""
        if self.plan.steps_per_epoch == 0:
            return 0.0
        return round(self.state.step / self.plan.steps_per_epoch, 4)

    def _log_progress(self, tokens_per_s: float, eta: float) -> None:
        if self.runtime.is_main:
            log_event(
                "progress",
                step=self.state.step,
                total_steps=self.total,
                epoch=self.epoch(),
                loss=round(self.state.train_loss or 0.0, 6),
                lr=self.state.learning_rate,
                grad_norm=round(self.state.grad_norm or 0.0, 6),
                tokens_per_s=round(tokens_per_s, 1),
                trained_tokens=self.state.trained_tokens,
                eta_s=round(eta, 1),
                **self._preference_fields(
                    "reward_margin", "preference_accuracy", "chosen_logps", "rejected_logps"
                ),
            )

    def _preference_fields(self, *names: str) -> dict[str, Any]:
        """The named preference metrics of the state, rounded for a log line (none for SFT)."""
        if not self.preference:
            return {}
        values = {name: getattr(self.state, name) for name in names}
        return {name: round(value, 6) for name, value in values.items() if value is not None}

    def _checkpoint_due(self) -> bool:
        if self.checkpointer is None or self.state.step >= self.total:
            return False
        every_steps = self.settings.checkpoint_every_steps
        every_minutes = self.settings.checkpoint_every_minutes
        due = (every_steps is not None and self.state.step % every_steps == 0) or (
            every_minutes is not None and time.monotonic() - self.last_checkpoint_time >= every_minutes * 60
        )
        # Ranks decide together (their clocks differ), so they all reach the barrier in save_checkpoint.
        return self.runtime.any_rank(due)

    def save_checkpoint(self) -> None:
        """Every process writes its own shards; rank 0 the manifest, last."""
        if self.checkpointer is None or self.state.step == self.last_checkpoint_step:
            return
        started = time.monotonic()
        target = self.checkpointer.save(
            self.state.step,
            self.model.model,
            self.optimizer,
            self.state.as_dict(),
            self.step_rng or capture_rng(),  # stopped mid-step: that step's start
            self.plan,
            self.best_weights if self.state.best_weights_step is not None else None,
        )
        if self.runtime.is_main:
            log_event(
                "checkpoint",
                step=self.state.step,
                uri=str(target),
                seconds=round(time.monotonic() - started, 3),
            )
        self.runtime.barrier()
        self.last_checkpoint_step = self.state.step
        self.last_checkpoint_time = time.monotonic()

    def _stop_if_requested(self) -> None:
        if self.runtime.any_rank(self.stop.requested):
            self.save_checkpoint()
            raise Interrupted(f"stopped by SIGTERM after step {self.state.step}")
