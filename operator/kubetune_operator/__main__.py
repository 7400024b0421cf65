"""``python -m kubetune_operator``: run the operator (kopf) with JSON logs, /healthz and /metrics."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf

from kubetune_operator.config import (
    ENV_DEFAULT_S3_ENDPOINT,
    ENV_GPU_RESOURCE_NAME,
    ENV_SCRAPE_INTERVAL,
    ENV_TRAINER_IMAGE,
    ConfigError,
    OperatorConfig,
)
from kubetune_operator.handlers import Runtime, register_handlers, stop_work
from kubetune_operator.k8s_io import KubeIO, load_api_client
from kubetune_operator.leader import LeaderElector, default_identity
from kubetune_operator.operator_metrics import OperatorMetrics, serve_metrics

DEFAULT_HEALTH_PORT = 8080
DEFAULT_METRICS_PORT = 8000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_operator",
        description="Run the kubetune operator: turns FineTuneJobs (kubetune.io/v1alpha1) into trainer Jobs.",
        epilog=(
            f"Settings by environment: {ENV_TRAINER_IMAGE} (trainer image when a job sets none), "
            f"{ENV_DEFAULT_S3_ENDPOINT} (S3 endpoint when a job sets none), "
            f"{ENV_GPU_RESOURCE_NAME} (default nvidia.com/gpu), {ENV_SCRAPE_INTERVAL} (default 10). "
            "The API server is found through $KUBECONFIG or ~/.kube/config when present, the pod's service "
            "account otherwise. Servers bind $POD_IP when set, 0.0.0.0 otherwise."
        ),
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch this namespace (repeat for several); default: all namespaces",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch all namespaces (the default)"
    )
    replicas = parser.add_mutually_exclusive_group()
    replicas.add_argument(
        "--leader-election",
        metavar="LEASE",
        help="elect one active replica through this coordination.k8s.io Lease; the others wait on standby",
    )
    replicas.add_argument("--standalone", action="store_true", help="run as the only replica (the default)")
    parser.add_argument(
        "--leader-election-namespace",
        metavar="NS",
        help="namespace of the leader Lease (default: $POD_NAMESPACE, else the one --namespace)",
    )
    parser.add_argument(
        "--health-port", type=int, default=DEFAULT_HEALTH_PORT, help="port of /healthz (8080)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="port of /metrics (8000)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return parser


M_ARENA_MAX = -8
"""mallopt() parameter number of glibc's arena limit (malloc.h)."""
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas; returns whether the cap was set (False off glibc).

    glibc gives each allocating thread its own arena, up to eight per core, and memory freed in one arena
    is not reused by another. The reconcile threads each read whole API objects, so with the default the
    operator's RSS grows to several times the memory it actually holds. $MALLOC_ARENA_MAX, when set, wins."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def bind_host() -> str:
    return os.environ.get("POD_IP", "").strip() or "0.0.0.0"


def lease_namespace(args: argparse.Namespace) -> str | None:
    if args.leader_election_namespace:
        return str(args.leader_election_namespace)
    if os.environ.get("POD_NAMESPACE", "").strip():
        return os.environ["POD_NAMESPACE"].strip()
    if args.namespaces and len(args.namespaces) == 1:
        return str(args.namespaces[0])
    return None


@contextmanager
def standby_health(host: str, port: int) -> Iterator[None]:
    """/healthz while this replica waits on standby (kopf serves it once it runs): a standby is healthy."""

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path.split("?")[0] == "/healthz"
            body = b'{"standby": true}' if ok else b"not found"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:  # probes every few seconds: not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Healthz)
    thread = threading.Thread(target=server.serve_forever, name="kubetune-standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def lose_leadership(runtime: Runtime, why: str) -> None:
    """Another replica may be working already: stop at once and exit, to start again as a standby."""
    logging.getLogger("kubetune_operator.leader").error("%s; stopping this replica", why)
    stop_work(runtime)
    logging.shutdown()
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    namespace_of_lease = lease_namespace(args)
    if args.leader_election and namespace_of_lease is None:
        parser.error(
            "--leader-election needs the Lease's namespace: set --leader-election-namespace or $POD_NAMESPACE"
        )
    limit_malloc_arenas()
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        parser.error(str(exc))
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    host = bind_host()
    metrics = OperatorMetrics(retention_seconds=config.finished_series_retention_seconds)
    serve_metrics(metrics.registry, host, args.metrics_port)
    registry = kopf.OperatorRegistry()
    register_handlers(registry)
    runtime = Runtime(config=config, metrics=metrics)
    if args.leader_election and namespace_of_lease is not None:
        elector = LeaderElector(
            KubeIO(load_api_client(), config), namespace_of_lease, args.leader_election, default_identity()
        )
        runtime.leader = elector
        metrics.watch_leader(elector.is_leader)
        with standby_health(host, args.health_port):
            elector.acquire()
        elector.keep(lambda why: lose_leadership(runtime, why))
    url_host = f"[{host}]" if ":" in host else host
    kopf.run(
        registry=registry,
        clusterwide=not args.namespaces,
        namespaces=args.namespaces or (),
        standalone=True,
        liveness_endpoint=f"http://{url_host}:{args.health_port}/healthz",
        memo=kopf.Memo(runtime=runtime),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
