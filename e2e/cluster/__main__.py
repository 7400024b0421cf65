"""python -m e2e.cluster up|down|env|status [--name NAME]

up      boot the control plane, KWOK GPU nodes and the node agent (or report the running cluster)
down    stop exactly the processes the cluster recorded
env     print `export KUBECONFIG=...` lines for a shell: eval "$(python -m e2e.cluster env)"
status  print the cluster's processes, server and nodes as JSON
"""

from __future__ import annotations

import argparse
import json
import sys

from e2e.cluster.cluster import Cluster, ClusterError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "env", "status"])
    parser.add_argument(
        "--name", default="local", help="cluster name (state in ~/.cache/kubetune/clusters/NAME)"
    )
    parser.add_argument("--kwok-nodes", type=int, default=2, help="KWOK fake GPU nodes to register (up)")
    parser.add_argument("--agent-nodes", type=int, default=1, help="node agents that run pods locally (up)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness (up)")
    args = parser.parse_args(argv)
    cluster = Cluster(args.name)
    try:
        if args.command == "up":
            info = cluster.up(kwok_nodes=args.kwok_nodes, agent_nodes=args.agent_nodes, timeout=args.timeout)
            print(f"boot time: {info.boot_seconds:.1f}s")
            print(f"export KUBECONFIG={info.kubeconfig}")
        elif args.command == "down":
            cluster.down()
        elif args.command == "env":
            info = cluster.info()
            if info is None or not cluster.is_up():
                print(f"cluster {args.name} is not up; run: python -m e2e.cluster up", file=sys.stderr)
                return 1
            for key, value in info.env().items():
                print(f"export {key}={value}")
        else:
            print(json.dumps(cluster.status(), indent=1))
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
