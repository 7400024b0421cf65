"""`kubectl finetune logs`: the trainer pod's log, from the API server or, for a pod the local cluster's
node agent runs as a local process (it has no kubelet to serve logs), from the agent's log file.

``--rank N`` picks the pod running rank N (pod N // processes-per-pod of an Indexed Job; the only pod
otherwise) and keeps that rank's lines: the trainer's JSON lines carry ``rank`` when a rank other than 0
writes them and none when rank 0 does; lines that are not JSON (a traceback) are kept, whoever wrote them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kubetune_cli.job_view import number_at, obj_at, text_at
from kubetune_cli.kubectl import CliError, Kubectl

JOB_NAME_LABEL = "kubetune.io/job-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
COMPONENT_LABEL = "app.kubernetes.io/component"
VALIDATOR_COMPONENT = "validator"
"""The validation pod's component: its log is shown only until a trainer pod exists."""
TRAINER_CONTAINER = "trainer"
LOCAL_RUNTIME_PREFIX = "local://"
"""containerID of a container the local node agent runs as a process."""
CLUSTER_DIR_ENV = "KUBETUNE_CLUSTER_DIR"
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def trainer_pod(kubectl: Kubectl, job: dict[str, Any], rank: int | None) -> dict[str, Any]:
    namespace = text_at(job, "metadata", "namespace") or ""
    name = text_at(job, "metadata", "name") or ""
    pods = kubectl.pods(namespace, f"{JOB_NAME_LABEL}={name}")
    if not pods:
        raise CliError(
            f"FineTuneJob {namespace}/{name} has no trainer pod (phase {text_at(job, 'status', 'phase')}); "
            "pods appear once the trainer Job starts, and are removed with the Job after "
            "ttlSecondsAfterFinished",
            exit_code=1,
        )
    trainers = [p for p in pods if text_at(p, "metadata", "labels", COMPONENT_LABEL) != VALIDATOR_COMPONENT]
    pods = trainers or pods
    indexed = [p for p in pods if text_at(p, "metadata", "labels", COMPLETION_INDEX_LABEL) is not None]
    if rank is not None and indexed:
        per_pod = max(1, int(number_at(job, "spec", "resources", "gpus") or 1))
        wanted = str(rank // per_pod)
        pods = [p for p in indexed if text_at(p, "metadata", "labels", COMPLETION_INDEX_LABEL) == wanted]
        if not pods:
            raise CliError(f"no trainer pod runs rank {rank} (pod index {wanted}) of {namespace}/{name}")
    # The newest attempt: the one a user asking for "the log" means.
    return max(pods, key=lambda p: text_at(p, "metadata", "creationTimestamp") or "")


def stream_log(kubectl: Kubectl, pod: dict[str, Any], follow: bool, rank: int | None) -> Iterator[str]:
    lines = _agent_lines(kubectl, pod, follow) if _is_local(pod) else _api_lines(kubectl, pod, follow)
    return (line for line in lines if rank is None or _of_rank(line, rank))


def _api_lines(kubectl: Kubectl, pod: dict[str, Any], follow: bool) -> Iterator[str]:
    name = text_at(pod, "metadata", "name") or ""
    namespace = text_at(pod, "metadata", "namespace") or ""
    args = ["logs", name, f"--container={TRAINER_CONTAINER}"] + (["--follow"] if follow else [])
    return kubectl.in_namespace(namespace).stream(*args)


def _is_local(pod: dict[str, Any]) -> bool:
    statuses = obj_at(pod, "status", "containerStatuses")
    for item in statuses if isinstance(statuses, list) else []:
        container_id = text_at(item, "containerID") or text_at(item, "imageID") or ""
        if container_id.startswith(LOCAL_RUNTIME_PREFIX):
            return True
    return False


def agent_log_path(kubectl: Kubectl, namespace: str, pod: str) -> Path:
    """Where the node agent writes the trainer container's log: <cluster dir>/pods/<ns>/<pod>/logs/. The
    cluster directory is $KUBETUNE_CLUSTER_DIR, else the directory of the kubeconfig (the local cluster
    writes its admin kubeconfig there)."""
    for part in (namespace, pod):
        if not _DNS_NAME.match(part):
            raise CliError(f"{part!r} is not a Kubernetes object name; refusing to build a log path from it")
    candidates = [os.environ[CLUSTER_DIR_ENV]] if os.environ.get(CLUSTER_DIR_ENV) else []
    candidates += [str(Path(p).expanduser().resolve().parent) for p in kubectl.kubeconfig_paths()]
    for directory in candidates:
        path = Path(directory) / "pods" / namespace / pod / "logs" / f"{TRAINER_CONTAINER}.log"
        if path.is_file():
            return path
    raise CliError(
        f"pod {namespace}/{pod} runs on the local node agent, whose log files are on the machine running "
        f"the local cluster; looked in {', '.join(candidates) or 'no directory'}: run this there, or set "
        f"{CLUSTER_DIR_ENV} to the cluster's directory",
        exit_code=1,
    )


def _agent_lines(kubectl: Kubectl, pod: dict[str, Any], follow: bool) -> Iterator[str]:
    namespace = text_at(pod, "metadata", "namespace") or ""
    name = text_at(pod, "metadata", "name") or ""
    path = agent_log_path(kubectl, namespace, name)
    pending = b""
    with path.open("rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.decode(errors="replace") + "\n"
                continue
            if not follow or _finished(kubectl, namespace, name):
                rest = pending + log.read()
                if rest:
                    yield from rest.decode(errors="replace").splitlines(keepends=True)
                return
            time.sleep(0.5)


def _finished(kubectl: Kubectl, namespace: str, name: str) -> bool:
    try:
        pod = kubectl.in_namespace(namespace).get_json("pod", name)
    except CliError:
        return True  # gone: nothing more will be written
    return text_at(pod, "status", "phase") in ("Succeeded", "Failed")


def _of_rank(line: str, rank: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True
    if not isinstance(record, dict):
        return True
    return bool(record.get("rank", 0) == rank)


def write_lines(lines: Iterable[str]) -> None:
    for line in lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
