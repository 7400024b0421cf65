"""Session fixtures for the e2e suite: one local cluster (control plane, KWOK GPU nodes, a node agent), the
FineTuneJob CRD, a real S3 server and the operator running as a local process.

The cluster is booted once per session (``Cluster("e2e-<checkout>")``: one per checkout, so two checkouts on
one machine never stop each other's) and stopped at the end by PID; the teardown fails the session if any of
its processes or ports outlive ``down``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from e2e.cluster import kueue as kueue_harness
from e2e.cluster import procs
from e2e.cluster.cluster import REPO_ROOT, Cluster, ClusterInfo
from e2e.cluster.kube import KubeClient
from e2e.cluster.s3 import S3Server
from e2e.tests.helpers import install_crd


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every e2e test is slow by the project's definition (it starts servers).
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterInfo]:
    c = Cluster(f"e2e-{hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:8]}")
    info = c.up(kwok_nodes=2, agent_nodes=1, log=lambda m: print(f"[e2e cluster] {m}", file=sys.stderr))
    records = c.pidfile.read()
    try:
        yield info
    finally:
        c.down(log=lambda m: print(f"[e2e cluster] {m}", file=sys.stderr))
        left = [r.name for r in records if procs.is_alive(r)]
        ports = [f"{k}:{p}" for k, p in info.ports.items() if procs.port_is_listening(p)]
        assert not left and not ports, f"left behind after down: processes {left}, ports {ports}"


@pytest.fixture(scope="session")
def kube(cluster: ClusterInfo) -> Iterator[KubeClient]:
    client = cluster.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def crd(kube: KubeClient) -> dict:
    """The FineTuneJob CRD from crds/, applied and Established."""
    return install_crd(kube)


@pytest.fixture(scope="session")
def make_namespace(kube: KubeClient) -> Iterator[Callable[..., str]]:
    """Create a namespace (name prefix, Pod Security level to enforce); all are deleted at session end."""
    created: list[str] = []

    def make(prefix: str, pod_security: str | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        labels = {"kubetune.io/e2e": "true"}
        if pod_security:
            labels["pod-security.kubernetes.io/enforce"] = pod_security
        kube.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}},
        )
        # Pods are admitted only once the namespace's default ServiceAccount exists.
        kube.wait_for(f"/api/v1/namespaces/{name}/serviceaccounts/default", bool, timeout=30)
        created.append(name)
        return name

    yield make
    for name in created:
        kube.delete_if_exists(f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def kueue(cluster: ClusterInfo, kube: KubeClient) -> Iterator[kueue_harness.KueueProcess]:
    """Kueue's controller manager (built from its Go module) with its CRDs installed; stopped by PID at the
    end. Fails, not skips, when it is not built: `make e2e` builds it."""
    why_not = kueue_harness.missing()
    if why_not:
        pytest.fail(why_not)
    running = kueue_harness.start(cluster, kube)
    try:
        yield running
    finally:
        running.stop()
        assert not procs.port_is_listening(running.ports["webhook"]), "kueue's webhook port outlived it"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


class OperatorProcess:
    def __init__(
        self, proc: subprocess.Popen[bytes], namespace: str, log: Path, health_port: int, metrics_port: int
    ) -> None:
        self.proc = proc
        self.namespace = namespace
        self.log = log
        self.health_port = health_port
        self.metrics_port = metrics_port

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s (it is our own child: stopped by PID)."""
        procs.terminate(self.proc)


def launch_operator(
    cluster: ClusterInfo,
    namespace: str | None,
    *,
    leader_lease: str | None = None,
    replica: str | None = None,
    kubeconfig: str | None = None,
) -> OperatorProcess:
    """`python -m kubetune_operator --standalone --namespace <ns>` with the cluster's admin kubeconfig (or
    ``kubeconfig``), once its /healthz answers. ``namespace`` None: cluster-wide. ``leader_lease``: elect the
    active replica through this Lease in ``namespace`` instead of running standalone; ``replica`` is the
    POD_NAME the process reports (in Events and the Lease)."""
    health_port, metrics_port = procs.free_port(), procs.free_port()
    log = Path(cluster.dir) / "logs" / f"operator-{namespace or 'all'}{'-' + replica if replica else ''}.log"
    env = {
        **os.environ,
        "KUBECONFIG": kubeconfig or cluster.kubeconfig,
        "POD_IP": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("operator", "trainer_image", "")),
        "KUBETUNE_SCRAPE_INTERVAL_SECONDS": "1",
    }
    if replica:
        env["POD_NAME"] = replica
    scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    if leader_lease and namespace:
        replicas = ["--leader-election", leader_lease, "--leader-election-namespace", namespace]
    else:
        replicas = ["--standalone"]
    argv = [
        sys.executable,
        "-m",
        "kubetune_operator",
        *replicas,
        *scope,
        "--health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True
        )
    op = OperatorProcess(proc, namespace or "", log, health_port, metrics_port)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"operator exited with {proc.returncode}:\n{op.log_tail()}")
        try:
            if requests.get(f"http://127.0.0.1:{health_port}/healthz", timeout=1).status_code == 200:
                return op
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            op.stop()
            pytest.fail(f"operator not healthy after 60s:\n{op.log_tail()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def operator(
    cluster: ClusterInfo, crd: dict, make_namespace: Callable[..., str]
) -> Iterator[OperatorProcess]:
    """The operator for the suite's namespace, which enforces the restricted Pod Security profile, so every
    trainer pod the operator creates must pass that admission."""
    op = launch_operator(cluster, make_namespace("e2e-op", pod_security="restricted"))
    try:
        yield op
    finally:
        op.stop()
