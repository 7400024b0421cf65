"""Training on several pods (``spec.resources.nodes: N``): one launcher per pod, the group held together by
PyTorch's elastic agent, and the gang semantics the operator's Indexed Job relies on.

Where the group meets. The operator sets ``KUBETUNE_NODES=N``, ``KUBETUNE_RENDEZVOUS_ENDPOINT`` (pod 0's
stable name, port 29400) and ``KUBETUNE_PEER_TIMEOUT_SECONDS``; Kubernetes sets ``JOB_COMPLETION_INDEX``, the
pod's node rank. Each pod's launcher runs a ``LocalElasticAgent`` with the c10d rendezvous backend at that
endpoint, hosted by pod 0 (``is_host`` is passed explicitly: in the local test cluster every pod runs on one
machine, so the agent's own guess by host name would make every pod the host). The agent starts the pod's
workers (one per visible GPU, or ``KUBETUNE_CPU_PROCESSES`` gloo workers on a machine without GPUs). The
rendezvous orders pods by address and process id, not by index, so every worker takes its global rank from
the index itself: ``node_rank * per_pod + local_rank`` (the agent's store is shared by all ranks, so any
consistent numbering works); global rank 0 is always pod 0's first worker, the one that serves metrics,
publishes the result and writes the result record.

Gang semantics: the group lives and dies as one.
- A worker that fails (an exception, OOM, SIGKILL) ends its pod with that worker's exit code. The agent
  restarts nothing (``max_restarts=0``): a restart in place would keep the other pods' stale state; instead
  every pod ends and the Job starts the whole group again, which resumes from the last committed checkpoint.
- Every other pod ends with ``EXIT_CODE_PEER_LOST`` (3), which the Job's podFailurePolicy ignores, so one
  group failure is counted once, by the pod whose failure started it (``status.restarts``, bounded by
  ``backoffLimit``). A worker whose collective fails because a peer vanished (the connection closed, or the
  collective timed out) exits 3 itself and its pod passes that on.
- A peer that vanishes without closing its connections (its node lost, or its processes stopped) is found by
  a heartbeat through the rendezvous store: every launcher bumps a counter of its own every few seconds and
  watches the others'; one that has not moved for ``KUBETUNE_PEER_TIMEOUT_SECONDS`` (or a store that has not
  answered for as long) counts as lost, and the pod stops its workers and exits 3. The training loop's
  collectives also time out after twice that time (``step_collective_timeout``) as a second line; setup,
  checkpoints and the final upload keep the long timeout, since one rank may legitimately wait there for
  another's download or upload.
- SIGTERM to any pod (preemption, drain, suspend) reaches that pod's workers through the agent; they agree
  with every other rank at the next step boundary (a collective), the group writes one checkpoint, and every
  pod exits ``EXIT_CODE_INTERRUPTED`` (143), which the Job ignores.
- A pod that finished training exits 0 only once the whole group has: rank 0's upload is followed by a
  barrier of every rank, then the agent's exit barrier.

What the agent cannot keep, and what this wrapper adds for it: after one local worker fails the agent gives
the others 30 s (fixed) before SIGKILL, too long when they are blocked in a collective with the vanished
worker, so ``_GroupAgent`` shortens that to ``STOP_GRACE_S``; the agent has no notion of a silently lost peer
(its own rendezvous keep-alive only prunes dead nodes at the next rendezvous), hence the heartbeat; and it
reports every failure alike, so the exit code the podFailurePolicy reads is chosen here (``choose_exit``).
Limit: a pod that loses its own network sees every peer as lost and also exits 3, so such a failure is not
counted against ``backoffLimit``; the operator's progress watchdog still ends a group that never advances.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from kubetune_trainer.contract import TERMINATION_LOG_ENV, TerminationSummary, TrainerReason
from kubetune_trainer.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_LOST, EXIT_RETRYABLE

NODES_ENV = "KUBETUNE_NODES"
RENDEZVOUS_ENDPOINT_ENV = "KUBETUNE_RENDEZVOUS_ENDPOINT"
PEER_TIMEOUT_ENV = "KUBETUNE_PEER_TIMEOUT_SECONDS"
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in the pods of an Indexed Job
# Set by the launcher for its workers: the directory each writes its report to (rank-<local rank>).
RANK_REPORTS_ENV = "KUBETUNE_RANK_REPORTS"

MAX_NODES = 64
DEFAULT_PEER_TIMEOUT_S = 60
MIN_PEER_TIMEOUT_S = 5
MAX_PEER_TIMEOUT_S = 86400
# How long the pods wait for the whole group to join (all pods scheduled, images pulled).
JOIN_TIMEOUT_S = 900
# After one local worker failed, how long the others get to exit before SIGKILL.
STOP_GRACE_S = 5
# After SIGTERM, the workers' time to write the group's checkpoint; the pod's terminationGracePeriodSeconds
# ends it sooner.
SHUTDOWN_GRACE_S = 3600
_MONITOR_S = 0.2
_HEARTBEAT_PREFIX = "kubetune/heartbeat/"


# ----------------------------------------------------------------------------------------------------
# Settings and rank math (pure)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSettings:
    nodes: int  # pods in the group
    node_rank: int  # this pod's index (JOB_COMPLETION_INDEX)
    host: str  # the rendezvous endpoint: pod 0's stable name
    port: int
    peer_timeout_s: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def local_addr(self) -> str:
        return peer_address(self.host, self.node_rank)


def group_settings(env: Mapping[str, str]) -> GroupSettings | None:
    """The group this pod belongs to, from the operator's env; None for a job of one pod. ValueError names
    every bad value at once, with what to set instead."""
    raw_nodes = env.get(NODES_ENV, "").strip()
    if not raw_nodes:
        return None
    nodes = _whole(raw_nodes)
    if nodes is None or not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"{NODES_ENV}={raw_nodes!r} is not a whole number from 1 to {MAX_NODES}")
    if nodes == 1:
        return None
    problems: list[str] = []
    raw_endpoint = env.get(RENDEZVOUS_ENDPOINT_ENV, "").strip()
    host, port = parse_endpoint(raw_endpoint)
    if host is None or port is None:
        problems.append(
            f"{RENDEZVOUS_ENDPOINT_ENV}={raw_endpoint!r} is not host:port (pod 0's address and the "
            "rendezvous port, e.g. job-trainer-0.job-trainer:29400)"
        )
    raw_rank = env.get(NODE_RANK_ENV, "").strip()
    node_rank = _whole(raw_rank)
    if node_rank is None or node_rank >= nodes:
        problems.append(
            f"{NODE_RANK_ENV}={raw_rank!r} is not a pod index from 0 to {nodes - 1} (it is set by "
            f"Kubernetes in the pods of an Indexed Job with {nodes} completions)"
        )
    raw_timeout = env.get(PEER_TIMEOUT_ENV, "").strip()
    timeout = DEFAULT_PEER_TIMEOUT_S if not raw_timeout else _whole(raw_timeout)
    if timeout is None or not MIN_PEER_TIMEOUT_S <= timeout <= MAX_PEER_TIMEOUT_S:
        problems.append(
            f"{PEER_TIMEOUT_ENV}={raw_timeout!r} is not a whole number of seconds from {MIN_PEER_TIMEOUT_S} "
            f"to {MAX_PEER_TIMEOUT_S} (spec.peerTimeoutSeconds)"
        )
    if problems:
        raise ValueError("; ".join(problems))
    assert host is not None and port is not None and node_rank is not None and timeout is not None
    return GroupSettings(nodes, node_rank, host, port, timeout)


def parse_endpoint(raw: str) -> tuple[str | None, int | None]:
    """(host, port) of ``host:port`` (``[v6]:port`` too); None for a part that is missing or malformed."""
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        return None, None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = _whole(port_text)
    valid_host = bool(host) and len(host) <= 253 and not re.search(r"[\s/@]", host)
    return (host if valid_host else None), (port if port is not None and 1 <= port <= 65535 else None)


def _whole(text: str) -> int | None:
    """``text`` as a whole number >= 0 (digits only, at most 9 of them), else None."""
    return int(text) if text.isdigit() and len(text) <= 9 else None


def peer_address(endpoint_host: str, node_rank: int) -> str:
    """Pod ``node_rank``'s own stable name, from pod 0's (``<job>-trainer-0.<job>-trainer``: the Indexed
    Job's hostname pattern); the endpoint's host itself where it does not follow it (an IP address in tests,
    where every pod is on one machine)."""
    match = re.fullmatch(r"(.+)-0(\..+)?", endpoint_host)
    if match is None or re.fullmatch(r"[\d.]+", endpoint_host):
        return endpoint_host
    return f"{match.group(1)}-{node_rank}{match.group(2) or ''}"


def global_rank(node_rank: int, per_pod: int, local_rank: int) -> int:
    return node_rank * per_pod + local_rank


def step_collective_timeout(peer_timeout_s: int) -> timedelta:
    """How long a collective of the training loop may wait for the slowest rank before it fails: twice the
    peer timeout (a step's ranks differ by a fraction of a step; the heartbeat usually ends a lost group
    sooner)."""
    return timedelta(seconds=2 * peer_timeout_s)


def adopt_worker_rank(env: MutableMapping[str, str]) -> None:
    """In a worker the agent started: set ``RANK`` from the pod index and the report path from the
    launcher's directory. ValueError when the pods run different numbers of workers."""
    settings = group_settings(env)
    if settings is None:
        return
    local_rank, per_pod, world = (int(env[name]) for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"))
    if world != settings.nodes * per_pod:
        raise ValueError(
            f"the group's {settings.nodes} pods run {world} training processes, not {per_pod} each: every "
            "pod must see the same number of GPUs (resources.gpus) "
        )
    env["RANK"] = str(global_rank(settings.node_rank, per_pod, local_rank))
    reports = env.get(RANK_REPORTS_ENV)
    if reports:
        env[TERMINATION_LOG_ENV] = str(Path(reports) / f"rank-{local_rank}")


def worker_peer_timeout(env: Mapping[str, str]) -> int | None:
    """The group's peer timeout in a worker of a multi-pod group; None otherwise."""
    try:
        settings = group_settings(env)
    except ValueError:
        return None
    return settings.peer_timeout_s if settings else None


# ----------------------------------------------------------------------------------------------------
# Exit codes (pure)
# ----------------------------------------------------------------------------------------------------


def exit_code_of(returned: int) -> int:
    """A process's exit status as a shell reports it: killed by signal N is 128 + N."""
    return 128 - returned if returned < 0 else returned


def choose_exit(codes: Sequence[int]) -> int:
    """The pod's exit code from its workers' exit codes (in the order they were seen): a worker's own
    failure first, then a lost peer, then an interrupt, else 0."""
    own = [code for code in codes if code not in (EXIT_OK, EXIT_PEER_LOST, EXIT_INTERRUPTED)]
    if own:
        return own[0]
    for code in (EXIT_PEER_LOST, EXIT_INTERRUPTED):
        if code in codes:
            return code
    return EXIT_OK


def report_code(summary: TerminationSummary) -> int:
    """The exit code a worker's report stands for (for a worker whose exit status the agent did not keep)."""
    from kubetune_trainer.contract import PERMANENT_REASONS
    from kubetune_trainer.errors import EXIT_PERMANENT

    if summary.outcome == "Succeeded":
        return EXIT_OK
    if summary.reason == TrainerReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    if summary.reason == TrainerReason.PEER_LOST:
        return EXIT_PEER_LOST
    return EXIT_PERMANENT if summary.reason in PERMANENT_REASONS else EXIT_RETRYABLE


# ----------------------------------------------------------------------------------------------------
# Heartbeat through the rendezvous store
# ----------------------------------------------------------------------------------------------------


@dataclass
class PeerTracker:
    """Judges peers from their heartbeat counters, on this pod's clock: a peer is lost once its counter has
    not moved for ``timeout_s`` since it first beat; the store (on pod 0) once it has not answered for as
    long after it first did. Before a peer's first beat the rendezvous' join timeout covers it."""

    timeout_s: float
    values: dict[int, int] = field(default_factory=dict)
    changed: dict[int, float] = field(default_factory=dict)
    last_contact: float | None = None

    def observe(self, counters: Mapping[int, int], now: float) -> str | None:
        self.last_contact = now
        for peer, value in sorted(counters.items()):
            if value != self.values.get(peer, 0):
                self.values[peer], self.changed[peer] = value, now
            elif value > 0 and now - self.changed[peer] > self.timeout_s:
                return f"pod {peer} of the group sent no heartbeat for {self.timeout_s:g} s"
        return None

    def unanswered(self, now: float) -> str | None:
        if self.last_contact is not None and now - self.last_contact > self.timeout_s:
            return f"the group's rendezvous store on pod 0 did not answer for {self.timeout_s:g} s"
        return None


class PeerWatcher(threading.Thread):
    """Beats for this pod and watches the others' beats; calls ``on_lost`` once (from this thread) when a peer
    is lost, with ``lost`` saying which.

    The store's client does not time out against a server that is stopped rather than gone (its calls block
    however short its timeout), so the store is used from a thread of its own (``_beat``) that records what it
    last saw, and this one judges by the clock alone."""

    def __init__(self, settings: GroupSettings, run_id: str, on_lost: Callable[[], None]) -> None:
        super().__init__(name="kubetune-peer-watcher", daemon=True)
        self.settings = settings
        self.prefix = f"{_HEARTBEAT_PREFIX}{run_id}/"
        self.on_lost = on_lost
        self.interval = min(5.0, max(0.5, settings.peer_timeout_s / 5))
        self.lost: str | None = None
        self._done = threading.Event()
        self._seen: tuple[float, dict[int, int]] | None = None  # (when, counters) of the last round
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._done.set()

    def run(self) -> None:
        threading.Thread(target=self._beat, name="kubetune-heartbeat", daemon=True).start()
        tracker = PeerTracker(float(self.settings.peer_timeout_s))
        judged = 0.0
        while not self._done.wait(self.interval):
            with self._lock:
                seen = self._seen
            if seen is not None and seen[0] > judged:
                judged = seen[0]
                lost = tracker.observe(seen[1], time.monotonic())
            else:
                lost = tracker.unanswered(time.monotonic())
            if lost and not self._done.is_set():
                self.lost = lost
                self.on_lost()
                return

    def _beat(self) -> None:
        from torch.distributed import TCPStore

        peers = [n for n in range(self.settings.nodes) if n != self.settings.node_rank]
        store: Any = None
        while not self._done.wait(self.interval):
            try:
                if store is None:
                    store = TCPStore(
                        self.settings.host,
                        self.settings.port,
                        is_master=False,
                        timeout=timedelta(seconds=self.settings.peer_timeout_s),
                        wait_for_workers=False,
                    )
                store.add(f"{self.prefix}{self.settings.node_rank}", 1)
                counters = {peer: int(store.add(f"{self.prefix}{peer}", 0)) for peer in peers}
            except Exception:  # not up yet, refused, gone: no news this round
                continue
            with self._lock:
                self._seen = (time.monotonic(), counters)


# ----------------------------------------------------------------------------------------------------
# The launcher of one pod of the group
# ----------------------------------------------------------------------------------------------------


def _group_agent_class() -> Any:
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class GroupAgent(LocalElasticAgent):  # type: ignore[misc]
        """The agent, with a short grace for the surviving workers after one failed: they are exiting
        too, or blocked in a collective with the worker that is gone (its default is a fixed 30 s)."""

        def _stop_workers(self, worker_group: Any, *args: Any, **kwargs: Any) -> None:
            self._shutdown(timeout=STOP_GRACE_S)

    return GroupAgent


def finished_before(config: Any, node_rank: int) -> bool:
    """Whether the group already published this job's result: a pod started again after that (killed while
    the group was exiting) must not wait for peers that have ended, which would never come back. It reports
    the published result (pod 0, whose report the operator reads) or that training finished, and the pod
    exits 0. Storage errors are left to the recipe, which reports them with their reasons."""
    from kubetune_trainer import publish
    from kubetune_trainer.metrics import log_event
    from kubetune_trainer.recipe import _success, write_termination_message
    from kubetune_trainer.storage import Storage, make_client

    try:
        already = publish.published(Storage(make_client(config.s3)), config.output.uri, config.job.uid)
    except Exception:  # the recipe reads the same objects and reports what failed, with its reason
        return False
    if already is None:
        return False
    record, manifest = already
    log_event("already_published", every_rank=True, node_rank=node_rank, uri=record.uri)
    mine = record if node_rank == 0 else None
    write_termination_message(
        _success(mine, manifest.get("metrics") or {}, manifest.get("progress") or {}, {}, None)
    )
    return True


def launch_group(settings: GroupSettings, per_pod: int, on_gpu: bool, run_id: str) -> int:
    """Run this pod's ``per_pod`` workers as part of the group; returns the pod's exit code and writes its
    termination message."""
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    from kubetune_trainer.launch import worker_threads
    from kubetune_trainer.metrics import log_event
    from kubetune_trainer.recipe import write_termination_message

    reports = Path(tempfile.mkdtemp(prefix="kubetune-ranks-"))
    os.environ[RANK_REPORTS_ENV] = str(reports)
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(worker_threads(per_pod))

    def raise_stop(signum: int, frame: Any) -> None:
        # What the agent's own handler does once the workers run; before that (rendezvous) it is ours.
        raise SignalException(f"launcher {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, raise_stop)
    finishing = threading.Lock()  # whoever takes it writes the pod's report and exits

    def finish(code: int, summary: TerminationSummary) -> int:
        write_termination_message(summary)
        log_event("pod_exit", every_rank=True, node_rank=settings.node_rank, code=code, reason=summary.reason)
        shutil.rmtree(reports, ignore_errors=True)
        return code

    def stop_for_lost_peer() -> None:
        # The workers first, by process id: they may be blocked in a collective with the lost peer. Then
        # the agent, through its signal path; its thread may be blocked on a silent store, which never
        # times out, so past a grace period this thread ends the pod itself.
        log_event("peer_lost", every_rank=True, node_rank=settings.node_rank, message=watcher.lost)
        for pid in child_processes(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(STOP_GRACE_S)
        if finishing.acquire(blocking=False):
            _reap_children()
            finish(EXIT_PEER_LOST, _peer_lost(watcher.lost or "a peer was lost"))
            sys.stdout.flush()
            os._exit(EXIT_PEER_LOST)

    watcher = PeerWatcher(settings, run_id, stop_for_lost_peer)
    log_event(
        "group",
        every_rank=True,
        node_rank=settings.node_rank,
        nodes=settings.nodes,
        processes=per_pod,
        endpoint=settings.endpoint,
        peer_timeout_s=settings.peer_timeout_s,
    )
    codes: list[tuple[int, int]] = []  # (local rank, exit code) of failed workers
    stopped_by: int | None = None
    error: str | None = None
    try:
        watcher.start()
        parameters = RendezvousParameters(
            backend="c10d",
            endpoint=settings.endpoint,
            run_id=run_id,
            min_nodes=settings.nodes,
            max_nodes=settings.nodes,
            local_addr=settings.local_addr,
            is_host=settings.node_rank == 0,
            join_timeout=JOIN_TIMEOUT_S,
            # The agent asks the store between checks of its workers: a silent store must not hold it
            # longer than the peer timeout.
            read_timeout=settings.peer_timeout_s,
        )
        spec = WorkerSpec(
            role="trainer",
            local_world_size=per_pod,
            entrypoint=sys.executable,
            args=("-m", "kubetune_trainer"),
            rdzv_handler=get_rendezvous_handler(parameters),
            max_restarts=0,
            monitor_interval=_MONITOR_S,
            local_addr=settings.local_addr,
        )
        agent = _group_agent_class()(
            spec,
            logs_specs=DefaultLogsSpecs(log_dir=str(reports / "agent")),
            start_method="spawn",
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        result = agent.run()
        codes = [(f.local_rank, exit_code_of(f.exitcode)) for f in result.failures.values()]
        if result.is_failed() and not codes:
            error = f"the agent ended the workers in state {result.state.name} without an exit code"
    except SignalException as stop:
        stopped_by = int(stop.sigval)
    except Exception as err:  # the rendezvous failed or its store vanished
        error = f"{type(err).__name__}: {err}"
    finally:
        watcher.stop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the decision is made; let the report be written
        _reap_children()
    code, summary = pod_result(settings, per_pod, reports, codes, watcher.lost, stopped_by, error)
    finishing.acquire()  # held for good when the watcher is ending the pod itself
    return finish(code, summary)


def pod_result(
    settings: GroupSettings,
    per_pod: int,
    reports: Path,
    failed: Sequence[tuple[int, int]],
    lost: str | None,
    stopped_by: int | None,
    error: str | None,
) -> tuple[int, TerminationSummary]:
    """(exit code, termination summary) of the pod: a lost peer; SIGTERM; the workers' own exit codes; or,
    where the agent ended without them, what their reports say."""
    from kubetune_trainer.launch import report

    def of(local_rank: int, code: int) -> TerminationSummary:
        return report(reports / f"rank-{local_rank}", local_rank, per_pod, code)

    if lost is not None:
        return EXIT_PEER_LOST, _peer_lost(lost)
    if stopped_by in (signal.SIGTERM, signal.SIGINT):
        summary = of(0, EXIT_INTERRUPTED)
        if summary.reason != TrainerReason.INTERRUPTED:
            summary = TerminationSummary(
                outcome="Failed",
                reason=TrainerReason.INTERRUPTED,
                message="stopped by SIGTERM before training wrote a checkpoint; the Job restarts the group",
            )
        return EXIT_INTERRUPTED, summary
    if failed:
        code = choose_exit([c for _, c in failed])
        local_rank = next(rank for rank, c in failed if c == code)
        return code, of(local_rank, code)
    written = {
        rank: TerminationSummary.from_json(path.read_text())
        for rank in range(per_pod)
        if (path := reports / f"rank-{rank}").is_file() and _parses(path)
    }
    if error is None and stopped_by is None:
        return EXIT_OK, of(0, EXIT_OK)
    if written:
        ranked = sorted(written.items())
        code = choose_exit([report_code(s) for _, s in ranked])
        return code, next(s for _, s in ranked if report_code(s) == code)
    if settings.node_rank != 0 and error is not None and ("Connection" in error or "Store" in error):
        return EXIT_PEER_LOST, _peer_lost(f"the group's rendezvous store on pod 0 went away ({error})")
    message = error or f"the launcher was stopped by signal {stopped_by}"
    return EXIT_RETRYABLE, TerminationSummary(
        outcome="Failed",
        reason=TrainerReason.INTERNAL_ERROR,
        message=f"pod {settings.node_rank} of {settings.nodes} could not run its workers: {message}",
    )


def _peer_lost(what: str) -> TerminationSummary:
    return TerminationSummary(
        outcome="Failed",
        reason=TrainerReason.PEER_LOST,
        message=f"{what}; every pod stops and the group resumes from the last checkpoint",
    )


def _parses(path: Path) -> bool:
    try:
        TerminationSummary.from_json(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _reap_children() -> None:
    """SIGKILL whatever this launcher started that is still running (workers the agent could not stop: a
    SIGHUP arriving inside its own shutdown), by process id, and reap them."""
    me = os.getpid()
    for pid in child_processes(me):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def child_processes(parent: int) -> set[int]:
    """Processes whose parent is ``parent`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            found.add(int(entry.name))
    return found
