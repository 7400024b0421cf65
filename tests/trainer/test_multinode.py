"""Training on several pods, on CPU: two launchers (``python -m kubetune_trainer``) play pods 0 and 1 of an
Indexed Job on 127.0.0.1 (``JOB_COMPLETION_INDEX`` 0 and 1, two gloo workers each, the rendezvous at pod 0's
port), as the operator starts them for ``resources.nodes: 2``.

World size 4 must train exactly like one process on the same steps; the group lives and dies as one: a pod
killed mid-run ends the other with EXIT_CODE_PEER_LOST well within the peer timeout, and both restarted
resume from the last checkpoint to the same final loss; SIGTERM to one pod checkpoints the group once and
ends both with EXIT_CODE_INTERRUPTED. No process or listening port is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e.cluster.procs import free_port, pid_running, port_is_listening
from test_distributed import MICRO_TOKENS, distributed_config, published

from conftest import REPO, Workspace, chat_records, jsonl
from kubetune_trainer import group, launch
from kubetune_trainer.contract import (
    TERMINATION_LOG_ENV,
    CheckpointConfig,
    OutputConfig,
    TerminationSummary,
    TrainerReason,
)
from kubetune_trainer.errors import EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_PERMANENT
from kubetune_trainer.recipe import MICRO_BATCH_TOKENS_ENV, is_peer_failure

PEER_TIMEOUT_S = 10
RELATIVE_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------------------
# Two pods on one machine
# ----------------------------------------------------------------------------------------------------


@dataclass
class Pod:
    index: int
    process: subprocess.Popen[bytes]
    log: Path  # stdout and stderr
    termination_log: Path

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_pod(self)
            raise AssertionError(f"pod {self.index} did not exit in {timeout} s:\n{self.tail()}") from None

    def summary(self) -> TerminationSummary:
        return TerminationSummary.from_json(self.termination_log.read_text())

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def processes(self) -> set[int]:
        """The launcher and everything under it (the agent starts each worker in a session of its own, so
        the pod is the process tree, as a container's cgroup is)."""
        found, todo = set(), [self.process.pid]
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found.add(pid)
            todo.extend(group.child_processes(pid))
        return {pid for pid in found if pid_running(pid)}


def start_pods(
    ws: Workspace, config: Any, name: str, port: int, nodes: int = 2, only: Sequence[int] | None = None
) -> list[Pod]:
    """The pods of a group of ``nodes`` (``only`` some of them: the others are gone)."""
    pods = []
    for index in range(nodes) if only is None else only:
        env = {**os.environ, **ws.env(config, f"{name}-pod{index}")}
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), str(REPO)]),
                group.NODES_ENV: str(nodes),
                group.RENDEZVOUS_ENDPOINT_ENV: f"127.0.0.1:{port}",
                group.PEER_TIMEOUT_ENV: str(PEER_TIMEOUT_S),
                group.NODE_RANK_ENV: str(index),
                launch.CPU_PROCESSES_ENV: "2",
                MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS,
                "OMP_NUM_THREADS": "1",
            }
        )
        env.pop("WORLD_SIZE", None)
        log = ws.tmp / f"{name}-pod{index}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "kubetune_trainer"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pods.append(Pod(index, process, log, Path(env[TERMINATION_LOG_ENV])))
    return pods


def kill_pod(pod: Pod, signum: int = signal.SIGKILL) -> set[int]:
    """Signal every process of the pod (by PID), as the kubelet does to a container's processes."""
    pids = pod.processes()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return pids


def wait_for(pods: list[Pod], what: Any, timeout: float = 240) -> dict[str, Any]:
    """The first event of pod 0 matching ``what``; fails when a pod exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in pods[0].events():
            if what(event):
                return event
        ended = [p for p in pods if p.process.poll() is not None]
        assert not ended, f"pod {ended[0].index} exited {ended[0].process.returncode}:\n{ended[0].tail()}"
        time.sleep(0.05)
    for pod in pods:
        kill_pod(pod)
    raise AssertionError(f"no such event in {timeout} s:\n{pods[0].tail()}")


def assert_nothing_left(pids: set[int], port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and ([p for p in pids if pid_running(p)] or port_is_listening(port)):
        time.sleep(0.1)
    assert not [p for p in pids if pid_running(p)], "processes left behind"
    assert not port_is_listening(port), f"port {port} still listening"


def job_config(ws: Workspace, train: str, steps: int, out: str, every_steps: int | None) -> Any:
    config = distributed_config(ws, train, steps=steps, out=out)
    return replace(
        config,
        job=replace(config.job, uid=f"uid-{out}"),
        checkpointing=CheckpointConfig(every_steps=every_steps, every_minutes=None, keep=2),
    )


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ----------------------------------------------------------------------------------------------------
# Real training
# ----------------------------------------------------------------------------------------------------


def test_two_pods_of_two_processes_train_exactly_like_one(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(40, seed=5)))
    config = job_config(ws, train, steps=4, out="group", every_steps=None)
    port = free_port()
    pods = start_pods(ws, config, "group", port)
    pids = set().union(*(pod.processes() for pod in pods))
    # The reference, in this process while the pods start: one process, the same steps.
    one = ws.run(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/one/")),
        monkeypatch,
        **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS},
    )
    assert one.code == 0, one.summary.message
    codes = [pod.wait(240) for pod in pods]
    assert codes == [0, 0], "\n".join(pod.tail() for pod in pods)
    pids |= set().union(*(pod.processes() for pod in pods))

    first, second = pods[0].summary(), pods[1].summary()
    assert first.outcome == second.outcome == "Succeeded"
    assert first.adapter is not None and first.adapter.uri == f"s3://{ws.bucket}/group/"
    assert second.adapter is None  # only pod 0 (global rank 0) publishes and reports the result

    one_summary, one_weights = published(ws, "one/")
    group_summary, group_weights = published(ws, "group/")
    assert group_summary["provenance"]["resolved"]["worldSize"] == 4
    assert one_summary["progress"]["trainedTokens"] == group_summary["progress"]["trainedTokens"]
    losses_one, losses_group = one_summary["losses"], group_summary["losses"]
    assert len(losses_one) == len(losses_group) == 4
    worst = max(relative(g, o) for g, o in zip(losses_group, losses_one, strict=True))
    assert one_weights.keys() == group_weights.keys() and one_weights
    weight_diff = max(float((one_weights[k] - group_weights[k]).abs().max()) for k in one_weights)
    moved = max(float(w.abs().max()) for k, w in one_weights.items() if "lora_B" in k)
    print(
        f"world size 4 (2 pods x 2) vs 1 process: max relative loss diff {worst:.3g}, "
        f"max |adapter weight diff| {weight_diff:.3g} (largest lora_B {moved:.3g}); losses {losses_group}"
    )
    assert worst < RELATIVE_TOLERANCE
    assert weight_diff < WEIGHT_TOLERANCE and moved > 100 * WEIGHT_TOLERANCE

    # Global ranks follow the pod index: pod 0 holds ranks 0-1 and alone logs, serves metrics, publishes.
    exits = {
        pod.index: sorted((e["rank"], e["code"]) for e in pod.events() if e["event"] == "exit")
        for pod in pods
    }
    assert exits == {0: [(0, 0), (1, 0)], 1: [(2, 0), (3, 0)]}
    assert [e["event"] for e in pods[0].events()].count("plan") == 1
    assert not [e for e in pods[1].events() if e["event"] not in ("exit", "group", "pod_exit")]
    assert_nothing_left(pids, port)


def test_a_killed_pod_stops_the_group_which_resumes_from_the_checkpoint(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(60, seed=6)))
    config = job_config(ws, train, steps=24, out="killed", every_steps=3)
    port = free_port()
    pods = start_pods(ws, config, "killed", port)
    wait_for(pods, lambda e: e["event"] == "progress" and e["step"] >= 5)
    pids = set().union(*(pod.processes() for pod in pods))
    assert len(pids) == 6  # two launchers, four workers
    kill_pod(pods[1])
    killed_at = time.monotonic()
    code = pods[0].wait(PEER_TIMEOUT_S * 3)
    took = time.monotonic() - killed_at
    print(f"pod 0 exited {code} {took:.1f} s after pod 1 was killed")
    assert code == EXIT_PEER_LOST, pods[0].tail()
    assert took < PEER_TIMEOUT_S
    summary = pods[0].summary()
    assert summary.reason == TrainerReason.PEER_LOST, summary.message
    assert_nothing_left(pids, port)
    checkpoints = [e["step"] for e in pods[0].events() if e["event"] == "checkpoint"]
    assert checkpoints and checkpoints[-1] >= 3

    # The Job starts both pods again: they resume from the last checkpoint and finish.
    port = free_port()
    pods = start_pods(ws, config, "killed-again", port)
    # The uninterrupted reference (one process trains like the group, as the test above shows).
    reference = ws.run(
        replace(config, output=OutputConfig(uri=f"s3://{ws.bucket}/reference/")),
        monkeypatch,
        **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS},
    )
    assert reference.code == 0, reference.summary.message
    codes = [pod.wait(300) for pod in pods]
    assert codes == [0, 0], "\n".join(pod.tail() for pod in pods)
    plan = next(e for e in pods[0].events() if e["event"] == "plan")
    assert plan["resumed_step"] == checkpoints[-1]
    resumed = ws.read_json("killed/training_summary.json")["losses"]
    expected = ws.read_json("reference/training_summary.json")["losses"]
    print(
        f"resumed from step {checkpoints[-1]}: final loss {resumed[-1]!r}, uninterrupted {expected[-1]!r}, "
        f"relative diff {relative(resumed[-1], expected[-1]):.3g}"
    )
    assert len(resumed) == len(expected) == 24
    assert relative(resumed[-1], expected[-1]) < RELATIVE_TOLERANCE
    assert pods[0].summary().adapter is not None


def test_a_pod_started_after_the_group_published_exits_without_waiting_for_its_peers(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod killed while the group was exiting is started again by the Job; its peers have ended and will not
    come back, so it must not wait for them: it finds this job's result published and ends at once."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(12, seed=8)))
    config = job_config(ws, train, steps=2, out="published", every_steps=None)
    published = ws.run(config, monkeypatch, **{MICRO_BATCH_TOKENS_ENV: MICRO_TOKENS})
    assert published.code == 0 and published.summary.adapter is not None, published.summary.message
    port = free_port()  # nobody listens: no rendezvous can happen
    (late,) = start_pods(ws, config, "late-peer", port, only=[1])
    assert late.wait(60) == 0, late.tail()
    assert late.summary().adapter is None and late.summary().outcome == "Succeeded"
    (first,) = start_pods(ws, config, "late-first", port, only=[0])
    assert first.wait(60) == 0, first.tail()
    assert first.summary().adapter == published.summary.adapter
    # Another job's result at the same output is not this job's: that pod waits for its group.
    other = replace(config, job=replace(config.job, uid="another-uid"))
    (waiting,) = start_pods(ws, other, "other-job", port, only=[1])
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.process.wait(timeout=15)
    kill_pod(waiting)


def test_a_failed_worker_is_counted_once_by_its_own_pod(ws: Workspace) -> None:
    """One worker of pod 1 is OOM-killed (SIGKILL): pod 1 exits with that worker's code, the status the Job
    counts; pod 0 exits EXIT_CODE_PEER_LOST, which it ignores."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(60, seed=9)))
    config = job_config(ws, train, steps=200, out="oom", every_steps=None)
    port = free_port()
    pods = start_pods(ws, config, "oom", port)
    wait_for(pods, lambda e: e["event"] == "progress" and e["step"] >= 2)
    pids = set().union(*(pod.processes() for pod in pods))
    workers = group.child_processes(pods[1].process.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    codes = [pod.wait(PEER_TIMEOUT_S * 3) for pod in pods]
    assert codes == [EXIT_PEER_LOST, 128 + signal.SIGKILL], "\n".join(pod.tail() for pod in pods)
    assert pods[0].summary().reason == TrainerReason.PEER_LOST
    assert pods[1].summary().reason == TrainerReason.INTERNAL_ERROR  # killed before it could report
    assert_nothing_left(pids, port)


def test_sigterm_to_one_pod_checkpoints_the_group_once(ws: Workspace) -> None:
    train = ws.put("data/train.jsonl", jsonl(chat_records(60, seed=7)))
    config = job_config(ws, train, steps=200, out="stopped", every_steps=None)
    port = free_port()
    pods = start_pods(ws, config, "stopped", port)
    wait_for(pods, lambda e: e["event"] == "progress" and e["step"] >= 2)
    pids = set().union(*(pod.processes() for pod in pods))
    pods[1].process.send_signal(signal.SIGTERM)  # the kubelet signals the container's main process
    codes = [pod.wait(120) for pod in pods]
    assert codes == [EXIT_INTERRUPTED, EXIT_INTERRUPTED], "\n".join(pod.tail() for pod in pods)
    checkpoints = [e["step"] for e in pods[0].events() if e["event"] == "checkpoint"]
    assert len(checkpoints) == 1 and 2 <= checkpoints[0] < 200
    step = checkpoints[0]
    assert ws.read_json(f"stopped/checkpoints/step-{step:08d}/manifest.json")["worldSize"] == 4
    for pod in pods:
        summary = pod.summary()
        assert summary.reason == TrainerReason.INTERRUPTED, summary.message
    assert pods[0].summary().checkpoint == {
        "uri": f"s3://{ws.bucket}/stopped/checkpoints/step-{step:08d}/",
        "step": step,
    }
    exits = sorted((e["rank"], e["code"]) for pod in pods for e in pod.events() if e["event"] == "exit")
    assert exits == [(rank, EXIT_INTERRUPTED) for rank in range(4)]
    assert_nothing_left(pids, port)


def test_a_silent_pod_is_found_by_the_heartbeat(ws: Workspace) -> None:
    """Pod 0 (the rendezvous store's host) stops answering without closing a connection, as a lost node
    does (SIGSTOP): pod 1 finds it within the peer timeout and exits EXIT_CODE_PEER_LOST, blocked in no
    collective."""
    train = ws.put("data/train.jsonl", jsonl(chat_records(60, seed=8)))
    config = job_config(ws, train, steps=200, out="silent", every_steps=None)
    port = free_port()
    pods = start_pods(ws, config, "silent", port)
    wait_for(pods, lambda e: e["event"] == "progress" and e["step"] >= 2)
    pids = set().union(*(pod.processes() for pod in pods))
    kill_pod(pods[0], signal.SIGSTOP)
    stopped_at, stopped_wall = time.monotonic(), time.time()
    try:
        code = pods[1].wait(PEER_TIMEOUT_S * 4)
        took = time.monotonic() - stopped_at
    finally:
        kill_pod(pods[0])  # the node is gone: its pod is deleted
    found = next(e for e in pods[1].events() if e["event"] == "peer_lost")
    print(
        f"pod 1 found the silent pod 0 after {found['ts'] - stopped_wall:.1f} s ({found['message']}), "
        f"exited after {took:.1f} s"
    )
    assert code == EXIT_PEER_LOST, pods[1].tail()
    heartbeat_s = min(5.0, max(0.5, PEER_TIMEOUT_S / 5))
    assert found["ts"] - stopped_wall < PEER_TIMEOUT_S + 2 * heartbeat_s + 2
    assert took < 2 * PEER_TIMEOUT_S + 5
    assert pods[1].summary().reason == TrainerReason.PEER_LOST
    pods[0].process.wait(30)
    assert_nothing_left(pids, port)


# ----------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------

GOOD = {
    group.NODES_ENV: "3",
    group.RENDEZVOUS_ENDPOINT_ENV: "ft-trainer-0.ft-trainer:29400",
    group.NODE_RANK_ENV: "2",
    group.PEER_TIMEOUT_ENV: "30",
}


def test_group_settings_from_the_operators_env() -> None:
    settings = group.group_settings(GOOD)
    assert settings == group.GroupSettings(3, 2, "ft-trainer-0.ft-trainer", 29400, 30)
    assert settings.local_addr == "ft-trainer-2.ft-trainer"
    assert group.group_settings({}) is None
    assert group.group_settings({group.NODES_ENV: "1"}) is None  # one pod: today's launcher
    default = group.group_settings({k: v for k, v in GOOD.items() if k != group.PEER_TIMEOUT_ENV})
    assert default is not None and default.peer_timeout_s == group.DEFAULT_PEER_TIMEOUT_S


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({group.NODES_ENV: "65"}, "KUBETUNE_NODES='65' is not a whole number from 1 to 64"),
        ({group.NODES_ENV: "two"}, "KUBETUNE_NODES='two'"),
        ({group.RENDEZVOUS_ENDPOINT_ENV: "ft-trainer-0"}, "ENDPOINT='ft-trainer-0' is not host:port"),
        ({group.RENDEZVOUS_ENDPOINT_ENV: "h:99999"}, "is not host:port"),
        ({group.NODE_RANK_ENV: "3"}, "JOB_COMPLETION_INDEX='3' is not a pod index from 0 to 2"),
        ({group.NODE_RANK_ENV: ""}, "JOB_COMPLETION_INDEX='' is not a pod index"),
        ({group.PEER_TIMEOUT_ENV: "4"}, "PEER_TIMEOUT_SECONDS='4' is not a whole number of seconds"),
    ],
)
def test_bad_group_settings_say_what_to_set(changes: dict[str, str], expected: str) -> None:
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        group.group_settings({**GOOD, **changes})


def test_every_bad_group_setting_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as err:
        group.group_settings({group.NODES_ENV: "2", group.PEER_TIMEOUT_ENV: "x"})
    text = str(err.value)
    assert all(
        name in text for name in (group.RENDEZVOUS_ENDPOINT_ENV, group.NODE_RANK_ENV, group.PEER_TIMEOUT_ENV)
    )


def test_a_bad_group_setting_fails_the_pod_permanently(ws: Workspace) -> None:
    env = {**os.environ, **ws.env(ws.config("s3://x/y.jsonl"), "bad")}
    env.update({"PYTHONPATH": str(REPO / "trainer_image"), group.NODES_ENV: "2", group.NODE_RANK_ENV: "5"})
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "kubetune_trainer"]
    done = subprocess.run(command, env=env, capture_output=True, timeout=120)
    assert done.returncode == EXIT_PERMANENT
    summary = TerminationSummary.from_json(Path(env[TERMINATION_LOG_ENV]).read_text())
    assert summary.reason == TrainerReason.INVALID_CONFIG
    assert "JOB_COMPLETION_INDEX='5'" in summary.message and "KUBETUNE_RENDEZVOUS_ENDPOINT" in summary.message


def test_rank_math_and_addresses() -> None:
    ranks = [group.global_rank(node, 2, local) for node in range(3) for local in range(2)]
    assert ranks == list(range(6))  # each rank once, pod 0 first
    assert group.peer_address("job-trainer-0.job-trainer", 11) == "job-trainer-11.job-trainer"
    assert group.peer_address("127.0.0.1", 1) == "127.0.0.1"
    assert group.parse_endpoint("[::1]:29400") == ("::1", 29400)
    env = {**GOOD, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "6", "RANK": "0"}
    group.adopt_worker_rank(env)
    assert env["RANK"] == "5"
    with pytest.raises(ValueError, match="every pod must see the same number of GPUs"):
        group.adopt_worker_rank({**env, "WORLD_SIZE": "5"})


def test_the_pod_exit_code_names_the_failure_that_started_it() -> None:
    assert group.choose_exit([EXIT_PEER_LOST, 137]) == 137  # own worker OOM-killed, its sibling saw it
    assert group.choose_exit([EXIT_PEER_LOST, EXIT_PEER_LOST]) == EXIT_PEER_LOST
    assert group.choose_exit([EXIT_INTERRUPTED, EXIT_PEER_LOST]) == EXIT_PEER_LOST
    assert group.choose_exit([EXIT_INTERRUPTED]) == EXIT_INTERRUPTED
    assert group.choose_exit([EXIT_PERMANENT, 1]) == EXIT_PERMANENT
    assert group.choose_exit([]) == 0
    assert group.exit_code_of(-9) == 137
    assert launch.pick_report([(1, EXIT_PEER_LOST), (0, 1)]) == (0, 1)


def test_a_silent_peer_is_lost_after_the_timeout() -> None:
    tracker = group.PeerTracker(10.0)
    assert tracker.unanswered(100.0) is None  # the store was never reached: the rendezvous waits
    assert tracker.observe({1: 0, 2: 0}, 0.0) is None  # not started yet
    assert tracker.observe({1: 1, 2: 0}, 1.0) is None
    assert tracker.observe({1: 2, 2: 0}, 9.0) is None
    assert tracker.observe({1: 2, 2: 0}, 18.9) is None
    assert tracker.observe({1: 2, 2: 0}, 19.1) == "pod 1 of the group sent no heartbeat for 10 s"
    assert tracker.unanswered(25.0) is None
    assert tracker.unanswered(29.2) is not None


def test_collective_failures_from_a_vanished_peer_are_told_apart() -> None:
    assert is_peer_failure(RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:28084"))
    assert is_peer_failure(torch.distributed.DistNetworkError("store unreachable"))
    assert not is_peer_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))
    assert group.step_collective_timeout(10).total_seconds() == 20


def test_the_pod_result_when_the_agent_ends_without_exit_codes(tmp_path: Path) -> None:
    settings = group.GroupSettings(2, 1, "127.0.0.1", 29400, 10)
    interrupted = TerminationSummary(outcome="Failed", reason=TrainerReason.INTERRUPTED, message="stopped")
    code, summary = group.pod_result(settings, 2, tmp_path, [], "pod 0 sent no heartbeat", None, None)
    assert (code, summary.reason) == (EXIT_PEER_LOST, TrainerReason.PEER_LOST)
    assert "pod 0 sent no heartbeat" in summary.message
    code, summary = group.pod_result(settings, 2, tmp_path, [], None, signal.SIGTERM, None)
    assert (code, summary.reason) == (EXIT_INTERRUPTED, TrainerReason.INTERRUPTED)
    # The store vanished while the workers were ending: their reports decide.
    (tmp_path / "rank-0").write_text(interrupted.to_json())
    (tmp_path / "rank-1").write_text(interrupted.to_json())
    code, summary = group.pod_result(
        settings, 2, tmp_path, [], None, None, "DistNetworkError: Connection reset"
    )
    assert (code, summary.message) == (EXIT_INTERRUPTED, "stopped")
    # ... and with no report, the store's host (pod 0) is gone; pod 0 itself has no such excuse.
    for path in tmp_path.iterdir():
        path.unlink()
    code, summary = group.pod_result(
        settings, 2, tmp_path, [], None, None, "DistNetworkError: Connection reset"
    )
    assert code == EXIT_PEER_LOST
    pod_0 = replace(settings, node_rank=0)
    code, summary = group.pod_result(pod_0, 2, tmp_path, [], None, None, "RendezvousTimeoutError: 2 of 2")
    assert code == 1 and "pod 0 of 2 could not run its workers" in summary.message
