"""Boot and stop a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler), KWOK fake GPU nodes and one node agent that runs pods as local processes.

Everything binds 127.0.0.1 on free ports. State lives in ``~/.cache/kubetune/clusters/<name>/``:
``kubeconfig`` (admin), ``pki/``, ``logs/<component>.log``, ``pods/`` (the node agent's pod directories and
container logs), ``pids.json`` (exactly the processes ``down`` stops) and ``cluster.json`` (ports, nodes,
boot time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
import yaml

from e2e.cluster import procs
from e2e.cluster.kube import ApiError, Credentials, KubeClient
from e2e.cluster.pki import PKI, ClientIdentity
from e2e.cluster.procs import bin_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(
    os.environ.get(
        "KUBETUNE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
    )
)
CLUSTERS = CACHE / "clusters"

SERVICE_CIDR = "10.0.0.0/24"
KWOK_POD_CIDR = "10.244.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
KWOK_NODE_LABEL = "kubetune.io/kwok-node"
AGENT_NODE_LABEL = "kubetune.io/node-agent"
GPU_RESOURCE = "nvidia.com/gpu"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

# Each component authenticates with its own client certificate, as in a kubeadm cluster.
IDENTITIES = {
    "admin": ClientIdentity("admin", "kubetune-admin", ("system:masters",)),
    "controller-manager": ClientIdentity("controller-manager", "system:kube-controller-manager"),
    "scheduler": ClientIdentity("scheduler", "system:kube-scheduler"),
    "kwok": ClientIdentity("kwok", "kwok-controller", ("system:masters",)),
}


def agent_identity(node_name: str) -> ClientIdentity:
    """The node agent is a kubelet to the API server: Node authorizer and NodeRestriction apply to it."""
    return ClientIdentity(f"node-{node_name}", f"system:node:{node_name}", ("system:nodes",))


class ClusterError(RuntimeError):
    pass


def require_binaries(directory: Path, names: tuple[str, ...] = BINARIES) -> dict[str, Path]:
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise ClusterError(
            f"missing binaries in {directory}: {', '.join(missing)}; "
            "build them with `bash e2e/cluster/build.sh`"
        )
    return {n: directory / n for n in names}


AUDIT_POLICY_FILE = "audit-policy.yaml"
AUDIT_LOG_FILE = "audit.log"
"""Under logs/: one JSON line per list or watch of pods and Jobs, with its full URI and user agent, so tests
can check what a client asked the API server to stream (the operator's label selectors); and one per create
of a pod or Job, with the object sent, so tests can check that an object was never created (no GPU Job or pod
for a job that failed validation)."""
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Request
    verbs: [create]
    resources:
      - group: ""
        resources: [pods]
      - group: batch
        resources: [jobs]
  - level: Metadata
    verbs: [list, watch]
    resources:
      - group: ""
        resources: [pods]
      - group: batch
        resources: [jobs]
  - level: None
"""


@dataclass
class ClusterInfo:
    name: str
    dir: str
    server: str
    kubeconfig: str
    ports: dict[str, int]
    kwok_nodes: list[str] = field(default_factory=list)
    agent_nodes: list[str] = field(default_factory=list)
    kubernetes_version: str = ""
    etcd_version: str = ""
    boot_seconds: float = 0.0

    @property
    def pods_dir(self) -> Path:
        return Path(self.dir) / "pods"

    @property
    def logs_dir(self) -> Path:
        return Path(self.dir) / "logs"

    def client(self) -> KubeClient:
        return KubeClient.from_kubeconfig(self.kubeconfig)

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig, "KUBETUNE_CLUSTER_DIR": self.dir}


def write_kubeconfig(path: Path, server: str, pki: PKI, stem: str, user: str) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-local",
                "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki.cert(stem)), "client-key": str(pki.key(stem))},
            }
        ],
        "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": user}}],
        "current-context": "kubetune-local",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


def kwok_node_manifest(name: str, gpus: int = 8) -> dict[str, Any]:
    capacity = {
        "cpu": "64",
        "memory": "512Gi",
        "pods": "110",
        "ephemeral-storage": "1Ti",
        GPU_RESOURCE: str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                KWOK_NODE_LABEL: "true",
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": {"taints": [KWOK_TAINT]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


class Cluster:
    def __init__(self, name: str = "local", root: Path = CLUSTERS) -> None:
        self.name = name
        self.dir = root / name
        self.pki = PKI(self.dir / "pki")
        self.pidfile = procs.PidFile(self.dir / "pids.json")
        self.info_path = self.dir / "cluster.json"
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "kubeconfig"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ---- queries -------------------------------------------------------------------------------------

    def info(self) -> ClusterInfo | None:
        if not self.info_path.exists():
            return None
        return ClusterInfo(**json.loads(self.info_path.read_text()))

    def is_up(self) -> bool:
        info = self.info()
        records = self.pidfile.read()
        if info is None or not records or not all(procs.is_alive(r) for r in records):
            return False
        try:
            return _get(info.server + "/readyz", self._admin_creds(info.server)).status_code == 200
        except requests.RequestException:
            return False

    def status(self) -> dict[str, Any]:
        info = self.info()
        return {
            "name": self.name,
            "dir": str(self.dir),
            "up": self.is_up(),
            "server": info.server if info else None,
            "kubeconfig": info.kubeconfig if info else None,
            "processes": {r.name: {"pid": r.pid, "alive": procs.is_alive(r)} for r in self.pidfile.read()},
            "nodes": (info.kwok_nodes + info.agent_nodes) if info else [],
        }

    # ---- lifecycle -----------------------------------------------------------------------------------

    def up(
        self,
        kwok_nodes: int = 2,
        agent_nodes: int = 1,
        timeout: float = 90.0,
        log: Callable[[str], None] = print,
    ) -> ClusterInfo:
        """Start a fresh cluster (or return the running one when it is healthy)."""
        if self.is_up():
            info = self.info()
            assert info is not None
            log(f"cluster {self.name} is already up: {info.server}")
            return info
        self.down(log=lambda _m: None)
        try:
            return self._boot(kwok_nodes, agent_nodes, timeout, log)
        except BaseException:
            self.down(log=lambda _m: None)
            raise

    def _boot(
        self, kwok_nodes: int, agent_nodes: int, timeout: float, log: Callable[[str], None]
    ) -> ClusterInfo:
        started = time.monotonic()
        binaries = require_binaries(bin_dir())
        for sub in ("etcd", "logs", "pods"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        agent_names = [f"agent-{i}" for i in range(agent_nodes)]
        self.pki.ensure([*IDENTITIES.values(), *(agent_identity(n) for n in agent_names)])

        ports = {
            k: procs.free_port()
            for k in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        }
        server = f"https://127.0.0.1:{ports['apiserver']}"
        kubeconfigs = {}
        for component, ident in IDENTITIES.items():
            path = self.kubeconfig if component == "admin" else self.dir / f"{component}.kubeconfig"
            write_kubeconfig(path, server, self.pki, ident.stem, ident.user)
            kubeconfigs[component] = path
        for n in agent_names:
            ident = agent_identity(n)
            write_kubeconfig(self.dir / f"{ident.stem}.kubeconfig", server, self.pki, ident.stem, ident.user)

        self._start("etcd", [str(binaries["etcd"]), *self._etcd_args(ports)])
        self._wait(
            "etcd",
            lambda: requests.get(f"http://127.0.0.1:{ports['etcd']}/health", timeout=1).ok,
            timeout,
            started,
        )
        (self.dir / AUDIT_POLICY_FILE).write_text(AUDIT_POLICY)
        self._start("kube-apiserver", [str(binaries["kube-apiserver"]), *self._apiserver_args(ports)])
        admin = self._admin_creds(server)
        self._wait(
            "kube-apiserver", lambda: _get(server + "/readyz", admin).status_code == 200, timeout, started
        )
        log(f"api server ready after {time.monotonic() - started:.1f}s")
        # Started only now: both exit at once when RBAC is not bootstrapped yet.
        self._start(
            "kube-controller-manager",
            [
                str(binaries["kube-controller-manager"]),
                *self._kcm_args(ports, kubeconfigs["controller-manager"]),
            ],
        )
        self._start(
            "kube-scheduler",
            [str(binaries["kube-scheduler"]), *self._scheduler_args(ports, kubeconfigs["scheduler"])],
        )

        client = KubeClient(admin)
        kwok_names = [f"kwok-gpu-{i}" for i in range(kwok_nodes)]
        if kwok_names:
            self._start(
                "kwok",
                [
                    str(binaries["kwok"]),
                    f"--kubeconfig={kubeconfigs['kwok']}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                    f"--config={HERE / 'kwok-stages.yaml'}",
                    f"--cidr={KWOK_POD_CIDR}",
                    "--node-ip=10.244.255.254",
                    "--node-lease-duration-seconds=40",
                ],
            )
            for n in kwok_names:
                client.apply_yaml("/api/v1/nodes", kwok_node_manifest(n))
        for n in agent_names:
            self._start(
                f"node-agent-{n}",
                [
                    sys.executable,
                    "-m",
                    "e2e.cluster.node_agent",
                    "--cluster-dir",
                    str(self.dir),
                    "--node-name",
                    n,
                ],
                env={**os.environ, "PYTHONPATH": _pythonpath()},
                cwd=REPO_ROOT,
            )

        for component in ("controller-manager", "scheduler"):
            url = f"https://127.0.0.1:{ports[component]}/healthz"
            self._wait(component, lambda url=url: _get(url, None).status_code == 200, timeout, started)
        self._wait(
            "service account controller",
            lambda: client.get_or_none("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            timeout,
            started,
        )
        self._wait("nodes", lambda: _ready_nodes(client) >= set(kwok_names + agent_names), timeout, started)

        version = client.get("/version")
        info = ClusterInfo(
            name=self.name,
            dir=str(self.dir),
            server=server,
            kubeconfig=str(self.kubeconfig),
            ports=ports,
            kwok_nodes=kwok_names,
            agent_nodes=agent_names,
            kubernetes_version=str(version.get("gitVersion", "")),
            etcd_version=_etcd_version(ports["etcd"]),
            boot_seconds=round(time.monotonic() - started, 2),
        )
        self.info_path.write_text(json.dumps(asdict(info), indent=1))
        client.close()
        log(
            f"cluster {self.name} up in {info.boot_seconds:.1f}s: Kubernetes {info.kubernetes_version}, "
            f"etcd {info.etcd_version}, nodes {', '.join(kwok_names + agent_names)}"
        )
        return info

    def down(self, log: Callable[[str], None] = print) -> None:
        """Stop exactly the processes recorded in the pids file (SIGTERM, then SIGKILL)."""
        records = self.pidfile.read()
        # In dependency order: node agents first (they still report their pods), the API server's clients
        # next, etcd last, so no component spends its grace period retrying a server that is gone.
        stages = [
            [r for r in records if r.name.startswith("node-agent")],
            [
                r
                for r in records
                if r.name not in ("kube-apiserver", "etcd") and not r.name.startswith("node-agent")
            ],
            [r for r in records if r.name == "kube-apiserver"],
            [r for r in records if r.name == "etcd"],
        ]
        killed = [name for stage in stages for name in procs.stop(stage, grace=15)]
        for p in self._procs.values():
            if p.poll() is None:
                p.wait(timeout=5)
        self._procs.clear()
        self.pidfile.clear()
        if records:
            note = f" (SIGKILL: {', '.join(killed)})" if killed else ""
            log(f"cluster {self.name}: stopped {len(records)} processes{note}")

    # ---- helpers -------------------------------------------------------------------------------------

    def _admin_creds(self, server: str) -> Credentials:
        return Credentials(
            server=server,
            ca_file=str(self.pki.ca_cert),
            cert_file=str(self.pki.cert("admin")),
            key_file=str(self.pki.key("admin")),
        )

    def _start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self._procs[name] = procs.start(name, argv, self.logs / f"{name}.log", self.pidfile, env=env, cwd=cwd)

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float, started: float) -> None:
        deadline = started + timeout
        while True:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
                    self.down(log=lambda _m: None)
                    raise ClusterError(
                        f"{name} exited with code {p.returncode} while waiting for {what}; "
                        f"last lines of {self.logs / (name + '.log')}:\n" + "\n".join(tail)
                    )
            try:
                if ready():
                    return
            except (requests.RequestException, ApiError, OSError):
                pass
            if time.monotonic() > deadline:
                self.down(log=lambda _m: None)
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.logs}")
            time.sleep(0.1)

    def _etcd_args(self, ports: dict[str, int]) -> list[str]:
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            "--name=kubetune",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubetune={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self, ports: dict[str, int]) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki.cert('apiserver')}",
            f"--tls-private-key-file={pki.key('apiserver')}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            # OwnerReferencesPermissionEnforcement as on hardened clusters: blockOwnerDeletion needs update on
            # the owner's finalizers.
            "--enable-admission-plugins=NodeRestriction,PodSecurity,OwnerReferencesPermissionEnforcement",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.path('sa.pub')}",
            f"--service-account-signing-key-file={pki.path('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            f"--audit-policy-file={self.dir / AUDIT_POLICY_FILE}",
            f"--audit-log-path={self.logs / AUDIT_LOG_FILE}",
            "--audit-log-format=json",
            "--audit-log-maxsize=100",
            "--v=0",
        ]

    def _kcm_args(self, ports: dict[str, int], kubeconfig: Path) -> list[str]:
        pki = self.pki
        return [
            *_client_component_args(kubeconfig, ports["controller-manager"]),
            f"--service-account-private-key-file={pki.path('sa.key')}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=true",
            "--controllers=*",
            # The default 20 requests/s makes the Job controller the bottleneck in scale runs (1,000 Jobs).
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--concurrent-job-syncs=20",
        ]

    def _scheduler_args(self, ports: dict[str, int], kubeconfig: Path) -> list[str]:
        return _client_component_args(kubeconfig, ports["scheduler"])


def _client_component_args(kubeconfig: Path, port: int) -> list[str]:
    """What kube-controller-manager and kube-scheduler share: their identity, one instance (no leader
    election), and /healthz served on 127.0.0.1:``port`` without authentication."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        "--profiling=false",
        "--v=0",
    ]


def _pythonpath() -> str:
    parts = [str(REPO_ROOT), str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


def _get(url: str, creds: Credentials | None) -> requests.Response:
    if creds is None:
        # kube-controller-manager and kube-scheduler serve /healthz with a self-signed certificate.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            return requests.get(url, verify=False, timeout=2)
    return requests.get(
        url, verify=creds.ca_file, cert=(creds.cert_file or "", creds.key_file or ""), timeout=2
    )


def _ready_nodes(client: KubeClient) -> set[str]:
    ready = set()
    for node in client.get("/api/v1/nodes").get("items", []):
        for cond in node.get("status", {}).get("conditions", []):
            if cond.get("type") == "Ready" and cond.get("status") == "True":
                ready.add(node["metadata"]["name"])
    return ready


def _etcd_version(port: int) -> str:
    try:
        return str(requests.get(f"http://127.0.0.1:{port}/version", timeout=2).json().get("etcdserver", ""))
    except (requests.RequestException, ValueError):
        return ""
