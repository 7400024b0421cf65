"""Kueue's own controller manager (built from ``sigs.k8s.io/kueue`` by ``build.sh kueue``) running against the
local control plane, plus the queue objects the tests give it.

How it runs here, and why:
- Its CRDs come from the same module version's ``config/components/crd/bases`` (``build.sh`` copies them
  next to the binary's version) and are applied server-side. They serve v1beta1 and v1beta2 without a
  conversion webhook; everything here speaks v1beta2, Kueue's storage version.
- No webhooks are registered with the API server: the operator creates trainer Jobs already suspended and
  labelled ``kueue.x-k8s.io/queue-name``, which is all Kueue's Job webhook would have added. The manager
  still starts its webhook server, so it gets a serving certificate from the cluster's CA and binds it to
  127.0.0.1 on a free port (``internalCertManagement`` off: nothing is written into the cluster for certs).
- Kueue reads its metrics serving certificate from the fixed path ``/etc/kueue/metrics/certs`` when internal
  cert management is off; it runs in its own mount namespace (``unshare --mount``, as the node agent runs
  containers) where the certificate directory is bind-mounted there, so the host's /etc only gains an
  empty mount point. Needs root, like the node agent.
- Health, metrics, webhook and visibility servers bind 127.0.0.1 on free ports; the on-demand visibility API
  (an aggregated API server) is switched off. Only the ``batch/job`` integration is on, and only Jobs with a
  queue-name label are managed, so the suite's other Jobs are left alone.
- The process is recorded in the cluster's pids file (``down`` stops it too) and stopped by PID.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from e2e.cluster import procs
from e2e.cluster.cluster import (
    CACHE,
    HERE,
    ClusterError,
    ClusterInfo,
    write_kubeconfig,
)
from e2e.cluster.kube import KubeClient
from e2e.cluster.pki import PKI, ClientIdentity
from e2e.cluster.procs import bin_dir

JSON = dict[str, Any]
API = "/apis/kueue.x-k8s.io/v1beta2"
CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
"""Where Kueue v0.17 reads its metrics serving certificate when internal cert management is off (a constant
in cmd/kueue/main.go, not configurable)."""
IDENTITY = ClientIdentity("kueue", "kueue-controller-manager", ("system:masters",))
NAMESPACE = "kueue-system"
"""The namespace Kueue's configuration names as its own (it keeps nothing there with these settings)."""


def kueue_version() -> str:
    """The version ``build.sh`` builds (its KUEUE_VERSION line)."""
    found = re.search(r"^KUEUE_VERSION=(\S+)", (HERE / "build.sh").read_text(), re.M)
    if found is None:
        raise ClusterError("e2e/cluster/build.sh has no KUEUE_VERSION line")
    return found.group(1)


def kueue_binary() -> Path:
    return bin_dir() / "kueue"


def crd_dir() -> Path:
    return CACHE / "crds" / f"kueue-{kueue_version()}"


def missing() -> str | None:
    """Why Kueue cannot run here (not built, or not root), or None."""
    if not kueue_binary().exists() or not (crd_dir() / ".complete").exists():
        return f"Kueue {kueue_version()} is not built: run `bash e2e/cluster/build.sh kueue`"
    if os.geteuid() != 0:
        return (
            "Kueue runs in its own mount namespace here (its metrics certificate path is fixed): needs root"
        )
    return None


def install_crds(kube: KubeClient, timeout: float = 60) -> list[str]:
    """Apply every Kueue CRD from the module source and wait until each is Established; their names."""
    names = []
    for path in sorted(crd_dir().glob("kueue.x-k8s.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kube.server_side_apply(CRD_API, crd, manager="kubetune-e2e-kueue")
        names.append(str(crd["metadata"]["name"]))
    for name in names:
        kube.wait_for(
            f"{CRD_API}/{name}",
            lambda c: any(
                x.get("type") == "Established" and x.get("status") == "True"
                for x in (c.get("status") or {}).get("conditions") or []
            ),
            timeout=timeout,
            what=f"CRD {name} to be Established",
        )
    return names


def manager_config(ports: dict[str, int], cert_dir: Path) -> JSON:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for one local manager."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
    }


@dataclass
class KueueProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]
    version: str

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def healthy(self) -> bool:
        try:
            return bool(requests.get(f"http://127.0.0.1:{self.ports['health']}/readyz", timeout=1).ok)
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL (our own child: stopped by its PID)."""
        procs.terminate(self.proc)


def start(cluster: ClusterInfo, kube: KubeClient, timeout: float = 120) -> KueueProcess:
    """Install Kueue's CRDs and start its controller manager; return once /readyz answers."""
    why_not = missing()
    if why_not:
        raise ClusterError(why_not)
    install_crds(kube)
    if kube.get_or_none(f"/api/v1/namespaces/{NAMESPACE}") is None:
        kube.create(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
    root = Path(cluster.dir)
    state = root / "kueue"
    certs = state / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    pki = PKI(root / "pki")
    pki.ensure([IDENTITY])
    # A serving certificate for 127.0.0.1 and localhost signed by the cluster's CA, for the webhook and
    # metrics servers; Kueue reads tls.crt/tls.key from both directories.
    serving = pki.serving_cert("kueue-serving", "kueue-webhook")
    (certs / "tls.crt").write_bytes(serving[0].read_bytes())
    (certs / "tls.key").write_bytes(serving[1].read_bytes())
    (certs / "tls.key").chmod(0o600)
    kubeconfig = state / "kueue.kubeconfig"
    write_kubeconfig(kubeconfig, cluster.server, pki, IDENTITY.stem, IDENTITY.user)
    ports = {k: procs.free_port() for k in ("health", "metrics", "webhook", "visibility")}
    config = state / "config.yaml"
    config.write_text(yaml.safe_dump(manager_config(ports, certs), sort_keys=False))

    binary = str(kueue_binary())
    METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)  # the empty mount point, on the host
    script = f'set -e\nmount --bind "$1" {METRICS_CERT_DIR}\nshift\nexec "$@"'
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        script,
        "kueue",
        str(certs),
        binary,
        f"--config={config}",
        f"--kubeconfig={kubeconfig}",
        f"--visibility-server-port={ports['visibility']}",
        "--zap-log-level=info",
    ]
    log = root / "logs" / "kueue.log"
    pidfile = procs.PidFile(root / "pids.json")
    proc = procs.start("kueue", argv, log, pidfile, env={**os.environ}, exe=binary)
    running = KueueProcess(proc, log, ports, kueue_version())
    deadline = time.monotonic() + timeout
    while not running.healthy():
        if proc.poll() is not None:
            raise ClusterError(
                f"kueue exited with code {proc.returncode}; last lines of {log}:\n{running.log_tail()}"
            )
        if time.monotonic() > deadline:
            running.stop()
            raise ClusterError(
                f"kueue not ready after {timeout:.0f}s; last lines of {log}:\n{running.log_tail()}"
            )
        time.sleep(0.2)
    return running


# --- the queue objects ------------------------------------------------------------------------------------


def resource_flavor(name: str = "default") -> JSON:
    """A flavor without node labels: admitting into it changes nothing on the pod template."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ResourceFlavor",
        "metadata": {"name": name},
        "spec": {},
    }


def cluster_queue(name: str, quota: dict[str, str], flavor: str = "default") -> JSON:
    """A ClusterQueue over every namespace with ``quota`` (resource -> nominal quota) in one flavor."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "resourceGroups": [
                {
                    "coveredResources": sorted(quota),
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [{"name": r, "nominalQuota": q} for r, q in sorted(quota.items())],
                        }
                    ],
                }
            ],
        },
    }


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> JSON:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def make_queue(
    kube: KubeClient, namespace: str, quota: dict[str, str], prefix: str = "q", name: str | None = None
) -> str:
    """A ClusterQueue with ``quota`` and a LocalQueue in ``namespace`` pointing at it (both named ``name``, or
    ``prefix``-<random>), once both are Active; the LocalQueue's name (what spec.queueName takes)."""
    kube.server_side_apply(f"{API}/resourceflavors", resource_flavor())
    name = name or f"{prefix}-{uuid.uuid4().hex[:6]}"
    kube.create(f"{API}/clusterqueues", cluster_queue(name, quota))
    kube.create(f"{API}/namespaces/{namespace}/localqueues", local_queue(name, namespace, name))
    for path in (f"{API}/clusterqueues/{name}", f"{API}/namespaces/{namespace}/localqueues/{name}"):
        kube.wait_for(
            path,
            lambda q: any(
                c.get("type") == "Active" and c.get("status") == "True"
                for c in (q.get("status") or {}).get("conditions") or []
            ),
            timeout=60,
            what=f"{path} to be Active",
        )
    return name


def workloads_of_job(kube: KubeClient, namespace: str, job: JSON) -> list[JSON]:
    """The Workloads Kueue made for this Job (controller ownerReference to it)."""
    uid = job["metadata"]["uid"]
    items = kube.get(f"{API}/namespaces/{namespace}/workloads", labelSelector=f"kueue.x-k8s.io/job-uid={uid}")
    return [
        w
        for w in items.get("items", [])
        if any(r.get("uid") == uid and r.get("controller") for r in w["metadata"].get("ownerReferences", []))
    ]


def workload_condition(workload: JSON, ctype: str) -> JSON | None:
    return next(
        (c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None
    )


__all__ = [
    "KueueProcess",
    "cluster_queue",
    "install_crds",
    "kueue_binary",
    "local_queue",
    "make_queue",
    "manager_config",
    "missing",
    "resource_flavor",
    "start",
    "workload_condition",
    "workloads_of_job",
]
