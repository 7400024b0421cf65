"""python -m e2e.bench_operator --jobs 1000: the operator's performance targets (DESIGN §6), measured.

Boots the local control plane with enough KWOK GPU nodes for every trainer pod, runs the operator as a local
process against it (all namespaces, standalone, default settings) and measures, from watches on the API
server:

1. apply -> trainer pod created, for ``--sequential`` FineTuneJobs applied one at a time (target p50 <= 1 s);
2. trainer Job done -> ``Succeeded`` in status, for ``--completions`` of them: KWOK ends the pod when it is
   annotated, with the trainer's success summary as termination message (target <= 2 s);
3. ``--jobs`` FineTuneJobs applied concurrently: the time until every trainer pod is scheduled, with the
   stages in between (FineTuneJob accepted, trainer Job created, pod created, pod scheduled), and the
   operator's peak RSS (VmHWM; target <= 300 MiB);
4. step 2 again while those jobs run (the operator then also scrapes every running trainer).

Every figure is one JSON line on stdout; progress goes to stderr. The cluster and the operator are stopped
at the end, by PID (``--keep`` leaves the cluster up).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from e2e.cluster import procs
from e2e.cluster.cluster import REPO_ROOT, Cluster, ClusterInfo
from e2e.cluster.kube import ApiError, KubeClient
from e2e.tests.helpers import ON_KWOK, ftj_path, install_crd, make_ftj
from kubetune_operator.labels import LABEL_JOB_NAME
from kubetune_trainer import contract

JSON = dict[str, Any]
NAMESPACE = "bench"
GPUS_PER_NODE = 8  # what e2e.cluster gives each KWOK node

TARGET_APPLY_TO_POD_P50 = 1.0
TARGET_DONE_TO_SUCCEEDED = 2.0
TARGET_RSS_MIB = 300.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(record: JSON) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> JSON:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "max": round(max(values), 3),
    }


# --- what the watches saw -----------------------------------------------------------------------------------


@dataclass
class Seen:
    """First time (monotonic) each thing was observed, per FineTuneJob name."""

    pod_created: dict[str, float] = field(default_factory=dict)
    pod_scheduled: dict[str, float] = field(default_factory=dict)
    pod_running: dict[str, float] = field(default_factory=dict)
    pod_name: dict[str, str] = field(default_factory=dict)
    job_created: dict[str, float] = field(default_factory=dict)
    job_done: dict[str, float] = field(default_factory=dict)
    ftj_phase: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def note(self, table: dict[Any, float], key: Any, when: float) -> None:
        if key not in table:
            table[key] = when
            self.lock.notify_all()

    def succeeded(self, name: str) -> bool:
        return (name, "Succeeded") in self.ftj_phase and name in self.job_done

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                self.lock.wait(min(left, 1.0))


def _on_pod(seen: Seen, pod: JSON, when: float) -> None:
    meta = pod.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(LABEL_JOB_NAME)
    if not owner:
        return
    seen.pod_name.setdefault(owner, str(meta.get("name")))
    seen.note(seen.pod_created, owner, when)
    if (pod.get("spec") or {}).get("nodeName"):
        seen.note(seen.pod_scheduled, owner, when)
    if (pod.get("status") or {}).get("phase") == "Running":
        seen.note(seen.pod_running, owner, when)


def _on_job(seen: Seen, job: JSON, when: float) -> None:
    owner = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_NAME)
    if not owner:
        return
    seen.note(seen.job_created, owner, when)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "SuccessCriteriaMet") and cond.get("status") == "True":
            seen.note(seen.job_done, owner, when)


def _on_ftj(seen: Seen, ftj: JSON, when: float) -> None:
    name = str((ftj.get("metadata") or {}).get("name"))
    seen.note(seen.ftj_phase, (name, "Created"), when)
    phase = (ftj.get("status") or {}).get("phase")
    if phase:
        seen.note(seen.ftj_phase, (name, str(phase)), when)


class Watcher(threading.Thread):
    """List, then watch from that resourceVersion; re-list when the server ends the stream."""

    def __init__(self, kubeconfig: str, path: str, handle: Callable[[Seen, JSON, float], None], seen: Seen):
        super().__init__(daemon=True, name=f"watch {path}")
        self.client = KubeClient.from_kubeconfig(kubeconfig, timeout=60)
        self.path, self.handle, self.seen = path, handle, seen
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                listed = self.client.get(self.path)
                now = time.monotonic()
                with self.seen.lock:
                    for item in listed.get("items") or []:
                        self.handle(self.seen, item, now)
                self.ready.set()
                version = listed["metadata"]["resourceVersion"]
                for event in self.client.watch(self.path, timeout_seconds=120, resourceVersion=version):
                    if self.stopping.is_set():
                        return
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        now = time.monotonic()
                        with self.seen.lock:
                            self.handle(self.seen, event["object"], now)
            except (requests.RequestException, ApiError, ValueError) as exc:
                if not self.stopping.is_set():
                    log(f"watch {self.path}: {exc}; re-listing")
                    time.sleep(0.5)

    def stop(self) -> None:
        self.stopping.set()
        self.client.close()


# --- the operator under test --------------------------------------------------------------------------------


class OperatorUnderTest:
    def __init__(self, cluster: ClusterInfo) -> None:
        self.health_port, self.metrics_port = procs.free_port(), procs.free_port()
        self.log_path = Path(cluster.dir) / "logs" / "operator-bench.log"
        env = {
            **os.environ,
            "KUBECONFIG": cluster.kubeconfig,
            "POD_IP": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("operator", "trainer_image", "")),
        }
        argv = [
            sys.executable,
            "-m",
            "kubetune_operator",
            "--standalone",
            "--health-port",
            str(self.health_port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True
            )
        self.rss_samples: list[int] = []
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                url = f"http://127.0.0.1:{self.health_port}/healthz"
                if requests.get(url, timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not healthy after {timeout:.0f}s; log: {self.log_path}")
            time.sleep(0.2)
        self._sampler.start()

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the operator process, from /proc."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def _sample_rss(self) -> None:
        while not self._sampling.wait(1.0) and self.proc.poll() is None:
            try:
                self.rss_samples.append(self.memory_kib()["VmRSS"])
            except (OSError, KeyError):
                return

    def stop(self) -> None:
        self._sampling.set()
        procs.terminate(self.proc)


# --- the benchmark ------------------------------------------------------------------------------------------


def bench_ftj(name: str) -> JSON:
    manifest = make_ftj(name, placement=ON_KWOK, hyperparameters={"maxSteps": 100})
    manifest["metadata"]["namespace"] = NAMESPACE
    return manifest


def success_message(name: str) -> str:
    return contract.TerminationSummary(
        outcome="Succeeded",
        reason="Completed",
        message="done",
        adapter=contract.AdapterRecord(
            uri=f"s3://adapters/{name}/",
            files=["adapter_config.json", "adapter_model.safetensors"],
            size_bytes=1024,
            sha256="0" * 64,
            base_model="s3://models/tiny/",
        ),
        progress={"step": 100, "totalSteps": 100},
    ).to_json()


def install(kube: KubeClient) -> None:
    install_crd(kube)
    kube.apply_yaml(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    )
    kube.wait_for(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default", bool, timeout=30)


def apply_one_at_a_time(kube: KubeClient, seen: Seen, names: list[str], timeout: float) -> list[float]:
    latencies = []
    for name in names:
        started = time.monotonic()
        kube.create(ftj_path(NAMESPACE), bench_ftj(name))
        seen.wait(
            functools.partial(seen.pod_created.__contains__, name), timeout, f"the trainer pod of {name}"
        )
        latencies.append(seen.pod_created[name] - started)
    return latencies


def complete_one_at_a_time(kube: KubeClient, seen: Seen, names: list[str], timeout: float) -> JSON:
    done_to_succeeded, end_to_succeeded = [], []
    for name in names:
        pod = seen.pod_name[name]
        started = time.monotonic()
        annotations = {
            "kubetune.io/kwok-outcome": "Succeeded",
            "kubetune.io/kwok-message": success_message(name),
        }
        kube.patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}", {"metadata": {"annotations": annotations}})
        seen.wait(functools.partial(seen.succeeded, name), timeout, f"FineTuneJob {name} to reach Succeeded")
        succeeded = seen.ftj_phase[(name, "Succeeded")]
        done_to_succeeded.append(max(0.0, succeeded - seen.job_done[name]))
        end_to_succeeded.append(succeeded - started)
    return {
        "job_done_to_succeeded_seconds": summary(done_to_succeeded),
        "pod_end_to_succeeded_seconds": summary(end_to_succeeded),
    }


def apply_concurrently(kube_config: str, seen: Seen, names: list[str], threads: int) -> tuple[float, float]:
    """Create every FineTuneJob from ``threads`` clients at once; (start, time the last create returned)."""
    clients = [KubeClient.from_kubeconfig(kube_config, timeout=120) for _ in range(threads)]
    chunks = [names[i::threads] for i in range(threads)]
    started = time.monotonic()

    def create(index: int) -> None:
        for name in chunks[index]:
            clients[index].create(ftj_path(NAMESPACE), bench_ftj(name))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, range(threads)))
    applied = time.monotonic()
    for client in clients:
        client.close()
    return started, applied


@contextmanager
def watching(cluster: ClusterInfo, seen: Seen) -> Iterator[None]:
    watchers = [
        Watcher(cluster.kubeconfig, f"/api/v1/namespaces/{NAMESPACE}/pods", _on_pod, seen),
        Watcher(cluster.kubeconfig, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", _on_job, seen),
        Watcher(cluster.kubeconfig, ftj_path(NAMESPACE), _on_ftj, seen),
    ]
    for w in watchers:
        w.start()
    for w in watchers:
        if not w.ready.wait(30):
            raise TimeoutError(f"{w.name} did not start")
    try:
        yield
    finally:
        for w in watchers:
            w.stop()


def run(args: argparse.Namespace) -> int:
    needed_pods = 1 + args.sequential + args.jobs
    nodes = args.nodes or math.ceil(needed_pods * 1.05 / GPUS_PER_NODE)
    cluster = Cluster(args.cluster_name)
    started = time.monotonic()
    info = cluster.up(kwok_nodes=nodes, agent_nodes=0, timeout=args.boot_timeout, log=log)
    emit(
        {
            "metric": "cluster_boot_seconds",
            "value": round(time.monotonic() - started, 1),
            "kwok_nodes": nodes,
            "gpus": nodes * GPUS_PER_NODE,
            "kubernetes": info.kubernetes_version,
        }
    )
    kube = info.client()
    operator: OperatorUnderTest | None = None
    failures: list[str] = []
    try:
        install(kube)
        seen = Seen()
        with watching(info, seen):
            operator = OperatorUnderTest(info)
            operator.wait_healthy()
            log(f"operator pid {operator.proc.pid} healthy; log {operator.log_path}")
            # The first job waits out the operator's initial list-and-watch.
            warm = apply_one_at_a_time(kube, seen, ["warmup"], timeout=120)
            emit({"metric": "first_job_apply_to_pod_created_seconds", "value": round(warm[0], 3)})

            names = [f"seq-{i:04d}" for i in range(args.sequential)]
            log(f"applying {len(names)} FineTuneJobs one at a time")
            latencies = apply_one_at_a_time(kube, seen, names, timeout=60)
            stats = summary(latencies)
            ok = stats["p50"] <= TARGET_APPLY_TO_POD_P50
            failures += [] if ok else ["apply_to_pod_created p50"]
            emit(
                {
                    "metric": "apply_to_pod_created_seconds",
                    **stats,
                    "target_p50": TARGET_APPLY_TO_POD_P50,
                    "ok": ok,
                }
            )

            done = names[: args.completions]
            seen.wait(lambda: all(n in seen.pod_running for n in done), 60, "the trainer pods to run")
            log(f"completing {len(done)} trainer Jobs one at a time")
            failures += measure_completions(kube, seen, done, "idle", timeout=60)

            batch = [f"con-{i:04d}" for i in range(args.jobs)]
            cpu_before = operator.cpu_seconds()
            log(f"applying {len(batch)} FineTuneJobs concurrently from {args.apply_threads} clients")
            t0, applied = apply_concurrently(info.kubeconfig, seen, batch, args.apply_threads)
            seen.wait(
                lambda: all(n in seen.pod_scheduled for n in batch),
                args.timeout,
                f"all {len(batch)} trainer pods to be scheduled",
            )
            all_scheduled = time.monotonic() - t0
            seen.wait(lambda: all(n in seen.pod_running for n in batch), 120, "all trainer pods to run")
            all_running = time.monotonic() - t0
            memory = operator.memory_kib()
            stages = {
                "applied": applied - t0,
                "last_trainer_job_created": max(seen.job_created[n] for n in batch) - t0,
                "last_pod_created": max(seen.pod_created[n] for n in batch) - t0,
                "last_pod_scheduled": max(seen.pod_scheduled[n] for n in batch) - t0,
                "last_pod_running": all_running,
            }
            peak_mib = memory["VmHWM"] / 1024
            ok = peak_mib <= TARGET_RSS_MIB
            failures += [] if ok else ["operator peak RSS"]
            emit(
                {
                    "metric": "concurrent_jobs",
                    "jobs": len(batch),
                    "all_scheduled_seconds": round(all_scheduled, 2),
                    "stages_seconds": {k: round(v, 2) for k, v in stages.items()},
                    "ftj_created_to_job_created_seconds": summary(
                        [seen.job_created[n] - seen.ftj_phase[(n, "Created")] for n in batch]
                    ),
                    "apply_start_to_pod_created_seconds": summary([seen.pod_created[n] - t0 for n in batch]),
                    "operator_cpu_seconds": round(operator.cpu_seconds() - cpu_before, 1),
                    "operator_rss_mib": round(memory["VmRSS"] / 1024, 1),
                    "operator_peak_rss_mib": round(peak_mib, 1),
                    "target_peak_rss_mib": TARGET_RSS_MIB,
                    "ok": ok,
                }
            )

            loaded = batch[: args.completions]
            log(f"completing {len(loaded)} trainer Jobs while {len(batch)} jobs run")
            failures += measure_completions(
                kube, seen, loaded, "loaded", timeout=120, running_jobs=len(batch)
            )
            if args.settle > 0:
                log(f"letting {len(batch)} running jobs be scraped for {args.settle:.0f}s")
                time.sleep(args.settle)
            memory = operator.memory_kib()
            emit(
                {
                    "metric": "operator_memory",
                    "rss_mib": round(memory["VmRSS"] / 1024, 1),
                    "peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
                    "target_peak_rss_mib": TARGET_RSS_MIB,
                    "ok": memory["VmHWM"] / 1024 <= TARGET_RSS_MIB,
                }
            )
    finally:
        if operator is not None:
            operator.stop()
        kube.close()
        if args.keep:
            log(f"cluster {args.cluster_name} left up: export KUBECONFIG={info.kubeconfig}")
        else:
            cluster.down(log=log)
    emit({"metric": "result", "ok": not failures, "missed": failures})
    return 0 if not failures else 1


def measure_completions(
    kube: KubeClient, seen: Seen, names: list[str], load: str, *, timeout: float, **extra: int
) -> list[str]:
    """Complete the trainer Jobs of ``names`` one at a time, emit the completion_<load> line, and return the
    missed target (if any) for the final result."""
    completion = complete_one_at_a_time(kube, seen, names, timeout=timeout)
    ok = completion["job_done_to_succeeded_seconds"]["max"] <= TARGET_DONE_TO_SUCCEEDED
    emit(
        {
            "metric": f"completion_{load}",
            **extra,
            **completion,
            "target_max": TARGET_DONE_TO_SUCCEEDED,
            "ok": ok,
        }
    )
    return [] if ok else [f"job_done_to_succeeded ({load})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.bench_operator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=1000, help="FineTuneJobs applied concurrently (1000)")
    parser.add_argument("--sequential", type=int, default=50, help="FineTuneJobs applied one at a time (50)")
    parser.add_argument("--completions", type=int, default=5, help="trainer Jobs completed per phase (5)")
    parser.add_argument("--nodes", type=int, default=0, help="KWOK GPU nodes (default: enough for every pod)")
    parser.add_argument("--apply-threads", type=int, default=8, help="clients creating FineTuneJobs (8)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all pods scheduled")
    parser.add_argument("--boot-timeout", type=float, default=180, help="seconds to wait for the cluster")
    parser.add_argument("--settle", type=float, default=0, help="seconds to keep the jobs running at the end")
    parser.add_argument("--cluster-name", default="bench-operator", help="cluster name (bench-operator)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up at the end")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
