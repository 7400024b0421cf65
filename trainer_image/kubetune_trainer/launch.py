"""Several training processes in one pod: one per GPU when the job asks for more than one and the pod sees
them, or ``$KUBETUNE_CPU_PROCESSES`` of them on a machine without GPUs (gloo; the same data-parallel path,
runnable anywhere).

The launcher is the pod's main process. It starts the workers with the torch.distributed environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), forwards SIGTERM to them, and
ends with the exit code and termination message the operator reads. Each worker writes its report to a file
of its own; the pod reports the first worker to fail (a crash on one GPU leaves the others failing only
because a peer vanished), or rank 0 when none failed. A generic launcher (torchrun, ``accelerate launch``)
exits 1 for every failure, SIGTERM included, which would lose the permanent and interrupted exit codes the
Job's pod failure policy matches on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.contract import TERMINATION_LOG_ENV, TerminationSummary, TrainerReason
from kubetune_trainer.errors import EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_PERMANENT
from kubetune_trainer.recipe import write_termination_message

# Training processes on a machine without GPUs (unset: one).
CPU_PROCESSES_ENV = "KUBETUNE_CPU_PROCESSES"
# After one worker fails, how long the others get to notice and exit before they are killed (a collective
# waiting on a vanished peer may otherwise block until its timeout).
PEER_EXIT_GRACE_S = 30.0
_POLL_S = 0.1


def plan_processes(gpus: int) -> tuple[int, bool]:
    """(how many training processes, whether they use GPUs) for a job asking for ``gpus``."""
    if gpus > 0:
        import torch

        visible = torch.cuda.device_count()
        if visible > 0:
            return min(gpus, visible), True
    return cpu_processes(), False


def cpu_processes() -> int:
    raw = os.environ.get(CPU_PROCESSES_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"{CPU_PROCESSES_ENV}={raw!r} is not a whole number >= 1; set it to the number of training "
            "processes, or unset it for one"
        )
    return int(raw)


def launch(count: int, on_gpu: bool) -> int:
    """Run ``count`` workers to the end; returns the pod's exit code and writes its termination message."""
    reports = Path(tempfile.mkdtemp(prefix="kubetune-ranks-"))
    port = _free_port()
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        _signal_running(workers, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for rank in range(count):
            env = worker_env(os.environ, rank, count, port, reports / f"rank-{rank}", on_gpu)
            workers.append(subprocess.Popen([sys.executable, "-m", "kubetune_trainer"], env=env))
            if stopping:  # SIGTERM came while the workers were starting
                workers[-1].send_signal(signal.SIGTERM)
        exits = _wait(workers, lambda: stopping)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _signal_running(workers, signal.SIGKILL)
        for worker in workers:
            worker.wait()
    rank, code = pick_report(exits)
    write_termination_message(report(reports / f"rank-{rank}", rank, count, code))
    shutil.rmtree(reports, ignore_errors=True)
    return code


def worker_env(
    base: Mapping[str, str], rank: int, count: int, port: int, report: Path, on_gpu: bool
) -> dict[str, str]:
    env = dict(base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(count),
        LOCAL_WORLD_SIZE=str(count),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env[TERMINATION_LOG_ENV] = str(report)
    if not on_gpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(worker_threads(count))
    return env


def worker_threads(count: int) -> int:
    """CPU threads per worker: the machine's cores shared out (more threads than cores only contend)."""
    return max(1, (os.cpu_count() or 1) // count)


def pick_report(exits: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(rank, exit code) whose report the pod gives: the first worker to exit non-zero (lowest rank among
    those found ending together), else rank 0. ``exits`` is in the order the workers ended. A worker that
    stopped only because a peer vanished (EXIT_PEER_LOST) gives way to the one whose failure it saw."""
    failed = [(rank, code) for rank, code in exits if code != 0]
    for rank, code in failed:
        if code != EXIT_PEER_LOST:
            return rank, code
    if failed:
        return failed[0]
    return next((rank, code) for rank, code in exits if rank == 0)


def _wait(workers: Sequence[subprocess.Popen[bytes]], stopping: Callable[[], bool]) -> list[tuple[int, int]]:
    """(rank, exit code) of every worker in the order they ended. After the first failure the others get
    SIGTERM, and SIGKILL once ``PEER_EXIT_GRACE_S`` has passed (unless the pod itself is stopping, when they
    have their own grace period to write a checkpoint)."""
    exits: list[tuple[int, int]] = []
    running = set(range(len(workers)))
    failed_at: float | None = None
    while running:
        for rank in sorted(running):
            returned = workers[rank].poll()
            if returned is None:
                continue
            running.discard(rank)
            code = 128 - returned if returned < 0 else returned  # killed by signal N: 128 + N, as a shell
            exits.append((rank, code))
            if code != 0 and failed_at is None:
                failed_at = time.monotonic()
                _signal_running(workers, signal.SIGTERM)
        if failed_at is not None and not stopping() and time.monotonic() - failed_at > PEER_EXIT_GRACE_S:
            _signal_running(workers, signal.SIGKILL)
        time.sleep(_POLL_S)
    return exits


def _signal_running(workers: Sequence[subprocess.Popen[bytes]], signum: int) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signum)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def report(path: Path, rank: int, count: int, code: int) -> TerminationSummary:
    """The worker's report; one saying so for a worker that ended without a whole one (killed, or stopped
    before it could write it)."""
    try:
        return TerminationSummary.from_json(path.read_text())
    except (OSError, ValueError):
        pass
    return TerminationSummary(
        outcome="Failed",
        reason={EXIT_INTERRUPTED: TrainerReason.INTERRUPTED, EXIT_PEER_LOST: TrainerReason.PEER_LOST}.get(
            code, TrainerReason.INTERNAL_ERROR
        ),
        message=(
            f"training process {rank} of {count} exited with code {code} before writing its report; "
            "its traceback is in the pod's log"
        ),
    )


def invalid_setting(message: str) -> int:
    """A launcher setting that cannot work: report it as the pod's failure."""
    write_termination_message(
        TerminationSummary(outcome="Failed", reason=TrainerReason.INVALID_CONFIG, message=message)
    )
    print(message, file=sys.stderr, flush=True)
    return EXIT_PERMANENT
