"""``python -m kubetune_operator``: run the operator (kopf) with JSON logs, /healthz and /metrics."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence

import kopf

from kubetune_operator.config import (
    ENV_DEFAULT_S3_ENDPOINT,
    ENV_GPU_RESOURCE_NAME,
    ENV_SCRAPE_INTERVAL,
    ENV_TRAINER_IMAGE,
    ConfigError,
    OperatorConfig,
)
from kubetune_operator.handlers import Runtime, register_handlers
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
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help="coordinate replicas through this kopf peering object (needs kopf's peering CRDs)",
    )
    peering.add_argument("--standalone", action="store_true", help="run as the only replica (the default)")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    url_host = f"[{host}]" if ":" in host else host
    kopf.run(
        registry=registry,
        clusterwide=not args.namespaces,
        namespaces=args.namespaces or (),
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=f"http://{url_host}:{args.health_port}/healthz",
        memo=kopf.Memo(runtime=Runtime(config=config, metrics=metrics, peering=args.peering)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
