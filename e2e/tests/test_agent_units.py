"""Pure parts of the node agent and the launcher: no cluster needed."""

from __future__ import annotations

import copy
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from e2e.cluster import pod_dns
from e2e.cluster.cluster import IDENTITIES
from e2e.cluster.pki import PKI
from e2e.cluster.pod_runtime import ConfigError, ImageMap, expand, field_value, quantity, resource_value

IMAGES = Path(__file__).resolve().parents[1] / "cluster" / "images.yaml"


@pytest.fixture
def images() -> ImageMap:
    return ImageMap.load(IMAGES, "/venv/bin/python")


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("cost: $5 $(A)", env) == "cost: $5 1"


def test_image_entrypoint_and_command_rules(images: ImageMap) -> None:
    assert images.resolve("kubetune/trainer:0.1.0", [], []) == (
        ["/venv/bin/python", "-m", "kubetune_trainer"],
        {"PYTHONUNBUFFERED": "1"},
    )
    argv, _ = images.resolve("ghcr.io/acme/kubetune/operator:1.2", [], ["--standalone"])
    assert argv == ["/venv/bin/python", "-m", "kubetune_operator", "--standalone"]
    assert images.resolve("busybox:1.36", [], [])[0] == ["sh"]
    assert images.resolve("busybox", ["sh", "-c"], ["echo hi"])[0] == ["sh", "-c", "echo hi"]
    assert images.resolve("python:3.11-slim", ["python", "-c", "1"], [])[0] == ["/venv/bin/python", "-c", "1"]


def test_unknown_image_names_the_config_file(images: ImageMap) -> None:
    with pytest.raises(ConfigError) as err:
        images.resolve("registry.example/unknown:1", [], [])
    assert err.value.reason == "ErrImagePull" and "images.yaml" in err.value.message


def test_field_refs() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
        "spec": {"nodeName": "agent-0", "serviceAccountName": "sa"},
    }
    assert field_value(pod, "status.podIP", "127.0.0.5", "127.0.0.1") == "127.0.0.5"
    assert field_value(pod, "metadata.labels['app']", "", "") == "x"
    assert field_value(pod, "spec.serviceAccountName", "", "") == "sa"
    with pytest.raises(ConfigError):
        field_value(pod, "status.phase", "", "")


def test_resource_field_refs() -> None:
    container = {"resources": {"limits": {"memory": "2Gi"}, "requests": {"cpu": "1500m"}}}
    assert resource_value(container, {"resource": "limits.memory", "divisor": "1Mi"}, {}) == "2048"
    assert resource_value(container, {"resource": "requests.cpu"}, {}) == "2"
    assert resource_value(container, {"resource": "limits.cpu"}, {"cpu": "16"}) == "16"
    assert quantity("250m") == pytest.approx(0.25)


def test_pki_identities_and_sans(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    pki.ensure(list(IDENTITIES.values()))
    serving = x509.load_pem_x509_certificate(pki.cert("apiserver").read_bytes())
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "kubernetes.default.svc"} <= set(sans.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    admin = x509.load_pem_x509_certificate(pki.cert("admin").read_bytes())
    orgs = [a.value for a in admin.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)]
    assert orgs == ["system:masters"]
    before = pki.ca_cert.read_bytes()
    pki.ensure(list(IDENTITIES.values()))
    assert pki.ca_cert.read_bytes() == before, "a second ensure must keep the CA"


def test_a_local_serving_cert_passes_a_tls_handshake_verified_against_the_cluster_ca(tmp_path: Path) -> None:
    """What Kueue's webhook and metrics servers are given: Python's TLS client, checking the chain and the
    host name 127.0.0.1, accepts a server presenting it."""
    pki = PKI(tmp_path)
    pki.ensure([])
    cert, key = pki.serving_cert("kueue-serving", "kueue-webhook")
    assert pki.serving_cert("kueue-serving", "kueue-webhook") == (cert, key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(pki.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(timeout=5)


# --- the cluster DNS stand-in (pod_dns) -----------------------------------------------------------------


def _pod(name: str, index: int | None = None, **status: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if index is not None:
        spec = {"hostname": f"job-trainer-{index}", "subdomain": "job-trainer"}
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": name, "labels": {"app": "t"}},
        "spec": spec,
        "status": status,
    }


HEADLESS = {
    "metadata": {"name": "job-trainer", "namespace": "ml"},
    "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "t"}},
}


def test_a_pod_under_a_headless_service_gets_the_names_cluster_dns_gives_it() -> None:
    pods = [(_pod("job-trainer-0-abcde", 0), "127.0.0.5"), (_pod("job-trainer-1-fghij", 1), "127.0.0.6")]
    known = pod_dns.records(pods, [HEADLESS])
    text = pod_dns.hosts_file(pods[1][0], "127.0.0.6", known)
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "127.0.0.6\tjob-trainer-1.job-trainer.ml.svc.cluster.local job-trainer-1" in lines
    assert (
        "127.0.0.5\tjob-trainer-0.job-trainer job-trainer-0.job-trainer.ml job-trainer-0.job-trainer.ml.svc "
        "job-trainer-0.job-trainer.ml.svc.cluster.local"
    ) in lines


@pytest.mark.parametrize(
    ("change", "published"),
    [
        ({}, True),
        ({"service": {"publishNotReadyAddresses": False}}, False),  # not Ready yet
        ({"service": {"clusterIP": "10.96.0.9"}}, False),  # not headless
        ({"service": {"selector": {"app": "other"}}}, False),
        ({"service_namespace": "other"}, False),
        ({"phase": "Failed"}, False),
        ({"deleted": True}, False),
    ],
)
def test_only_published_pods_have_a_record(change: dict[str, Any], published: bool) -> None:
    service = copy.deepcopy(HEADLESS)
    service["spec"].update(change.get("service", {}))
    service["metadata"]["namespace"] = change.get("service_namespace", "ml")
    pod = _pod("p", 0, phase=change.get("phase", "Running"))
    if change.get("deleted"):
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_dns.published(pod, [service]) is published


def test_a_pod_without_subdomain_knows_only_itself() -> None:
    pod = _pod("plain-pod")
    assert pod_dns.pod_hostname(pod) == "plain-pod"
    assert pod_dns.records([(pod, "127.0.0.9")], [HEADLESS]) == []
    assert pod_dns.hosts_file(pod, "127.0.0.9", []).splitlines()[-1] == "127.0.0.9\tplain-pod"


def test_hosts_are_rewritten_in_place_so_a_bind_mount_sees_the_change(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    assert pod_dns.write_in_place(path, "a much longer first text\n")
    inode = path.stat().st_ino
    assert pod_dns.write_in_place(path, "short\n")
    assert not pod_dns.write_in_place(path, "short\n")
    assert path.stat().st_ino == inode and path.read_text() == "short\n"
