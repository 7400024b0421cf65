"""A local node agent: it plays the kubelet for one Node and runs that node's pods as local processes.

    python -m e2e.cluster.node_agent --cluster-dir ~/.cache/kubetune/clusters/local --node-name agent-0

It registers the Node (label kubetune.io/node-agent=true, capacity including nvidia.com/gpu), keeps its
Lease and Ready condition fresh, and for every pod bound to it runs a PodWorker (see pod_runtime): volumes,
env, containers in their own mount namespaces, probes, restarts, status, and deletion with the grace period.
Each pod gets its own loopback address 127.0.0.N as its pod IP. It authenticates as system:node:<name>, so
the Node authorizer and NodeRestriction limit it exactly as they limit a kubelet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from e2e.cluster.cluster import AGENT_NODE_LABEL, GPU_RESOURCE
from e2e.cluster.kube import STRATEGIC_MERGE_PATCH, ApiError, KubeClient, load_kubeconfig
from e2e.cluster.pod_dns import PodRecord, records
from e2e.cluster.pod_runtime import ImageMap, NodeContext, PodWorker, now

log = logging.getLogger("node-agent")

JSON = dict[str, Any]
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
STATUS_REPORT_SECONDS = 60
CAPACITY = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "32",
    "ephemeral-storage": "100Gi",
    GPU_RESOURCE: "8",
}


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class IPPool:
    """Loopback addresses 127.0.0.2 .. 127.0.0.254, one per pod (Linux routes all of 127/8 to lo)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used: set[str] = set()

    def take(self) -> str:
        with self.lock:
            for n in range(2, 255):
                ip = f"127.0.0.{n}"
                if ip not in self.used:
                    self.used.add(ip)
                    return ip
        raise RuntimeError("no free loopback pod IP left (253 pods on one node agent)")

    def release(self, ip: str) -> None:
        with self.lock:
            self.used.discard(ip)


class NodeAgent:
    def __init__(self, client: KubeClient, ctx: NodeContext) -> None:
        self.client = client
        self.ctx = ctx
        self.name = ctx.name
        self.workers: dict[str, PodWorker] = {}
        self.ips = IPPool()
        self.stop = threading.Event()
        self.wake = threading.Event()

    # -- node registration and heartbeats --

    def node_conditions(self) -> list[JSON]:
        t = now()
        conds = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return [
            {
                "type": ty,
                "status": st,
                "reason": r,
                "message": "node agent is posting ready status" if ty == "Ready" else "",
                "lastHeartbeatTime": t,
                "lastTransitionTime": self._since,
            }
            for ty, st, r in conds
        ]

    def register(self, kubelet_version: str) -> None:
        self._since = now()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    AGENT_NODE_LABEL: "true",
                    "nvidia.com/gpu.present": "true",
                },
            },
            "spec": {},
        }
        try:
            self.client.create("/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
        status = {
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "conditions": self.node_conditions(),
            "addresses": [
                {"type": "InternalIP", "address": self.ctx.host_ip},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": kubelet_version,
                "kubeProxyVersion": kubelet_version,
                "containerRuntimeVersion": "kubetune-node-agent://0.1",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.client.patch(f"/api/v1/nodes/{self.name}/status", {"status": status}, STRATEGIC_MERGE_PATCH)
        log.info("registered node %s", self.name)

    def renew_lease(self, client: KubeClient | None = None) -> None:
        client = client or self.client
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            client.patch(path, {"spec": spec})
        except ApiError as e:
            if e.status != 404:
                raise
            node = client.get(f"/api/v1/nodes/{self.name}")
            client.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.name,
                                "uid": node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": spec,
                },
            )

    def heartbeat_loop(self) -> None:
        # Each thread talks through its own client: a requests.Session is not meant to be shared by threads.
        client = KubeClient(self.client.creds)
        last_status = time.monotonic()
        while not self.stop.is_set():
            try:
                self.renew_lease(client)
                if time.monotonic() - last_status > STATUS_REPORT_SECONDS:
                    client.patch(
                        f"/api/v1/nodes/{self.name}/status",
                        {"status": {"conditions": self.node_conditions()}},
                        STRATEGIC_MERGE_PATCH,
                    )
                    last_status = time.monotonic()
            except Exception as e:  # keep beating through API server hiccups
                log.warning("heartbeat failed: %s", e)
            self.stop.wait(LEASE_RENEW_SECONDS)

    # -- pods --

    def watch_loop(self) -> None:
        """Wake the sync loop on every change to this node's pods; the sync itself lists (level-based)."""
        selector = f"spec.nodeName={self.name}"
        client = KubeClient(self.client.creds)
        while not self.stop.is_set():
            try:
                rv = client.get("/api/v1/pods", fieldSelector=selector, limit=1)["metadata"][
                    "resourceVersion"
                ]
                for _event in client.watch(
                    "/api/v1/pods", timeout_seconds=50, fieldSelector=selector, resourceVersion=rv
                ):
                    self.wake.set()
                    if self.stop.is_set():
                        return
            except Exception as e:
                if not self.stop.is_set():
                    log.debug("watch restarted: %s", e)
                    self.stop.wait(0.5)

    def sync(self) -> None:
        pods = self.client.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.name}").get("items", [])
        seen = set()
        new: list[PodWorker] = []
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    # Finished before this agent started: nothing to run, only a deletion to complete.
                    if pod["metadata"].get("deletionTimestamp"):
                        with contextlib.suppress(ApiError):
                            self.client.delete(
                                f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}",
                                {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                            )
                    continue
                worker = PodWorker(
                    KubeClient(self.client.creds),
                    pod,
                    node=self.ctx,
                    pod_ip=self.ips.take(),
                    release_ip=self.ips.release,
                )
                self.workers[uid] = worker
                new.append(worker)
            else:
                worker.update(pod)
        # Names first: a new pod's containers start with the hosts file that names its peers.
        self.publish_names(pods)
        for worker in new:
            worker.start()
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                worker.mark_gone()
            if not worker.is_alive():
                del self.workers[uid]

    def publish_names(self, pods: list[JSON]) -> None:
        """Give every pod the hosts file cluster DNS would answer from (pod_dns). Services are read only
        while some pod here has a subdomain."""
        known: list[PodRecord] = []
        if any((pod.get("spec") or {}).get("subdomain") for pod in pods):
            services = self.client.get("/api/v1/services").get("items", [])
            with_ips = [
                (pod, self.workers[pod["metadata"]["uid"]].pod_ip)
                for pod in pods
                if pod["metadata"]["uid"] in self.workers
            ]
            known = records(with_ips, services)
        for pod in pods:
            worker = self.workers.get(pod["metadata"]["uid"])
            if worker is not None and not worker.gone:
                try:
                    worker.set_hosts(known)
                except OSError as e:
                    log.warning("hosts file of %s: %s", pod["metadata"]["name"], e)

    def run(self) -> None:
        version = self.client.get("/version").get("gitVersion", "v0.0.0")
        self.register(str(version))
        self.renew_lease()
        threading.Thread(target=self.heartbeat_loop, daemon=True, name="heartbeat").start()
        threading.Thread(target=self.watch_loop, daemon=True, name="watch").start()
        while not self.stop.is_set():
            try:
                self.sync()
            except Exception as e:
                log.warning("sync failed: %s", e)
            self.wake.wait(2.0)
            self.wake.clear()
        self.shutdown()

    def shutdown(self) -> None:
        for worker in self.workers.values():
            worker.mark_gone()
        for worker in self.workers.values():
            worker.join(timeout=15)
        log.info("node agent %s stopped", self.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.cluster.node_agent", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cluster-dir", type=Path, required=True, help="the launcher's state directory")
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--kubeconfig", type=Path, help="default: <cluster-dir>/node-<name>.kubeconfig")
    parser.add_argument(
        "--images", type=Path, default=HERE / "images.yaml", help="image -> local entry point map"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter substituted for {python}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    if os.geteuid() != 0:
        print("error: the node agent needs root (it runs containers in mount namespaces)", file=sys.stderr)
        return 2

    kubeconfig = args.kubeconfig or args.cluster_dir / f"node-{args.node_name}.kubeconfig"
    creds = load_kubeconfig(kubeconfig)
    client = KubeClient(creds)
    host, _, port = creds.server.removeprefix("https://").partition(":")
    pythonpath = os.pathsep.join(str(REPO_ROOT / p) for p in ("operator", "trainer_image"))
    ctx = NodeContext(
        name=args.node_name,
        pods_dir=args.cluster_dir / "pods",
        images=ImageMap.load(args.images, args.python),
        pythonpath=pythonpath,
        service_env={
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port or "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": port or "443",
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
        },
        allocatable=CAPACITY,
        keep_paths=keep_paths(args.python),
    )
    agent = NodeAgent(client, ctx)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set() or agent.wake.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set() or agent.wake.set())
    agent.run()
    return 0


def keep_paths(python: str) -> list[Path]:
    """The host paths a container's process needs whatever the pod mounts: the checkout, the virtual
    environment, and the interpreter it was made from."""
    interpreter = Path(python)
    paths = [REPO_ROOT, interpreter.parent.parent, Path(os.path.realpath(interpreter)).parent.parent]
    return sorted({p.resolve() for p in paths})


if __name__ == "__main__":
    sys.exit(main())
