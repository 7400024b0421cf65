"""The node agent's stand-in for cluster DNS: a hosts file per pod, bind-mounted at /etc/hosts in each of its
containers, and kept current as pods come and go.

It resolves what CoreDNS resolves for a pod with ``hostname`` and ``subdomain`` whose subdomain names a
headless Service that selects it: ``<hostname>.<subdomain>`` (also with ``.<namespace>``, ``.svc`` and
``.svc.cluster.local`` appended) -> the pod's IP, plus the pod's own hostname, as the kubelet writes it. The
Service must publish not-ready addresses or the pod must be Ready, as for an Endpoints entry; ended and
deleted pods drop out. Only the pods of this node agent are known (the local cluster has one node agent).

Each container also gets its own UTS namespace with the pod's hostname (pod_runtime), so
``socket.gethostname()`` inside it is the pod's hostname and resolves to the pod IP, as in a real pod.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
CLUSTER_DOMAIN = "cluster.local"
HOSTNAME_MAX = 63
LOCALHOST_LINES = ("127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback")


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    hostname: str
    subdomain: str | None
    ip: str


def pod_hostname(pod: JSON) -> str:
    """spec.hostname, else the pod's name cut to a DNS label, as the kubelet chooses it."""
    spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
    name = str(spec.get("hostname") or meta.get("name") or "")
    return name[:HOSTNAME_MAX].rstrip("-.")


def names_under(hostname: str, subdomain: str, namespace: str) -> list[str]:
    """The names a pod answers to under its subdomain, the shortest (what a peer in the namespace types)
    first."""
    short = f"{hostname}.{subdomain}"
    return [
        short,
        f"{short}.{namespace}",
        f"{short}.{namespace}.svc",
        f"{short}.{namespace}.svc.{CLUSTER_DOMAIN}",
    ]


def _ready(pod: JSON) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _selects(service: JSON, pod: JSON) -> bool:
    selector = (service.get("spec") or {}).get("selector") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def published(pod: JSON, services: Iterable[JSON]) -> bool:
    """The pod has an address record: its subdomain is a headless Service of its namespace that selects it,
    and the Service publishes not-ready addresses or the pod is Ready; ended and deleted pods have none."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    subdomain = spec.get("subdomain")
    if not subdomain or meta.get("deletionTimestamp"):
        return False
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return False
    for service in services:
        smeta, sspec = service.get("metadata") or {}, service.get("spec") or {}
        if smeta.get("namespace") != meta.get("namespace") or smeta.get("name") != subdomain:
            continue
        if sspec.get("clusterIP") != "None" or not _selects(service, pod):
            return False
        return bool(sspec.get("publishNotReadyAddresses")) or _ready(pod)
    return False


def records(pods_with_ips: Iterable[tuple[JSON, str]], services: list[JSON]) -> list[PodRecord]:
    """The address records of these pods (each with the IP the agent gave it)."""
    found = []
    for pod, ip in pods_with_ips:
        if published(pod, services):
            meta = pod.get("metadata") or {}
            found.append(
                PodRecord(str(meta.get("namespace")), pod_hostname(pod), str(pod["spec"]["subdomain"]), ip)
            )
    return found


def hosts_file(pod: JSON, ip: str, known: Iterable[PodRecord]) -> str:
    """/etc/hosts of one pod: localhost, its own hostname (fully qualified first when it has a subdomain, as
    the kubelet writes it), then every published pod of its namespace."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    namespace, hostname = str(meta.get("namespace")), pod_hostname(pod)
    lines = ["# written by the kubetune node agent (cluster DNS stand-in)", *LOCALHOST_LINES]
    own = [hostname]
    if spec.get("subdomain"):
        own = [names_under(hostname, str(spec["subdomain"]), namespace)[-1], hostname]
    lines.append(f"{ip}\t{' '.join(own)}")
    for record in sorted(known, key=lambda r: (r.hostname, r.ip)):
        if record.namespace == namespace and record.subdomain:
            lines.append(
                f"{record.ip}\t{' '.join(names_under(record.hostname, record.subdomain, namespace))}"
            )
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> bool:
    """Write ``text`` into ``path`` without replacing the file: a bind mount holds the inode, so a rename
    would leave the containers reading the old one. Returns whether the content changed."""
    data = text.encode()
    if path.exists() and path.read_bytes() == data:
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        # One write, then cut what is left of the old text; a reader in between sees the new lines first.
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return True
